"""Codecs: how a model's float segments travel as bytes, and the receiver that checks them.

"raw" sends the buffers themselves (zero copies); "fp16"/"bf16" halve the bytes
at the cost of precision and one conversion on each side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from gossip.core.layout import Layout, LayoutError
from gossip.core.params import FlatParams, all_finite, bytes_of

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
    return [bytes_of(s.to(wire)) for s in flat.segments.values()]


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


def round_trip_(flat: FlatParams, codec: str) -> None:
    """Replace values by what ``codec`` makes of them, so both sides of an exchange use the same numbers."""
    wire = _WIRE_DTYPE.get(codec)
    if wire is None:
        return
    for s in flat:
        s.copy_(s.to(wire))
