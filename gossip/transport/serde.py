"""Protobuf at the edge: the Gossip service's messages to and from plain values.

Every message a peer sends is decoded here and checked against the bounds the
domain sets (:mod:`gossip.core.membership`); anything else is a
:class:`~gossip.transport.frames.WireError`. Nothing above the transport sees a
generated message class.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from gossip.core.membership import (
    MAX_FINGERPRINT_BYTES,
    MAX_ID_CHARS,
    MEMBER_PROTOCOLS,
    MemberRecord,
    dialable,
)
from gossip.core.status import MemberView, NodeStatus
from gossip.proto import gossip_pb2 as pb
from gossip.transport.frames import WireError

STATE_NAMES = {
    pb.STATE_ALIVE: "alive",
    pb.STATE_SUSPECT: "suspect",
    pb.STATE_DEAD: "dead",
    pb.STATE_LEFT: "left",
}
STATE_TO_PB = {v: k for k, v in STATE_NAMES.items()}

MAX_MEMBERS = 4096  # members accepted in one table; bounds memory a peer can make us spend


def parse(msg: Message, data: bytes) -> Message:
    """``msg`` filled from ``data``; WireError when the bytes are not that message."""
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed {type(msg).__name__}: {exc}") from None
    return msg


def encode(msg: Message) -> bytes:
    return bytes(msg.SerializeToString())


# --- membership ----------------------------------------------------------------


def _sent_state(m: MemberRecord, claims: bool) -> str:
    # Heartbeat: suspect and dead are this node's own judgement and travel as alive; swim
    # (``claims``): they are claims every node takes in (gossip.core.swim).
    return m.state if claims or m.state == "left" else "alive"


def _member_to_pb(m: MemberRecord, claims: bool = False) -> pb.Member:
    state = _sent_state(m, claims)
    return pb.Member(
        node_id=m.node_id,
        address=m.address,
        incarnation=m.incarnation,
        heartbeat=m.heartbeat,
        state=STATE_TO_PB[state],
        rank=m.rank,
        fingerprint=m.fingerprint,
    )


# Serialized one-member tables, by what they say: a table of hundreds of members is these
# concatenated (protobuf appends repeated fields), so the members that did not change since
# the last table cost no encoding. Bounded: cleared whole when full.
_FRAGMENTS: dict[tuple[str, str, int, int, str, int, bytes], bytes] = {}
_MAX_FRAGMENTS = 1 << 14


def _member_fragment(m: MemberRecord, claims: bool) -> bytes:
    """``MemberTable(members=[m])`` serialized (as :func:`_member_to_pb` would put it)."""
    key = (m.node_id, m.address, m.incarnation, m.heartbeat, _sent_state(m, claims), m.rank, m.fingerprint)
    frag = _FRAGMENTS.get(key)
    if frag is None:
        if len(_FRAGMENTS) >= _MAX_FRAGMENTS:
            _FRAGMENTS.clear()
        frag = _FRAGMENTS[key] = encode(pb.MemberTable(members=[_member_to_pb(m, claims)]))
    return frag


_PLAIN_STATES = frozenset((pb.STATE_ALIVE, pb.STATE_LEFT))
_CLAIM_STATES = frozenset((pb.STATE_ALIVE, pb.STATE_LEFT, pb.STATE_SUSPECT, pb.STATE_DEAD))


def _member_from_pb(m: pb.Member, claims: bool = False) -> MemberRecord:
    node_id, address, state, rank = m.node_id, m.address, m.state, m.rank  # each field read once
    if not node_id or len(node_id) > MAX_ID_CHARS:
        raise WireError("member has an empty or over-long node_id")
    if not dialable(address):
        raise WireError(f"member {node_id!r} has an invalid address {address[:80]!r}")
    if state not in (_CLAIM_STATES if claims else _PLAIN_STATES):
        raise WireError(
            f"member {node_id!r} travels with state {state}, only {'alive, suspect, dead' if claims else 'alive'} or left may"
        )
    if rank < -1:
        raise WireError(f"member {node_id!r} has rank {rank}")
    fingerprint = m.fingerprint
    if len(fingerprint) > MAX_FINGERPRINT_BYTES:
        raise WireError(
            f"member {node_id!r} has a fingerprint of {len(fingerprint)} bytes (at most {MAX_FINGERPRINT_BYTES})"
        )
    return MemberRecord(node_id, address, m.incarnation, m.heartbeat, STATE_NAMES[state], rank, fingerprint)


class ProtocolMismatch(ValueError):
    """A member table from a node that runs another ``--member-protocol``: well formed, but
    its records mean something else here (heartbeat counters against swim's claims)."""

    def __init__(self, sender: str, theirs: str, mine: str) -> None:
        super().__init__(
            f"{sender} runs --member-protocol {theirs}, this node {mine}: "
            "every node of a cluster must run the same one"
        )
        self.theirs = theirs


def table_to_bytes(
    sender: MemberRecord, members: list[MemberRecord], full: bool = False, protocol: str = "heartbeat"
) -> bytes:
    """A member table of a node running ``protocol``; with swim, suspect and dead travel as they are."""
    claims = protocol == "swim"
    head = encode(pb.MemberTable(sender=_member_to_pb(sender), full=full, protocol=protocol))
    return head + b"".join([_member_fragment(m, claims) for m in members])


def table_message_from_bytes(
    data: bytes, protocol: str = "heartbeat"
) -> tuple[MemberRecord, list[MemberRecord], bool]:
    """The sender, the records, and whether they are the sender's whole table (``full``), for a
    node running ``protocol``: with swim records may say suspect or dead, the sender itself
    never. ProtocolMismatch if the sender runs another protocol, WireError if the table is
    malformed. No field reads as heartbeat: nodes older than the field ran it, but for those
    built on 2026-12-02 between swim becoming the default and the field, which a swim node
    refuses as heartbeat nodes (upgrade them with the rest)."""
    msg = parse(pb.MemberTable(), data)
    assert isinstance(msg, pb.MemberTable)
    if len(msg.members) > MAX_MEMBERS:
        raise WireError(f"member table of {len(msg.members)} entries exceeds {MAX_MEMBERS}")
    if not msg.HasField("sender"):
        raise WireError("member table without a sender")
    sender = _member_from_pb(msg.sender)
    theirs = msg.protocol or "heartbeat"
    if theirs != protocol:
        shown = theirs if theirs in MEMBER_PROTOCOLS else repr(theirs[:40])
        raise ProtocolMismatch(f"member {sender.node_id} ({sender.address})", shown, protocol)
    claims = protocol == "swim"
    return sender, [_member_from_pb(m, claims) for m in msg.members], msg.full


def table_from_bytes(data: bytes) -> tuple[MemberRecord, list[MemberRecord]]:
    sender, members, _ = table_message_from_bytes(data)
    return sender, members


def leave_to_bytes(node_id: str, incarnation: int) -> bytes:
    return encode(pb.LeaveRequest(node_id=node_id, incarnation=incarnation))


def leave_from_bytes(data: bytes) -> tuple[str, int]:
    msg = parse(pb.LeaveRequest(), data)
    assert isinstance(msg, pb.LeaveRequest)
    return msg.node_id, msg.incarnation


EMPTY = encode(pb.Empty())


def probe_to_bytes(node_id: str, address: str) -> bytes:
    return encode(pb.ProbeRequest(node_id=node_id, address=address))


def probe_from_bytes(data: bytes) -> tuple[str, str]:
    """(node id, address) of the member to probe; WireError unless both could be a member's."""
    msg = parse(pb.ProbeRequest(), data)
    assert isinstance(msg, pb.ProbeRequest)
    if not 0 < len(msg.node_id) <= MAX_ID_CHARS or not dialable(msg.address):
        raise WireError("a probe request names a node id and a HOST:PORT address")
    return msg.node_id, msg.address


def probe_reply_to_bytes(reached: bool) -> bytes:
    return encode(pb.ProbeReply(reached=reached))


def probe_reply_from_bytes(data: bytes) -> bool:
    msg = parse(pb.ProbeReply(), data)
    assert isinstance(msg, pb.ProbeReply)
    return msg.reached


def push_ack_to_bytes(accepted: bool) -> bytes:
    return encode(pb.PushAck(accepted=accepted))


def push_ack_from_bytes(data: bytes) -> bool:
    msg = parse(pb.PushAck(), data)
    assert isinstance(msg, pb.PushAck)
    return msg.accepted


# --- status ----------------------------------------------------------------------


def status_to_bytes(s: NodeStatus) -> bytes:
    return encode(
        pb.StatusReply(
            node_id=s.node_id,
            address=s.address,
            step=s.step,
            rank=s.rank,
            topology=s.topology,
            strategy=s.strategy,
            members=[
                pb.MemberView(
                    node_id=m.node_id,
                    address=m.address,
                    state=STATE_TO_PB[m.state],
                    heartbeat=m.heartbeat,
                    seconds_since_heartbeat=m.seconds_since_heartbeat,
                    rank=m.rank,
                )
                for m in s.members
            ],
            neighbours=list(s.neighbours),
            exchanges_ok=s.exchanges_ok,
            exchanges_failed=s.exchanges_failed,
            exchanges_declined=s.exchanges_declined,
            exchanges_served=s.exchanges_served,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            weight=s.weight,
            phase=s.phase,
            parameters=s.parameters,
            fingerprint=s.fingerprint,
            uptime_seconds=s.uptime_seconds,
            training=s.training,
            resting=s.resting,
            epoch=s.epoch,
            train_loss=s.train_loss,
            eval_loss=s.eval_loss,
            eval_accuracy=s.eval_accuracy,
            evals=s.evals,
            last_delta_norm=s.last_delta_norm,
            exchange_seconds_bounds=list(s.exchange_seconds_bounds),
            exchange_seconds_buckets=list(s.exchange_seconds_buckets),
            exchange_seconds_sum=s.exchange_seconds_sum,
            exchanged_with=dict(s.exchanged_with),
            calls_refused=s.calls_refused,
            calls_delayed=s.calls_delayed,
            control_calls=dict(s.control_calls),
            sample=list(s.sample),
            max_send_rate=s.max_send_rate,
            paced_bytes=s.paced_bytes,
            paced_wait_seconds=s.paced_wait_seconds,
            pipeline=s.pipeline,
            bulk_port=s.bulk_port,
        )
    )


def status_from_bytes(data: bytes) -> NodeStatus:
    s = parse(pb.StatusReply(), data)
    assert isinstance(s, pb.StatusReply)
    return NodeStatus(
        node_id=s.node_id,
        address=s.address,
        phase=s.phase,
        step=s.step,
        rank=s.rank,
        topology=s.topology,
        strategy=s.strategy,
        parameters=s.parameters,
        fingerprint=bytes(s.fingerprint),
        weight=s.weight,
        uptime_seconds=s.uptime_seconds,
        exchanges_ok=s.exchanges_ok,
        exchanges_failed=s.exchanges_failed,
        exchanges_declined=s.exchanges_declined,
        exchanges_served=s.exchanges_served,
        bytes_in=s.bytes_in,
        bytes_out=s.bytes_out,
        members=tuple(
            MemberView(
                node_id=m.node_id,
                address=m.address,
                state=STATE_NAMES.get(m.state, "unknown"),
                rank=m.rank,
                heartbeat=m.heartbeat,
                seconds_since_heartbeat=m.seconds_since_heartbeat,
            )
            for m in s.members
        ),
        neighbours=tuple(s.neighbours),
        training=s.training,
        resting=s.resting,
        epoch=s.epoch,
        train_loss=s.train_loss if s.HasField("train_loss") else None,
        eval_loss=s.eval_loss if s.HasField("eval_loss") else None,
        eval_accuracy=s.eval_accuracy if s.HasField("eval_accuracy") else None,
        evals=s.evals,
        last_delta_norm=s.last_delta_norm if s.HasField("last_delta_norm") else None,
        exchange_seconds_bounds=tuple(s.exchange_seconds_bounds),
        exchange_seconds_buckets=tuple(s.exchange_seconds_buckets),
        exchange_seconds_sum=s.exchange_seconds_sum,
        exchanged_with=dict(s.exchanged_with),
        calls_refused=s.calls_refused,
        calls_delayed=s.calls_delayed,
        # At most 64 names of 64 printable characters: what a peer says is printed as it is.
        control_calls={k[:64]: v for k, v in list(s.control_calls.items())[:64] if k.isprintable()},
        sample=tuple(s.sample),
        max_send_rate=s.max_send_rate,
        paced_bytes=s.paced_bytes,
        paced_wait_seconds=s.paced_wait_seconds,
        pipeline=s.pipeline,
        bulk_port=s.bulk_port if 0 < s.bulk_port <= 65535 else 0,
    )
