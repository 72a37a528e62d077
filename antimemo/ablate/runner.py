"""Plan and run the cells x seeds of an ablation, each as its own ``antimemo fit`` process.

Layout of the output directory ``OUT``::

    OUT/ablation.json                      the plan (config, grid, seeds, every run's arguments)
    OUT/runs/<cell-id>/seed<S>/report.json the run's report (written only when the run succeeded)
    OUT/runs/<cell-id>/seed<S>/run.log     the run's stdout and stderr
    OUT/runs/<cell-id>/seed<S>/failed.json exit code and log tail of a failed attempt
    OUT/runs/<cell-id>/seed<S>/run.lock    while a child trains it: the child's pid and start time

A run is *finished* when its ``report.json`` exists and parses. The child writes its report to
``report.partial.json`` and the runner renames it to ``report.json`` after the child exited with
status 0, so a crash or Ctrl-C never leaves a half-written report: rerunning the same command
skips the finished runs and runs the rest (failed runs are retried).

Children die with the runner: each child leads its own process group (Ctrl-C and SIGTERM stop the
whole group) and, on Linux, is started through a tiny launcher that sets
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` before ``exec``-ing the training command, so that a runner
killed with SIGKILL takes its children with it (a SIGKILL cannot be caught, so nothing else would
stop them). The launcher replaces ``subprocess``'s ``preexec_fn``, which is unsafe when the parent
has threads. A rerun that finds a run's ``run.lock`` held by a live process (same pid *and* the
same start time in ``/proc``, so a reused pid does not count) does not start that run a second time.

The manifest, ``failed.json`` and the lock are written atomically (:mod:`antimemo._atomic`).

This module does not import Lightning (the children do).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antimemo._atomic import atomic_write_text
from antimemo.ablate.grid import (
    NONE,
    GridAxis,
    _get,
    callback_sections,
    cell_overrides,
    expand_grid,
    parse_fit_args,
    seed_keys,
    validate_grid,
)

__all__ = [
    "LOCK",
    "MANIFEST",
    "PARTIAL_REPORT",
    "REPORT",
    "Run",
    "RunOutcome",
    "default_command",
    "execute",
    "is_finished",
    "live_lock",
    "load_manifest",
    "plan_runs",
    "progress_postfix",
    "run_progress",
    "write_manifest",
]

#: File name of the plan inside ``OUT``.
MANIFEST = "ablation.json"
#: A finished run's report.
REPORT = "report.json"
#: Where the child writes its report (renamed to :data:`REPORT` on success).
PARTIAL_REPORT = "report.partial.json"
LOG = "run.log"
FAILED = "failed.json"
#: Held while a child trains the run (``{"pid", "start_time", "runner_pid", ...}``).
LOCK = "run.lock"


@dataclass
class Run:
    """One training run: a cell and a seed.

    Attributes:
        cell: cell id (the directory name).
        assignment: ``{grid key: value}`` of the cell.
        seed: the seed value ``S`` (directory ``seed<S>``).
        dir: the run directory.
        args: the ``antimemo fit`` arguments (without the command itself).
    """

    cell: str
    assignment: dict[str, str]
    seed: int
    dir: Path
    args: list[str] = field(default_factory=list)

    @property
    def report_path(self) -> Path:
        return self.dir / REPORT

    def to_json(self) -> dict[str, Any]:
        return {"cell": self.cell, "assignment": self.assignment, "seed": self.seed, "dir": str(self.dir), "args": self.args}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Run:
        return cls(str(data["cell"]), dict(data["assignment"]), int(data["seed"]), Path(data["dir"]), list(data["args"]))


@dataclass
class RunOutcome:
    """Counts of an :func:`execute` call and the failed runs."""

    finished: int = 0
    skipped: int = 0
    failed: list[Run] = field(default_factory=list)
    #: runs not started because a live process (another ``antimemo ablate``) holds their lock
    busy: list[Run] = field(default_factory=list)


def default_command() -> list[str]:
    """``[python, -m, antimemo.cli, fit]`` with this interpreter.

    Example:
        >>> default_command()[-2:]
        ['antimemo.cli', 'fit']
    """
    return [sys.executable, "-m", "antimemo.cli", "fit"]


def plan_runs(
    config: str | Sequence[str],
    axes: Sequence[GridAxis],
    out: str | os.PathLike[str],
    seeds: int = 1,
    seed_start: int = 0,
    seed_keys_: Sequence[str] | None = None,
    base_overrides: Sequence[str] = (),
    sections: Mapping[str, str] | None = None,
    parse: Callable[[Sequence[str]], Any] | None = None,
    validate: bool = True,
) -> list[Run]:
    """Validate the grid and list every run (cells in grid order, seeds innermost).

    Seed ``i`` (``0 <= i < seeds``) uses the value ``S = seed_start + i`` for every seed key of
    the cell's parsed config (default): ``seed_everything``, ``model.seed``, ``data.seed`` and
    the ``seed`` of each enabled callback section (goldfish hash, monitor probes, ...), so that
    seed ``S`` of every cell is reproducible and cells differ only in their grid values. A key
    set by the grid or by ``base_overrides`` is not overridden. With ``seed_start=0`` and the
    recipes' seeds (all 0), seed 0 is the recipe as it is.

    Args:
        config: recipe path(s).
        axes: the grid (:func:`~antimemo.ablate.grid.parse_grid`).
        out: output directory.
        seeds: number of seeds per cell (``>= 1``).
        seed_start: first seed value.
        seed_keys_: explicit seed keys (e.g. ``["seed_everything", "model.seed"]``); ``None``:
            all of the cell's seed keys (see above). Keys of a section that a cell turns off are
            dropped for that cell.
        base_overrides: ``antimemo fit`` arguments for every run (e.g. ``--trainer.max_epochs=10``).
        sections: callback sections (default: ``antimemo.sections.CALLBACK_SECTIONS``).
        parse: ``parse(args) -> config`` (default: the real ``antimemo fit`` parser).
        validate: check every key and value (:func:`~antimemo.ablate.grid.validate_grid`) and
            parse each cell's full arguments.

    Returns:
        The runs.

    Raises:
        ValueError: a bad key or value, naming it; ``seeds < 1``.

    Example:
        >>> runs = plan_runs("recipes/lm_goldfish.yaml", parse_grid(["goldfish.k=2,none"]),
        ...                  "runs/ablation", seeds=3)  # doctest: +SKIP
        >>> len(runs), runs[0].dir  # doctest: +SKIP
        (6, PosixPath('runs/ablation/runs/goldfish.k-2/seed0'))
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}; --seeds 3 runs every cell with seeds 0, 1, 2")
    if isinstance(seed_start, bool) or not isinstance(seed_start, int) or seed_start < 0:
        raise ValueError(f"--seed_start must be an integer >= 0, got {seed_start!r}")
    sections = callback_sections() if sections is None else dict(sections)
    parse = parse_fit_args if parse is None else parse
    configs = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    head = [arg for c in configs for arg in ("--config", str(c))]
    base_overrides = list(base_overrides)
    if validate:
        base = validate_grid([str(c) for c in configs], axes, base_overrides, sections=sections, parse=parse)
    else:
        base = parse([*head, *base_overrides])
    null_sections = {s for s in sections if _get(base, s) is None}
    explicit = {a.split("=", 1)[0].lstrip("-") for a in base_overrides if a.startswith("--")}
    out = Path(out)
    runs: list[Run] = []
    for cell in expand_grid(axes):
        overrides = cell_overrides(cell, sections, null_sections)
        cell_config = parse([*head, *base_overrides, *overrides]) if (validate or seed_keys_ is None) else base
        keys = list(seed_keys(cell_config, sections)) if seed_keys_ is None else list(seed_keys_)
        off = {s for s in sections if _get(cell_config, s) is None}
        keys = [
            k
            for k in keys
            if k not in explicit and k not in cell.as_dict() and k.split(".", 1)[0] not in off
            and not (cell.as_dict().get(k.split(".", 1)[0]) == NONE)
        ]
        for i in range(seeds):
            seed = seed_start + i
            run_dir = out / "runs" / cell.id / f"seed{seed}"
            args = [
                *head,
                "--trainer.enable_progress_bar=false",
                *base_overrides,
                *overrides,
                *(f"--{k}={seed}" for k in keys),
                f"--trainer.default_root_dir={run_dir}",
                f"--report_path={run_dir / PARTIAL_REPORT}",
            ]
            runs.append(Run(cell.id, cell.as_dict(), seed, run_dir, args))
    return runs


def write_manifest(out: str | os.PathLike[str], runs: Sequence[Run], **info: Any) -> Path:
    """Write ``OUT/ablation.json``: ``info`` (config, grid, seeds...) and every run.

    Example:
        >>> write_manifest("runs/ablation", runs, config="recipes/lm_goldfish.yaml")  # doctest: +SKIP
    """
    path = Path(out) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**info, "runs": [r.to_json() for r in runs]}
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def load_manifest(out: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Run]]:
    """Read ``OUT/ablation.json``: ``(info, runs)``.

    The manifest is data only: nothing in it is imported, called or executed (a rerun plans its
    runs from the command line, not from here); every field is type-checked.

    Raises:
        FileNotFoundError: no ablation in ``out``.
        ValueError: the file is not a valid manifest (naming the file, the field and the fix).
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out)!r}; run 'antimemo ablate --config ... --out {out}' first")
    fix = f"rerun 'antimemo ablate --config ... --out {out}' to rewrite it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{str(path)!r} is not an ablation manifest (no 'runs' list); {fix}")
    runs = []
    for i, item in enumerate(data.pop("runs")):
        problem = _run_problem(item)
        if problem:
            raise ValueError(f"{str(path)!r}: runs[{i}]: {problem}; {fix}")
        runs.append(Run.from_json(item))
    grid = data.get("grid", [])
    if not isinstance(grid, list) or not all(
        isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], list) for a in grid
    ):
        raise ValueError(f"{str(path)!r}: 'grid' must be a list of [key, [values...]] pairs, got {grid!r}; {fix}")
    return data, runs


def _run_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return f"expected an object, got {type(item).__name__}"
    for key, kind in (("cell", str), ("dir", str), ("assignment", dict), ("args", list)):
        if not isinstance(item.get(key), kind):
            return f"{key!r} must be a {kind.__name__}, got {item.get(key)!r}"
    if isinstance(item.get("seed"), bool) or not isinstance(item.get("seed"), int):
        return f"'seed' must be an integer, got {item.get('seed')!r}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in item["assignment"].items()):
        return f"'assignment' must map grid keys to string values, got {item['assignment']!r}"
    if not all(isinstance(a, str) for a in item["args"]):
        return f"'args' must be a list of strings, got {item['args']!r}"
    return None


def is_finished(run: Run) -> bool:
    """True when the run's ``report.json`` exists and is valid JSON."""
    try:
        json.loads(run.report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the antimemo package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------ children and their locks

#: Run as ``python -c _LAUNCHER RUNNER_PID COMMAND...``: ask the kernel to SIGKILL this process when
#: the runner dies, then become the training command (the pid stays the same).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('antimemo ablate: the runner exited before this run started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _launch_prefix() -> list[str]:
    """The launcher that ties a child's life to the runner's (Linux only; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return []
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid())]


def _start_time(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat`` field 22), ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: Any, start_time: Any = None) -> bool:
    """True when ``pid`` runs and, where ``/proc`` tells, is the process that started at ``start_time``."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        state = None
    if state in ("Z", "X"):  # a zombie is not running
        return False
    if start_time is not None:
        now = _start_time(pid)
        if now is not None and now != str(start_time):
            return False  # the pid was reused by another process
    return True


def live_lock(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock of a run that a live process holds (``None`` when free or stale).

    The lock names the training child (``pid``, ``start_time``) and the runner that started it
    (``runner_pid``, ``runner_start_time``); before the child exists only the runner is named.
    """
    path = Path(run_dir) / LOCK
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("pid") is not None:
        return info if _alive(info.get("pid"), info.get("start_time")) else None
    return info if _alive(info.get("runner_pid"), info.get("runner_start_time")) else None


def _acquire_lock(run_dir: Path) -> dict[str, Any] | None:
    """Take the run's lock for this runner; returns the live holder's lock instead when busy."""
    path = run_dir / LOCK
    mine = {"runner_pid": os.getpid(), "runner_start_time": _start_time(os.getpid()), "pid": None}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = live_lock(run_dir)
            if holder is not None:
                return holder
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(mine) + "\n")
        return None
    return live_lock(run_dir)  # pragma: no cover - lost a race twice


def _kill(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop a child and everything it started (it leads its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail_lines(path: Path, limit: int = 16384) -> tuple[str, list[str]]:
    """The first line of a text file and its last lines (read from the last ``limit`` bytes)."""
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8", "replace").strip()
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        tail = f.read().decode("utf-8", "replace").splitlines()
    return head, tail


def _latest_epoch(run_dir: Path, since: float = 0.0) -> int | None:
    """The latest 1-based epoch a child has reached, from files written since ``since``.

    Sources: the ``epoch`` column of ``metrics.csv`` (Lightning's ``CSVLogger``, its default logger
    without TensorBoard; the 0-based epoch being trained, written at every logged step) and the
    names of epoch-end checkpoints (``epoch=E-step=S.ckpt``: epoch ``E + 1`` done). ``None``
    when neither exists yet (another logger, no checkpoints).
    """
    import re

    best: int | None = None
    for path in run_dir.rglob("metrics.csv"):
        try:
            if path.stat().st_mtime < since:
                continue  # an earlier, failed attempt's file
            head, tail = _tail_lines(path)
        except OSError:
            continue
        columns = head.split(",")
        if "epoch" not in columns:
            continue
        col = columns.index("epoch")
        for line in reversed(tail):
            cells = line.split(",")
            if len(cells) == len(columns) and cells[col].strip():
                try:
                    epoch = int(float(cells[col])) + 1
                except ValueError:
                    continue
                best = epoch if best is None else max(best, epoch)
                break
    for path in run_dir.rglob("epoch=*.ckpt"):
        found = re.match(r"epoch=(\d+)", path.name)
        try:
            fresh = path.stat().st_mtime >= since
        except OSError:
            continue
        if found and fresh:
            best = int(found.group(1)) + 1 if best is None else max(best, int(found.group(1)) + 1)
    return best


def _max_epochs(run: Run) -> int | None:
    """``trainer.max_epochs`` of a run: from the ``config.yaml`` its child saved (LightningCLI's
    ``SaveConfigCallback``), else from a ``--trainer.max_epochs`` argument; ``None`` if unknown."""
    for path in sorted(run.dir.rglob("config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            import yaml

            value = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("trainer") or {}).get("max_epochs")
        except (OSError, ValueError, AttributeError, ImportError):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = None
    for i, arg in enumerate(run.args):  # the last one wins, as in the child's parser
        if arg.startswith("--trainer.max_epochs="):
            value = arg.split("=", 1)[1]
        elif arg == "--trainer.max_epochs" and i + 1 < len(run.args):
            value = run.args[i + 1]
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def run_progress(run: Run, since: float = 0.0) -> str | None:
    """``"epoch 3/60"``: the latest epoch a running child has reached (1-based, see
    :func:`_latest_epoch`) out of its ``max_epochs``; ``None`` before its first logged step.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); v = d / "lightning_logs" / "version_0"; v.mkdir(parents=True)
        >>> _ = (v / "metrics.csv").write_text("epoch,step,train_loss\\n0,15,2.5\\n2,47,2.1\\n")
        >>> run_progress(Run("k-2", {}, 0, d, ["--trainer.max_epochs=60"]))
        'epoch 3/60'
    """
    epoch = _latest_epoch(run.dir, since)
    if epoch is None:
        return None
    total = _max_epochs(run)
    return f"epoch {epoch}" if total is None else f"epoch {min(epoch, total)}/{total}"


def progress_postfix(running: Sequence[tuple[Run, float]], failed: int = 0) -> str:
    """The progress bar's postfix: ``"failed=1, k-2/seed0: epoch 3/60, k-4/seed0: starting"``.

    Args:
        running: ``(run, start time)`` of each running child (see :func:`run_progress`).
        failed: runs failed so far (shown when > 0).

    Example:
        >>> progress_postfix([(Run("k-2", {}, 0, Path("/nonexistent"), []), 0.0)], failed=1)
        'failed=1, k-2/seed0: starting'
    """
    parts = [f"failed={failed}"] if failed else []
    for run, since in running:
        parts.append(f"{run.cell}/seed{run.seed}: {run_progress(run, since) or 'starting'}")
    return ", ".join(parts)


def execute(
    runs: Sequence[Run],
    jobs: int = 1,
    command: Sequence[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
    poll_interval: float = 0.2,
) -> RunOutcome:
    """Run every unfinished run, ``jobs`` processes at a time, with an overall progress bar whose
    postfix shows each running child's epoch (``k-2/seed0: epoch 3/60``, :func:`run_progress`,
    refreshed every 2 s) and the failures so far.

    Each child is ``command + run.args`` (default ``python -m antimemo.cli fit ...``), started
    in its own process group with its stdout and stderr appended to ``<run dir>/run.log`` and
    ``OMP_NUM_THREADS=threads``; on Linux the kernel kills it if this process dies (even by
    SIGKILL). While it trains, ``<run dir>/run.lock`` holds its pid and start time: a run whose
    lock a live process holds (another ``antimemo ablate`` on the same ``OUT``, or a child that
    outlived a killed runner) is not started again but listed in ``RunOutcome.busy``. On success (exit status 0 and a report written) the report is
    renamed to ``report.json``; otherwise ``failed.json`` records the exit status and the log's
    tail, and the run is retried next time.

    On ``KeyboardInterrupt`` (Ctrl-C) every running child's process group is terminated
    (SIGTERM, then SIGKILL after 5 s), finished runs are left as they are, and the interrupt is
    re-raised.

    Args:
        runs: from :func:`plan_runs` (or :func:`load_manifest`).
        jobs: parallel processes (``>= 1``).
        command: the command before the run's arguments (default :func:`default_command`).
        threads: torch threads per process (default ``max(1, cpu_count // jobs)``).
        progress: show a ``tqdm`` bar (on stderr).
        poll_interval: seconds between checks of the running children.

    Returns:
        A :class:`RunOutcome`.

    Example:
        >>> outcome = execute(plan_runs(...), jobs=2)  # doctest: +SKIP
        >>> outcome.finished, outcome.skipped, len(outcome.failed)  # doctest: +SKIP
        (4, 2, 0)
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}; --jobs 2 runs two trainings at a time")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    command = default_command() if command is None else list(command)
    env = _child_env(threads)
    outcome = RunOutcome()
    pending = []
    for run in runs:
        if is_finished(run):
            outcome.skipped += 1
        else:
            pending.append(run)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), initial=outcome.skipped, desc="ablate", unit="run", dynamic_ncols=True)
    active: list[tuple[subprocess.Popen[Any], Run, Any]] = []
    started: dict[int, float] = {}  # id(run) -> when its child started (older files are a failed attempt's)
    last_postfix = [0.0]

    def show(force: bool = False) -> None:
        """The bar's postfix: failures, then each running child's epoch (every 2 s at most)."""
        if bar is None or (not force and time.monotonic() - last_postfix[0] < 2.0):
            return
        last_postfix[0] = time.monotonic()
        bar.set_postfix_str(progress_postfix(
            [(r, started.get(id(r), 0.0)) for _, r, _ in active], len(outcome.failed)), refresh=True)

    launcher = _launch_prefix()

    def start(run: Run) -> None:
        run.dir.mkdir(parents=True, exist_ok=True)
        holder = _acquire_lock(run.dir)
        if holder is not None:
            pid = holder.get("pid") or holder.get("runner_pid")
            outcome.busy.append(run)
            message = (
                f"ablate: run {run.cell}/seed{run.seed} is still being trained by process {pid} "
                f"(lock {run.dir / LOCK}); not starting it twice. Wait for it to finish, or stop it "
                f"(kill {pid}), then rerun the same command"
            )
            (bar.write(message) if bar is not None else print(message, file=sys.stderr))
            if bar is not None:
                bar.update(1)
            return
        for stale in (run.dir / PARTIAL_REPORT, run.dir / FAILED):
            stale.unlink(missing_ok=True)
        log = open(run.dir / LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        log.write(f"\n$ {' '.join(command + run.args)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                launcher + command + run.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        except BaseException:
            log.close()
            (run.dir / LOCK).unlink(missing_ok=True)
            raise
        atomic_write_text(run.dir / LOCK, json.dumps({
            "pid": proc.pid, "start_time": _start_time(proc.pid), "runner_pid": os.getpid(),
            "runner_start_time": _start_time(os.getpid()), "command": command + run.args,
        }) + "\n")
        started[id(run)] = time.time() - 1.0  # file times have coarse resolution on some filesystems
        active.append((proc, run, log))

    def finish(proc: subprocess.Popen[Any], run: Run, log: Any) -> None:
        log.close()
        (run.dir / LOCK).unlink(missing_ok=True)
        partial = run.dir / PARTIAL_REPORT
        ok = proc.returncode == 0 and partial.is_file()
        if ok:
            try:
                json.loads(partial.read_text(encoding="utf-8"))
            except ValueError:
                ok = False
        if ok:
            os.replace(partial, run.report_path)
            outcome.finished += 1
        else:
            reason = f"exit status {proc.returncode}" if proc.returncode != 0 else f"no valid {PARTIAL_REPORT} written"
            atomic_write_text(
                run.dir / FAILED,
                json.dumps({"returncode": proc.returncode, "reason": reason, "log_tail": _tail(run.dir / LOG)}, indent=2) + "\n",
            )
            outcome.failed.append(run)
            message = f"ablate: run {run.cell}/seed{run.seed} failed ({reason}); log: {run.dir / LOG}"
            (bar.write(message) if bar is not None else print(message, file=sys.stderr))
        if bar is not None:
            bar.update(1)

    queue = list(pending)
    try:
        while queue or active:
            while queue and len(active) < jobs:
                start(queue.pop(0))
            time.sleep(poll_interval if active else 0)
            still = []
            for proc, run, log in active:
                if proc.poll() is None:
                    still.append((proc, run, log))
                else:
                    finish(proc, run, log)
            changed = len(still) != len(active)
            active[:] = still
            show(force=changed)
    except BaseException:
        for proc, run, log in active:
            _kill(proc)
            log.close()
            (run.dir / LOCK).unlink(missing_ok=True)
        active.clear()
        raise
    finally:
        if bar is not None:
            bar.close()
    return outcome
