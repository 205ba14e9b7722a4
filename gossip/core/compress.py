"""Compressors: how a vector travels in fewer bytes, and the exact values the receiver decodes.

A spec is ``none`` or stages joined by ``+``: at most one *sparsifier* (``topk:F``,
``randk:F``: a fraction F of the entries, their indices sent as varint gaps) and at
most one *value coder* (``fp16``, ``bf16``; ``int8``, ``int4``: stochastic rounding
with a float32 scale per block of :data:`BLOCK` values; ``sign``: one bit per value
and a float32 scale, the block's mean magnitude), the sparsifier first, e.g.
``topk:0.01+int8``.

:meth:`Compressor.compress` returns the payload *and* the values the receiver will
decode from it, bit for bit, so a sender can keep its reference copy of what the
other side knows exactly in step (error feedback, CHOCO style, is built on this; the
biased stages, ``topk`` and ``sign``, are only correct with it). :meth:`decompress`
refuses, with :class:`CompressError`, a payload of the wrong length for this spec
and a vector of that length, indices that are not strictly increasing or fall
outside it, codes this spec never sends, and scales or values that are negative,
NaN or infinite: a peer controls every byte.

Error feedback is :mod:`gossip.core.choco` (per-pair public copies, on real nodes'
``--compress`` and the simulator's pairwise rounds) and ``averaging.choco_round_`` (sync
rounds); both count the bytes of the real payloads.

Pure: torch and numpy, shared by real nodes and the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BLOCK = 256  # values per scale of int8, int4 and sign
_SPARSIFIERS = ("topk", "randk")
_CODERS = ("fp16", "bf16", "int8", "int4", "sign")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CompressError(ValueError):
    """A spec that does not parse, or a payload this spec cannot have produced."""


@dataclass(frozen=True)
class Compressor:
    """A parsed spec: ``sparsifier`` (``topk``/``randk`` or None) with ``fraction``, then ``coder``."""

    sparsifier: str | None = None
    fraction: float = 1.0
    coder: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Compressor:
        text = spec.strip()
        if text in ("", "none"):
            return cls()
        sparsifier, fraction, coder = None, 1.0, None
        for i, stage in enumerate(text.split("+")):
            name, _, arg = stage.strip().partition(":")
            if name in _SPARSIFIERS:
                if i != 0 or sparsifier is not None:
                    raise CompressError(f"compress spec {spec!r}: {name} must come first, once")
                try:
                    fraction = float(arg)
                except ValueError:
                    raise CompressError(f"compress spec {spec!r}: {name}:F needs a fraction F") from None
                if not 0 < fraction <= 1:
                    raise CompressError(f"compress spec {spec!r}: the fraction must be in (0, 1]")
                sparsifier = name
            elif name in _CODERS and not arg:
                if coder is not None:
                    raise CompressError(f"compress spec {spec!r}: one value coder at most")
                coder = name
            else:
                raise CompressError(
                    f"compress spec {spec!r}: unknown stage {stage!r}; use none, fp16, bf16, int8, int4, "
                    "sign, topk:F, randk:F, or a sparsifier + a coder such as topk:0.01+int8"
                )
        return cls(sparsifier, fraction, coder)

    @property
    def spec(self) -> str:
        parts = [f"{self.sparsifier}:{self.fraction:g}"] if self.sparsifier else []
        parts += [self.coder] if self.coder else []
        return "+".join(parts) or "none"

    @property
    def biased(self) -> bool:
        """Whether E[decoded] differs from the input: such a stage needs error feedback."""
        return self.sparsifier == "topk" or self.coder == "sign"

    def default_step(self) -> float:
        """A CHOCO-Gossip consensus step that converged with this compressor on a ring of 16
        (the research docs' table): smaller as fewer or noisier values travel."""
        step = 1.0
        if self.sparsifier == "topk":
            step = min(0.4, 2 * self.fraction)
        elif self.sparsifier == "randk":
            step = self.fraction
        if self.coder == "sign":
            step = min(step, 0.2)
        elif self.coder in _HALF:
            step = min(step, 0.4)  # their error does not shrink with the values: a floor
        return step

    def kept(self, n: int) -> int:
        """How many of ``n`` entries travel."""
        return n if self.sparsifier is None else max(1, min(n, math.ceil(self.fraction * n))) if n else 0

    def max_nbytes(self, n: int) -> int:
        """The most a payload for ``n`` values can take (varint gaps at their longest)."""
        k = self.kept(n)
        index = 4 + 5 * k if self.sparsifier else 0
        return index + _coded_nbytes(self.coder, k)

    # --- both ends ---------------------------------------------------------------------

    def compress(self, x: Tensor, gen: torch.Generator) -> tuple[bytes, Tensor]:
        """(payload, what :meth:`decompress` gives back from it) for the 1-D float tensor ``x``."""
        x = x.detach().reshape(-1).to(torch.float32)
        n = x.numel()
        if self.sparsifier is None:
            idx = None
            values = x
        else:
            k = self.kept(n)
            if self.sparsifier == "topk":
                # numpy's introselect then a mask is ~8x faster than torch.topk + sort here
                chosen = np.argpartition(x.abs().numpy(), n - k)[n - k :]
            else:
                chosen = torch.randperm(n, generator=gen)[:k].numpy()
            mask = np.zeros(n, dtype=bool)
            mask[chosen] = True
            idx = torch.from_numpy(np.flatnonzero(mask))  # sorted
            values = x[idx]
        coded, decoded_values = _encode_values(self.coder, values, gen)
        if idx is None:
            return coded, decoded_values
        decoded = torch.zeros(n, dtype=torch.float32)
        decoded[idx] = decoded_values
        return _encode_indices(idx.numpy()) + coded, decoded

    def decompress(self, payload: bytes | memoryview, n: int) -> Tensor:
        """The values of a payload for ``n`` entries; CompressError unless it is exactly well formed."""
        return densify(*self.decompress_parts(payload, n), n)

    def decompress_parts(self, payload: bytes | memoryview, n: int) -> tuple[Tensor | None, Tensor]:
        """(indices, their values) of a payload for ``n`` entries, indices None when every entry
        travels; checked as :meth:`decompress` checks."""
        data = memoryview(payload).cast("B")
        if len(data) > self.max_nbytes(n):
            raise CompressError(
                f"payload of {len(data)} bytes exceeds the {self.max_nbytes(n)} this spec allows"
            )
        if self.sparsifier is None:
            return None, _decode_values(self.coder, data, n)
        k = self.kept(n)
        idx, used = _decode_indices(data, k, n)
        return torch.from_numpy(idx), _decode_values(self.coder, data[used:], k)


def densify(idx: Tensor | None, values: Tensor, n: int) -> Tensor:
    """The dense vector of ``n`` entries that is ``values`` at ``idx`` (all of them if None), else 0."""
    if idx is None:
        return values
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = values
    return out


# --- indices: the count, then varint gaps ----------------------------------------------


def _encode_indices(idx: np.ndarray) -> bytes:
    """Sorted distinct indices as their count (uint32) and LEB128 varints of the gaps."""
    gaps: np.ndarray = np.diff(idx.astype(np.uint64), prepend=np.uint64(0)).astype(np.uint64)
    if not len(gaps) or int(gaps.max()) < 0x80:  # every gap in one byte
        return len(idx).to_bytes(4, "little") + gaps.astype(np.uint8).tobytes()
    sizes = np.ones(len(gaps), dtype=np.int64)
    for shift in (7, 14, 21, 28):
        sizes += gaps >= (1 << shift)
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    starts = np.cumsum(sizes) - sizes
    for j in range(5):
        has = sizes > j
        byte = (gaps[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = sizes[has] > j + 1
        out[starts[has] + j] = byte.astype(np.uint8) | (more.astype(np.uint8) << 7)
    return len(idx).to_bytes(4, "little") + out.tobytes()


def _decode_indices(data: memoryview, k: int, n: int) -> tuple[np.ndarray, int]:
    """(indices, bytes used); they must be k strictly increasing indices below n."""
    if len(data) < 4 or int.from_bytes(data[:4], "little") != k:
        raise CompressError(f"payload does not announce the {k} indices this spec sends")
    raw = np.frombuffer(data[4:], dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) < k:
        raise CompressError("payload ends inside its indices")
    ends = ends[:k]
    starts = np.concatenate(([0], ends[:-1] + 1)) if k else ends
    if k and int((ends - starts).max()) >= 5:
        raise CompressError("index gap longer than 5 bytes")
    used = int(ends[-1]) + 1 if k else 0
    part = raw[:used].astype(np.uint64) & np.uint64(0x7F)
    if used == k:  # every gap in one byte (k = 0 too; the common case of a dense enough top-k)
        gaps = part
    else:
        group = np.repeat(np.arange(k), (ends - starts + 1).astype(np.int64))
        shifts = (np.arange(used) - starts[group]).astype(np.uint64) * np.uint64(7)
        gaps = np.add.reduceat(part << shifts, starts)
    if k > 1 and int(gaps[1:].min()) == 0:
        raise CompressError("indices repeat")
    idx = np.cumsum(gaps)
    if k and int(idx[-1]) >= n:
        raise CompressError(f"index {int(idx[-1])} outside a vector of {n}")
    return idx.astype(np.int64), 4 + used


# --- values ----------------------------------------------------------------------------


def _coded_nbytes(coder: str | None, k: int) -> int:
    blocks = -(-k // BLOCK)
    if coder is None:
        return 4 * k
    if coder in _HALF:
        return 2 * k
    if coder == "int8":
        return 4 * blocks + k
    if coder == "int4":
        return 4 * blocks + (k + 1) // 2
    return 4 * blocks + (k + 7) // 8  # sign


def _blocks(values: Tensor) -> Tensor:
    """``values`` zero-padded to whole blocks, (blocks, BLOCK)."""
    k = values.numel()
    padded = torch.zeros(-(-k // BLOCK) * BLOCK, dtype=torch.float32)
    padded[:k] = values
    return padded.view(-1, BLOCK)


def _encode_values(coder: str | None, values: Tensor, gen: torch.Generator) -> tuple[bytes, Tensor]:
    k = values.numel()
    if coder is None:
        v = values.contiguous()
        return v.numpy().tobytes(), v.clone()
    if coder in _HALF:
        half = values.to(_HALF[coder])
        return half.view(torch.int16).numpy().tobytes(), half.to(torch.float32)
    b = _blocks(values)
    if coder == "sign":
        scale = b.abs().sum(dim=1) / torch.tensor(
            [min(BLOCK, k - i * BLOCK) for i in range(b.shape[0])], dtype=torch.float32
        )
        bits = (b >= 0).flatten()[:k].numpy()
        decoded = torch.where(b >= 0, 1.0, -1.0).mul_(scale[:, None]).flatten()[:k]
        return scale.numpy().tobytes() + np.packbits(bits, bitorder="little").tobytes(), decoded
    levels = 127 if coder == "int8" else 7
    amax = b.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
    noise = torch.rand(b.shape, generator=gen)
    q = torch.floor(b / scale[:, None] + noise).clamp_(-levels, levels)
    decoded = (q * scale[:, None]).flatten()[:k]
    qs = q.flatten()[:k].to(torch.int8).numpy()
    if coder == "int8":
        return scale.numpy().tobytes() + qs.tobytes(), decoded
    nib = (qs + 8).astype(np.uint8)
    if k % 2:
        nib = np.append(nib, np.uint8(8))
    return scale.numpy().tobytes() + (nib[0::2] | (nib[1::2] << 4)).tobytes(), decoded


def _decode_values(coder: str | None, data: memoryview, k: int) -> Tensor:
    if len(data) != _coded_nbytes(coder, k):
        raise CompressError(f"{len(data)} bytes of values where {_coded_nbytes(coder, k)} were expected")
    if coder is None:
        out = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
    elif coder in _HALF:
        out = (
            torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(_HALF[coder]).to(torch.float32)
        )
    else:
        blocks = -(-k // BLOCK)
        scale = torch.from_numpy(np.frombuffer(data[: 4 * blocks], dtype=np.float32).copy())
        body = np.frombuffer(data[4 * blocks :], dtype=np.uint8)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CompressError("a block scale is negative or not finite")
        if coder == "sign":
            signs = np.unpackbits(body, bitorder="little")[:k].astype(np.float32) * 2 - 1
            per = torch.from_numpy(signs)
        elif coder == "int8":
            q = body.view(np.int8)
            if int(np.abs(q.astype(np.int16)).max(initial=0)) > 127:
                raise CompressError("int8 value -128 is never sent")
            per = torch.from_numpy(q.astype(np.float32))
        else:
            nib = np.empty(2 * len(body), dtype=np.uint8)
            nib[0::2], nib[1::2] = body & 0x0F, body >> 4
            if int(nib.min(initial=8)) == 0:
                raise CompressError("int4 value -8 is never sent")
            per = torch.from_numpy(nib[:k].astype(np.float32) - 8)
        padded = torch.zeros(blocks * BLOCK, dtype=torch.float32)
        padded[:k] = per
        out = (padded.view(-1, BLOCK) * scale[:, None]).flatten()[:k]
    if not bool(torch.isfinite(out).all()):
        raise CompressError("payload decodes to NaN or Inf")
    return out
