"""A workload where bytes matter, with nothing downloaded: byte-level language modelling
on the source of the Python standard library of the machine it runs on.

``text:stdlib`` (or ``text:stdlib:CONTEXT``, 16 to 1024 bytes of context, default
64) reads the ``.py`` files under ``sysconfig``'s ``stdlib`` path in sorted order,
leaving out tests (``test``/``tests``/``idle_test`` folders and ``test_*.py``),
``site-packages``/``dist-packages`` and ``__pycache__``. A file goes to validation
when the BLAKE2 hash of its relative path says so (one in ten), else to training, so
the split is by file and the same on every machine; each side is cut at a fixed byte
budget (:data:`TRAIN_BYTES`, :data:`VALID_BYTES`), taking whole files in sorted
order. Every node of a run therefore derives the same corpus on its own. Within one
Python release (e.g. 3.11.7) the corpus is the same byte for byte everywhere; between
patch releases of one minor version the file list is the same but a few files
differ by a few bytes, and between minor versions the corpus differs.

Samples are windows of CONTEXT bytes at a stride of CONTEXT: the input is the window
(byte values as float32, the flat-feature convention of every dataset here), the
target the same window shifted by one byte (int64). Models map (N, CONTEXT) to logits
(N, CONTEXT, 256). Loss is in nats per byte; bits per byte = loss / ln 2.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from gossip.config import ConfigError

TRAIN_BYTES = 1 << 20  # what 8 nodes of a quick CPU run can each see a few times
VALID_BYTES = 1 << 17
DEFAULT_CONTEXT = 64
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class TextError(ConfigError):
    """A text dataset spec or corpus that cannot be used; one line for the user."""


def parse_spec(spec: str) -> int:
    """The context length of ``text:stdlib[:CONTEXT]``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "text" or parts[1] != "stdlib":
        raise TextError(f"unknown text dataset {spec!r}: use text:stdlib or text:stdlib:CONTEXT")
    if len(parts) == 2:
        return DEFAULT_CONTEXT
    try:
        context = int(parts[2])
    except ValueError:
        raise TextError(f"bad text dataset {spec!r}: CONTEXT must be a whole number of bytes") from None
    if not 16 <= context <= 1024:
        raise TextError(f"bad text dataset {spec!r}: CONTEXT must be between 16 and 1024 bytes")
    return context


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus's source files, sorted by their path relative to ``root``."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise TextError(f"the Python standard library's source is not at {base}")
    files = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # not walked at all
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def is_validation(relative: str) -> bool:
    """One file in ten, chosen by the hash of its relative path: the same on every machine."""
    return hashlib.blake2b(relative.encode(), digest_size=8).digest()[0] % 10 == 0


def corpus(root: Path | None = None) -> tuple[bytes, bytes, int]:
    """(training bytes, validation bytes, files used), each side capped at its budget."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    train: list[bytes] = []
    valid: list[bytes] = []
    sizes = {"train": 0, "valid": 0}
    used = 0
    for path in stdlib_files(base):
        side, budget, out = (
            ("valid", VALID_BYTES, valid)
            if is_validation(path.relative_to(base).as_posix())
            else ("train", TRAIN_BYTES, train)
        )
        if sizes[side] >= budget:
            if sizes["train"] >= TRAIN_BYTES and sizes["valid"] >= VALID_BYTES:
                break
            continue
        data = path.read_bytes()[: budget - sizes[side]]
        out.append(data)
        sizes[side] += len(data)
        used += 1
    if sizes["train"] < TRAIN_BYTES // 2 or sizes["valid"] < VALID_BYTES // 2:
        raise TextError(f"the standard library at {base} holds too little source for text:stdlib")
    return b"".join(train), b"".join(valid), used


def windows(data: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (N, context) float32 and next-byte targets (N, context) int64, at a stride of context."""
    raw = np.frombuffer(data, dtype=np.uint8)
    n = (len(raw) - 1) // context
    x = raw[: n * context].reshape(n, context)
    y = raw[1 : n * context + 1].reshape(n, context)
    return x.astype(np.float32), y.astype(np.int64)
