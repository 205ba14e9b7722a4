"""The exchange pipeline: what a node sends, and how what it receives becomes its change.

One pairwise exchange on one side, in order (DESIGN.md, "The exchange pipeline"):

1. *what is averaged*: the node's snapshot, which each stage's ``outgoing_`` may
   turn into something else in place (a pseudo-gradient, a compressed residual);
2. *how it travels*: the codec (raw, fp16, bf16) encodes it into bytes and the
   :class:`~gossip.core.codecs.PayloadReceiver` decodes and checks the peer's;
3. *how much of it is trusted*: each stage's ``incoming_`` may change the received
   values in place (clip them) before the delta is formed;
4. *how it is applied*: the delta rule, ``(other - own) / 2`` added to the current
   model between two steps, which preserves the sum of all models exactly (the
   receive buffer holds ``other - own``; the 1/2 is fused into the add).

Stages are per-exchange transforms with one interface (:class:`Stage`); a stage
sees the peer's id, so it can keep per-neighbour state, and hears whether the
exchange committed (``settle``), so that state moves in step on both sides. Both
ends must run the same stages: :attr:`Pipeline.spec` travels in every header and a
peer with another one is refused. With no stages and the raw codec the delta is
formed chunk by chunk as the payload arrives (the fast path), with the same
arithmetic.

Pure: torch only. Real nodes run it per exchange; the simulator can run the
same stages on its stacked models.
"""

from __future__ import annotations

import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence

import torch

from gossip.core.averaging import PAIRWISE_SCALE
from gossip.core.choco import Choco, Offer
from gossip.core.codecs import PayloadReceiver, encode, payload_nbytes, round_trip_
from gossip.core.compress import CompressError
from gossip.core.errors import Refused
from gossip.core.layout import Layout, LayoutError
from gossip.core.params import DTYPES, FlatParams


class Stage:
    """One per-exchange transform; a subclass overrides the hooks it needs.

    ``name`` is its spec in headers (with its parameters, e.g. ``clip:2.0``);
    two nodes exchange only if their stages' specs are equal, in order.
    """

    name: str = ""

    def outgoing_(self, snap: FlatParams, peer: str) -> None:
        """Turn this node's snapshot into what it sends to ``peer`` (in place)."""

    def incoming_(self, own: FlatParams, other: FlatParams, peer: str) -> None:
        """Adjust what ``peer`` sent (``other``, in place) before the delta is formed from it."""

    def settle(self, peer: str, committed: bool) -> None:
        """The exchange with ``peer`` ended: both sides took their halves, or neither did."""


class Pipeline:
    """The stages a node runs around every exchange, and the codec it sends with."""

    def __init__(
        self, layout: Layout, codec: str = "raw", stages: Sequence[Stage] = (), choco: Choco | None = None
    ) -> None:
        payload_nbytes(layout, codec)  # an unknown codec fails here
        if choco is not None and (codec != "raw" or stages):
            raise ValueError("compressed exchanges code the values themselves: raw codec, no stages")
        self.layout = layout
        self.codec = codec
        self.stages = tuple(stages)
        self.choco = choco  # compressed exchanges with error feedback (gossip.core.choco)

    @property
    def spec(self) -> str:
        """What travels in the header: the stages besides the codec ('' for none)."""
        return "+".join([s.name for s in self.stages] + ([self.choco.name] if self.choco else []))

    def payload_nbytes(self, codec: str | None = None) -> int:
        return payload_nbytes(self.layout, codec or self.codec)

    def streams(self, codec: str) -> bool:
        """Whether the delta is formed chunk by chunk as the payload arrives (raw, no stages)."""
        return codec == "raw" and not self.stages and self.choco is None

    def outgoing(self, snap: FlatParams, peer: str, codec: str | None = None) -> list[memoryview]:
        """The bytes to send ``peer`` for ``snap`` (views into it for raw, no copies)."""
        for stage in self.stages:
            stage.outgoing_(snap, peer)
        return encode(snap, codec or self.codec)

    def pairwise(
        self, snap: FlatParams | Runs, recv: FlatParams, peer: str, codec: str
    ) -> PairwiseDelta | CompressedDelta:
        """This side's numbers of a pairwise exchange with ``peer``; see :class:`PairwiseDelta`."""
        if self.choco is not None:
            if isinstance(snap, Runs):
                raise ValueError("a compressed exchange needs its snapshot as a copy")
            return CompressedDelta(self.choco, snap, recv, peer)
        return PairwiseDelta(self, snap, recv, peer, codec)

    def receiver(self, out: FlatParams, codec: str) -> PayloadReceiver:
        """A checked receiver of a peer's whole model into ``out`` (push-sum)."""
        return PayloadReceiver(self.layout, codec, out=out, check_finite=True)

    def settle(self, peer: str, committed: bool) -> None:
        for stage in self.stages:
            stage.settle(peer, committed)

    def forget(self, peer: str) -> None:
        """``peer`` refused us as out of step: per-pair state with it starts over. (A peer that is
        gone keeps its pair until newer neighbours push it out: forgetting it while an exchange
        with it may be in flight would move the pair under that exchange.)"""
        if self.choco is not None:
            self.choco.forget(peer)


class Runs:
    """A snapshot's values as runs of elements, per segment: its segments, or the chunks it was sent in.

    A node whose snapshot *is* the frames it sends (no copy besides the frames)
    reads its own values back from them: :meth:`of_chunks` takes the chunk bytes
    (read-only views; cut per segment, whole elements each, in order), each one
    asked for only when its values are first read (a snapshot taken frame by frame
    as it is sent has not taken the frames it has not sent yet).
    """

    def __init__(self, runs: list[list[torch.Tensor]]) -> None:
        self._runs: list[list[torch.Tensor | None]] = [list(pieces) for pieces in runs]
        self._chunk: Callable[[int], memoryview] | None = None
        self._first: list[int] = [0] * len(runs)  # segment i's first chunk (of_chunks)
        self._dtypes: list[torch.dtype] = []
        self._starts = [self._offsets([t.numel() for t in pieces]) for pieces in runs]

    @staticmethod
    def _offsets(sizes: Sequence[int]) -> list[int]:
        starts, at = [], 0
        for n in sizes:
            starts.append(at)
            at += n
        return starts

    @classmethod
    def of(cls, flat: FlatParams) -> Runs:
        return cls([[s] for s in flat])

    @classmethod
    def of_chunks(cls, layout: Layout, chunk: Callable[[int], memoryview], lengths: Sequence[int]) -> Runs:
        """Runs over chunks ``chunk(0), chunk(1), …`` of ``lengths`` bytes each, asked for when first read."""
        runs = cls([])
        at = 0
        for dt, n in layout.segments.items():
            size = DTYPES[dt].itemsize
            first, have = at, 0
            while have < n:
                have += lengths[at] // size
                at += 1
            runs._first.append(first)
            runs._dtypes.append(DTYPES[dt])
            runs._runs.append([None] * (at - first))
            runs._starts.append(cls._offsets([lengths[k] // size for k in range(first, at)]))
        runs._chunk = chunk
        return runs

    def _piece(self, i: int, k: int) -> torch.Tensor:
        piece = self._runs[i][k]
        if piece is None:
            assert self._chunk is not None
            with warnings.catch_warnings():  # the chunks are immutable bytes; they are only ever read
                warnings.simplefilter("ignore", UserWarning)
                piece = torch.frombuffer(self._chunk(self._first[i] + k), dtype=self._dtypes[i])
            self._runs[i][k] = piece
        return piece

    def pieces(self, i: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first element, values)`` of each run of segment ``i``, in order."""
        for k, first in enumerate(self._starts[i]):
            yield first, self._piece(i, k)

    def sub(self, i: int, start: int, stop: int, other: torch.Tensor, out: torch.Tensor) -> None:
        """``out[start:stop] = other - own[start:stop]`` for segment ``i`` (``other`` holds that range)."""
        starts = self._starts[i]
        k = bisect_right(starts, start) - 1
        pos = start
        while pos < stop:
            first, piece = starts[k], self._piece(i, k)
            end = min(stop, first + piece.numel())
            torch.sub(other[pos - start : end - start], piece[pos - first : end - first], out=out[pos:end])
            pos = end
            k += 1


class PairwiseDelta:
    """One side's numbers of one pairwise exchange: ``recv`` ends as ``other - own``.

    ``receiver`` takes the peer's payload (every element checked for length and
    finiteness as it arrives); once it is whole, :meth:`delta` is the difference
    whose :attr:`scale` (1/2) is the change to add to the current model. On the
    fast path the difference is formed as each chunk arrives, while it is in cache,
    and the own values may be :class:`Runs` (the frames the snapshot was sent as).
    """

    scale = PAIRWISE_SCALE
    rounds = 0  # only compressed exchanges count them

    def __init__(
        self,
        pipeline: Pipeline,
        snap: FlatParams | Runs,
        recv: FlatParams,
        peer: str,
        codec: str,
    ) -> None:
        self.pipeline = pipeline
        self.recv = recv
        self.peer = peer
        self.codec = codec
        self.streaming = pipeline.streams(codec)
        if isinstance(snap, Runs):
            if not self.streaming:
                raise ValueError("a snapshot kept as its frames serves only the raw, stage-free path")
            self._own = snap
        else:
            self.snap = snap
            self._own = Runs.of(snap)
        self._out = list(recv)
        self.receiver = PayloadReceiver(
            pipeline.layout,
            codec,
            out=recv,
            check_finite=True,
            consume=self._to_delta if self.streaming else None,
        )

    @property
    def nbytes(self) -> int:
        """The payload this side sends."""
        return self.pipeline.payload_nbytes(self.codec)

    def accept(self, total_bytes: int, rounds: int) -> None:
        """The peer's header announced its payload (its length is checked against the layout already)."""

    def _to_delta(self, i: int, start: int, stop: int, other: torch.Tensor) -> None:
        self._own.sub(i, start, stop, other, self._out[i])  # averaging.pairwise_difference

    def delta(self) -> FlatParams:
        """``other - own`` once the payload is whole and the exchange committed; add it times :attr:`scale`."""
        if not self.streaming:
            round_trip_(self.snap, self.codec)  # the numbers the peer decoded of ours
            for stage in self.pipeline.stages:
                stage.incoming_(self.snap, self.recv, self.peer)
            for own, other in zip(self.snap, self.recv, strict=True):
                torch.sub(other, own, out=other)  # averaging.pairwise_difference, in place
        return self.recv


class BytesReceiver:
    """A compressed payload of the announced length, gathered whole, then decoded and checked."""

    def __init__(self, choco: Choco, peer: str) -> None:
        self.choco = choco
        self.peer = peer
        self.expected = 0
        self.received = 0
        self._buf = bytearray()
        self.values: torch.Tensor | None = None

    def expect(self, nbytes: int) -> None:
        self.expected = nbytes
        self._buf = bytearray(nbytes)

    def write(self, data: memoryview | bytes) -> None:
        n = len(data)
        if self.received + n > self.expected:
            raise LayoutError(f"payload longer than the {self.expected} bytes announced")
        self._buf[self.received : self.received + n] = data
        self.received += n

    def finish(self) -> torch.Tensor:
        if self.received != self.expected:
            raise LayoutError(f"payload has {self.received} bytes, expected {self.expected}")
        try:
            self.values = self.choco.decode(memoryview(self._buf), self.peer)
        except CompressError as exc:
            raise LayoutError(f"compressed payload: {exc}") from None
        return self.values


class CompressedDelta:
    """One side's numbers of a compressed pairwise exchange (:mod:`gossip.core.choco`).

    Made, the offer is ready: :attr:`payload` (Q(snapshot - own copy)) is what this
    side sends and :attr:`rounds` goes in its header. :meth:`accept` checks the
    peer's header (its count must equal ours: otherwise both copies are out of step,
    the pair is forgotten and the exchange refused with FAILED_PRECONDITION); the
    :attr:`receiver` then decodes and checks the peer's payload. :meth:`delta`, once
    the exchange committed, moves the pair's copies and gives ``peer - own`` in
    ``recv``, to add times :attr:`scale` (γ/2).
    """

    streaming = False

    def __init__(self, choco: Choco, snap: FlatParams, recv: FlatParams, peer: str) -> None:
        self.choco = choco
        self.recv = recv
        self.peer = peer
        self.codec = "raw"
        self.scale = choco.scale
        vector = torch.cat([s.reshape(-1).to(torch.float32) for s in snap])
        self.offer: Offer = choco.offer(peer, vector)
        self.receiver = BytesReceiver(choco, peer)

    @property
    def payload(self) -> bytes:
        return self.offer.payload

    @property
    def nbytes(self) -> int:
        return len(self.offer.payload)

    @property
    def rounds(self) -> int:
        return self.offer.rounds

    def accept(self, total_bytes: int, rounds: int) -> None:
        """The peer's header: a count out of step with ours is refused, and the pair starts over."""
        check_answer(self.choco, self.peer, total_bytes, rounds, ours=self.offer.rounds)
        self.receiver.expect(total_bytes)

    def delta(self) -> FlatParams:
        """The exchange committed: the pair's copies move, and ``recv`` becomes ``peer - own``."""
        assert self.receiver.values is not None, "delta() before the payload was decoded"
        diff = self.choco.settle(self.peer, self.offer, self.receiver.values)
        start = 0
        for seg in self.recv:
            seg.copy_(diff[start : start + seg.numel()])
            start += seg.numel()
        return self.recv


def check_rounds(choco: Choco, peer: str, rounds: int, ours: int | None = None) -> None:
    """``peer`` counts ``rounds`` committed exchanges of our pair: a count out of step with ours
    (the pair's now, or ``ours`` where an offer was made from it) is refused (FAILED_PRECONDITION),
    and the pair starts over on both sides."""
    ours = choco.rounds(peer) if ours is None else ours
    if rounds != ours:
        choco.forget(peer)
        raise Refused(
            "FAILED_PRECONDITION",
            f"compressed exchange out of step: this pair committed {ours} exchanges "
            f"here and {rounds} there; both sides start its reference copies over",
        )


def check_answer(choco: Choco, peer: str, total_bytes: int, rounds: int, ours: int | None = None) -> None:
    """A compressed payload's header from ``peer``: its count (:func:`check_rounds`), then its length,
    1 to the most the spec can send (INVALID_ARGUMENT)."""
    check_rounds(choco, peer, rounds, ours)
    if not 0 < total_bytes <= choco.max_nbytes():
        raise Refused(
            "INVALID_ARGUMENT",
            f"compressed payload of {total_bytes} bytes; this spec sends 1 to {choco.max_nbytes()}",
        )


PairChange = PairwiseDelta | CompressedDelta  # one side of a pairwise exchange, dense or compressed
