"""Flat parameter layout: one contiguous buffer behind every trainable tensor.

A model's parameters are re-pointed at views of one flat buffer per dtype, so a
snapshot is one ``clone()``, an averaging delta is one ``add_`` and the bytes
on the wire are the buffer itself (a memoryview, no per-tensor packing). The
layout's fingerprint must match before two nodes mix numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
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
            if not isinstance(dt, str) or dt not in DTYPES:
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
        return all(all_finite(s) for s in self.segments.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors (views into the buffers) in layout order."""
        return {
            e.name: self.segments[e.dtype][e.offset : e.offset + e.numel].view(e.shape)
            for e in self.layout.entries
        }

    def byte_views(self) -> list[memoryview]:
        """The raw little-endian bytes of every segment, in order, without copying."""
        return [_bytes_of(s) for s in self.segments.values()]


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN and no ±Inf; exact.

    ``aminmax`` propagates NaN and returns ±Inf as an extreme when present, so
    both results are finite exactly when every element is. It is one vectorized
    pass with no temporary: ~30x faster than ``torch.isfinite(t).all()``, which
    builds a bool tensor and is not vectorized on CPU (117 ms vs 3.5 ms for
    100 MiB of float32). A sum would be one pass too, but finite values can
    overflow it to Inf.
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _bytes_of(t: torch.Tensor) -> memoryview:
    # uint8 view of the storage: memoryview(numpy) works for every dtype, bfloat16 included.
    return t.contiguous().view(torch.uint8).numpy().data.cast("B")


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

    ``check_finite``: every element is checked for NaN/Inf as soon as it has
    arrived (while the chunk is still in cache), and a non-finite one makes
    ``write`` (or, for fp16/bf16, ``finish``) raise :class:`LayoutError`, so a
    complete payload is known to be finite without another pass over it.

    ``consume(i, start, stop, values)``: instead of storing the values itself,
    the receiver hands each range of elements of segment ``i`` over, in order
    and exactly once, once they are complete (and checked). ``values`` is a
    tensor of the received values, often a view of the chunk itself (read-only,
    valid only during the call), sometimes ``out``'s own slice; ``consume`` must
    leave in ``out.segments[i][start:stop]`` whatever it wants there. This saves
    the copy when the caller transforms the values anyway (the pairwise delta).
    For fp16/bf16 the ranges are whole segments, handed over by ``finish``.
    """

    def __init__(
        self,
        layout: Layout,
        codec: str,
        out: FlatParams | None = None,
        *,
        check_finite: bool = False,
        consume: Callable[[int, int, int, torch.Tensor], None] | None = None,
    ) -> None:
        self.layout = layout
        self.codec = codec
        self.expected = payload_nbytes(layout, codec)
        self.out = out if out is not None else FlatParams.zeros(layout)
        self.check_finite = check_finite
        self.consume = consume
        if codec == "raw":
            self._scratch: torch.Tensor | None = None
            self._targets = self.out.byte_views()
        else:
            self._scratch = torch.empty(self.expected, dtype=torch.uint8)
            self._targets = [self._scratch.numpy().data.cast("B")]
        # Element views of the raw targets, for checking and handing on finished ranges.
        self._track = codec == "raw" and (check_finite or consume is not None)
        self._elems = list(self.out.segments.values()) if self._track else []
        self._itemsize = [t.element_size() for t in self._elems]
        self._ready = [0] * len(self._elems)  # elements of each segment already checked and handed on
        self.received = 0
        self._seg = 0
        self._pos = 0

    def write(self, data: memoryview | bytes) -> None:
        n = len(data)
        if self.received + n > self.expected:
            raise LayoutError(f"payload longer than the {self.expected} bytes announced")
        src = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        if self.consume is not None and self._track and self._whole_elements(n):
            self._hand_over(src)
            return
        first = self._seg
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
        if self._track:
            for i in range(first, self._seg + 1):
                filled = len(self._targets[i]) if i < self._seg else self._pos
                self._advance(i, filled // self._itemsize[i])

    def _whole_elements(self, n: int) -> bool:
        """Whether ``n`` bytes are whole elements of the current segment, starting on one."""
        size = self._itemsize[self._seg]
        return (
            n > 0
            and self._pos == self._ready[self._seg] * size
            and n % size == 0
            and self._pos + n <= len(self._targets[self._seg])
        )

    def _hand_over(self, src: memoryview) -> None:
        """Check and hand over whole elements straight from the chunk: no copy into ``out``."""
        i = self._seg
        seg = self._elems[i]
        with warnings.catch_warnings():  # the chunk is read-only bytes; it is only ever read
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(src, dtype=seg.dtype)
        if self.check_finite and not all_finite(values):
            raise LayoutError("payload holds NaN or Inf")
        start = self._ready[i]
        stop = start + values.numel()
        assert self.consume is not None
        self.consume(i, start, stop, values)
        self._ready[i] = stop
        self.received += len(src)
        self._pos += len(src)
        if self._pos == len(self._targets[i]) and i + 1 < len(self._targets):
            self._seg += 1
            self._pos = 0

    def _advance(self, i: int, stop: int) -> None:
        start = self._ready[i]
        if stop <= start:
            return
        values = self._elems[i][start:stop]
        if self.check_finite and not all_finite(values):
            raise LayoutError("payload holds NaN or Inf")
        self._ready[i] = stop
        if self.consume is not None:
            self.consume(i, start, stop, values)

    def finish(self) -> FlatParams:
        if self.received != self.expected:
            raise LayoutError(f"payload has {self.received} bytes, expected {self.expected}")
        if self._scratch is not None:
            wire = self._scratch.view(_WIRE_DTYPE[self.codec])
            start = 0
            for seg in self.out.segments.values():
                seg.copy_(wire[start : start + seg.numel()])
                start += seg.numel()
            # Checked after the conversion: bf16 values can overflow a float16 segment.
            for i, seg in enumerate(self.out.segments.values()):
                if self.check_finite and not all_finite(seg):
                    raise LayoutError("payload holds NaN or Inf")
                if self.consume is not None and seg.numel():
                    self.consume(i, 0, seg.numel(), seg)
        elif self._track and self._ready != [t.numel() for t in self._elems]:  # pragma: no cover
            raise AssertionError("a complete payload left elements unchecked")
        return self.out
