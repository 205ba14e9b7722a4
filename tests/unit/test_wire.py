"""The hand-written frame codec against the generated protobuf, and every rejection path."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.membership import (
    MAX_ADDRESS_CHARS,
    MAX_FINGERPRINT_BYTES,
    MAX_ID_CHARS,
    STATES,
    MemberRecord,
)
from gossip.proto import gossip_pb2 as pb
from gossip.transport import frames as wire
from gossip.transport.frames import (
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_PIPELINE_CHARS,
    Header,
    WireError,
    chunk_frame,
    chunk_from_frame,
    header_from_frame,
    header_to_frame,
    iter_chunks,
)
from gossip.transport.serde import (
    MAX_MEMBERS,
    ProtocolMismatch,
    table_from_bytes,
    table_message_from_bytes,
    table_to_bytes,
)

CHUNK_SIZES = [0, 1, 127, 128, 16383, 16384, 1 << 20]


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _header(**kw: object) -> Header:
    fields: dict[str, object] = {
        "fingerprint": bytes(range(16)),
        "sender": "node-a",
        "step": 42,
        "codec": "raw",
        "total_bytes": 1 << 20,
        "weight": 0.5,
        "chunk_bytes": 1 << 16,
        "outcome": "",
    }
    fields.update(kw)
    return Header(**fields)  # type: ignore[arg-type]


def _pb_member(**kw: object) -> pb.Member:
    fields: dict[str, object] = {
        "node_id": "n1",
        "address": "127.0.0.1:5000",
        "incarnation": 7,
        "heartbeat": 3,
        "state": pb.STATE_ALIVE,
        "rank": 2,
        "fingerprint": b"\x01" * 16,
    }
    fields.update(kw)
    return pb.Member(**fields)  # type: ignore[arg-type]


def _member_from_pb(m: pb.Member) -> MemberRecord:
    """One member decoded the way every member is: as the sender of a member table."""
    sender, _ = table_from_bytes(pb.MemberTable(sender=m).SerializeToString())
    return sender


def _member_round_trip(rec: MemberRecord) -> MemberRecord:
    sender, _ = table_from_bytes(table_to_bytes(rec, []))
    return sender


def _frame_with_header(**kw: object) -> bytes:
    base: dict[str, object] = {"fingerprint": b"f", "sender": "s", "codec": pb.CODEC_RAW, "weight": 1.0}
    base.update(kw)
    return pb.Frame(header=pb.Header(**base)).SerializeToString()  # type: ignore[arg-type]


# --- headers ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "fp16", "bf16"])
@pytest.mark.parametrize("outcome", ["", "accepted", "busy"])
def test_header_round_trip(codec: str, outcome: str) -> None:
    h = _header(codec=codec, outcome=outcome)

    back = header_from_frame(header_to_frame(h))

    assert back == h


_headers = st.builds(
    Header,
    fingerprint=st.binary(max_size=32),
    sender=st.text(max_size=64),
    step=st.integers(0, 2**64 - 1),
    codec=st.sampled_from(["raw", "fp16", "bf16"]),
    total_bytes=st.integers(0, 2**64 - 1),
    weight=st.floats(min_value=0.0, allow_infinity=False, allow_nan=False),
    chunk_bytes=st.integers(0, MAX_CHUNK_BYTES),
    outcome=st.sampled_from(["", "accepted", "busy"]),
    pipeline=st.text(max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(_headers)
def test_any_valid_header_round_trips(h: Header) -> None:
    assert header_from_frame(header_to_frame(h)) == h


def test_header_frame_is_a_protobuf_frame() -> None:
    h = _header(codec="bf16", outcome="busy")

    msg = pb.Frame.FromString(header_to_frame(h))

    assert msg.WhichOneof("body") == "header"
    assert msg.header.codec == pb.CODEC_BF16
    assert msg.header.outcome == pb.OUTCOME_BUSY
    assert msg.header.sender == "node-a"


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b", b"\x00\x00"],
    ids=["bad tag", "truncated header", "overlong varint", "start group", "field zero"],
)
def test_header_from_frame_rejects_garbage(data: bytes) -> None:
    with pytest.raises(WireError):
        header_from_frame(data)


def test_header_from_frame_rejects_an_empty_frame() -> None:
    with pytest.raises(WireError):
        header_from_frame(b"")


def test_header_from_frame_rejects_a_chunk_frame() -> None:
    with pytest.raises(WireError):
        header_from_frame(chunk_frame(memoryview(b"abc")))


@pytest.mark.parametrize("weight", [math.nan, -1.0, -1e-300, math.inf, -math.inf])
def test_header_from_frame_rejects_bad_weights(weight: float) -> None:
    data = _frame_with_header(weight=weight)

    with pytest.raises(WireError):
        header_from_frame(data)


@pytest.mark.parametrize(("field", "value"), [("codec", 0), ("codec", 99), ("outcome", 7)])
def test_header_from_frame_rejects_unknown_enums(field: str, value: int) -> None:
    data = _frame_with_header(**{field: value})

    with pytest.raises(WireError):
        header_from_frame(data)


def test_header_from_frame_rejects_an_oversized_frame() -> None:
    data = header_to_frame(_header(sender="x" * MAX_HEADER_BYTES))

    with pytest.raises(WireError):
        header_from_frame(data)


def test_header_from_frame_rejects_oversized_chunks() -> None:
    data = _frame_with_header(chunk_bytes=MAX_CHUNK_BYTES + 1)

    with pytest.raises(WireError):
        header_from_frame(data)


def test_header_from_frame_rejects_an_overlong_pipeline() -> None:
    data = _frame_with_header(pipeline="x" * (MAX_PIPELINE_CHARS + 1))

    with pytest.raises(WireError):
        header_from_frame(data)


def test_header_pipeline_round_trips() -> None:
    h = _header(pipeline="x" * MAX_PIPELINE_CHARS)

    assert header_from_frame(header_to_frame(h)) == h


# --- chunks ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.sampled_from(CHUNK_SIZES), st.integers(0, 5000)), seed=st.integers(0, 2**32))
def test_hand_encoded_chunk_parses_with_protobuf(n: int, seed: int) -> None:
    data = _payload(n, seed)

    msg = pb.Frame.FromString(chunk_frame(memoryview(data)))

    assert msg.WhichOneof("body") == "chunk"
    assert msg.chunk == data


@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.sampled_from(CHUNK_SIZES), st.integers(0, 5000)), seed=st.integers(0, 2**32))
def test_protobuf_chunk_parses_with_chunk_from_frame(n: int, seed: int) -> None:
    data = _payload(n, seed)

    got = chunk_from_frame(pb.Frame(chunk=data).SerializeToString())

    assert bytes(got) == data


@pytest.mark.parametrize("n", CHUNK_SIZES)
def test_hand_encoding_is_byte_identical_to_protobuf(n: int) -> None:
    data = _payload(n, n)

    assert chunk_frame(memoryview(data)) == pb.Frame(chunk=data).SerializeToString()


def test_chunk_from_frame_returns_a_view_not_a_copy() -> None:
    frame = chunk_frame(memoryview(b"hello"))

    view = chunk_from_frame(frame)

    assert view.obj is frame
    assert bytes(view) == b"hello"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x12",  # tag, no length
        b"\x12\x80",  # length varint cut short
        b"\x12\xff\xff",
        b"\x12" + b"\x80" * 10 + b"\x01",  # varint longer than 10 bytes
    ],
    ids=["empty", "no length", "truncated varint", "truncated long varint", "overlong varint"],
)
def test_chunk_from_frame_rejects_bad_lengths(data: bytes) -> None:
    with pytest.raises(WireError):
        chunk_from_frame(data)


@pytest.mark.parametrize("tag", [0x0A, 0x10, 0x1A, 0x00, 0xFF])
def test_chunk_from_frame_rejects_wrong_tags(tag: int) -> None:
    data = bytes((tag, 3)) + b"abc"

    with pytest.raises(WireError):
        chunk_from_frame(data)


def test_chunk_from_frame_rejects_a_header_frame() -> None:
    with pytest.raises(WireError):
        chunk_from_frame(header_to_frame(_header()))


@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_chunk_from_frame_rejects_length_mismatch(delta: int) -> None:
    frame = chunk_frame(memoryview(b"x" * 200))
    data = frame[: len(frame) + delta] if delta < 0 else frame + b"y" * delta

    with pytest.raises(WireError):
        chunk_from_frame(data)


def test_chunk_from_frame_rejects_oversized_chunks() -> None:
    data = chunk_frame(memoryview(bytes(MAX_CHUNK_BYTES + 1)))

    with pytest.raises(WireError):
        chunk_from_frame(data)


def test_chunk_from_frame_accepts_the_largest_chunk() -> None:
    data = chunk_frame(memoryview(bytes(MAX_CHUNK_BYTES)))

    assert len(chunk_from_frame(data)) == MAX_CHUNK_BYTES
    assert len(data) <= wire.MAX_FRAME_BYTES


@pytest.mark.parametrize(("sizes", "chunk"), [([10, 0, 7], 4), ([4096], 4096), ([5], 100), ([], 3)])
def test_iter_chunks_covers_every_byte_in_order(sizes: list[int], chunk: int) -> None:
    views = [memoryview(_payload(n, i)) for i, n in enumerate(sizes)]

    chunks = iter_chunks(views, chunk)

    assert b"".join(bytes(c) for c in chunks) == b"".join(bytes(v) for v in views)
    assert all(0 < len(c) <= chunk for c in chunks)


# --- members -----------------------------------------------------------------------


def test_member_round_trip() -> None:
    rec = MemberRecord("n1", "10.0.0.1:5000", incarnation=9, heartbeat=4, rank=3, fingerprint=b"\x02" * 16)

    back = _member_round_trip(rec)

    assert back == rec


@pytest.mark.parametrize(("local", "travels"), [("alive", "alive"), ("suspect", "alive"), ("left", "left")])
def test_member_encoding_sends_only_alive_or_left(local: str, travels: str) -> None:
    rec = MemberRecord("n1", "10.0.0.1:5000", incarnation=1, heartbeat=1, state=local)

    back = _member_round_trip(rec)

    assert back.state == travels


def test_swim_claims_travel_as_they_are_and_only_where_claims_are_taken() -> None:
    me = MemberRecord("me", "127.0.0.1:1000", 1, 5)
    others = [MemberRecord(f"n{i}", f"127.0.0.1:{2000 + i}", 1, 0, state=s) for i, s in enumerate(STATES)]
    data = table_to_bytes(me, others, full=True, protocol="swim")

    sender, members, full = table_message_from_bytes(data, "swim")

    assert (sender, members, full) == (me, others, True)
    with pytest.raises(ProtocolMismatch, match="runs --member-protocol swim, this node heartbeat"):
        table_from_bytes(data)  # a heartbeat node takes no swim table
    claim = pb.MemberTable(
        sender=pb.Member(node_id="me", address="127.0.0.1:1000", state=pb.STATE_ALIVE),
        members=[pb.Member(node_id="n1", address="127.0.0.1:2001", state=pb.STATE_SUSPECT)],
    )
    with pytest.raises(WireError, match="only alive or left may"):
        table_from_bytes(claim.SerializeToString())  # nor claims in a heartbeat one


@pytest.mark.parametrize(
    ("sent", "mine", "shown"),
    [("", "swim", "heartbeat"), ("heartbeat", "swim", "heartbeat"), ("gossip-2030", "swim", "'gossip-2030'")],
)
def test_a_table_of_another_member_protocol_is_named_not_merged(sent: str, mine: str, shown: str) -> None:
    msg = pb.MemberTable(
        sender=pb.Member(node_id="old", address="10.0.0.1:7070", state=pb.STATE_ALIVE), protocol=sent
    )

    with pytest.raises(ProtocolMismatch) as info:
        table_message_from_bytes(msg.SerializeToString(), mine)

    assert str(info.value) == (
        f"member old (10.0.0.1:7070) runs --member-protocol {shown}, this node {mine}: "
        "every node of a cluster must run the same one"
    )


def test_a_table_without_a_protocol_is_from_a_heartbeat_node() -> None:
    msg = pb.MemberTable(
        sender=pb.Member(node_id="old", address="10.0.0.1:7070", state=pb.STATE_ALIVE)
    )  # before the field

    assert table_message_from_bytes(msg.SerializeToString(), "heartbeat")[0].node_id == "old"


def test_table_round_trip() -> None:
    me = MemberRecord("me", "127.0.0.1:1000", 1, 5)
    others = [MemberRecord(f"n{i}", f"127.0.0.1:{2000 + i}", i, i, rank=i) for i in range(5)]

    sender, members = table_from_bytes(table_to_bytes(me, others))

    assert sender == me
    assert members == others


@pytest.mark.parametrize("node_id", ["", "x" * (MAX_ID_CHARS + 1)], ids=["empty", "too long"])
def test_member_decoding_rejects_bad_ids(node_id: str) -> None:
    with pytest.raises(WireError):
        _member_from_pb(_pb_member(node_id=node_id))


def test_member_decoding_rejects_an_oversized_fingerprint() -> None:
    _member_from_pb(_pb_member(fingerprint=b"f" * MAX_FINGERPRINT_BYTES))  # at the bound: taken
    with pytest.raises(WireError, match="fingerprint of 65 bytes"):
        _member_from_pb(_pb_member(fingerprint=b"f" * (MAX_FINGERPRINT_BYTES + 1)))


BAD_ADDRESSES = {
    "empty": "",
    "no port": "127.0.0.1",
    "empty port": "127.0.0.1:",
    "empty host": ":5000",
    "port not a number": "127.0.0.1:http",
    "port out of range": "127.0.0.1:70000",
    "port zero": "127.0.0.1:0",
    "too long": "h" * MAX_ADDRESS_CHARS + ":1",
}


@pytest.mark.parametrize("address", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_member_decoding_rejects_bad_addresses(address: str) -> None:
    with pytest.raises(WireError):
        _member_from_pb(_pb_member(address=address))


@pytest.mark.parametrize("address", ["127.0.0.1:1", "node-7.example.org:65535", "[::1]:5000"])
def test_member_decoding_accepts_good_addresses(address: str) -> None:
    assert _member_from_pb(_pb_member(address=address)).address == address


@pytest.mark.parametrize(
    "state",
    [pb.STATE_UNSPECIFIED, pb.STATE_SUSPECT, pb.STATE_DEAD, 17],
    ids=["unspecified", "suspect", "dead", "17"],
)
def test_member_decoding_rejects_local_only_states(state: int) -> None:
    with pytest.raises(WireError):
        _member_from_pb(_pb_member(state=state))


def test_member_decoding_rejects_rank_below_minus_one() -> None:
    with pytest.raises(WireError):
        _member_from_pb(_pb_member(rank=-2))


def test_table_from_bytes_rejects_too_many_members() -> None:
    members = [_pb_member(node_id=f"n{i}") for i in range(MAX_MEMBERS + 1)]
    msg = pb.MemberTable(sender=_pb_member(node_id="me"), members=members)

    with pytest.raises(WireError):
        table_from_bytes(msg.SerializeToString())


def test_table_from_bytes_accepts_the_most_members() -> None:
    members = [_pb_member(node_id=f"n{i}") for i in range(MAX_MEMBERS)]
    msg = pb.MemberTable(sender=_pb_member(node_id="me"), members=members)

    _, got = table_from_bytes(msg.SerializeToString())

    assert len(got) == MAX_MEMBERS


def test_table_from_bytes_rejects_a_missing_sender() -> None:
    with pytest.raises(WireError):
        table_from_bytes(pb.MemberTable(members=[_pb_member()]).SerializeToString())


def test_table_from_bytes_rejects_one_bad_member_among_good_ones() -> None:
    msg = pb.MemberTable(
        sender=_pb_member(node_id="me"), members=[_pb_member(), _pb_member(state=pb.STATE_DEAD)]
    )

    with pytest.raises(WireError):
        table_from_bytes(msg.SerializeToString())


# --- fuzz ------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_header_from_frame_raises_only_wire_error(data: bytes) -> None:
    try:
        h = header_from_frame(data)
    except WireError:
        return
    assert h.codec in ("raw", "fp16", "bf16")
    assert math.isfinite(h.weight) and h.weight >= 0


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"\x12" + b)))
def test_chunk_from_frame_raises_only_wire_error(data: bytes) -> None:
    try:
        view = chunk_from_frame(data)
    except WireError:
        return
    assert pb.Frame.FromString(data).chunk == bytes(view)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_table_parsing_raises_only_wire_error(data: bytes) -> None:
    try:
        sender, members = table_from_bytes(data)  # malformed protobuf is a WireError too
    except WireError:
        return
    for m in (sender, *members):
        assert m.node_id and ":" in m.address and m.state in ("alive", "left")


_members = st.builds(
    pb.Member,
    node_id=st.text(max_size=5),
    address=st.one_of(st.text(max_size=12), st.just("127.0.0.1:1")),
    incarnation=st.integers(0, 2**64 - 1),
    heartbeat=st.integers(0, 2**64 - 1),
    state=st.integers(-3, 8),
    rank=st.integers(-(2**31), 2**31 - 1),
    fingerprint=st.binary(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(sender=_members, members=st.lists(_members, max_size=5))
def test_structured_table_fuzz_raises_only_wire_error(sender: pb.Member, members: list[pb.Member]) -> None:
    msg = pb.MemberTable(sender=sender, members=members)

    try:
        table_from_bytes(msg.SerializeToString())
    except WireError:
        return


def test_a_table_built_from_cached_members_is_the_message_built_whole() -> None:
    """Members' encodings are reused across tables (serde._FRAGMENTS): a changed record, and the
    same record under the other protocol, must still travel as it is now."""
    me = MemberRecord("me", "127.0.0.1:1000", 1, 5)
    others = [MemberRecord(f"n{i}", f"127.0.0.1:{2000 + i}", 1, i, state="suspect") for i in range(300)]
    for protocol, state in (("swim", pb.STATE_SUSPECT), ("heartbeat", pb.STATE_ALIVE)):
        table_to_bytes(me, others, full=True, protocol=protocol)  # fills the cache
        others[7].heartbeat += 1
        whole = pb.MemberTable(
            sender=pb.Member(
                node_id="me",
                address="127.0.0.1:1000",
                incarnation=1,
                heartbeat=5,
                state=pb.STATE_ALIVE,
                rank=-1,
            ),
            members=[
                pb.Member(
                    node_id=m.node_id,
                    address=m.address,
                    incarnation=1,
                    heartbeat=m.heartbeat,
                    state=state,
                    rank=-1,
                )
                for m in others
            ],
            full=True,
            protocol=protocol,
        )

        got = pb.MemberTable.FromString(table_to_bytes(me, others, full=True, protocol=protocol))

        assert got == whole
        assert got.members[7].heartbeat == others[7].heartbeat
