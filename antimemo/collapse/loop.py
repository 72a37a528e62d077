"""The recursive-training loop of ``antimemo recursive`` (model collapse: replace, accumulate, filter).

Layout of the output directory ``OUT``::

    OUT/recursive.json                          the plan (config, generations, mixes, seeds, settings)
    OUT/data/real_train.npy, real_val.npy       the recipe's real training and held-out splits
    OUT/runs/gen0/seed<S>/                      generation 0 (real data; shared by every mix)
    OUT/runs/<mix>/seed<S>/synthetic/gen<g>.npy the watermarked samples of generation g-1's model
                                                (images for a diffusion recipe; labels in gen<g>_labels.npy)
    OUT/runs/<mix>/seed<S>/gen<g>/              generation g >= 1: fit.yaml, train.npy, report.json, ...
    OUT/generations.csv, summary.md, collapse.png

Every fit is an ``antimemo fit`` subprocess run by :func:`antimemo.ablate.runner.execute` (its
own run dir, ``report.json`` renamed into place on success, a lock, ``failed.json`` on failure):
a finished generation is never re-run, a crashed one is retried by the same command. Every file
is written atomically. This module does not import Lightning (the children and the sampling step
import the recipe's classes by their class paths).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antimemo._atomic import atomic_write_bytes, atomic_write_text
from antimemo.ablate.runner import PARTIAL_REPORT, REPORT, Run, execute, is_finished

__all__ = [
    "DEFAULTS",
    "MIXES",
    "CollapsePlan",
    "final_checkpoint",
    "generation_config",
    "load_recipe",
    "parse_mixes",
    "run_recursive",
    "write_outputs",
]

#: The mixing policies: what generation g >= 1 trains on.
MIXES = ("replace", "accumulate", "filter")
#: What a recipe trains on: token rows (an LM recipe) or images (a diffusion recipe, :mod:`antimemo.collapse.images`).
MODALITIES = ("tokens", "images")
#: Defaults of the recipe's ``recursive:`` section (each also a CLI flag).
DEFAULTS: dict[str, Any] = {
    "samples": None,          # synthetic sequences per generation; None: as many as real training sequences
    "prompt_length": 8,       # real training prefix tokens each sample continues
    "temperature": 1.0,
    "gamma": 0.25,            # watermark green fraction
    "delta": 4.0,             # watermark bias: strong, so that the filter finds (nearly) every sample on bytes
    "key": 15485863,          # watermark secret key
    "context_width": 1,
    "z_threshold": 4.0,       # WatermarkFilter's flagging threshold
    "diversity": {},          # DiversityMonitor arguments (num_samples, num_tokens, ...)
}
METRIC_COLUMNS = (
    "val_loss", "diversity/distinct_1", "diversity/distinct_2", "diversity/distinct_3", "diversity/distinct_4",
    "diversity/entropy_2", "diversity/tail_coverage", "diversity/tail_probability_coverage", "exact_match",
    "watermark/filtered_fraction",
)  # fmt: skip
COLUMNS = (
    "generation", "mix", "seed", *METRIC_COLUMNS, "train_items", "real_items", "synthetic_items",
    "synthetic_flagged", "train_wall_time_s", "run_dir",
)  # fmt: skip
PLOTTED = ("val_loss", "diversity/distinct_2", "diversity/distinct_4", "diversity/tail_coverage", "exact_match")


def parse_mixes(text: str | Sequence[str]) -> list[str]:
    """``"replace,filter"`` -> ``["replace", "filter"]`` (checked, duplicates removed).

    Example:
        >>> parse_mixes("replace, filter")
        ['replace', 'filter']
        >>> parse_mixes("keep")
        Traceback (most recent call last):
        ...
        ValueError: --mix: unknown policy 'keep'; choose from replace, accumulate, filter (comma-separated, e.g. --mix replace,accumulate)
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    mixes: list[str] = []
    for part in (p.strip() for p in parts):
        if part not in MIXES:
            raise ValueError(f"--mix: unknown policy {part!r}; choose from {', '.join(MIXES)} "
                             "(comma-separated, e.g. --mix replace,accumulate)")
        if part not in mixes:
            mixes.append(part)
    if not mixes:
        raise ValueError("--mix: no policy given; e.g. --mix replace,accumulate,filter")
    return mixes


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe as a dict (``yaml.safe_load``); its ``recursive:`` section stays in it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: {str(p)!r} does not exist; e.g. --config recipes/lm_collapse.yaml")
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(p)!r} is not a YAML mapping of config sections")
    return data


def _init_args(section: Any) -> dict[str, Any]:
    """The argument dict of a config section (``init_args:`` when it has a ``class_path``)."""
    if not isinstance(section, dict):
        return {}
    if "class_path" in section:
        section.setdefault("init_args", {})
        return section["init_args"]
    return section


@dataclass
class CollapsePlan:
    """Everything the loop needs: the recipe, the choices and the derived settings."""

    config_path: str
    recipe: dict[str, Any]
    out: Path
    generations: int
    mixes: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    modality: str = "tokens"

    @property
    def metric_columns(self) -> tuple[str, ...]:
        from antimemo.collapse.images import IMAGE_METRICS

        return IMAGE_METRICS if self.modality == "images" else METRIC_COLUMNS

    @property
    def columns(self) -> tuple[str, ...]:
        tail = COLUMNS[len(METRIC_COLUMNS) + 3 :]
        if self.modality == "images":  # no image watermark: nothing is flagged
            tail = tuple(c for c in tail if c != "synthetic_flagged")
        return ("generation", "mix", "seed", *self.metric_columns, *tail)

    @property
    def real_train(self) -> Path:
        return self.out / "data" / "real_train.npy"

    @property
    def real_val(self) -> Path:
        return self.out / "data" / "real_val.npy"

    def run_dir(self, mix: str, seed: int, generation: int) -> Path:
        if generation == 0:
            return self.out / "runs" / "gen0" / f"seed{seed}"
        return self.out / "runs" / mix / f"seed{seed}" / f"gen{generation}"

    def synthetic_path(self, mix: str, seed: int, generation: int) -> Path:
        return self.out / "runs" / mix / f"seed{seed}" / "synthetic" / f"gen{generation}.npy"

    def training_parts(self, mix: str, seed: int, generation: int) -> list[Path]:
        """The token files generation ``generation`` trains on, in order."""
        if generation == 0:
            return [self.real_train]
        synthetic = [self.synthetic_path(mix, seed, g) for g in range(1, generation + 1)]
        if mix == "replace":
            return synthetic[-1:]
        return [self.real_train, *synthetic]  # accumulate, filter (the filter drops the watermarked rows)

    def train_file(self, mix: str, seed: int, generation: int) -> Path:
        """The concatenation of :meth:`training_parts` that generation ``generation``'s fit reads."""
        return self.run_dir(mix, seed, generation) / "train.npy"


def generation_config(plan: CollapsePlan, mix: str, seed: int, generation: int, train_file: Path) -> dict[str, Any]:
    """The ``antimemo fit`` config of one generation: the recipe with its ``data:`` replaced by a
    ``TokenFileDataModule`` (``train_file``; the REAL held-out split for validation), its seeds set
    to ``seed``, and a ``DiversityMonitor`` (plus ``WatermarkFilter(policy="drop")`` for ``filter``
    at generation >= 1) appended to ``trainer.callbacks``. For a diffusion recipe ``data:`` is an
    ``ImageFileDataModule`` and nothing is appended (its ``replica_monitor:`` measures)."""
    cfg = copy.deepcopy(plan.recipe)
    cfg.pop("recursive", None)
    data = _init_args(cfg.get("data"))
    if plan.modality == "images":
        from antimemo.collapse.images import data_section

        cfg["data"] = data_section(plan.recipe, train_file, plan.real_val)
    else:
        cfg["data"] = {"class_path": "antimemo.lm.token_files.TokenFileDataModule", "init_args": {
            "train": str(train_file), "val": str(plan.real_val), "seq_len": data.get("seq_len"),
            "batch_size": data.get("batch_size", 8),
        }}
    cfg["seed_everything"] = seed
    model = _init_args(cfg.setdefault("model", {}))
    model["seed"] = seed
    for name in ("monitor", "replica_monitor"):
        if isinstance(cfg.get(name), dict):
            _init_args(cfg[name])["seed"] = seed
    trainer = cfg.setdefault("trainer", {})
    run_dir = plan.run_dir(mix, seed, generation)
    trainer["default_root_dir"] = str(run_dir)
    if plan.modality == "images":
        return cfg  # the recipe's replica_monitor measures FID, Vendi and the replica rate
    every = int(trainer.get("check_val_every_n_epoch", 1) or 1)
    diversity = {"every_n_epochs": every, "seed": seed, **plan.settings.get("diversity", {})}
    if "vocab_size" in model and "vocab_size" not in diversity:
        diversity["vocab_size"] = model["vocab_size"]
    callbacks = list(trainer.get("callbacks") or [])
    callbacks.append({"class_path": "antimemo.callbacks.diversity_monitor.DiversityMonitor", "init_args": diversity})
    if mix == "filter" and generation >= 1:
        s = plan.settings
        callbacks.append({"class_path": "antimemo.callbacks.watermark_filter.WatermarkFilter", "init_args": {
            "gamma": s["gamma"], "key": s["key"], "context_width": s["context_width"], "policy": "drop",
            "z_threshold": s["z_threshold"],
        }})
    trainer["callbacks"] = callbacks
    return cfg


def final_checkpoint(run_dir: Path) -> Path:
    """The newest ``.ckpt`` under a finished run (Lightning's ``ModelCheckpoint`` saves the last epoch)."""
    ckpts = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(
            f"no .ckpt under {str(run_dir)!r}; the recursive loop needs trainer.enable_checkpointing: true in the "
            "recipe (the next generation samples from the final checkpoint)"
        )
    return ckpts[-1]


def _copy_shared_draw(plan: CollapsePlan, mix: str, seed: int, path: Path) -> bool:
    """Generation 1 of every mix samples the shared generation-0 model with the same seed: reuse a
    draw another mix already made (byte for byte what sampling again would give). Returns whether one was."""
    for other in MIXES:
        source = plan.synthetic_path(other, seed, 1)
        if other != mix and source.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            if plan.modality == "images":
                from antimemo.collapse.image_files import labels_path

                atomic_write_bytes(labels_path(path), labels_path(source).read_bytes())  # labels first (see save_images)
            atomic_write_bytes(path, source.read_bytes())
            return True
    return False


def _sample(plan: CollapsePlan, mix: str, seed: int, generation: int, path: Path, progress: bool = True) -> None:
    """Draw generation ``generation``'s synthetic data from generation ``generation - 1``'s final checkpoint."""
    import numpy as np
    import torch

    from antimemo.collapse.synth import GreenListProcessor, load_checkpoint_model, sample_synthetic, save_tokens

    s = plan.settings
    if generation == 1 and _copy_shared_draw(plan, mix, seed, path):
        return
    module = load_checkpoint_model(final_checkpoint(plan.run_dir(mix, seed, generation - 1)), plan.recipe)
    draw_seed = seed * 1_000_003 + generation
    if plan.modality == "images":
        from antimemo.collapse.images import sample_images, save_images

        m = s["samples"] or int(np.load(plan.real_train, mmap_mode="r", allow_pickle=False).shape[0])
        images, labels = sample_images(module, m, seed=draw_seed * 1_000_003, progress=progress)
        save_images(path, images, labels)
        return
    real = torch.from_numpy(np.load(plan.real_train, allow_pickle=False))
    m = s["samples"] or real.shape[0]
    prompts = real[torch.arange(m) % real.shape[0], : s["prompt_length"]]
    vocab = getattr(getattr(getattr(module, "model", None), "config", None), "vocab_size", None)
    proc = GreenListProcessor(gamma=s["gamma"], delta=s["delta"], key=s["key"],
                              context_width=s["context_width"], vocab_size=vocab)
    lm = getattr(module, "model", module)
    rows = sample_synthetic(lm, prompts, real.shape[1], proc, seed=draw_seed, temperature=s["temperature"])
    save_tokens(path, rows)


def _write_train_file(plan: CollapsePlan, parts: list[Path], train_file: Path) -> list[int]:
    """Concatenate ``parts`` (in order) into ``train_file`` unless it exists; returns each part's item count."""
    import numpy as np

    if plan.modality == "images":
        from antimemo.collapse.images import load_images, save_images

        arrays = [load_images(p) for p in parts]
        if not train_file.is_file():
            save_images(train_file, np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
        return [a[0].shape[0] for a in arrays]
    from antimemo.collapse.synth import save_tokens

    tokens = [np.load(p, allow_pickle=False) for p in parts]
    if not train_file.is_file():
        save_tokens(train_file, np.concatenate(tokens, axis=0))
    return [a.shape[0] for a in tokens]


def _prepare_generation(plan: CollapsePlan, mix: str, seed: int, generation: int, progress: bool = True) -> dict[str, Any]:
    """Sample generation ``g``'s synthetic data (if not on disk), write its training file and config."""
    run_dir = plan.run_dir(mix, seed, generation)
    run_dir.mkdir(parents=True, exist_ok=True)
    if generation >= 1:
        synth = plan.synthetic_path(mix, seed, generation)
        if not synth.is_file():
            _sample(plan, mix, seed, generation, synth, progress)
    parts = plan.training_parts(mix, seed, generation)
    train_file = plan.train_file(mix, seed, generation)
    counts = _write_train_file(plan, parts, train_file)
    cfg = generation_config(plan, mix, seed, generation, train_file)
    import yaml

    config_file = run_dir / "fit.yaml"
    atomic_write_text(config_file, yaml.safe_dump(cfg, sort_keys=False))
    real_items = sum(n for p, n in zip(parts, counts) if p == plan.real_train)
    return {"config_file": config_file, "train_items": sum(counts), "real_items": real_items}


def _info(plan: CollapsePlan, mix: str, seed: int, generation: int) -> dict[str, Any]:
    """Row facts of a generation that do not come from its report (counts, watermark detection)."""
    import numpy as np

    from antimemo.collapse.synth import watermark_flags

    s = plan.settings
    parts = plan.training_parts(mix, seed, generation)
    real = synthetic = flagged = 0
    for p in parts:
        a = np.load(p, mmap_mode="r" if plan.modality == "images" else None, allow_pickle=False)
        if p == plan.real_train:
            real += a.shape[0]
        else:
            synthetic += a.shape[0]
            if plan.modality == "tokens":
                flagged += int(watermark_flags(a, s["gamma"], s["key"], s["context_width"], s["z_threshold"]).sum())
    return {"train_items": real + synthetic, "real_items": real, "synthetic_items": synthetic,
            "synthetic_flagged": flagged if plan.modality == "tokens" else None}


def _row(plan: CollapsePlan, mix: str, seed: int, generation: int) -> dict[str, Any]:
    run_dir = plan.run_dir(mix, seed, generation)
    report = json.loads((run_dir / REPORT).read_text(encoding="utf-8"))
    metrics = report.get("metrics") or {}
    row: dict[str, Any] = {"generation": generation, "mix": mix, "seed": seed}
    for key in plan.metric_columns:
        row[key] = report.get(key) if key in ("val_loss", "exact_match") else metrics.get(key)
    row.update(_info(plan, mix, seed, generation))
    row["train_wall_time_s"] = report.get("train_wall_time_s")
    row["run_dir"] = str(run_dir)
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(xs) / len(xs) if xs else None


def write_outputs(plan: CollapsePlan, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write ``generations.csv``, ``summary.md`` and ``collapse.png`` (atomically)."""
    out = plan.out
    buffer = io.StringIO()
    columns = plan.columns
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    paths = {"csv": atomic_write_text(out / "generations.csv", buffer.getvalue())}

    if plan.modality == "images":
        from antimemo.collapse.images import IMAGE_METRICS, IMAGE_PLOTTED

        shown: tuple[str, ...] = (*IMAGE_METRICS, "real_items", "synthetic_items")
        plotted = IMAGE_PLOTTED
        note = ("`val_loss` is the denoising loss and `replication/fid` the FID against the REAL held-out images; "
                "`replication/rate` counts samples above the replica threshold against the generation's own "
                "training images")
    else:
        shown = ("val_loss", "diversity/distinct_2", "diversity/distinct_4", "diversity/tail_coverage", "exact_match",
                 "watermark/filtered_fraction", "synthetic_items", "synthetic_flagged")
        plotted = PLOTTED
        note = "`val_loss` is the loss on the REAL held-out split"
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["mix"], row["generation"]), []).append(row)
    n_seeds = len(plan.seeds)
    lines = [
        "# Recursive training (antimemo recursive)", "",
        f"Config `{plan.config_path}`, {plan.generations} generation{'s' if plan.generations != 1 else ''} "
        f"(0 = real data), mix {', '.join(plan.mixes)}, {n_seeds} seed{'s' if n_seeds != 1 else ''} "
        f"(mean over seeds). {note}.", "",
        "| mix | generation | " + " | ".join(shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for (mix, gen), group in groups.items():
        cells = [_fmt(_mean([r.get(k) for r in group])) if _mean([r.get(k) for r in group]) is not None else "n/a" for k in shown]
        lines.append(f"| {mix} | {gen} | " + " | ".join(cells) + " |")
    lines += ["", "Per-seed rows: `generations.csv`; plot: `collapse.png`.", ""]
    paths["summary"] = atomic_write_text(out / "summary.md", "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = _sample_grids(plan) if plan.modality == "images" else []
    fig = plt.figure(figsize=(4 * len(plotted), 3.4 + (2.2 if grids else 0)))
    spec = fig.add_gridspec(2 if grids else 1, 1, height_ratios=[3.4, 2.2] if grids else None)
    axes = [spec[0].subgridspec(1, len(plotted)).subplots(squeeze=False)[0]]
    if grids:
        for ax, (title, labels, grid) in zip(spec[1].subgridspec(1, len(grids)).subplots(squeeze=False)[0], grids):
            ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            step = grid.shape[0] / len(labels)
            ax.set_yticks([step * (i + 0.5) for i in range(len(labels))], labels)
            ax.set_xticks([])
            ax.set_title(title)
    for ax, key in zip(axes[0], plotted):
        for mix in plan.mixes:
            xs, ys = [], []
            for gen in range(plan.generations):
                value = _mean([r.get(key) for r in groups.get((mix, gen), [])])
                if value is not None:
                    xs.append(gen)
                    ys.append(value)
            ax.plot(xs, ys, marker="o", label=mix)
        ax.set_title(key)
        ax.set_xlabel("generation")
        ax.set_xticks(range(plan.generations))
    axes[0][0].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    paths["plot"] = atomic_write_bytes(out / "collapse.png", png.getvalue())
    return paths


def _sample_grids(plan: CollapsePlan) -> list[tuple[str, list[str], Any]]:
    """Per mix (first seed): the first 10 synthetic images drawn from each generation's model."""
    from antimemo.collapse.images import sample_grid

    seed, grids = plan.seeds[0], []
    for mix in plan.mixes:
        gens = [g for g in range(1, plan.generations) if plan.synthetic_path(mix, seed, g).is_file()]
        grid = sample_grid([plan.synthetic_path(mix, seed, g) for g in gens])
        if grid is not None:
            grids.append((f"{mix}: samples of each generation's model (seed {seed})", [f"gen {g - 1}" for g in gens], grid))
    return grids


def run_recursive(plan: CollapsePlan, threads: int | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Run every generation of every (mix, seed) in order, then write the outputs.

    Returns:
        ``(rows, failures)``: one row per generation x mix x seed that finished, and a line per
        failed or busy run (its later generations are not run).
    """
    plan.out.mkdir(parents=True, exist_ok=True)
    if threads is not None:  # the sampling here runs with the children's thread count
        import torch

        torch.set_num_threads(threads)
    atomic_write_text(plan.out / "recursive.json", json.dumps({
        "config": plan.config_path, "generations": plan.generations, "mixes": plan.mixes, "seeds": plan.seeds,
        "settings": plan.settings, "modality": plan.modality,
    }, indent=2, default=str) + "\n")
    if not (plan.real_train.is_file() and plan.real_val.is_file()):
        if plan.modality == "images":
            from antimemo.collapse.images import export_real_images as export
        else:
            from antimemo.collapse.synth import export_real_data as export
        export(plan.recipe, plan.real_train, plan.real_val)
    alive = [(mix, seed) for mix in plan.mixes for seed in plan.seeds]
    failures: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.generations, desc="recursive", unit="generation", dynamic_ncols=True)
    try:
        for gen in range(plan.generations):
            runs: dict[Path, Run] = {}
            owners: dict[Path, list[tuple[str, int]]] = {}
            for mix, seed in alive:
                run_dir = plan.run_dir(mix, seed, gen)
                owners.setdefault(run_dir, []).append((mix, seed))
                if run_dir in runs:
                    continue  # generation 0 is shared by every mix
                run = Run(f"{'gen0' if gen == 0 else mix}/gen{gen}", {"mix": mix, "generation": str(gen)}, seed, run_dir)
                if not is_finished(run):
                    info = _prepare_generation(plan, mix, seed, gen, progress)
                    run.args = ["--config", str(info["config_file"]), "--trainer.enable_progress_bar=false",
                                f"--report_path={run_dir / PARTIAL_REPORT}"]
                runs[run_dir] = run
            outcome = execute(list(runs.values()), jobs=1, threads=threads, progress=False)
            bad = {r.dir for r in outcome.failed} | {r.dir for r in outcome.busy}
            for run_dir in bad:
                failures.append(f"generation {gen} in {run_dir} did not finish (see {run_dir / 'run.log'}); "
                                "rerun the same command to retry it")
                alive = [o for o in alive if o not in owners[run_dir]]
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"trained {outcome.finished}, skipped {outcome.skipped}, failed {len(bad)}")
            if not alive:
                break
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for mix in plan.mixes:
        for seed in plan.seeds:
            for gen in range(plan.generations):
                if is_finished(Run("", {}, seed, plan.run_dir(mix, seed, gen))):
                    rows.append(_row(plan, mix, seed, gen))
    rows.sort(key=lambda r: (r["generation"], plan.mixes.index(r["mix"]), r["seed"]))
    write_outputs(plan, rows)
    return rows, failures
