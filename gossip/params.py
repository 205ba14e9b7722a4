"""Flat parameter layout: one contiguous buffer behind every trainable tensor.

A model's parameters are re-pointed at views of one flat buffer per dtype, so a
snapshot is one ``clone()``, an averaging delta is one ``add_`` and the bytes
on the wire are the buffer itself (a memoryview, no per-tensor packing). The
layout's fingerprint must match before two nodes mix numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Dtypes a layout may hold. Trainable parameters are floating point; the names
# are what travels in a fingerprint, so they must never change.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("gossip sends raw little-endian bytes and needs a little-endian host")


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
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Layout:
        items = list(named)
        if not items:
            raise LayoutError("the model has no trainable parameters")
        offsets: dict[str, int] = {}
        entries = []
        # Segments follow the order in which dtypes first appear, so a model of one
        # dtype has exactly the parameter order of model.named_parameters().
        for name, t in items:
            if t.dtype not in _DTYPE_NAMES:
                raise LayoutError(f"parameter {name} has dtype {t.dtype}; supported: {', '.join(DTYPES)}")
            dt = _DTYPE_NAMES[t.dtype]
            off = offsets.get(dt, 0)
            entries.append(Entry(name, dt, tuple(int(s) for s in t.shape), off))
            offsets[dt] = off + t.numel()
        return cls(tuple(entries))

    @classmethod
    def of_model(cls, model: nn.Module) -> Layout:
        return cls.from_named((n, p) for n, p in model.named_parameters() if p.requires_grad)

    @property
    def segments(self) -> dict[str, int]:
        """dtype name -> element count, in segment order."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.dtype] = out.get(e.dtype, 0) + e.numel
        return out

    @property
    def numel(self) -> int:
        return sum(self.segments.values())

    @property
    def nbytes(self) -> int:
        return sum(n * _itemsize(dt) for dt, n in self.segments.items())

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
        if not isinstance(data, list):
            raise LayoutError("layout must be a list of entries")
        entries = []
        try:
            for d in data:
                dt = str(d["dtype"])
                if dt not in DTYPES:
                    raise LayoutError(f"unknown dtype {dt!r} in layout")
                shape = tuple(int(s) for s in d["shape"])
                if any(s < 0 for s in shape):
                    raise LayoutError(f"negative dimension in layout entry {d['name']!r}")
                entries.append(Entry(str(d["name"]), dt, shape, int(d["offset"])))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LayoutError):
                raise
            raise LayoutError(f"malformed layout entry: {exc}") from None
        layout = cls(tuple(entries))
        if layout != cls.from_named(
            (e.name, torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta")) for e in entries
        ):
            raise LayoutError("layout offsets are inconsistent")
        return layout


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


class FlatParams:
    """The flat buffers behind a model's parameters.

    ``segments`` maps a dtype name to a 1-D tensor; every parameter of that dtype
    is a view into it. ``bind`` re-points an existing model's parameters (the
    Parameter objects stay the same, so an optimizer built earlier keeps working).
    """

    def __init__(self, layout: Layout, segments: dict[str, torch.Tensor]) -> None:
        self.layout = layout
        self.segments = segments
        self.fingerprint = layout.fingerprint()

    @classmethod
    def bind(cls, model: nn.Module) -> FlatParams:
        layout = Layout.of_model(model)
        segs = {dt: torch.empty(n, dtype=DTYPES[dt]) for dt, n in layout.segments.items()}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for e in layout.entries:
                view = segs[e.dtype][e.offset : e.offset + e.numel].view(e.shape)
                p = params[e.name]
                if p.device.type != "cpu":
                    raise LayoutError(f"parameter {e.name} lives on {p.device}; gossip binds CPU parameters")
                view.copy_(p.data)
                p.data = view
        return cls(layout, segs)

    @classmethod
    def zeros(cls, layout: Layout) -> FlatParams:
        return cls(layout, {dt: torch.zeros(n, dtype=DTYPES[dt]) for dt, n in layout.segments.items()})

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def clone(self) -> FlatParams:
        return FlatParams(self.layout, {dt: s.clone() for dt, s in self.segments.items()})

    def copy_(self, other: FlatParams) -> None:
        for dt, s in self.segments.items():
            s.copy_(other.segments[dt])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.segments.values())

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in self.segments.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors (views into the buffers) in layout order."""
        return {
            e.name: self.segments[e.dtype][e.offset : e.offset + e.numel].view(e.shape)
            for e in self.layout.entries
        }

    def byte_views(self) -> list[memoryview]:
        """The raw little-endian bytes of every segment, in order, without copying."""
        return [_bytes_of(s) for s in self.segments.values()]


def _bytes_of(t: torch.Tensor) -> memoryview:
    # uint8 view of the storage: memoryview(numpy) works for every dtype, bfloat16 included.
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def concat_bytes(flat: FlatParams) -> memoryview:
    """One memoryview over all bytes; copies only when there is more than one segment."""
    views = flat.byte_views()
    if len(views) == 1:
        return views[0]
    return memoryview(b"".join(views))


# --- codecs -------------------------------------------------------------------
# A codec turns the float segments into the bytes that travel. "raw" sends the
# buffers themselves (zero copies); "fp16"/"bf16" halve the bytes at the cost of
# precision and one conversion on each side.
CODECS = ("raw", "fp16", "bf16")
_WIRE_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def payload_nbytes(layout: Layout, codec: str) -> int:
    if codec == "raw":
        return layout.nbytes
    if codec in _WIRE_DTYPE:
        return layout.numel * 2
    raise LayoutError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def encode(flat: FlatParams, codec: str) -> list[memoryview]:
    """Byte views to send for ``flat`` under ``codec`` (the buffers themselves for raw)."""
    if codec == "raw":
        return flat.byte_views()
    wire = _WIRE_DTYPE.get(codec)
    if wire is None:
        raise LayoutError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return [_bytes_of(s.to(wire)) for s in flat.segments.values()]


class PayloadReceiver:
    """Preallocated destination for one incoming payload.

    ``write`` copies each chunk straight into the target buffers (raw) or into a
    scratch buffer that ``finish`` converts (fp16/bf16). Nothing reaches ``out``
    in a usable state until ``finish`` has checked the length.
    """

    def __init__(self, layout: Layout, codec: str, out: FlatParams | None = None) -> None:
        self.layout = layout
        self.codec = codec
        self.expected = payload_nbytes(layout, codec)
        self.out = out if out is not None else FlatParams.zeros(layout)
        if codec == "raw":
            self._scratch: torch.Tensor | None = None
            self._targets = self.out.byte_views()
        else:
            self._scratch = torch.empty(self.expected, dtype=torch.uint8)
            self._targets = [memoryview(self._scratch.numpy()).cast("B")]
        self.received = 0
        self._seg = 0
        self._pos = 0

    def write(self, data: memoryview | bytes) -> None:
        n = len(data)
        if self.received + n > self.expected:
            raise LayoutError(f"payload longer than the {self.expected} bytes announced")
        src = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        done = 0
        while done < n:
            tgt = self._targets[self._seg]
            take = min(n - done, len(tgt) - self._pos)
            tgt[self._pos : self._pos + take] = src[done : done + take]
            done += take
            self._pos += take
            if self._pos == len(tgt) and self._seg + 1 < len(self._targets):
                self._seg += 1
                self._pos = 0
        self.received += n

    def finish(self) -> FlatParams:
        if self.received != self.expected:
            raise LayoutError(f"payload has {self.received} bytes, expected {self.expected}")
        if self._scratch is not None:
            wire = self._scratch.view(_WIRE_DTYPE[self.codec])
            start = 0
            for seg in self.out.segments.values():
                seg.copy_(wire[start : start + seg.numel()])
                start += seg.numel()
        return self.out
