"""The flat layout of a model's trainable parameters, without torch.

Ordered (name, dtype, shape, offset) entries, one contiguous segment per dtype.
Its fingerprint must match before two nodes mix numbers. Torch-free, so the
shard store's manifests and the command line can read layouts without loading
torch; :mod:`gossip.core.params` binds a layout to tensors.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

# Dtypes a layout may hold. Trainable parameters are floating point; the names
# are what travels in a fingerprint, so they must never change.
ITEMSIZE: dict[str, int] = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("gossip sends raw little-endian bytes and needs a little-endian host")


# What a snapshot may carry after the parameters (a second layout, names prefixed):
# the publisher's momentum buffers, keyed by parameter name, and the model's
# floating-point buffers (e.g. BatchNorm's running statistics), keyed by buffer name.
STATE_MOMENTUM = "momentum/"
STATE_BUFFER = "buffer/"
STATE_PREFIXES = (STATE_MOMENTUM, STATE_BUFFER)


class LayoutError(ValueError):
    """A model or a payload does not fit the expected layout."""


@dataclass(frozen=True)
class Entry:
    """One tensor in the flat layout; ``offset`` counts elements within its dtype segment."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    """Ordered entries, grouped into one contiguous segment per dtype."""

    entries: tuple[Entry, ...]

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, Any]]) -> Layout:
        """The layout of (name, tensor) pairs in order; a tensor needs ``dtype``, ``shape`` and ``numel()``."""
        items = list(named)
        if not items:
            raise LayoutError("the model has no trainable parameters")
        offsets: dict[str, int] = {}
        entries = []
        # Segments follow the order in which dtypes first appear, so a model of one
        # dtype has exactly the parameter order of model.named_parameters().
        for name, t in items:
            dt = str(t.dtype).removeprefix("torch.")
            if dt not in ITEMSIZE:
                raise LayoutError(f"parameter {name} has dtype {t.dtype}; supported: {', '.join(ITEMSIZE)}")
            off = offsets.get(dt, 0)
            entries.append(Entry(name, dt, tuple(int(s) for s in t.shape), off))
            offsets[dt] = off + t.numel()
        return cls(tuple(entries))

    @classmethod
    def of_model(cls, model: Any) -> Layout:
        """The layout of an ``nn.Module``'s trainable parameters."""
        return cls.from_named((n, p) for n, p in model.named_parameters() if p.requires_grad)

    @cached_property
    def segments(self) -> dict[str, int]:
        """dtype name -> element count, in segment order."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.dtype] = out.get(e.dtype, 0) + e.numel
        return out

    @cached_property
    def numel(self) -> int:
        return sum(self.segments.values())

    @cached_property
    def nbytes(self) -> int:
        return sum(n * ITEMSIZE[dt] for dt, n in self.segments.items())

    def fingerprint(self) -> bytes:
        """16-byte digest of names, dtypes and shapes: equal only for the same architecture."""
        canon = json.dumps([[e.name, e.dtype, list(e.shape)] for e in self.entries], separators=(",", ":"))
        return hashlib.blake2b(canon.encode(), digest_size=16).digest()

    def to_json(self) -> list[dict[str, object]]:
        return [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset}
            for e in self.entries
        ]

    @classmethod
    def from_json(cls, data: object) -> Layout:
        """Parse a layout that came from elsewhere (a manifest, a peer): every field is checked."""
        if not isinstance(data, list) or not data:
            raise LayoutError("layout must be a non-empty list of entries")
        entries = []
        for d in data:
            if not isinstance(d, dict) or not {"name", "dtype", "shape", "offset"} <= d.keys():
                raise LayoutError(f"malformed layout entry {str(d)[:80]}: needs name, dtype, shape, offset")
            name, dt, shape, offset = d["name"], d["dtype"], d["shape"], d["offset"]
            if not isinstance(name, str) or not name:
                raise LayoutError(f"layout entry name must be a non-empty string, got {name!r:.80}")
            if not isinstance(dt, str) or dt not in ITEMSIZE:
                raise LayoutError(f"unknown dtype {dt!r:.40} in layout entry {name!r}")
            if not isinstance(shape, list | tuple) or not all(_is_count(s) for s in shape):
                raise LayoutError(
                    f"layout entry {name!r} needs a shape of non-negative integers, got {shape!r:.80}"
                )
            if not _is_count(offset):
                raise LayoutError(f"layout entry {name!r} has offset {offset!r:.40}")
            entries.append(Entry(name, dt, tuple(shape), offset))
        if len({e.name for e in entries}) != len(entries):
            raise LayoutError("layout names a parameter twice")
        # Offsets must be exactly what from_named would assign: dense, in order, per dtype.
        next_offset: dict[str, int] = {}
        for e in entries:
            if e.offset != next_offset.get(e.dtype, 0):
                raise LayoutError(f"layout offsets are inconsistent at entry {e.name!r}")
            next_offset[e.dtype] = e.offset + e.numel
        if any(n >= _MAX_COUNT for n in next_offset.values()):
            raise LayoutError("layout is larger than any buffer torch can hold")
        return cls(tuple(entries))


_MAX_COUNT = 1 << 62  # far above any real model, below int64 overflow in torch's sizes


def _is_count(v: object) -> bool:
    # bool is an int in Python, and 2.0 or "3" are not what a layout writer meant.
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT
