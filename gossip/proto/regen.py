"""Regenerate the committed stubs from ``protos/`` (needs grpcio-tools)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(out_dir: Path | None = None) -> int:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = str(out_dir or ROOT)
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    return int(protoc.main(args))


if __name__ == "__main__":
    sys.exit(main())
