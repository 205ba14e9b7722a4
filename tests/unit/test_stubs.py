"""Committed stubs match the protos (the layering rules are tests/unit/test_layers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.proto import regen

PACKAGE = Path(__file__).resolve().parents[2] / "gossip"
PROTOS = sorted(p.stem for p in (PACKAGE.parent / "protos" / "gossip" / "proto").glob("*.proto"))
STUBS = [f"{stem}{suffix}" for stem in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


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
