"""The package's layering, enforced: every explainer import (inside functions too) points down.

A unit is a top-level module or a stage subpackage. Imports inside a unit are free; an import
from another unit must go to a lower layer, and no import cycle may exist between modules. A new
module or package must be given a layer here, which is the point: someone decides where it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "explainer"

LAYERS: dict[str, int] = {
    # foundation: the error type, the shared words, settings, statistics, result shapes, display
    "__init__": 0, "errors": 0,
    "vocab": 1, "selectors": 1, "hooks": 1,
    "settings": 2, "metrics": 2,
    "settings_load": 3, "results": 3,
    "ui": 4,
    # data: the DuckDB file, prompt templates, text, the subject model
    "store": 5, "prompts": 5, "corpus": 5, "lm": 5,
    # the two engines the stages use: the LLM client and the dictionary
    "llm": 6, "sae": 6,
    # stages (explain's agent scores its candidates, so score sits below explain)
    "sample": 7, "score": 7,
    "explain": 8,
    # verbs over the stages and the DB, then the command line
    "query": 9, "forget": 9, "planted": 9, "pipeline": 9,
    "browse": 10,
    "cli_read": 11, "cli_args": 11,
    "cli": 12,
    "__main__": 13,
}


def unit_of(module: str) -> str:
    """explainer.sample.state -> sample; explainer.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """Explainer modules this file imports, anywhere in it (`from explainer.x import y` counts y
    when y is itself a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "explainer" or node.module.startswith("explainer.")):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in mods else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("explainer."))
    return {m for m in found if m in mods and m != "explainer"}


def test_every_unit_has_a_layer() -> None:
    missing = sorted({unit_of(m) for m in modules()} - set(LAYERS))
    assert not missing, f"give these a layer in tests/test_layering.py: {missing}"


def test_imports_point_down() -> None:
    mods = modules()
    bad = []
    for name, path in mods.items():
        src = unit_of(name)
        for dep in imports_of(path, mods):
            dst = unit_of(dep)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{name} (layer {LAYERS[src]}) imports {dep} (layer {LAYERS[dst]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {name: imports_of(path, mods) - {name} for name, path in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
