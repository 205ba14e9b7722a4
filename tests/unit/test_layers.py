"""The package's shape, checked on its source: layers, no import cycles, protobuf at the edge.

The import graph is built from every import statement in ``gossip/`` (function-
local and ``TYPE_CHECKING`` ones included) with ``ast``, so a cycle cannot hide
behind a deferred import. DESIGN.md ("Layout") is the rule book.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gossip"

# Each package's layer: a module may import its own package and lower layers only.
LAYER = {
    "core": 0,
    "config": 1,
    "configfile": 2,
    "transport": 2,
    "train": 2,
    "store": 3,
    "node": 4,
    "sim": 3,
    "observe": 5,
    "cluster": 6,
    "api": 7,
    "cli": 8,
    "__main__": 9,
}
# Modules that may import grpc (the transport) and the generated stubs (transport and the
# store's one serde module).
GRPC_ALLOWED = ("gossip.transport.",)
STUBS_ALLOWED = ("gossip.transport.", "gossip.store.serde")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(p): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "proto" not in p.relative_to(PACKAGE).parts
    }


def _imports(name: str, path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _graph() -> nx.DiGraph:
    sources = _sources()
    g = nx.DiGraph()
    g.add_nodes_from(sources)
    for name, path in sources.items():
        for target in _imports(name, path):
            # "from gossip.x import y": y is a module when gossip.x.y is one, else a name in gossip.x.
            if target in sources and target != name:
                g.add_edge(name, target)
    return g


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else LAYER["cli"]


def test_every_module_is_in_a_layer() -> None:
    unknown = sorted(m for m in _sources() if m != "gossip" and m.split(".")[1] not in LAYER)

    assert unknown == []


def test_the_import_graph_has_no_cycle() -> None:
    g = _graph()

    cycles = list(nx.simple_cycles(g))

    assert cycles == [], "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_imports_point_down_the_layers() -> None:
    g = _graph()
    upward = []
    for a, b in g.edges:
        pa, pb = a.split("."), b.split(".")
        if len(pa) < 2 or len(pb) < 2 or pa[1] == pb[1]:
            continue
        if _layer(b) >= _layer(a):
            upward.append(f"{a} -> {b}")

    assert upward == []


def test_grpc_and_the_generated_stubs_stay_at_the_edge() -> None:
    wrong = []
    for name, path in _sources().items():
        for target in _imports(name, path):
            if target.split(".")[0] == "grpc" and not name.startswith(GRPC_ALLOWED):
                wrong.append(f"{name} imports {target}")
            stub = target.startswith("gossip.proto") or target.startswith("google.protobuf")
            if stub and not name.startswith(STUBS_ALLOWED):
                wrong.append(f"{name} imports {target}")

    assert wrong == []


def test_core_imports_no_network_and_no_event_loop() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, path in _sources().items()
        if name.startswith("gossip.core")
        for target in _imports(name, path)
        if target.split(".")[0] in ("grpc", "google", "asyncio") or target.startswith("gossip.proto")
    ]

    assert wrong == []


def test_core_imports_where_grpc_and_protobuf_cannot() -> None:
    core = sorted(m for m in _sources() if m.startswith("gossip.core."))
    code = (
        "import sys\n"
        "for blocked in ('grpc', 'google.protobuf', 'google'):\n"
        "    sys.modules[blocked] = None  # any import of it raises ImportError\n"
        + "".join(f"import {m}\n" for m in core)
        + "print('ok')\n"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(_sources()))
def test_no_module_is_over_500_lines(name: str) -> None:
    lines = len(_sources()[name].read_text().splitlines())

    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_the_node_class_is_under_400_lines() -> None:
    tree = ast.parse((PACKAGE / "node" / "node.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Node")

    assert node.end_lineno is not None and node.end_lineno - node.lineno + 1 < 400
