"""Flat parameters: one contiguous buffer behind every trainable tensor.

A model's parameters are re-pointed at views of one flat buffer per dtype (see
:mod:`gossip.core.layout`), so a snapshot is one ``copy_``, an averaging delta
is one ``add_`` and the bytes on the wire are the buffer itself (a memoryview,
no per-tensor packing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gossip.core.layout import ITEMSIZE, Entry, Layout, LayoutError

__all__ = ["DTYPES", "Entry", "FlatParams", "Layout", "LayoutError", "all_finite"]

# The torch dtype of each dtype name a layout may hold.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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

    @classmethod
    def empty(cls, layout: Layout) -> FlatParams:
        """Uninitialised buffers, for a destination that is filled whole before it is read."""
        return cls(layout, {dt: torch.empty(n, dtype=DTYPES[dt]) for dt, n in layout.segments.items()})

    @classmethod
    def copy_of(cls, named: Sequence[tuple[str, torch.Tensor]]) -> FlatParams:
        """A flat copy of named CPU tensors (a snapshot's optimizer state), in a layout of their own."""
        flat = cls.empty(Layout.from_named(named))
        views = flat.state_dict()
        with torch.no_grad():
            for name, t in named:
                views[name].copy_(t.reshape(views[name].shape))
        return flat

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

    def gather(self, coords: Sequence[int]) -> list[float]:
        """The values at sorted flat ``coords`` (counted over the segments in order), as floats."""
        out: list[float] = []
        first = 0
        for s in self.segments.values():
            mine = [c - first for c in coords if first <= c < first + s.numel()]
            if mine:
                out += s[torch.tensor(mine, dtype=torch.long)].float().tolist()
            first += s.numel()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors (views into the buffers) in layout order."""
        return {
            e.name: self.segments[e.dtype][e.offset : e.offset + e.numel].view(e.shape)
            for e in self.layout.entries
        }

    @classmethod
    def from_bytes(cls, layout: Layout, data: bytearray | memoryview) -> FlatParams:
        """Tensors over ``data`` (no copy where alignment allows): never unpickles anything."""
        if len(data) != layout.nbytes:
            raise LayoutError(f"{len(data)} bytes where the layout needs {layout.nbytes}")
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        segments = {}
        start = 0
        for dt, n in layout.segments.items():
            dtype = DTYPES[dt]
            item = ITEMSIZE[dt]
            piece = raw[start : start + n * item]
            if start % item:
                piece = piece.clone()  # a segment after an odd-sized one: views must be aligned
            segments[dt] = piece.view(dtype)
            start += n * item
        return cls(layout, segments)

    def byte_views(self) -> list[memoryview]:
        """The raw little-endian bytes of every segment, in order, without copying."""
        return [bytes_of(s) for s in self.segments.values()]

    def concat_bytes(self) -> memoryview:
        """One memoryview over all bytes; copies only when there is more than one segment."""
        views = self.byte_views()
        return views[0] if len(views) == 1 else memoryview(b"".join(views))


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


def bytes_of(t: torch.Tensor) -> memoryview:
    # uint8 view of the storage: memoryview(numpy) works for every dtype, bfloat16 included.
    return t.contiguous().view(torch.uint8).numpy().data.cast("B")
