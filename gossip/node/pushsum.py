"""Push-sum (SGP style): send half of one's mass to one out-neighbour.

A node keeps ``(x, w)`` with the model holding the de-biased ``x / w``. It sends
its snapshot with half its weight and gives that half up only once the receiver
acknowledged it, so mass is never lost: a lost acknowledgement duplicates the
half (numerator and weight together, so every model stays a weighted mean), a
lost message changes nothing. One direction only: the receiver merges and acks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gossip.core import averaging
from gossip.core.errors import PeerError, Refused
from gossip.core.membership import MemberRecord
from gossip.core.params import FlatParams
from gossip.node import faults
from gossip.node.protocol import (
    CallerStream,
    FrameStream,
    Party,
    check_header,
    outgoing_frames,
    read_header,
    read_payload,
)
from gossip.transport.frames import WireError, header_to_frame
from gossip.transport.serde import push_ack_from_bytes, push_ack_to_bytes

log = logging.getLogger(__name__)


async def run_own(party: Party, peer: MemberRecord | None, connect: Callable[[str], CallerStream]) -> None:
    """This node's push to ``peer``, the slot already claimed (it holds ``snap`` until applied)."""
    delivered = False
    try:
        if peer is not None:
            delivered = await push(party, peer, connect)
    finally:
        if not delivered:
            party.slot.release()
        party.slot.own_finished()


async def push(party: Party, peer: MemberRecord, connect: Callable[[str], CallerStream]) -> bool:
    """Send half our mass to ``peer``; True once it acknowledged and our half is queued for removal."""
    slot = party.slot
    codec = party.pipeline.codec
    _, w_send = averaging.push_sum_split(party.weight)
    header = party.header(codec, weight=w_send)

    def detail() -> dict[str, object]:
        return party.fault_detail(peer.node_id, w_send=w_send)

    chunks = faults.tap(
        outgoing_frames(party, peer.node_id, codec), "push.caller.mid_stream", "push.caller.sent", detail
    )
    faults.failpoint("push.caller.before_send", detail)
    began = time.monotonic()
    stream = connect(peer.address)
    try:
        await stream.write(header_to_frame(header))
        for f in chunks:
            await stream.write(f)
        await stream.done_writing()
        accepted = push_ack_from_bytes(await stream.response())
    except (PeerError, WireError) as exc:
        party.failed(peer.node_id, peer.address, exc)
        return False
    finally:
        stream.cancel()
    if not accepted:
        party.stats.busy_replies += 1
        return False
    faults.failpoint("push.caller.acked", detail)

    # Keep half only now that the peer holds the other half: mass is never lost.
    # Merges (and SGD) may have moved z since the snapshot was sent, so remove
    # exactly the numerator that left, snap * w_send, from z * w. Applied between
    # steps like every result, and holding the slot (so snap stays put).
    sent = slot.own_runs()

    def apply() -> None:
        keep = party.weight - w_send
        for i, z in enumerate(party.flat):
            z.mul_(party.weight / keep)
            for first, s in sent.pieces(i):
                z[first : first + s.numel()].sub_(s, alpha=w_send / keep)
        party.weight = keep
        slot.release_locked()

    party.stats.exchanges_ok += 1
    party.stats.bytes_out += header.total_bytes
    party.stats.completed(peer.node_id, time.monotonic() - began)
    slot.deliver(apply)
    return True


async def receive(party: Party, stream: FrameStream) -> bytes:
    """Serve one Push call: merge the sender's half once it is whole and checked, then acknowledge."""
    if party.push_slots.locked():
        raise Refused("RESOURCE_EXHAUSTED", "too many pushes in flight")
    async with party.push_slots:
        z_in, w_in, nbytes, detail, sender = await asyncio.wait_for(_read(party, stream), party.deadline)

    def apply() -> None:
        share = w_in / (party.weight + w_in)  # the merge moves z by share * (z_in - z)
        party.measured(
            lambda: share * averaging.norm([zi - z for z, zi in zip(party.flat, z_in, strict=True)])
        )
        w_new = party.weight
        for z, zi in zip(party.flat, z_in, strict=True):
            w_new = averaging.push_sum_merge_(z, party.weight, zi, w_in)
        party.weight = w_new
        party.give_back(z_in)

    party.slot.deliver(apply)
    faults.failpoint("push.callee.applied", detail)
    party.stats.bytes_in += nbytes
    party.stats.exchanges_served += 1
    party.stats.completed(sender)
    return push_ack_to_bytes(True)


async def _read(
    party: Party, stream: FrameStream
) -> tuple[FlatParams, float, int, Callable[[], dict[str, object]], str]:
    """The pushed model (checked), its weight, its size in bytes, the failpoint detail and the sender."""
    sender, whole = "an unknown sender", False
    buf: FlatParams | None = None
    try:
        header = read_header(await stream.read(), "push")
        sender = header.sender
        check_header(party, header)
        party.heard(header.sender, header.step)
        if party.gossip.strategy != "push-sum":
            raise Refused("FAILED_PRECONDITION", "this node runs pairwise, not push-sum")
        if not header.weight > 0:
            raise Refused("INVALID_ARGUMENT", "push-sum weight must be positive")

        def detail() -> dict[str, object]:
            return party.fault_detail(header.sender, w_in=header.weight)

        faults.failpoint("push.callee.header", detail)
        buf = party.take_buffer()
        receiver = party.pipeline.receiver(buf, header.codec)
        z_in = await read_payload(stream, receiver, "push.callee.mid_stream", detail, until_end=True)
        whole = True
        return z_in, header.weight, receiver.received, detail, sender
    finally:
        if not whole:
            if buf is not None:
                party.give_back(buf)
            # Refused, timed out, or the sender vanished (its call was cancelled).
            log.warning("push from %s ended before it was whole and checked; nothing merged", sender)
