"""What the exchange protocols are written against: frame streams and the node's side.

A protocol (``pairwise``, ``pushsum``) sees a :class:`FrameStream`, never gRPC:
the transport's streams implement it for real calls, :mod:`gossip.node.memory`
in memory for tests. It sees the node through a :class:`Party`: its model, its
exchange slot, its pipeline and its counters. A receiving protocol refuses a
message by raising :class:`~gossip.core.errors.Refused` with a status name,
before it has changed anything; the servicer turns that into the call's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from gossip.config import GossipConfig
from gossip.core import averaging
from gossip.core.errors import Refused
from gossip.core.layout import LayoutError
from gossip.core.outer import Outer
from gossip.core.params import FlatParams
from gossip.core.pipeline import CompressedDelta, PairChange, Pipeline
from gossip.core.status import Histogram
from gossip.node import faults
from gossip.node.rest import RestPolicy
from gossip.node.slot import ExchangeSlot
from gossip.transport.channels import DEADLINE_BYTES_PER_S, transfer_timeout
from gossip.transport.frames import (
    Header,
    WireError,
    chunk_frame,
    chunk_from_frame,
    header_from_frame,
    iter_chunks,
)

log = logging.getLogger(__name__)

MAX_CONCURRENT_PUSHES = 4  # push-sum receives one node serves at once
BUSY_BACKOFF_ROUND_TRIPS = 2.0  # back off up to this many declined calls' round trips (a mean of one)
BUSY_MEAN_WEIGHT = 0.25  # weight of the newest declined call in the running mean
MAX_BUSY_BACKOFF = 0.5  # seconds: the bound of one back-off never exceeds this


T_co = TypeVar("T_co", covariant=True)


class Receiving(Protocol[T_co]):
    """A payload receiver: chunks in, checked as they come; ``finish`` gives the whole, checked payload."""

    @property
    def received(self) -> int: ...
    @property
    def expected(self) -> int: ...
    def write(self, data: memoryview | bytes) -> None: ...
    def finish(self) -> T_co: ...


class FrameStream(Protocol):
    """Frames in both directions; ``read`` gives None once the other side finished sending."""

    async def read(self) -> bytes | None: ...
    async def write(self, frame: bytes) -> None: ...


class CallerStream(FrameStream, Protocol):
    """The calling side of one call; every failure is a :class:`~gossip.core.errors.PeerError`."""

    address: str

    async def done_writing(self) -> None: ...
    async def finish(self) -> None: ...
    async def response(self) -> bytes: ...
    def cancel(self) -> None: ...


@dataclass
class Stats:
    exchanges_ok: int = 0
    exchanges_failed: int = 0
    exchanges_declined: int = 0  # incoming exchanges we declined because we were busy
    exchanges_served: int = 0  # incoming exchanges completed
    busy_replies: int = 0  # our attempts a peer declined
    bytes_in: int = 0
    bytes_out: int = 0
    durations: Histogram = field(default_factory=Histogram)  # of the exchanges we started, completed
    exchanged_with: dict[str, int] = field(default_factory=dict)  # peer -> exchanges completed
    last_delta_norm: float | None = None  # of the last change averaging applied, measured <= 1/s
    _norm_due: float = 0.0

    def status_fields(self) -> dict[str, Any]:
        """The counters as :class:`~gossip.core.status.NodeStatus` names them."""
        return {
            "exchanges_ok": self.exchanges_ok,
            "exchanges_failed": self.exchanges_failed,
            "exchanges_declined": self.exchanges_declined,
            "exchanges_served": self.exchanges_served,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "last_delta_norm": self.last_delta_norm,
            "exchange_seconds_bounds": self.durations.bounds,
            "exchange_seconds_buckets": tuple(self.durations.counts),
            "exchange_seconds_sum": self.durations.total,
            "exchanged_with": dict(self.exchanged_with),
        }

    def completed(self, peer: str, seconds: float | None = None) -> None:
        """An exchange with ``peer`` completed; ``seconds`` it took when we started it."""
        self.exchanged_with[peer] = self.exchanged_with.get(peer, 0) + 1
        if seconds is not None:
            self.durations.observe(seconds)

    def norm_due(self) -> bool:
        """Whether to measure the next applied change's norm (a pass over the model: once a second)."""
        now = time.monotonic()
        if now < self._norm_due:
            return False
        self._norm_due = now + 1.0
        return True


@dataclass
class Party:
    """The node's side of every exchange, as the protocols see it."""

    node_id: str
    flat: FlatParams
    slot: ExchangeSlot
    pipeline: Pipeline
    gossip: GossipConfig
    running: Callable[[], bool]  # whether the node takes part in exchanges now
    stats: Stats = field(default_factory=Stats)
    weight: float = 1.0  # push-sum weight; the model holds the de-biased values x / w
    avoid: dict[str, float] = field(default_factory=dict)  # peer id -> left out of picks until
    # Push-sum receives in flight at once; more get RESOURCE_EXHAUSTED.
    push_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_PUSHES))
    spare: list[FlatParams] = field(default_factory=list)  # push-sum receive buffers to reuse
    rest: RestPolicy | None = None  # set once training is over: how hard to keep averaging
    on_wake: Callable[[], None] = lambda: None  # the rest policy woke up: average again at once
    send_floor: float = DEADLINE_BYTES_PER_S  # the throughput deadlines assume (lower when paced)
    busy_round_trip_s: float = 0.0  # running mean of a declined call's round trip (0: none yet)
    # --outer: the optimizer, and its anchor and momentum (local, set at the first step).
    outer: Outer = field(default_factory=Outer)
    anchor: FlatParams | None = None
    outer_buf: FlatParams | None = None

    def declined(self, round_trip_s: float) -> None:
        """A peer answered busy ``round_trip_s`` after this node opened the call."""
        sample = min(round_trip_s, MAX_BUSY_BACKOFF)
        if self.busy_round_trip_s == 0.0:
            self.busy_round_trip_s = sample
        else:
            self.busy_round_trip_s += BUSY_MEAN_WEIGHT * (sample - self.busy_round_trip_s)

    def busy_backoff(self) -> float:
        """The bound of the random back-off after a busy answer.

        A node is busy while its own attempt is in flight and free while it backs off,
        so an incoming call finds it free with a chance of about back-off / (back-off +
        attempt). With the bound at ``BUSY_BACKOFF_ROUND_TRIPS`` times the round trip of
        a declined call (a running mean), the mean back-off is about one attempt: about
        half the calls land, on loopback (round trips of a millisecond or two: the
        configured ``backoff`` decides) and over long round trips alike. At most
        ``MAX_BUSY_BACKOFF`` (or the configured ``backoff`` if larger), so one late answer cannot
        hold a training step for long.
        """
        bound = BUSY_BACKOFF_ROUND_TRIPS * self.busy_round_trip_s
        return max(self.gossip.backoff, min(bound, MAX_BUSY_BACKOFF))

    def start_outer(self) -> None:
        """The first training step: the model as it is now is the first anchor (called on the trainer's thread)."""
        if self.outer.active and self.anchor is None:
            self.anchor = self.flat.clone()
            self.outer_buf = FlatParams.zeros(self.flat.layout)

    @property
    def fingerprint(self) -> bytes:
        return self.flat.fingerprint

    @property
    def deadline(self) -> float:
        """The deadline of one exchange: the base plus the payload at the throughput floor."""
        return transfer_timeout(self.gossip.exchange_timeout, self.flat.nbytes, self.send_floor)

    def header(
        self, codec: str, weight: float = 1.0, outcome: str = "", change: PairChange | None = None
    ) -> Header:
        """The header of what we send: ``change``'s payload for a pairwise exchange, else the dense model."""
        return Header(
            fingerprint=self.fingerprint,
            sender=self.node_id,
            step=self.slot.step,
            codec=codec,
            total_bytes=change.nbytes if change is not None else self.pipeline.payload_nbytes(codec),
            weight=weight,
            chunk_bytes=self.gossip.chunk_bytes,
            outcome=outcome,
            pipeline=self.pipeline.spec,
            pair_round=change.rounds if change is not None else 0,
        )

    def asking_header(self, codec: str, peer: str) -> Header:
        """A compressing caller's first header: no payload length yet (0) and its pair's count with
        ``peer``. It computes its payload only once the peer accepted (a busy peer costs it no
        compression), then sends its length in a second header, the first one repeated."""
        assert self.pipeline.choco is not None
        return replace(self.header(codec), total_bytes=0, pair_round=self.pipeline.choco.rounds(peer))

    def take_buffer(self) -> FlatParams:
        """A receive buffer for one push (reused: no allocation or page faults per push)."""
        return self.spare.pop() if self.spare else FlatParams.empty(self.flat.layout)

    def give_back(self, buf: FlatParams) -> None:
        if len(self.spare) < MAX_CONCURRENT_PUSHES:
            self.spare.append(buf)

    def heard(self, peer: str, step: int) -> None:
        """A header from ``peer`` said it is at ``step`` (a peer whose step advances still trains)."""
        if self.rest is not None and self.rest.heard(peer, step) and not self.slot.training:
            self.on_wake()

    def measured(self, moved: Callable[[], float]) -> None:
        """Before averaging changes the model by ``moved()`` (its norm, a pass over the model): record it
        for the status at most once a second, and after training every time, for the rest policy."""
        settling = self.rest is not None and not self.slot.training
        if settling or self.stats.norm_due():
            norm = moved()
            self.stats.last_delta_norm = norm
            if settling:
                self.applied(averaging.norm_ratio(norm, averaging.norm(list(self.flat))))

    def applied(self, ratio: float) -> None:
        """A change of ``ratio`` times the model's norm was applied (called with the slot's lock held)."""
        if self.rest is None or self.slot.training:
            return
        was = self.rest.pause
        self.rest.moved(ratio)
        if self.rest.pause < was:
            self.on_wake()

    def failed(self, peer: str, address: str, why: Exception) -> None:
        """An exchange with ``peer`` failed: count it, log it, leave the peer out of the picks a while."""
        self.stats.exchanges_failed += 1
        self.avoid[peer] = time.monotonic() + self.gossip.avoid_after_failure
        log.warning("exchange with %s (%s) failed: %s", peer, address, why)

    def fault_detail(self, peer: str, **extra: float) -> dict[str, Any]:
        """What a failpoint logs of this node as it dies: the survivor's books are checked against it."""
        s = self.stats
        return {
            "node": self.node_id,
            "peer": peer,
            "step": self.slot.step,
            "weight": self.weight,
            "ok": s.exchanges_ok,
            "served": s.exchanges_served,
            "failed": s.exchanges_failed,
            "busy_replies": s.busy_replies,
            **extra,
        }


def outgoing_frames(party: Party, peer: str, codec: str, change: PairChange | None = None) -> Iterable[bytes]:
    """The chunk frames of the slot's snapshot for ``peer``: the snapshot itself when it was taken as frames,
    ``change``'s compressed payload when the exchange is compressed."""
    if party.slot.frames is not None:
        return party.slot.frames
    if isinstance(change, CompressedDelta):
        views = [memoryview(change.payload)]
    else:
        views = party.pipeline.outgoing(party.slot.snap, peer, codec)
    return (chunk_frame(c) for c in iter_chunks(views, party.gossip.chunk_bytes))


def read_header(frame: bytes | None, what: str) -> Header:
    """The header a call starts with; Refused (INVALID_ARGUMENT) for anything else."""
    if frame is None:
        raise Refused("INVALID_ARGUMENT", f"empty {what}")
    try:
        return header_from_frame(frame)
    except WireError as exc:
        raise Refused("INVALID_ARGUMENT", str(exc)) from None


def check_header(party: Party, h: Header, codec: str | None = None) -> None:
    """Refuse a header this node cannot mix with: another model, pipeline, codec or length."""
    if h.fingerprint != party.fingerprint:
        raise Refused("FAILED_PRECONDITION", "parameter layout fingerprint differs: not the same model")
    if h.pipeline != party.pipeline.spec:
        raise Refused(
            "FAILED_PRECONDITION",
            f"exchange pipeline {h.pipeline or '(none)'!r} where this node runs {party.pipeline.spec or '(none)'!r}",
        )
    if codec is not None and h.codec != codec:
        raise Refused("INVALID_ARGUMENT", f"codec {h.codec} where {codec} was expected")
    if party.pipeline.choco is not None:
        if h.codec != "raw":
            raise Refused(
                "INVALID_ARGUMENT", f"codec {h.codec} in a compressed exchange (its spec codes the values)"
            )
        return  # a compressed payload's length varies: PairChange.accept checks it
    expected = party.pipeline.payload_nbytes(h.codec)
    if h.total_bytes != expected:
        raise Refused(
            "INVALID_ARGUMENT", f"payload of {h.total_bytes} bytes where the layout needs {expected}"
        )


def read_length_header(frame: bytes | None, first: Header) -> Header:
    """A compressing caller's second header: its first one (``first``) again, now with the payload's
    length (and its step, which may have moved on); Refused (INVALID_ARGUMENT) for anything else."""
    if frame is None:
        raise Refused("INVALID_ARGUMENT", "the caller ended before its second header")
    h = read_header(frame, "exchange")
    if replace(h, total_bytes=0, step=first.step) != first:
        raise Refused("INVALID_ARGUMENT", "a compressed exchange's second header must repeat its first")
    return h


async def read_payload(
    stream: FrameStream,
    receiver: Receiving[T_co],
    first_chunk_point: str,
    detail: Callable[[], dict[str, Any]],
    *,
    until_end: bool,
) -> T_co:
    """Feed the chunk frames of ``stream`` to ``receiver`` and finish it: the checked payload.

    ``until_end``: read until the sender closes (a push), else until the payload is
    whole (a pairwise caller, who then waits for the answer). A frame that is not a
    chunk, a payload of the wrong length or a non-finite value is refused
    (INVALID_ARGUMENT). ``first_chunk_point`` is the failpoint after the first chunk.
    """
    while until_end or receiver.received < receiver.expected:
        frame = await stream.read()
        if frame is None:
            if until_end:
                break
            raise Refused("INVALID_ARGUMENT", "payload ended early")
        started = receiver.received == 0
        try:
            receiver.write(chunk_from_frame(frame))
        except (WireError, LayoutError) as exc:
            raise Refused("INVALID_ARGUMENT", str(exc)) from None
        if started:
            faults.failpoint(first_chunk_point, detail)
    try:
        return receiver.finish()
    except LayoutError as exc:
        raise Refused("INVALID_ARGUMENT", str(exc)) from None
