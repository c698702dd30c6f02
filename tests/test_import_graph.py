"""The package's import graph runs one way: downward through an explicit order of layers, with no circle.

Every module under ``src/layerexit`` is parsed with ``ast``; every ``import`` counts, also one inside a
function (a lazy import is still a dependency), except those under ``if TYPE_CHECKING:``, which only
annotations read and which never run. A unit is a sub-package (``training``, ``runtime``, ...) or a
top-level module (``config``, ``methods``, ...); ``__init__`` is the package's own facade
(``layerexit/__init__.py``). A unit may import units of its own layer or of a layer below, never one
above, and the units never import each other in a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "layerexit"

LAYERS: list[tuple[str, set[str]]] = [
    # lowest first; each layer may import its own and the ones above it in this list
    ("core", {"version", "errors", "atomic", "options", "pooling", "metrics", "losses", "strategies", "methods"}),
    ("models", {"assets", "backbones", "native_heads", "model"}),
    ("data", {"data"}),
    ("config", {"config"}),
    ("runtime", {"runtime"}),
    ("run_folder", {"run_folder"}),
    ("training", {"training"}),
    ("evaluation", {"evaluation"}),
    ("predictor", {"predictor"}),
    ("workflows", {"compare", "report"}),
    ("serving", {"serving"}),
    ("cli", {"cli_options", "cli"}),
    ("facade", {"__init__"}),
]

ALLOWED: dict[tuple[str, str], str] = {}
"""Imports allowed to run up the order, each with its reason; none today."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str
    """``layerexit/<path>:<line>`` of the import statement."""


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts == ("__init__.py",):
        return "__init__"
    return rel.parts[0].removesuffix(".py")


def units() -> set[str]:
    return {unit_of(p) for p in PACKAGE.rglob("*.py")}


def _module_name(path: Path) -> list[str]:
    parts = ["layerexit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _targets(node: ast.Import | ast.ImportFrom, module: list[str], is_package: bool, known: set[str]) -> Iterator[str]:
    """The units of ``layerexit`` an import statement reads."""
    if isinstance(node, ast.Import):
        dotted = [a.name for a in node.names]
        names: list[str] = []
    else:
        if node.level:  # relative: from the module's package upwards
            base = module if is_package else module[:-1]
            base = base[: len(base) - node.level + 1]
            dotted = [".".join([*base, *([node.module] if node.module else [])])]
        else:
            dotted = [node.module or ""]
        names = [a.name for a in node.names]
    for name in dotted:
        parts = name.split(".")
        if parts[0] != "layerexit":
            continue
        if len(parts) > 1:
            yield parts[1] if parts[1] in known else "__init__"
        else:  # from layerexit import x: a unit when x is one, else a name of the facade
            for imported in names:
                yield imported if imported in known else "__init__"


def edges() -> list[Edge]:
    known = units() - {"__init__"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skipped = _type_checking_only(tree)
        source = unit_of(path)
        module = _module_name(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skipped:
                continue
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != source:
                    found.append(Edge(source, target, f"{path.relative_to(SRC)}:{node.lineno}"))
    return found


def layer_index() -> dict[str, int]:
    return {unit: i for i, (_, members) in enumerate(LAYERS) for unit in members}


def upward(found: list[Edge], allowed: dict[tuple[str, str], str]) -> list[str]:
    """The imports that run up the layer order, as ``file:line: a (layer) imports b (layer)``."""
    index = layer_index()
    names = [name for name, _ in LAYERS]
    return [
        f"{e.where}: {e.source} ({names[index[e.source]]}) imports {e.target} ({names[index[e.target]]}), a layer above"
        for e in found
        if index[e.target] > index[e.source] and (e.source, e.target) not in allowed
    ]


def cycles(found: list[Edge], allowed: dict[tuple[str, str], str]) -> list[str]:
    """Each circle between units (strongly connected components of more than one unit), with the imports
    that close it."""
    graph: dict[str, set[str]] = {}
    for e in found:
        if (e.source, e.target) not in allowed:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return [
        f"circle {sorted(c)}: "
        + "; ".join(f"{e.where} ({e.source} -> {e.target})" for e in found if e.source in c and e.target in c)
        for c in components
    ]


def test_every_unit_has_a_layer() -> None:
    placed = [unit for _, members in LAYERS for unit in members]
    assert len(placed) == len(set(placed)), "a unit is in two layers"
    missing = sorted(units() - set(placed))
    assert not missing, f"give these modules or packages a layer in LAYERS: {missing}"
    gone = sorted(set(placed) - units())
    assert not gone, f"LAYERS names units that no longer exist: {gone}"


def test_imports_run_down_the_layers() -> None:
    wrong = upward(edges(), ALLOWED)
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_no_import_circle_between_units() -> None:
    found = cycles(edges(), ALLOWED)
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_allowed_exceptions_still_exist() -> None:
    """An allow-list entry whose import is gone must go too."""
    present = {(e.source, e.target) for e in edges()}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"remove from ALLOWED, the import is gone: {stale}"


def test_the_checks_name_the_offending_import() -> None:
    """The checker itself: an upward import and a circle are reported with their file and line."""
    made_up = [
        Edge("config", "training", "layerexit/config.py:22"),
        Edge("training", "config", "layerexit/training/loop.py:20"),
    ]
    assert upward(made_up, {}) == ["layerexit/config.py:22: config (config) imports training (training), a layer above"]
    (circle,) = cycles(made_up, {})
    assert "layerexit/config.py:22 (config -> training)" in circle
    assert "layerexit/training/loop.py:20 (training -> config)" in circle
    assert upward(made_up, {("config", "training"): "why"}) == []


def test_no_module_imports_another_modules_private_names() -> None:
    """A name with a leading underscore stays in its module: what modules share is public (``data/`` included)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerexit"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} imports {private} from {node.module}")
    assert not found, "\n".join(found)
