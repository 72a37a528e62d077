"""``antimemo dedup PATH_OR_RECIPE --out INDEX``: build a duplicate index and print its summary.

Sources:

- ``file.txt``: one text per line (example ``i`` is line ``i + 1``; empty lines are examples);
- ``file.jsonl``: one JSON object per line, the example in ``--field`` (``"text"`` by default, or
  ``"input_ids"``; a list of integers is indexed as token ids);
- ``recipe.yaml`` (or a recipe name ``NAME`` for ``recipes/NAME.yaml``): a LightningCLI config;
  its ``data`` DataModule is built (``data: {class_path, init_args}``, or the init arguments of
  the antimemo CLI's default, :data:`antimemo.sections.DEFAULT_DATA_CLASS`
  (``antimemo.lm.TextDataModule``), directly under ``data:``),
  ``setup("fit")`` is called, and its training dataset is indexed in order, so the index can be
  passed to ``DedupSampling(index=INDEX)`` for that recipe. The ``class_path`` must name a
  ``lightning.pytorch.LightningDataModule`` subclass: the path is checked before it is imported
  (:func:`antimemo.sections.check_import_path` refuses the standard library) and the class before
  it is constructed, so a recipe cannot make this verb call anything else.

Engines (``--engine``): ``local`` (default) builds the index in this process (``--num_workers``
processes); ``ray`` builds it with Ray workers (:func:`antimemo.dedup.ray_engine.build_index_ray`)
from one or more ``.txt`` / ``.jsonl`` / ``.parquet`` files, directories or glob patterns, on a
local Ray (``--num_workers`` CPUs) or on the cluster at ``--address``; ``--out`` is then an output
directory (``index.npz``, ``clusters/part-*.parquet``, ``manifest.json``).

The module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for the ``antimemo``
console script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from antimemo._flags import canonical_flags
from antimemo.sections import DEFAULT_DATA_CLASS, import_recipe_class

__all__ = ["add_arguments", "load_source", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dedup`` verb's arguments to a parser.

    Args:
        parser: an ``argparse`` (sub)parser.

    Returns:
        The same parser.

    Example:
        >>> p = add_arguments(argparse.ArgumentParser(prog="antimemo dedup"))
        >>> a = p.parse_args(["data.txt", "--out", "idx.npz"])
        >>> a.threshold is None, a.engine
        (True, 'local')
    """
    parser.description = "Find exact and near-duplicate examples and write a DuplicateIndex (.npz)."
    parser.add_argument("source", metavar="PATH_OR_RECIPE", nargs="+",
                        help="a .txt (one example per line) or .jsonl file, or a recipe .yaml / recipe name; with "
                             "--engine ray: one or more .txt / .jsonl / .parquet files, directories or glob patterns")
    parser.add_argument("--out", required=True, metavar="INDEX",
                        help="path of the index file to write (.npz); with --engine ray, the output directory")
    parser.add_argument("--engine", default="local", metavar="{local,ray}",
                        help="local (default: this process) or ray (Ray workers; pip install 'antimemo[ray]')")
    parser.add_argument("--address", default=None,
                        help="with --engine ray: the Ray cluster to join (e.g. auto, host:6379, ray://host:10001); "
                             "default: start a local Ray")
    parser.add_argument("--field", default=None, help="JSON field of a .jsonl file (default: text, else input_ids)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Jaccard threshold for text/tokens (default 0.8) or cosine threshold for images (0.95)")
    parser.add_argument("--ngram", type=int, default=5, help="words or tokens per shingle (default 5)")
    parser.add_argument("--num_perm", type=int, default=128, help="MinHash permutations (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations (default 0)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="worker processes (default 1); with --engine ray: parallel tasks and partitions "
                             "(default: every CPU of the Ray cluster)")
    parser.add_argument("--chunk_size", type=int, default=2048, help="examples per chunk (default 2048)")
    parser.add_argument("--top_k", type=int, default=5, help="largest clusters to print (default 5)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser


def _recipe_path(source: str) -> Path | None:
    p = Path(source)
    if p.suffix.lower() in (".yaml", ".yml"):
        return p
    if not p.suffix and not p.exists():
        for base in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
            for ext in (".yaml", ".yml"):
                if (base / f"{source}{ext}").is_file():
                    return base / f"{source}{ext}"
    return None


def _recipe_dataset(path: Path) -> Any:
    return _recipe_data(path)[1]


def _recipe_data(path: Path) -> tuple[Any, Any]:
    """The recipe's DataModule (after ``setup("fit")``) and its training dataset."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no recipe file at {str(path)!r}")
    config = yaml.safe_load(path.read_text()) or {}
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {str(path)!r} has no 'data:' section (the LightningCLI DataModule); index a .txt or .jsonl "
            "file instead"
        )
    if "class_path" in data:  # LightningCLI subclass mode: data: {class_path: ..., init_args: {...}}
        class_path = data["class_path"]
        init_args = data.get("init_args") or {}
        unknown = sorted(set(data) - {"class_path", "init_args", "dict_kwargs"})
        if unknown:
            raise ValueError(
                f"recipe {str(path)!r}: data: has the keys {unknown} beside class_path; put the class's "
                "arguments under data.init_args"
            )
    else:  # the antimemo CLI's default DataModule, with its init arguments under data:
        class_path = DEFAULT_DATA_CLASS
        init_args = data
    if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
        raise ValueError(
            f"recipe {str(path)!r}: data.init_args must be a mapping of argument names to values, got "
            f"{init_args!r}"
        )
    # checked before the import (the standard library is refused) and before construction (a
    # LightningDataModule subclass only), so the recipe cannot name an arbitrary callable
    cls = import_recipe_class(class_path, f"recipe {str(path)!r}: data.class_path",
                              "lightning.pytorch.LightningDataModule")
    dm = cls(**init_args)
    dm.setup("fit")
    dataset = getattr(dm, "train_dataset", None)
    if dataset is None:
        dataset = dm.train_dataloader().dataset
    return dm, dataset


def _decoder(dm: Any) -> tuple[Any, str] | None:
    """A ``token ids -> text`` function of a DataModule, with its name for the output: its
    ``decode`` attribute, else its ``tokenizer.decode`` (``TextDataModule``'s byte tokenizer, a
    Hugging Face tokenizer); ``None`` when it has neither."""
    decode = getattr(dm, "decode", None)
    if callable(decode):
        return decode, f"{type(dm).__name__}.decode"
    tokenizer = getattr(dm, "tokenizer", None)
    decode = getattr(tokenizer, "decode", None)
    if callable(decode):
        return decode, f"{type(dm).__name__}.tokenizer.decode"
    return None


def load_source(source: str, field: str | None = None) -> tuple[str, Any]:
    """Open a file or recipe as ``(kind, examples)`` for a duplicate index.

    Args:
        source: ``.txt`` / ``.jsonl`` path, recipe ``.yaml`` path, or recipe name.
        field: JSON field for ``.jsonl``.

    Returns:
        ``("text" | "tokens" | "images", sequence of examples)``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "d.jsonl"; _ = p.write_text('{"input_ids": [1, 2]}\\n')
        >>> load_source(str(p))[0]
        'tokens'
    """
    kind, items, _ = _load(source, field)
    return kind, items


def _load(source: str, field: str | None = None) -> tuple[str, Any, tuple[Any, str] | None]:
    """:func:`load_source` plus the recipe DataModule's decoder for the preview (:func:`_decoder`)."""
    from antimemo.dedup.datasets import LineFile, dataset_view

    recipe = _recipe_path(source)
    if recipe is not None:
        dm, dataset = _recipe_data(recipe)
        return (*dataset_view(dataset), _decoder(dm))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"no such file or recipe: {source!r}; give a .txt / .jsonl file, a recipe .yaml, or a recipe name"
        )
    if path.suffix.lower() not in (".txt", ".jsonl", ".ndjson", ".text", ""):
        raise ValueError(f"unsupported file type {path.suffix!r} for {source!r}: use .txt (one example per line) or .jsonl")
    f = LineFile(path, field=field)
    return f.kind, f, None


def _preview(value: Any, width: int = 70, decode: Any = None) -> str:
    """One line showing an example: its text, its token ids decoded with ``decode`` (quoted), the
    ids themselves without a decoder, or an image's shape."""
    if isinstance(value, str):
        text = " ".join(value.split())
    elif hasattr(value, "shape") and getattr(value, "ndim", 1) > 1:
        return f"<image {tuple(value.shape)}>"
    elif decode is not None:
        ids = [int(v) for v in list(value)]
        try:
            text = repr(" ".join(str(decode(ids)).split()))
        except Exception:  # noqa: BLE001 - a preview never fails the verb: fall back to the ids
            text = " ".join(str(v) for v in ids[:20])
    else:
        text = " ".join(str(int(v)) for v in list(value)[:20])
    return text if len(text) <= width else text[: width - 3] + "..."


def _item_ids(item: Any) -> Any:
    """An example as dataset_view gives it (text, ids, image); a dict's ``input_ids``."""
    return item["input_ids"] if isinstance(item, dict) and "input_ids" in item else item


def run(args: argparse.Namespace) -> int:
    """Build, save and summarise the index (the ``antimemo dedup`` verb).

    Args:
        args: parsed by a parser set up with :func:`add_arguments`.

    Returns:
        0 on success, 2 on a user error (one line on stderr; with ``ANTIMEMO_DEBUG=1``, as set by
        ``antimemo --debug``, the exception is raised with its traceback).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "t.txt").write_text("a b\\nA  B\\nc\\n")
        >>> p = add_arguments(argparse.ArgumentParser())
        >>> run(p.parse_args([str(d / "t.txt"), "--out", str(d / "i.npz"), "--no_progress", "--json"]))  # doctest: +ELLIPSIS
        {...}
        0
    """
    from antimemo.dedup.index import DuplicateIndex

    sources = list(args.source) if isinstance(args.source, (list, tuple)) else [args.source]
    engine = getattr(args, "engine", "local")
    if engine not in ENGINES:
        return _usage_error(f"--engine must be one of {list(ENGINES)}, got {engine!r}; e.g. --engine ray")
    if engine == "ray":
        return _run_ray(args, sources)
    if getattr(args, "address", None) is not None:
        return _usage_error(f"--address {args.address!r} joins a Ray cluster: it needs --engine ray")
    if len(sources) != 1:
        return _usage_error(
            f"the local engine indexes one file or recipe, got {len(sources)} sources; index several files or glob "
            "patterns with --engine ray (a local Ray starts by default)"
        )
    args.source = sources[0]
    if args.num_workers is None:
        args.num_workers = 1
    out_path = Path(args.out)
    if out_path.is_dir():
        print(
            f"antimemo dedup: error: --out {args.out!r} is a directory; give the path of the index file to "
            f"write, e.g. --out {str(out_path / 'index.npz')!r}",
            file=sys.stderr,
        )
        return 2
    try:
        kind, items, decoder = _load(args.source, args.field)
        progress = not args.no_progress
        if kind == "images":
            kwargs: dict[str, Any] = {"progress": progress}
            if args.threshold is not None:
                kwargs["threshold"] = args.threshold
            index = DuplicateIndex.from_images(items, **kwargs)
        else:
            kwargs = {
                "ngram": args.ngram,
                "num_perm": args.num_perm,
                "seed": args.seed,
                "num_workers": args.num_workers,
                "chunk_size": args.chunk_size,
                "progress": progress,
            }
            if args.threshold is not None:
                kwargs["threshold"] = args.threshold
            build = DuplicateIndex.from_texts if kind == "text" else DuplicateIndex.from_token_ids
            index = build(items, **kwargs)
        out = index.save(args.out)
    except (FileNotFoundError, IsADirectoryError, ValueError, TypeError, ImportError) as err:
        if os.environ.get("ANTIMEMO_DEBUG", "").strip().lower() in ("1", "true", "yes"):
            raise  # antimemo --debug: the full traceback
        print(f"antimemo dedup: error: {err}", file=sys.stderr)
        return 2
    summary = index.summary(args.top_k)
    if args.json:
        summary["index"] = str(out)
        summary["source"] = args.source
        print(json.dumps(summary, indent=2))
        return 0
    print(f"source: {args.source}")
    print(index.format_summary(args.top_k))
    shown = [c for c in summary["largest_clusters"] if c["size"] > 1]
    decode = decoder[0] if decoder is not None and kind == "tokens" else None
    if shown and kind == "tokens":
        print(f"  previews decoded with {decoder[1]}" if decode is not None
              else "  previews are token ids: the source has no decoder (a recipe DataModule's decode or tokenizer.decode)")
    for c in shown:
        example = c["first_examples"][0]
        print(f"  cluster {c['cluster']} example {example}: {_preview(_item_ids(items[example]), decode=decode)}")
    print(f"index written to {out}")
    return 0


#: The ``--engine`` choices.
ENGINES = ("local", "ray")


def _usage_error(message: str) -> int:
    print(f"antimemo dedup: error: {message}", file=sys.stderr)
    return 2


def _debug() -> bool:
    return os.environ.get("ANTIMEMO_DEBUG", "").strip().lower() in ("1", "true", "yes")


def _run_ray(args: argparse.Namespace, sources: list[str]) -> int:
    """``antimemo dedup --engine ray``: :func:`~antimemo.dedup.ray_engine.build_index_ray` into ``--out``."""
    for src in sources:
        if _recipe_path(src) is not None:
            return _usage_error(
                f"--engine ray reads .txt / .jsonl / .parquet files, not the recipe {src!r}; index a recipe with the "
                "local engine (drop --engine ray)"
            )
    out_dir = Path(args.out)
    if out_dir.suffix.lower() == ".npz":
        return _usage_error(
            f"--out {args.out!r} looks like an index file; with --engine ray --out is a directory (the index is "
            f"written to {str(out_dir.with_suffix('') / 'index.npz')!r}), e.g. --out {str(out_dir.with_suffix(''))!r}"
        )
    kwargs: dict[str, Any] = {
        "field": args.field,
        "ngram": args.ngram,
        "num_perm": args.num_perm,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "address": args.address,
        "num_workers": args.num_workers,
        "progress": not args.no_progress,
    }
    if args.threshold is not None:
        kwargs["threshold"] = args.threshold
    try:
        from antimemo.dedup.ray_engine import INDEX_FILE, build_index_ray

        index = build_index_ray(sources, out_dir, **kwargs)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError, TypeError, ImportError,
            ConnectionError) as err:
        if _debug():
            raise
        return _usage_error(str(err))
    summary = index.summary(args.top_k)
    written = out_dir / INDEX_FILE
    if args.json:
        summary.update(index=str(written), clusters_dir=str(out_dir / "clusters"), source=sources, engine="ray")
        print(json.dumps(summary, indent=2))
        return 0
    print(f"source: {' '.join(sources)}")
    print(index.format_summary(args.top_k))
    print(f"index written to {written}; cluster ids per document in {out_dir / 'clusters'}/part-*.parquet")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m antimemo.dedup.cli PATH --out INDEX``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = add_arguments(argparse.ArgumentParser(prog="antimemo dedup"))
    return run(parser.parse_args(canonical_flags(parser, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
