"""The memorization report printed after ``antimemo fit`` and written as ``report.json``.

A report is a plain ``dict`` (JSON-serialisable) so that later tooling (ablations, plots) can read
it back with ``json.load``. Keys:

- ``goldfish``: ``None`` (off) or ``{"k", "h", "seed"}``.
- ``exact_match``, ``token_match``, ``near_verbatim``: the last ``MemorizationMonitor`` evaluation
  (``None`` when no monitor ran), and ``memorization_after_epochs`` (epochs completed when it was
  measured; equal to ``epochs`` when the final model was measured).
- ``val_loss``: held-out loss of the last validation; ``best_val_loss``: the lowest one seen.
- ``train_loss``: mean training loss of the last epoch (over the targets trained on: goldfish-dropped
  targets are excluded).
- ``num_probes``, ``prefix_length``, ``suffix_length``: the probe protocol.
- ``train_wall_time_s``, ``global_step``, ``epochs``, ``num_parameters``.
- ``metrics``: every scalar in ``trainer.callback_metrics`` (MIA figures included).
- ``dp_guarantee``: ``None`` without ``DifferentialPrivacy``; otherwise the callback's
  :meth:`~antimemo.callbacks.DifferentialPrivacy.guarantee`: ``epsilon``, ``delta``, ``accountant``,
  ``private_steps``, ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``dataset_size``,
  ``unit``, ``noise`` / ``reproducible_noise`` (whether anyone with the seed can regenerate the
  noise), ``nonprivate_start`` / ``nonprivate_steps`` (steps trained without DP before the private
  start, which epsilon does not cover) and ``statement``. The printed table never shows epsilon
  without these.
- ``kind``: ``"diffusion"`` when a ``ReplicaMonitor`` ran and no ``MemorizationMonitor``, else
  ``"lm"``; the table shows only the rows of that kind (no goldfish / probe / exact-match rows
  for diffusion).
- ``monitors``: per ``MemorizationMonitor``, its ``log_prefix``, ``probe_dataset`` and probe
  protocol (``num_probes``, ``prefix_length``, ``suffix_length``); the top-level memorization keys
  are the ``memorization/`` monitor's (else the first one's).
- ``budget``: ``None`` without ``MemorizationBudget``; otherwise ``control``, ``metric``,
  ``max_value``, ``bounds``, ``stronger``, ``value`` and ``history`` (``[[epoch, figure, old,
  new], ...]``, ``epoch`` 0-based; the table prints "after epoch ``epoch + 1``").
- ``replica_pictures``: the last picture path of each ``ReplicaMonitor`` that saved one.
- ``environment``: Python, torch, lightning, transformers versions, platform, CPU count, threads.
- ``antimemo audit`` reports (:mod:`antimemo.audit`) also hold ``verb: "audit"``, ``checkpoint``
  (``path``, ``epoch``, ``global_step``, or ``None``), ``model_class``, ``model_path``,
  ``audit_wall_time_s`` and ``training_sections`` (the training-time sections not run).

The table also shows, when logged by the main monitor (``memorization/``), ``reproduced_length``,
the ``discoverable/*`` fractions and the untargeted-extraction figures beside their held-out
baseline.

``report.json`` is written atomically (:func:`antimemo._atomic.atomic_write_text`): a failed
write keeps the previous file.

This module does not import Lightning: it reads the trainer through duck typing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from antimemo._atomic import atomic_write_text

__all__ = ["REPORT_FILENAME", "build_report", "environment_info", "format_budget", "format_report", "write_report"]

#: File name of the JSON report inside a run's log directory.
REPORT_FILENAME = "report.json"

_MEM_KEYS = ("exact_match", "token_match", "near_verbatim")

#: The strength knobs shown in the table for a mitigation section that is on.
_SECTION_KNOBS = (
    "policy", "max_copies", "noise_multiplier", "target_epsilon", "max_grad_norm", "floor", "c", "lam",
    "p_fixed", "p_mem", "std", "p", "strength", "threshold",
)  # fmt: skip


#: ReplicaMonitor figures shown in the table (when logged), in this order.
_REPLICATION_ROWS = (
    "rate", "p50", "p95", "carlini/rate", "carlini/p95", "dup_match_fraction", "dup_rate", "fid", "vendi",
    "pairwise_distance", "background/rate", "background/dup_match_fraction", "background/dup_rate",
)  # fmt: skip


def _scalar(value: Any) -> float | None:
    """A float from a Python number or a one-element tensor; ``None`` otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1:
        return float(value.detach().cpu().item()) if hasattr(value, "detach") else float(value.item())
    return None


def environment_info() -> dict[str, Any]:
    """Versions and machine facts to store next to the numbers.

    Example:
        >>> info = environment_info()
        >>> sorted(info)[:3]
        ['cpu_count', 'lightning', 'machine']
    """
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("torch", "lightning", "transformers"):
        module = sys.modules.get(name)
        info[name] = getattr(module, "__version__", None) if module is not None else None
    torch = sys.modules.get("torch")
    info["torch_num_threads"] = torch.get_num_threads() if torch is not None else None
    return info


def _find_callback(trainer: Any, class_name: str) -> Any:
    for cb in getattr(trainer, "callbacks", []) or []:
        if any(c.__name__ == class_name for c in type(cb).__mro__):
            return cb
    return None


def _find_callbacks(trainer: Any, class_name: str) -> list[Any]:
    return [
        cb for cb in getattr(trainer, "callbacks", []) or [] if any(c.__name__ == class_name for c in type(cb).__mro__)
    ]


def _probe_protocol(monitor: Any) -> dict[str, Any]:
    """``num_probes`` / ``prefix_length`` / ``suffix_length`` of a ``MemorizationMonitor``."""
    n = getattr(monitor, "probes", None)
    return {
        "num_probes": int(n.shape[0]) if n is not None and hasattr(n, "shape") else getattr(monitor, "num_probes", None),
        "prefix_length": getattr(monitor, "prefix_length", None),
        "suffix_length": getattr(monitor, "suffix_length", None),
    }


def _budget_info(budget: Any) -> dict[str, Any] | None:
    """A ``MemorizationBudget``'s settings and decisions (``None`` without one).

    ``history`` is the callback's ``[[epoch, figure, old, new], ...]`` with ``epoch`` the 0-based
    ``trainer.current_epoch`` of the decision; the table prints it as "after epoch ``epoch + 1``".
    """
    if budget is None:
        return None
    bounds = getattr(budget, "bounds", None)
    return {
        "control": getattr(budget, "control", None),
        "metric": getattr(budget, "metric", None),
        "max_value": getattr(budget, "max_value", None),
        "bounds": list(bounds) if isinstance(bounds, (list, tuple)) else bounds,
        "stronger": getattr(budget, "stronger", None),
        "value": getattr(budget, "value", None),
        "history": [list(h) for h in getattr(budget, "history", None) or []],
    }


def build_report(
    trainer: Any,
    *,
    train_wall_time_s: float | None = None,
    best_val_loss: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the report of a finished run from its trainer.

    Reads the ``GoldfishTokenDropout`` and ``MemorizationMonitor`` among ``trainer.callbacks``
    (either may be absent) and the scalars in ``trainer.callback_metrics``.

    Args:
        trainer: a ``lightning.pytorch.Trainer`` after ``fit``.
        train_wall_time_s: wall-clock seconds of ``fit``.
        best_val_loss: lowest ``val_loss`` seen during the run (``None``: unknown).
        extra: more keys to store (e.g. the config file).

    Returns:
        The report dict (see the module docstring for its keys).

    Example:
        >>> report = build_report(trainer, train_wall_time_s=12.3)  # doctest: +SKIP
        >>> print(format_report(report))  # doctest: +SKIP
    """
    metrics: dict[str, float] = {}
    for key, value in dict(getattr(trainer, "callback_metrics", {}) or {}).items():
        scalar = _scalar(value)
        if scalar is not None:
            metrics[str(key)] = scalar

    goldfish_cb = _find_callback(trainer, "GoldfishTokenDropout")
    goldfish = None
    if goldfish_cb is not None:
        goldfish = {name: getattr(goldfish_cb, name, None) for name in ("k", "h", "seed")}

    monitors = _find_callbacks(trainer, "MemorizationMonitor")
    # the main monitor logs under "memorization/"; others (e.g. probe_dataset=...) get their own rows
    monitor = next((m for m in monitors if getattr(m, "log_prefix", None) == "memorization"), monitors[0] if monitors else None)
    memorization: dict[str, float | None] = {key: None for key in _MEM_KEYS}
    mem_after = None
    probes: dict[str, Any] = {"num_probes": None, "prefix_length": None, "suffix_length": None}
    if monitor is not None:
        history = getattr(monitor, "history", None) or []
        if history:
            epoch, _, results = history[-1]
            mem_after = int(epoch) + 1
            memorization = {key: _scalar(results.get(key)) for key in _MEM_KEYS}
        probes = _probe_protocol(monitor)
    monitor_probes = [
        {"log_prefix": getattr(m, "log_prefix", None), "probe_dataset": getattr(m, "probe_dataset", None), **_probe_protocol(m)}
        for m in monitors
    ]
    replica_monitors = _find_callbacks(trainer, "ReplicaMonitor")
    kind = "diffusion" if replica_monitors and not monitors else "lm"
    pictures = [str(m.last_picture_path) for m in replica_monitors if getattr(m, "last_picture_path", None)]
    budget = _budget_info(_find_callback(trainer, "MemorizationBudget"))

    dp_cb = _find_callback(trainer, "DifferentialPrivacy")
    dp_guarantee = None
    if dp_cb is not None and callable(getattr(dp_cb, "guarantee", None)):
        dp_guarantee = dict(dp_cb.guarantee())

    module = getattr(trainer, "lightning_module", None)
    num_parameters = sum(p.numel() for p in module.parameters()) if module is not None else None
    val_loss = metrics.get("val_loss")
    if best_val_loss is None:
        best_val_loss = val_loss
    report: dict[str, Any] = {
        "kind": kind,
        "goldfish": goldfish,
        **memorization,
        "memorization_after_epochs": mem_after,
        "val_loss": val_loss,
        "best_val_loss": best_val_loss,
        "train_loss": metrics.get("train_loss_epoch", metrics.get("train_loss")),
        **probes,
        "train_wall_time_s": None if train_wall_time_s is None else round(float(train_wall_time_s), 2),
        "global_step": int(getattr(trainer, "global_step", 0)),
        "epochs": int(getattr(trainer, "current_epoch", 0)),
        "num_parameters": num_parameters,
        "metrics": dict(sorted(metrics.items())),
        "dp_guarantee": dp_guarantee,
        "monitors": monitor_probes,
        "budget": budget,
        "replica_pictures": pictures,
        "environment": environment_info(),
    }
    if extra:
        report.update(dict(extra))
    return report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _dp_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The DP guarantee: epsilon never without delta, accountant, steps, noise and non-private steps."""
    g = report.get("dp_guarantee")
    if not isinstance(g, Mapping):
        epsilon = (report.get("metrics") or {}).get("dp/epsilon")
        if epsilon is None:
            return []
        # an old report (or one built without the callback): say what is missing instead of a bare number
        return [("DP epsilon (dp/epsilon)", f"{_fmt(epsilon, 3)} (no dp_guarantee in this report: delta, steps, "
                                            "noise secrecy and non-private steps unknown)")]
    eps, delta = g.get("epsilon"), g.get("delta")
    if eps is None or delta is None:
        guarantee = "unknown (no DP step taken or delta not set)"
    elif isinstance(eps, (int, float)) and math.isinf(eps):
        guarantee = "none: epsilon = inf (no noise, clipping only)"
    else:
        guarantee = f"epsilon={_fmt(float(eps), 3)}, delta={float(delta):.3g} ({g.get('accountant')} accountant)"
    sigma, c, q = g.get("noise_multiplier"), g.get("max_grad_norm"), g.get("sample_rate")
    steps = g.get("private_steps")
    rows = [
        ("DP guarantee (one example, all models)", guarantee),
        ("DP private steps", f"{steps} (noise_multiplier={_fmt(sigma, 4) if sigma is not None else 'n/a'}, "
                             f"max_grad_norm={c}, sample_rate={'n/a' if q is None else f'{float(q):.4g}'})"),
    ]
    if g.get("reproducible_noise"):
        noise = "REPRODUCIBLE from the seed (reproducible_noise=True): no guarantee against anyone who knows it"
    elif g.get("noise") == "secure":
        noise = "secret (torchcsprng, secure_mode=True)"
    else:
        noise = "secret (seeded from the OS entropy source)"
    rows.append(("DP noise", noise))
    nonprivate = int(g.get("nonprivate_steps") or 0)
    if g.get("nonprivate_start") or nonprivate:
        rows.append(("DP non-private steps", f"{nonprivate}: WARNING epsilon covers only the {steps} steps after the "
                                             "private start (allow_nonprivate_start=True)"))
    else:
        rows.append(("DP non-private steps", "0"))
    return rows


def _p_order(key: str) -> tuple[float, float, str]:
    """Sort ``discoverable/n{n}_p{p}`` keys by n, then p (other keys last)."""
    import re

    found = re.fullmatch(r".*/n(\d+)_p([\d.]+)", key)
    return (float(found.group(1)), float(found.group(2)), key) if found else (math.inf, math.inf, key)


def _measure_rows(metrics: Mapping[str, Any], prefix: str = "memorization") -> list[tuple[str, str]]:
    """Rows for the main monitor's optional keys: reproduced length, (n, p)-discoverable
    extraction and untargeted extraction (beside its held-out baseline)."""
    rows: list[tuple[str, str]] = []
    if f"{prefix}/reproduced_length" in metrics:
        rows.append(("reproduced length (greedy, tokens)", _fmt(metrics[f"{prefix}/reproduced_length"], 2)))
    disc = [k for k in metrics if k.startswith(f"{prefix}/discoverable/")]
    for key in sorted(disc, key=_p_order):
        name = key[len(f"{prefix}/discoverable/"):]
        label = "discoverable median log10 p_z" if name == "median_log10_pz" else f"discoverable {name.replace('_', ' ')}"
        rows.append((label, _fmt(metrics[key], 2 if name == "median_log10_pz" else 4)))
    base = f"{prefix}/untargeted"
    for name, label, digits in (
        ("extraction_rate", "untargeted extraction rate", 4),
        ("token_coverage", "untargeted token coverage", 4),
        ("longest_match", "untargeted longest match (tokens)", 0),
        ("nv_recall_mean", "untargeted nv-recall (mean)", 4),
    ):
        if f"{base}/{name}" not in metrics:
            continue
        value = _fmt(metrics[f"{base}/{name}"], digits)
        held = metrics.get(f"{base}/holdout_baseline/{name}")
        rows.append((label, value if held is None else f"{value} (held-out baseline {_fmt(held, digits)})"))
    kinds = sorted(
        k for k in metrics
        if k.startswith(f"{base}/") and k.endswith("/extraction_rate") and k.count("/") == 3 and "/holdout_baseline/" not in k
    )  # fmt: skip
    for key in kinds:
        rows.append((f"untargeted extraction rate, {key.split('/')[2]} prompts", _fmt(metrics[key])))
    return rows


def _audit_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What an ``antimemo audit`` measured, and which training-time sections it left out."""
    if report.get("verb") != "audit":
        return []
    ckpt = report.get("checkpoint")
    if isinstance(ckpt, Mapping):
        where = f"{ckpt.get('path')} (global step {ckpt.get('global_step', 'n/a')}, epoch index {ckpt.get('epoch', 'n/a')})"
    else:
        where = f"{report.get('model_class')}" + (f" from {report['model_path']}" if report.get("model_path") else "")
    dropped = sorted(report.get("training_sections") or {})
    return [
        ("audited model", where),
        ("training-time sections (not run)", ", ".join(dropped) or "none"),
    ]


def _kind(report: Mapping[str, Any]) -> str:
    """``"diffusion"`` (a ``ReplicaMonitor`` ran and no ``MemorizationMonitor``) or ``"lm"``.

    Reports written before the ``kind`` key are classified from their figures.
    """
    kind = report.get("kind")
    if kind in ("lm", "diffusion"):
        return str(kind)
    metrics = report.get("metrics") or {}
    replicas = any(k.startswith("replication/") for k in metrics)
    lm = report.get("exact_match") is not None or any(k.endswith("/exact_match") for k in metrics)
    return "diffusion" if replicas and not lm else "lm"


def _section_row(name: str, section: Any) -> tuple[str, str]:
    """One mitigation section and the knobs that apply to it."""
    args = section.get("init_args", {}) if isinstance(section, Mapping) else {}
    class_path = str(section.get("class_path", "")) if isinstance(section, Mapping) else ""
    if name == "budget" or class_path.endswith("MemorizationBudget"):
        keys: tuple[str, ...] = ("control", "metric", "max_value", "bounds")
    else:
        keys = _SECTION_KNOBS
    shown = {k: args[k] for k in keys if k in args and args[k] is not None}
    if name == "dedup" or class_path.endswith("DedupSampling"):
        policy = args.get("policy", "downweight")
        if policy != "cap":  # max_copies is the "cap" policy's knob ("drop" keeps one, "downweight" reweights)
            shown.pop("max_copies", None)
        if policy == "downweight" and args.get("num_samples") is not None:
            shown["num_samples"] = args["num_samples"]
    return name, ", ".join(f"{k}={v}" for k, v in shown.items()) or "on"


def _probe_text(entry: Mapping[str, Any]) -> str:
    n, p, s = entry.get("num_probes"), entry.get("prefix_length"), entry.get("suffix_length")
    source = f"sequences of {entry['probe_dataset']}" if entry.get("probe_dataset") else "training sequences"
    return f"{n} {source}, {p}-token prefix -> {s}-token suffix"


def format_budget(report: Mapping[str, Any]) -> str:
    """The ``MemorizationBudget`` trajectory: the knob after each decision and the figure it acted on.

    Epochs are 1-based, "after epoch N" (the budget's log line says the same; ``history`` stores
    the 0-based ``trainer.current_epoch``, i.e. ``N - 1``). Empty without a budget decision.

    Example:
        >>> print(format_budget({"budget": {"control": "goldfish.k", "metric": "memorization/exact_match",
        ...                                 "max_value": 0.05, "history": [[4, 0.0, 2, 2], [9, 0.0, 2, 4]]}}))
        MemorizationBudget: goldfish.k keeping memorization/exact_match <= 0.05
        +-------------+------------+--------------------------+
        | after epoch | goldfish.k | memorization/exact_match |
        +-------------+------------+--------------------------+
        | start       | 2          |                          |
        | 5           | 2          | 0.0000                   |
        | 10          | 4 (weaker) | 0.0000                   |
        +-------------+------------+--------------------------+
    """
    budget = report.get("budget")
    if not isinstance(budget, Mapping) or not budget.get("history"):
        return ""
    control, metric = str(budget.get("control")), str(budget.get("metric"))
    history = budget["history"]

    def value(v: Any) -> str:
        v = float(v)
        return str(int(v)) if v.is_integer() else f"{v:g}"

    stronger = budget.get("stronger")
    stronger_is_smaller = stronger == "decrease" if stronger in ("decrease", "increase") else _stronger_is_smaller(control)
    rows = [("start", value(history[0][2]), "")]
    for epoch, figure, old, new in history:
        label = value(new)
        if float(new) != float(old):
            label += " (stronger)" if (float(new) < float(old)) == stronger_is_smaller else " (weaker)"
        rows.append((str(int(epoch) + 1), label, _fmt(float(figure))))
    head = ("after epoch", control, metric)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [f"MemorizationBudget: {control} keeping {metric} <= {budget.get('max_value')}", line,
           "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    out.append(line)
    return "\n".join(out)


def _stronger_is_smaller(control: str) -> bool:
    """Whether a smaller value of the knob is the stronger mitigation (goldfish k, a loss floor)."""
    return control.rsplit(".", 1)[-1] in ("k", "floor")


def format_report(report: Mapping[str, Any]) -> str:
    """Render a report as a two-column text table.

    Only the rows that apply to the model's kind are shown: a diffusion run (a ``ReplicaMonitor``
    and no ``MemorizationMonitor``) gets its replication figures and the path of the replica
    picture, and no goldfish / probe / exact-match rows. A ``MemorizationBudget`` adds its
    trajectory below the table (:func:`format_budget`).

    Args:
        report: a dict from :func:`build_report` (or ``json.load`` of ``report.json``).

    Returns:
        The table, one row per line.

    Example:
        >>> print(format_report({"goldfish": None, "exact_match": 0.5, "val_loss": 2.0}))  # doctest: +NORMALIZE_WHITESPACE
        +-----------------------------+--------+
        | metric                      | value  |
        +-----------------------------+--------+
        | goldfish                    | off    |
        | exact match                 | 0.5000 |
        | token match                 | n/a    |
        | near-verbatim (edit >= 0.9) | n/a    |
        | held-out loss (val_loss)    | 2.0000 |
        +-----------------------------+--------+
    """
    lm = _kind(report) == "lm"
    metrics = report.get("metrics") or {}
    gf = report.get("goldfish")
    goldfish = "off" if not gf else f"k={gf.get('k')}, h={gf.get('h')}, seed={gf.get('seed')}"
    audit = _audit_rows(report)  # an audit ran no training-time section: no goldfish row
    rows: list[tuple[str, str]] = audit or ([("goldfish", goldfish)] if lm or gf else [])
    others = {
        k: v for k, v in (report.get("sections") or {}).items() if v is not None and k != "goldfish" and not k.endswith("monitor")
    }
    for name, section in others.items():
        rows.append(_section_row(name, section))
    rows += _dp_rows(report)
    monitors = [m for m in report.get("monitors") or [] if isinstance(m, Mapping)]
    main = next((m for m in monitors if m.get("log_prefix") == "memorization"), monitors[0] if monitors else None)
    if lm:
        if report.get("num_probes") is not None:
            several = len(monitors) > 1  # name the main monitor's probes when another monitor has its own
            rows.append(("memorization probes" if several else "probes", _probe_text(main or report)))
        rows += [
            ("exact match", _fmt(report.get("exact_match"))),
            ("token match", _fmt(report.get("token_match"))),
            ("near-verbatim (edit >= 0.9)", _fmt(report.get("near_verbatim"))),
        ]
    rows.append(("held-out loss (val_loss)", _fmt(report.get("val_loss"))))
    if lm:
        rows += _measure_rows(metrics)
    optional = [
        ("best held-out loss", "best_val_loss", 4),
        ("train loss (last epoch, trained targets)" if lm else "train loss (last epoch)", "train_loss", 4),
        ("memorization measured after epoch", "memorization_after_epochs", 0),
        ("train wall time (s)", "train_wall_time_s", 1),
        ("audit wall time (s)", "audit_wall_time_s", 1),
        ("steps / epochs", None, 0),
        ("parameters", "num_parameters", 0),
    ]
    for label, key, digits in optional:
        if key is None:
            if report.get("global_step") is not None and report.get("epochs") is not None:
                rows.append((label, f"{report['global_step']} / {report['epochs']}"))
            continue
        if report.get(key) is not None:
            rows.append((label, _fmt(report[key], digits)))
    after, epochs = report.get("memorization_after_epochs"), report.get("epochs")
    if after is not None and epochs is not None and after != epochs:
        rows.append(("WARNING", f"memorization is from epoch {after} of {epochs}, not the final model; "
                                "make max_epochs a multiple of monitor.every_n_epochs"))
    extra_monitors = sorted(k for k in metrics if k.endswith("/exact_match") and k != "memorization/exact_match")
    for key in extra_monitors:  # a second MemorizationMonitor (another log_prefix), e.g. on duplicated data
        prefix = key[: -len("/exact_match")]
        entry = next((m for m in monitors if m.get("log_prefix") == prefix), None)
        if entry is not None and entry.get("num_probes") is not None:
            rows.append((f"{prefix} probes", _probe_text(entry)))
        for name in ("exact_match", "token_match", "near_verbatim"):
            value = metrics.get(f"{prefix}/{name}")
            if value is not None:
                rows.append((f"{prefix}/{name}", _fmt(value)))
    replication = {k: v for k, v in metrics.items() if k.startswith("replication/")}
    for name in _REPLICATION_ROWS:  # ReplicaMonitor (diffusion): replicas, fidelity, diversity
        if f"replication/{name}" in replication:
            rows.append((f"replication/{name}", _fmt(replication[f"replication/{name}"])))
    for path in report.get("replica_pictures") or []:
        rows.append(("replica picture (PNG)", str(path)))
    mia = {k: v for k, v in metrics.items() if "/mia/" in k and k.endswith("/auc")}
    for key, value in sorted(mia.items()):
        rows.append((f"MIA {key.split('/mia/', 1)[1]}", _fmt(value)))
    if report.get("report_path"):
        rows.append(("report", str(report["report_path"])))
    w1 = max(len("metric"), *(len(r[0]) for r in rows))
    w2 = max(len("value"), *(len(r[1]) for r in rows))
    line = f"+-{'-' * w1}-+-{'-' * w2}-+"
    out = [line, f"| {'metric'.ljust(w1)} | {'value'.ljust(w2)} |", line]
    out += [f"| {a.ljust(w1)} | {b.ljust(w2)} |" for a, b in rows]
    out.append(line)
    budget = format_budget(report)
    if budget:
        out += ["", budget]
    return "\n".join(out)


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a report as indented JSON, atomically (parent directories are created).

    The JSON goes to a temporary file in the same directory that replaces ``path`` only when
    complete (:func:`antimemo._atomic.atomic_write_text`): a failed write keeps the old report.

    Args:
        report: the report dict.
        path: destination file.

    Returns:
        The path written.

    Example:
        >>> import tempfile, json
        >>> p = write_report({"exact_match": 1.0}, tempfile.mkdtemp() + "/report.json")
        >>> json.loads(p.read_text())["exact_match"]
        1.0
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(report), indent=2, sort_keys=False, default=str) + "\n")
    return path
