"""The package's import graph respects its layers (``docs/design.md``, "Layers").

Every module under ``antimemo/`` is parsed with ``ast``; every ``import`` / ``from ... import`` at
any depth counts, lazy imports inside functions included (a lazy import is still a dependency:
it runs as soon as the function is called). ``from pkg import name`` is an edge to ``pkg.name``
when that is a module, else to ``pkg``. Importing ``a.b.c`` is an edge to ``a.b.c`` only, not to
the packages ``a`` and ``a.b`` Python also initialises: every subpackage ``__init__`` re-exports
its own submodules, so counting those implicit parent edges would make every submodule that
imports a sibling look like a cycle through its ``__init__``, which is not a real dependency
loop. Imports by string (``importlib.import_module(path)``, the class paths of
:data:`antimemo.sections.CALLBACK_SECTIONS`) are configuration, not code dependencies, and are
not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "antimemo"

#: Lower layers: pure functions, metrics, data tools, DP helpers and the bottom modules. They never
#: import Lightning nor the callbacks / CLI / ablation layers above them.
LOWER = (
    "antimemo.functional",
    "antimemo.metrics",
    "antimemo.dedup",
    "antimemo.dp",
    "antimemo.sampling",
    "antimemo._checks",
    "antimemo.sections",
    "antimemo._faiss",
    "antimemo._pixels",
    "antimemo.probes",
    "antimemo.probes_untargeted",
    "antimemo._atomic",
    "antimemo.watermark",
    "antimemo.suffix_index",
    "antimemo.replica_index",
)
LIGHTNING = ("lightning", "pytorch_lightning")
UPPER = ("antimemo.callbacks", "antimemo.cli", "antimemo.ablate", "antimemo.collapse")
#: (importer prefix, forbidden prefix): the one-way rules between sibling layers.
FORBIDDEN_BETWEEN = (
    ("antimemo.functional", "antimemo.dedup"),
    ("antimemo.dedup", "antimemo.lm"),
    # LoRA adapters and the fine-tuning split compose with DP through the seams, never by importing a callback
    ("antimemo.lm.lora", "antimemo.callbacks"),
    ("antimemo.lm.splits", "antimemo.callbacks"),
)
#: Bottom modules and the antimemo modules each may import (nothing else of antimemo).
BOTTOM = {
    "antimemo._checks": set(),
    "antimemo.sections": set(),
    "antimemo._faiss": set(),
    "antimemo._pixels": {"antimemo._checks"},
    "antimemo._atomic": set(),
    "antimemo._extras": set(),
    "antimemo._flags": set(),
    "antimemo._loaders": set(),
}

#: Edges that break a rule today and belong to files whose owners will fix them:
#: ``(importer, imported)``. Empty: every rule holds. An entry must name an edge that still exists
#: (``test_known_exceptions_are_still_needed``), so a fixed edge cannot stay excused.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module name -> every module name it imports (any depth), for the package at ``root``."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from ..pkg import y
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` among the graph's own modules, or ``None``."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(t for t in graph[start] if t in graph))]
        path = [start]
        color[start] = GREY
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                color[node] = BLACK
                continue
            nxt = todo.pop(0)
            if color[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            if color[nxt] == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append((nxt, sorted(t for t in graph[nxt] if t in graph)))
    return None


def _under(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """Every ``(importer, imported, rule)`` that breaks a layer rule."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _under(importer, LOWER) and _under(target, LIGHTNING):
                found.append((importer, target, "lower layers do not import Lightning"))
            if _under(importer, LOWER) and _under(target, UPPER):
                found.append((importer, target, "lower layers do not import callbacks / cli / ablate"))
            for low, high in FORBIDDEN_BETWEEN:
                if _under(importer, low) and _under(target, high):
                    found.append((importer, target, f"{low} does not import {high}"))
            if importer in BOTTOM and _under(target, "antimemo") and target not in BOTTOM[importer]:
                found.append((importer, target, "bottom modules import no other antimemo module"))
            if _under(target, "antimemo.cli") and importer != "antimemo.cli":
                found.append((importer, target, "nothing imports the console script"))
    return found


GRAPH = import_graph(ROOT)


def test_the_graph_covers_the_package_and_its_lazy_imports():
    assert len(GRAPH) >= 60
    assert "antimemo.functional.replica" in GRAPH["antimemo.metrics.replica"]
    # lazy, inside a function: ``from antimemo.ablate.cli import main`` in cli._ablate_verb
    assert "antimemo.ablate.cli" in GRAPH["antimemo.cli"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle between antimemo modules: " + " -> ".join(cycle or [])


def test_layer_rules():
    bad = [v for v in violations(GRAPH) if (v[0], v[1]) not in KNOWN_EXCEPTIONS]
    assert not bad, "layer rules broken:\n" + "\n".join(f"  {a} imports {b}: {rule}" for a, b, rule in bad)


def lightning_path(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A chain ``[start, ..., lightning module]`` through the graph's modules, or ``None``."""
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph.get(node, ())):
            if target in parents:
                continue
            parents[target] = node
            if _under(target, LIGHTNING):
                chain = [target]
                while parents[chain[-1]] is not None:
                    chain.append(parents[chain[-1]])  # type: ignore[arg-type]
                return chain[::-1]
            if target in graph:
                queue.append(target)
    return None


def test_lower_layers_do_not_reach_lightning_through_other_modules():
    chains = [lightning_path(GRAPH, name) for name in sorted(GRAPH) if _under(name, LOWER)]
    chains = [c for c in chains if c is not None and (c[0], c[1]) not in KNOWN_EXCEPTIONS]
    assert not chains, "lower layers import Lightning through:\n" + "\n".join("  " + " -> ".join(c) for c in chains)


def test_known_exceptions_are_still_needed():
    current = {(a, b) for a, b, _ in violations(GRAPH)}
    stale = sorted(KNOWN_EXCEPTIONS - current)
    assert not stale, f"these KNOWN_EXCEPTIONS no longer break a rule, remove them: {stale}"


# --- the checks can fail -------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_self_check_a_planted_cycle_is_found(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.sub import b\n",
            "pkg/sub/__init__.py": "from .b import f\n",
            "pkg/sub/b.py": "def f():\n    from ..c import g  # lazy, relative\n    return g\n",
            "pkg/c.py": "import os\n\nclass C:\n    def m(self):\n        import pkg.a\n",
            "pkg/d.py": "import pkg.c\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"os", "pkg.a"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}
    graph["pkg.c"].discard("pkg.a")
    assert find_cycle(graph) is None


def test_self_check_an_indirect_lightning_import_is_found():
    graph = {"antimemo.dedup.cli": {"antimemo.lm.data"}, "antimemo.lm.data": {"lightning.pytorch", "torch"}}
    assert lightning_path(graph, "antimemo.dedup.cli") == ["antimemo.dedup.cli", "antimemo.lm.data", "lightning.pytorch"]
    assert lightning_path({"antimemo.sampling": {"numpy"}}, "antimemo.sampling") is None


@pytest.mark.parametrize(
    ("importer", "imported", "rule"),
    [
        ("antimemo.functional.replica", "antimemo.dedup.images", "antimemo.functional does not import antimemo.dedup"),
        ("antimemo.dedup.cli", "antimemo.lm.data", "antimemo.dedup does not import antimemo.lm"),
        ("antimemo.metrics.extraction", "lightning.pytorch", "lower layers do not import Lightning"),
        ("antimemo.dp.hf", "pytorch_lightning", "lower layers do not import Lightning"),
        ("antimemo.sampling", "antimemo.callbacks.dedup", "lower layers do not import callbacks / cli / ablate"),
        ("antimemo.sections", "antimemo.cli", "bottom modules import no other antimemo module"),
        ("antimemo.callbacks.budget", "antimemo.cli", "nothing imports the console script"),
    ],
)
def test_self_check_a_planted_bad_edge_is_flagged(importer, imported, rule):
    graph = {importer: {imported}}
    assert (importer, imported, rule) in violations(graph)
    assert violations({importer: {"torch", "numpy"}}) == []
