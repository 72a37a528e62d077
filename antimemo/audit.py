"""``antimemo audit``: every memorization measure on a finished model, with the report of ``fit``.

Two uses:

- a model trained with a recipe: ``antimemo audit --config recipes/lm_goldfish.yaml --ckpt_path
  runs/lm_goldfish/lightning_logs/version_0/checkpoints/epoch=59-step=960.ckpt`` with the fit's
  config and overrides, most simply the ``config.yaml`` LightningCLI saved in the fit's log
  directory (``--config runs/lm_goldfish/lightning_logs/version_0/config.yaml``): the data
  arguments decide which sequences are members. (LightningCLI also reads the model's
  hyperparameters from the checkpoint.)
- any Hugging Face causal LM saved with ``save_pretrained`` plus token files:
  ``antimemo audit --config recipes/audit_pretrained.yaml --model.init_args.path DIR
  --data.init_args.train train.jsonl --data.init_args.val val.jsonl``
  (:class:`~antimemo.lm.PretrainedCausalLM`, :class:`~antimemo.lm.TokenFileDataModule`).

It is LightningCLI's ``validate`` (:class:`~antimemo._fit_cli` ``AntimemoCLI``) run with the
config's monitor sections only, each forced to a full measurement:

- **kept**: the :data:`MONITOR_SECTIONS` (``monitor``, ``duplicates_monitor``), with
  ``decode_every_n_evaluations=1`` and ``every_n_epochs=1`` (a full greedy decode:
  ``exact_match``, ``token_match``, ``near_verbatim``), ``discoverable=True`` unless the config
  sets a sampling scheme (``discoverable/*``, ``reproduced_length``), ``holdout="val"`` unless the
  config names a holdout (MIA), and ``untargeted`` on (its defaults; ``bos_id=10``, the newline
  byte, for the byte-level recipe model; without a ``bos_token_id`` the ``"empty"`` prompts are
  left out) unless the config sets it. ``num_probes``, the lengths, the seed and the rest are the
  config's, so a recipe's audit probes the same training sequences as its fit.
- **dropped**: every other callback section (``goldfish``, ``dedup``, ``dp``, the regularizers,
  ``budget``, the diffusion sections). They act on training, which an audit does not do (DP would
  even refuse a model it did not wrap); the report lists them under ``training_sections``.

Needs ``--ckpt_path`` unless the model loads its own weights (``loads_own_weights = True``, as
:class:`~antimemo.lm.PretrainedCausalLM`): a recipe model without a checkpoint is untrained, and
auditing it is a mistake the verb refuses (exit 2, naming ``--ckpt_path``).

The report (``<log_dir>/report.json`` or ``--report_path``, and the printed table) has the keys of
``fit``'s (:mod:`antimemo.report`) plus ``verb: "audit"``, ``checkpoint`` (``path``, ``epoch``,
``global_step`` read from the checkpoint; ``None`` without one), ``model_class``,
``audit_wall_time_s`` and ``training_sections`` (the dropped sections, as configured);
``train_wall_time_s``, ``train_loss``, ``memorization_after_epochs`` and ``epochs`` are ``None``
and ``global_step`` is the checkpoint's. Lightning's own table of every logged key is not printed
(``verbose=False``): every key is in the report's ``metrics``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from antimemo.sections import CALLBACK_SECTIONS

__all__ = ["MONITOR_SECTIONS", "audit_cli_class", "forced_monitor_args", "run", "untargeted_for_model"]

#: The callback sections an audit keeps (every other one is training-time and dropped).
MONITOR_SECTIONS = tuple(name for name, path in CALLBACK_SECTIONS.items() if path.endswith(".MemorizationMonitor"))
#: ``untargeted["bos_id"]`` for the byte-level recipe model (it has no BOS token): the newline byte.
BYTE_BOS_ID = 10


def _value(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return getattr(namespace, key, default)


def forced_monitor_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """The monitor arguments an audit runs with: the config's, forced to a full measurement.

    ``untargeted`` comes back as ``{}`` (the defaults) when the config leaves it off; the audit
    then picks the start token from the model (:func:`untargeted_for_model`).

    Args:
        init_args: the monitor section's arguments from the config.

    Example:
        >>> args = forced_monitor_args({"num_probes": 8, "holdout": None, "discoverable": False})
        >>> args["num_probes"], args["decode_every_n_evaluations"], args["discoverable"], args["holdout"]
        (8, 1, True, 'val')
        >>> args["untargeted"]
        {}
        >>> forced_monitor_args({"holdout": "val", "discoverable": {"top_k": 40}})["discoverable"]
        {'top_k': 40}
    """
    args = dict(init_args)
    args["decode_every_n_evaluations"] = 1
    args["every_n_epochs"] = 1
    if not args.get("discoverable"):
        args["discoverable"] = True  # a dict (the config's sampling scheme) is kept
    if args.get("holdout") is None:
        args["holdout"] = "val"
    if not args.get("untargeted"):
        args["untargeted"] = {}
    return args


def untargeted_for_model(untargeted: Any, lm: Any, module: Any, holdout_lengths: set[int] | None = None) -> Any:
    """Fit the audit's default untargeted settings to the model and the held-out data.

    - start token of ``"empty"`` prompts: ``bos_id=10`` (the newline byte) for the byte-level
      recipe model, else the model config's ``bos_token_id``; without one, no ``"empty"`` prompts;
    - ``"holdout"`` prompts are left out unless the held-out sequences all have one length of at
      least ``holdout_length`` tokens (the prompts are cut from equal-length rows);
    - ``num_tokens`` is lowered so that prompt plus sample fit the model's positions
      (``max_position_embeddings`` / ``n_positions``).

    Args:
        untargeted: the monitor's :class:`~antimemo.probes_untargeted.UntargetedConfig` (``None``: off).
        lm: the causal LM the monitor samples from.
        module: the LightningModule.
        holdout_lengths: the distinct lengths of the held-out sequences (``None``: unknown).

    Example:
        >>> from antimemo.lm import CausalLMModule
        >>> from antimemo.probes_untargeted import UntargetedConfig
        >>> m = CausalLMModule(hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64)
        >>> cfg = untargeted_for_model(UntargetedConfig(), m.model, m, holdout_lengths={24, 25})
        >>> cfg.bos_id, cfg.kinds, cfg.num_tokens
        (10, ('empty', 'repeat'), 48)
    """
    from antimemo.lm.corpus import BYTE_VOCAB_SIZE
    from antimemo.lm.module import CausalLMModule
    from antimemo.probes_untargeted import UntargetedConfig

    if untargeted is None:
        return None
    settings = {f: getattr(untargeted, f) for f in untargeted.__dataclass_fields__}
    kinds = list(untargeted.kinds)
    config = getattr(lm, "config", None)
    if settings["bos_id"] is None and "empty" in kinds:
        if isinstance(module, CausalLMModule) and module.hparams.get("vocab_size") == BYTE_VOCAB_SIZE:
            settings["bos_id"] = BYTE_BOS_ID
        elif getattr(config, "bos_token_id", None) is None:
            kinds.remove("empty")  # nothing to start from
    if "holdout" in kinds and holdout_lengths is not None:
        if len(holdout_lengths) != 1 or min(holdout_lengths) < untargeted.holdout_length:
            kinds.remove("holdout")
    if kinds:
        settings["kinds"] = tuple(kinds)
    else:
        return None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int):
        longest_prompt = max({"empty": 1, "holdout": untargeted.holdout_length, "repeat": untargeted.repeats}[k] for k in kinds)
        room = positions - longest_prompt
        if room < 1:
            return None
        settings["num_tokens"] = min(untargeted.num_tokens, room)
    return UntargetedConfig.from_argument(settings)


def _lengths(dataset: Any, key: str) -> set[int] | None:
    """The distinct lengths of a map-style dataset's token rows (``None`` when not readable)."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return None
    lengths: set[int] = set()
    for i in range(len(dataset)):
        item = dataset[i]
        ids = item.get(key) if isinstance(item, dict) else item
        if not hasattr(ids, "shape") or len(ids.shape) != 1:
            return None
        lengths.add(int(ids.shape[0]))
    return lengths


def _checkpoint_meta(path: str) -> dict[str, Any]:
    """``{"path", "epoch", "global_step"}`` of a Lightning checkpoint, checked before the run."""
    import pickle

    import torch

    fix = (
        "pass the .ckpt file ModelCheckpoint wrote during the fit (e.g. <log_dir>/checkpoints/epoch=59-step=960.ckpt); "
        "a save_pretrained directory "
        "is audited with --model.class_path antimemo.lm.PretrainedCausalLM --model.init_args.path DIR"
    )
    target = Path(path)
    if not target.is_file():
        what = "is a directory" if target.is_dir() else "does not exist"
        raise FileNotFoundError(f"--ckpt_path: {path!r} {what}; {fix}")
    meta: dict[str, Any] = {"path": str(target.resolve()), "epoch": None, "global_step": None}
    try:
        try:
            checkpoint = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: cannot be memory-mapped; read it whole
            checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"--ckpt_path: {path!r} cannot be read with torch.load(weights_only=True): it is not a checkpoint, or it "
            f"holds pickled objects beyond tensors and plain values, which antimemo (and LightningCLI) never load; {fix}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a file torch cannot read at all
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise ValueError(f"--ckpt_path: {path!r} is not a checkpoint torch can read ({reason}); {fix}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path: {path!r} is not a Lightning checkpoint (no 'state_dict'); {fix}")
    for key in ("epoch", "global_step"):
        value = checkpoint.get(key)
        meta[key] = int(value) if isinstance(value, int) else None
    return meta


def build_audit_cli_class() -> type:
    """Define ``AuditCLI`` (an ``AntimemoCLI`` for the ``validate`` subcommand) lazily."""
    from antimemo._fit_cli import cli_class, import_class

    base = cli_class()

    class AuditCLI(base):  # type: ignore[misc, valid-type]
        """``AntimemoCLI`` running ``validate`` as an audit (see :mod:`antimemo.audit`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._audit: dict[str, Any] = {}
            self._checkpoint: dict[str, Any] | None = None
            super().__init__(*args, **kwargs)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            """Parse, then check ``--ckpt_path`` before LightningCLI reads hyperparameters from it."""
            super().parse_arguments(parser, args)
            config = self.config.get(self.config.get("subcommand") or "", self.config)
            ckpt_path = _value(config, "ckpt_path")
            self._checkpoint = None if ckpt_path is None else _checkpoint_meta(str(ckpt_path))

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()  # the import policy
            config = self.config[self.subcommand] if self.subcommand else self.config
            model_class = _value(_value(config, "model"), "class_path")
            dropped: dict[str, Any] = {}
            for name in CALLBACK_SECTIONS:
                if name not in MONITOR_SECTIONS and _value(config, name) is not None:
                    dropped[name] = self._section(name)
                    config[name] = None
            monitors = [name for name in MONITOR_SECTIONS if _value(config, name) is not None]
            if not monitors:
                raise ValueError(
                    "--monitor: an audit measures with the monitor section, but the config turns it off (null); "
                    "drop '--monitor null' (or 'monitor: null' from the config)"
                )
            chosen: list[str] = []
            for name in monitors:
                section = config[name]
                current = _value(section, "init_args")
                current = {} if current is None else dict(current) if isinstance(current, dict) else current.as_dict()
                if not current.get("untargeted"):
                    chosen.append(name)  # the audit's defaults: the start token is picked from the model
                forced = forced_monitor_args(current)
                section["init_args"] = type(section)(**forced) if not isinstance(section, dict) else forced
            ckpt_path = _value(config, "ckpt_path")
            model_cls = import_class(model_class) if isinstance(model_class, str) else None
            if ckpt_path is None:
                if not getattr(model_cls, "loads_own_weights", False):
                    raise ValueError(
                        f"--ckpt_path: required to audit {model_class or 'this model'} (it starts from fresh weights); "
                        "pass the .ckpt file ModelCheckpoint wrote during the fit, e.g. --ckpt_path "
                        "<log_dir>/checkpoints/epoch=59-step=960.ckpt, or audit a "
                        "save_pretrained directory with --model.class_path antimemo.lm.PretrainedCausalLM "
                        "--model.init_args.path DIR"
                    )
            checkpoint = self._checkpoint
            config["verbose"] = False  # the report's table replaces Lightning's table of every logged key
            self._audit = {
                "checkpoint": checkpoint, "model_class": model_class, "training_sections": dropped, "untargeted": chosen,
            }

        def before_validate(self) -> None:
            for name in self._audit.get("untargeted", []):
                monitor = self._get(self.config_init, name)
                attr = getattr(monitor, "model_attr", None)
                lm = getattr(self.model, attr) if attr else self.model
                holdout = getattr(self.datamodule, "val_dataset", None) if monitor.holdout == "val" else None
                lengths = _lengths(holdout, monitor.input_ids_key) if holdout is not None else None
                monitor.untargeted = untargeted_for_model(monitor.untargeted, lm, self.model, lengths)
            self._audit_start = time.perf_counter()

        def after_validate(self) -> None:
            checkpoint = self._audit.get("checkpoint")
            overrides = {
                "verb": "audit",
                "command": None if self._argv is None else " ".join(["antimemo", "audit", *map(str, self._argv[1:])]),
                "checkpoint": checkpoint,
                "model_class": self._audit.get("model_class"),
                "model_path": getattr(self.model, "hparams", {}).get("path") if getattr(self.model, "loads_own_weights", False) else None,
                "training_sections": self._audit.get("training_sections") or {},
                "audit_wall_time_s": round(time.perf_counter() - self._audit_start, 2),
                "train_wall_time_s": None,
                "train_loss": None,
                "memorization_after_epochs": None,
                "global_step": None if checkpoint is None else checkpoint["global_step"],
                "epochs": None,  # the checkpoint's own epoch counter is in checkpoint["epoch"]
            }
            self._finish_report(None, overrides)

    return AuditCLI


_AUDIT_CLASS: type | None = None


def audit_cli_class() -> type:
    """``AuditCLI``, built on first use (this imports Lightning)."""
    global _AUDIT_CLASS
    if _AUDIT_CLASS is None:
        _AUDIT_CLASS = build_audit_cli_class()
    return _AUDIT_CLASS


def run(argv: list[str]) -> int:
    """Run ``antimemo audit`` with the arguments after the verb; returns the exit code (0).

    Configuration errors raise (the console script prints them as one line, exit 2).
    """
    no_exit = {"exit_on_error": False}
    with warnings.catch_warnings():
        # the verb always passes args (the console's argv holds 'audit', LightningCLI's 'validate')
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # the training-time callbacks are left out on purpose, and an audit writes no checkpoint
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        audit_cli_class()(args=["validate", *argv], parser_kwargs={
            "description": "antimemo audit: every memorization measure on a finished model", **no_exit,
            "validate": {**no_exit, "description": "antimemo audit: the config's monitors, forced to a full "
                         "measurement, on --ckpt_path (or a PretrainedCausalLM); writes report.json"},
        })
    return 0

