"""Committed stubs match the protos, and protobuf, gRPC and asyncio stay out of the layers that do maths."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.proto import regen

PACKAGE = Path(__file__).resolve().parents[1] / "gossip"
PROTOS = sorted(p.stem for p in (PACKAGE.parent / "protos" / "gossip" / "proto").glob("*.proto"))
STUBS = [f"{stem}{suffix}" for stem in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
# The edge: the only modules that may speak protobuf.
# security.py: transport guards; it names protobuf's DecodeError and no message type.
PB_ALLOWED = {"wire.py", "rpc.py", "node.py", "status.py", "store_rpc.py", "store_server.py", "security.py"}
PURE = ["params.py", "topology.py", "averaging.py", "membership.py", "ring.py", "store.py"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    assert regen.main(out_dir=out) == 0
    return out / "gossip" / "proto"


@pytest.mark.parametrize("name", STUBS)
def test_committed_stub_matches_regenerated(regenerated: Path, name: str) -> None:
    fresh = (regenerated / name).read_bytes()
    committed = (PACKAGE / "proto" / name).read_bytes()

    assert fresh == committed, (
        f"gossip/proto/{name} is out of date with protos/: run `python -m gossip.proto.regen` and commit the result"
    )


def test_every_proto_has_its_committed_stubs() -> None:
    assert {"gossip", "store"} <= set(PROTOS)
    assert all((PACKAGE / "proto" / name).is_file() for name in STUBS)


def test_regen_writes_nothing_but_the_stubs(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(STUBS)


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "proto" not in p.relative_to(PACKAGE).parts)


def test_library_modules_are_found() -> None:
    names = {p.name for p in _library_modules()}

    assert {"wire.py", "params.py", "membership.py", "cli.py"} <= names


@pytest.mark.parametrize(
    "path",
    [p for p in _library_modules() if p.relative_to(PACKAGE).as_posix() not in PB_ALLOWED],
    ids=lambda p: p.relative_to(PACKAGE).as_posix(),
)
def test_protobuf_stays_at_the_edge(path: Path) -> None:
    imports = _imported_modules(path)

    offending = sorted(m for m in imports if "_pb2" in m or m.startswith("google.protobuf"))

    assert offending == [], f"{path.name} imports {offending}; only {sorted(PB_ALLOWED)} may"


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_network_or_event_loop(name: str) -> None:
    imports = _imported_modules(PACKAGE / name)

    offending = sorted(
        m
        for m in imports
        if m.split(".")[0] in ("grpc", "asyncio")
        or m in ("gossip.rpc", "gossip.node", "gossip.server", "gossip.status")
        or m.startswith(("gossip.rpc.", "gossip.node."))
    )

    assert offending == [], f"{name} imports {offending}"


def test_pure_modules_do_not_load_grpc_even_indirectly() -> None:
    code = (
        "import sys\n"
        + "".join(f"import gossip.{n[:-3]}\n" for n in PURE)
        + "print(','.join(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))))\n"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
