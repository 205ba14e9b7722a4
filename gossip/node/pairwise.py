"""Pairwise push-pull (AD-PSGD style): the caller's and the callee's side of one exchange.

The caller sends its header and snapshot; the callee answers with a header
(``accepted`` or ``busy``, decided at once from the header) and, if accepted,
streams its own snapshot while the caller's arrives. A compressing caller asks
first: its first header has no length, and it compresses and sends its payload,
after a second header with the length, only once the callee accepted. The caller reads and checks
the whole answer, then sends the commit frame and waits for the status; the
callee takes its half only on exactly that frame, so a cancel, a timeout or a
refusal never commits one side alone, and answers OK once its half is queued.
Each side then adds ``(other - own) / 2`` to its current model between two steps
(the delta rule keeps the sum of the models exact). On the raw path a snapshot is
the chunk frames it is sent in (``ExchangeSlot.frame_bytes``).

What a crash at each named failpoint does to the models is the table in the
docs' crash semantics page; the fault matrix tests it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable

from gossip.core import averaging
from gossip.core.errors import PeerError, Refused
from gossip.core.layout import LayoutError
from gossip.core.membership import MemberRecord
from gossip.core.pipeline import PairChange, check_answer, check_rounds
from gossip.node import faults
from gossip.node.protocol import (
    CallerStream,
    FrameStream,
    Party,
    check_header,
    outgoing_frames,
    read_header,
    read_length_header,
    read_payload,
)
from gossip.transport.frames import (
    COMMIT_FRAME,
    Header,
    WireError,
    chunk_from_frame,
    header_from_frame,
    header_to_frame,
)

log = logging.getLogger(__name__)

Connect = Callable[[str], CallerStream]  # address -> a fresh Exchange call
Pick = Callable[[set[str]], MemberRecord | None]  # ids to leave out -> a neighbour, or None


def deliver(party: Party, change: PairChange, *, at_once: bool = True, own: bool = False) -> None:
    """Queue ``(other - own) / 2`` for the model; applying it frees the slot (see ``ExchangeSlot.deliver``).

    The node's ``own`` exchange, while it trains with ``--outer``, takes the outer
    step in the same add (:meth:`gossip.core.outer.Outer.exchange_`).
    """
    delta = change.delta()
    scale = change.scale

    def apply() -> None:
        party.measured(lambda: scale * averaging.norm(list(delta)))
        if own and party.anchor is not None and party.outer_buf is not None and party.slot.training:
            party.outer.exchange_(
                list(party.flat),
                party.slot.own_runs(),
                list(delta),
                scale,
                list(party.anchor),
                list(party.outer_buf),
            )
        else:
            for x, d in zip(party.flat, delta, strict=True):
                averaging.apply_delta_(x, d, scale)
        party.slot.release_locked()

    party.slot.deliver(apply, at_once=at_once)


# --- caller --------------------------------------------------------------------------


async def run_own(party: Party, pick: Pick, connect: Connect, rng: random.Random) -> None:
    """This node's exchange, the slot already claimed: try free neighbours until one answers.

    A busy answer frees the slot during a short random back-off, so a neighbour
    that picked this node meanwhile gets its exchange (then this step is mixed
    already and the attempt ends). The back-off scales with what a declined attempt
    costs (:meth:`Party.busy_backoff`): over a link with a round trip of tens of
    milliseconds, a fixed 10 ms leaves every node busy with its own attempts nearly
    all the time, and their calls to each other are all declined.
    """
    g = party.gossip
    tried: set[str] = set()
    holding = True  # this attempt holds the slot and owns its snapshot
    try:
        for _ in range(g.busy_retries):
            peer = pick(tried)
            if peer is None:
                tried.clear()
                peer = pick(tried)
                if peer is None:
                    break
            tried.add(peer.node_id)
            outcome = await call(party, peer, connect)
            if outcome == "ok":
                holding = False  # the slot now belongs to the delivered delta
                return
            if outcome == "busy":
                party.slot.release()
                holding = False
                await asyncio.sleep(rng.uniform(0, party.busy_backoff()))
                if not party.slot.reclaim_own(party.running()):
                    return
                holding = True
    finally:
        if holding:
            party.slot.release()
        party.slot.own_finished()


async def _change(party: Party, peer: str, codec: str) -> PairChange:
    """This side's numbers of an exchange with ``peer`` from the slot's snapshot (compressing: off the loop)."""
    slot = party.slot
    if party.pipeline.choco is None:
        return party.pipeline.pairwise(slot.own_values(), slot.recv, peer, codec)
    # Q(snapshot - own copy) takes a few passes over the model; the slot keeps the pair to us.
    return await asyncio.to_thread(party.pipeline.pairwise, slot.own_values(), slot.recv, peer, codec)


async def _send(stream: FrameStream, frames: Iterable[bytes]) -> None:
    for f in frames:
        await stream.write(f)


async def call(party: Party, peer: MemberRecord, connect: Connect) -> str:
    """One exchange with ``peer`` from the slot's snapshot: 'ok', 'busy' or 'failed'."""
    codec = party.pipeline.codec

    def detail() -> dict[str, object]:
        return party.fault_detail(peer.node_id)

    def payload(change: PairChange) -> Iterable[bytes]:
        frames = outgoing_frames(party, peer.node_id, codec, change)
        return faults.tap(frames, "pairwise.caller.mid_stream", detail=detail)

    # A dense payload is the snapshot, streamed with the header; a compressed one is computed
    # only once the peer accepted (most attempts of a busy cluster are declined).
    choco = party.pipeline.choco
    change = None if choco is not None else await _change(party, peer.node_id, codec)
    if change is None:
        header, chunks = party.asking_header(codec, peer.node_id), None
    else:
        header, chunks = party.header(codec, change=change), payload(change)  # encoded before the clock
    faults.failpoint("pairwise.caller.before_send", detail)
    began = time.monotonic()
    stream = connect(peer.address)
    sender: asyncio.Task[None] | None = None
    try:
        await stream.write(header_to_frame(header))
        if chunks is not None:
            sender = asyncio.create_task(_send(stream, chunks))
        first = await stream.read()
        if first is None:
            await stream.finish()
            raise PeerError(peer.address, "INTERNAL", "peer closed the exchange without a header")
        reply = header_from_frame(first)
        party.heard(peer.node_id, reply.step)
        if reply.outcome == "busy":
            party.declined(time.monotonic() - began)
            party.stats.busy_replies += 1
            party.pipeline.settle(peer.node_id, committed=False)
            return "busy"
        check_header(party, reply, codec)
        faults.failpoint("pairwise.caller.accepted", detail)
        if change is None:
            assert choco is not None
            check_answer(choco, peer.node_id, reply.total_bytes, reply.pair_round)  # before the work
            change = await _change(party, peer.node_id, codec)
            header = party.header(codec, change=change)
            await stream.write(header_to_frame(header))  # the length, now known
            sender = asyncio.create_task(_send(stream, payload(change)))
        change.accept(reply.total_bytes, reply.pair_round)
        receiver = change.receiver
        # Every element is checked (length, finiteness) as it arrives, so the commit
        # frame is sent only for an answer known to be good.
        while receiver.received < receiver.expected:
            frame = await stream.read()
            if frame is None:
                await stream.finish()
                raise PeerError(peer.address, "DATA_LOSS", "peer ended its answer early")
            started = receiver.received == 0
            receiver.write(chunk_from_frame(frame))
            if started:
                faults.failpoint("pairwise.caller.reply_mid", detail)
        receiver.finish()
        faults.failpoint("pairwise.caller.before_commit", detail)
        assert sender is not None  # our payload went out once the answer was accepted
        await sender
        await stream.write(COMMIT_FRAME)
        # The callee ends the call once it read the commit; no half-close, nothing more to
        # read (frames past the announced payload would be ignored): fewer round trips.
        await stream.finish()  # OK only once the callee took its half
    except (PeerError, WireError, LayoutError, Refused) as exc:
        party.failed(peer.node_id, peer.address, exc)
        party.pipeline.settle(peer.node_id, committed=False)
        if isinstance(exc, PeerError) and exc.code == "FAILED_PRECONDITION":
            party.pipeline.forget(peer.node_id)  # per-pair state out of step (or another pipeline)
        return "failed"
    finally:
        if sender is not None:
            # Declined or failed: the peer ended the call, so pending writes fail; collect them.
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        stream.cancel()  # a no-op once the call ended; otherwise no commit was sent: no half taken
    faults.failpoint("pairwise.caller.after_commit", detail)
    assert change is not None  # the answer was accepted
    party.stats.bytes_out += change.nbytes
    party.stats.bytes_in += change.receiver.received
    party.stats.exchanges_ok += 1
    party.stats.completed(peer.node_id, time.monotonic() - began)
    deliver(party, change, own=True)
    party.pipeline.settle(peer.node_id, committed=True)
    return "ok"


# --- callee --------------------------------------------------------------------------


async def answer(party: Party, stream: FrameStream) -> None:
    """Serve one Exchange call: decline at once when busy, else answer and take our half on commit."""
    header = read_header(await asyncio.wait_for(stream.read(), party.deadline), "exchange")
    if header.outcome:
        raise Refused("INVALID_ARGUMENT", "requests carry no outcome")
    check_header(party, header)
    party.heard(header.sender, header.step)
    if party.gossip.strategy != "pairwise":
        raise Refused("FAILED_PRECONDITION", "this node runs push-sum, not pairwise")
    choco = party.pipeline.choco  # compressed: the caller's length comes in a second header
    if choco is not None and header.total_bytes != 0:
        raise Refused("INVALID_ARGUMENT", "a compressed exchange's first header announces no length")
    codec = header.codec
    slot = party.slot
    # The snapshot is taken frame by frame as the answer goes out (ExchangeSlot.claim_incoming):
    # the answer starts at once, beside the payload.
    if not slot.claim_incoming(party.running(), framed=party.pipeline.streams(codec)):
        party.stats.exchanges_declined += 1
        await stream.write(header_to_frame(party.header(codec, outcome="busy")))
        return
    peer = header.sender

    def detail() -> dict[str, object]:
        return party.fault_detail(peer)

    committed = False
    try:
        if choco is not None:
            check_rounds(choco, peer, header.pair_round)  # before the work; its length comes later
        change = await _change(party, peer, codec)
        if choco is None:
            change.accept(header.total_bytes, header.pair_round)
        # One deadline for the whole exchange (the caller's, scaled to the payload).
        await asyncio.wait_for(
            _serve(party, stream, change, detail, header if choco is not None else None), party.deadline
        )
        party.stats.bytes_in += change.receiver.received
        party.stats.bytes_out += change.nbytes  # our own payload
        party.stats.exchanges_served += 1
        party.stats.completed(peer)
        committed = True
        # Our half is taken (queued) now; when nobody trains it is added right after the
        # OK has gone out, so the caller does not wait for our add.
        deliver(party, change, at_once=False)
        asyncio.get_running_loop().call_soon(slot.flush)
        party.pipeline.settle(peer, committed=True)
        faults.failpoint("pairwise.callee.applied", detail)
    finally:
        if not committed:
            slot.release()
            party.pipeline.settle(peer, committed=False)
            # Refused, timed out, or the caller vanished (its call was cancelled).
            log.warning("exchange from %s ended without a commit; nothing applied", peer)
        slot.incoming_finished()


async def _serve(
    party: Party,
    stream: FrameStream,
    change: PairChange,
    detail: Callable[[], dict[str, object]],
    asked: Header | None,
) -> None:
    """Answer while the caller's payload arrives (both directions at once), then wait for the commit.

    On a full-duplex link an exchange then costs one direction's time, not two. The
    answer goes out through one writer, this task's ``send``: the header, then every
    chunk (two writers on one stream can stall it). The caller's payload is checked
    chunk by chunk as it arrives; a bad one ends the call, answer or not, and nothing
    is applied. A compressing caller (``asked``: its first header) sends its payload's
    length in a second header once it has our answer's header.
    """
    faults.failpoint("pairwise.callee.before_send", detail)
    frames = outgoing_frames(party, change.peer, change.codec, change)

    stop = False

    async def send() -> None:
        await stream.write(header_to_frame(party.header(change.codec, outcome="accepted", change=change)))
        for f in faults.tap(frames, "pairwise.callee.answering", "pairwise.callee.answered", detail):
            if stop:
                return
            await stream.write(f)

    sender = asyncio.ensure_future(send())
    try:
        # The answer's header and first frame go out before the payload is read: a read that
        # finds data waiting does not yield, and the answer would wait behind the payload.
        # (Inside the try: a cancel here must stop the sender too.)
        await asyncio.sleep(0)
        if asked is not None:
            second = read_length_header(await stream.read(), asked)
            change.accept(second.total_bytes, second.pair_round)
        await read_payload(stream, change.receiver, "pairwise.callee.mid_stream", detail, until_end=False)
    except asyncio.CancelledError:  # the deadline: the call is over, whatever the sender does
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        raise
    except BaseException:
        # A refusal: the sender stops at the next frame rather than being cancelled (a
        # gRPC write cancelled half-way leaves the call unable to end with the refusal's
        # status, and the caller would wait out its deadline).
        stop = True
        await asyncio.gather(sender, return_exceptions=True)
        raise
    await sender
    # The caller commits only after it read and checked our whole answer.
    last = await stream.read()
    if last is None:
        raise Refused("INVALID_ARGUMENT", "the caller closed without committing")
    if last != COMMIT_FRAME:
        raise Refused("INVALID_ARGUMENT", "expected the commit frame after the payload")
