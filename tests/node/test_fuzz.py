"""Bad input against a live node: every RPC, random bytes, mutated frames, valid-but-wrong messages.

Two nodes serve for the whole module (a pairwise one and a push-sum one, on
their own event loops), and one per compress spec (``--compress``: their
reference copies per neighbour are state too, see section 4). Each example is one call from the synchronous gRPC
client with a deadline (the aio client can mask a streaming call's final status,
grpc/grpc#36066). After every call:

- the reply is a status the protocol gives on purpose: never UNKNOWN (an
  unhandled exception), UNAVAILABLE (a dead server) or DEADLINE_EXCEEDED (a hang);
- the node still answers;
- its parameters, push-sum weight, member table and stored shards are
  bit-identical, except where the input was a valid push that the node rightly
  took: then its new state must be exactly the push-sum merge of what was sent,
  and it is put back for the next example. No exchange here sends the commit
  frame, so no exchange may change anything.

Hypothesis runs derandomized (the same examples every run: no flaky test) with a
bounded number of examples; the module reports how many inputs it sent.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pkgutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gossip.proto
from gossip.api import BackgroundNode
from gossip.cli.main import main as cli_main
from gossip.config import GossipConfig, NodeConfig, SecurityConfig, StoreConfig
from gossip.core import averaging
from gossip.core.choco import MAX_PAIRS, Choco
from gossip.core.codecs import PayloadReceiver, payload_nbytes
from gossip.core.compress import BLOCK, CompressError, Compressor
from gossip.core.membership import (
    MAX_ADDRESS_CHARS,
    MAX_FINGERPRINT_BYTES,
    MAX_ID_CHARS,
    MemberRecord,
    MembershipConfig,
    dialable,
)
from gossip.core.params import FlatParams
from gossip.proto import gossip_pb2 as pb
from gossip.transport import frames as wire
from gossip.transport import serde

DEADLINE = 5.0
GOSSIP = "/gossip.proto.Gossip/"
# What a node answers on purpose. INTERNAL is gRPC's own answer to bytes that do
# not parse as the method's request message, before any of our code runs.
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INTERNAL,
}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

sent = {"inputs": 0}
answers: dict[str, int] = {}  # status code name -> how often a fuzzing call ended with it
merged = {"pushes": 0}  # valid pushes the node took (checked against the reference merge)


# --- the nodes under test -------------------------------------------------------------------


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g))


def start(strategy: str) -> BackgroundNode:
    cfg = NodeConfig(
        node_id=f"fuzz-{strategy}",
        gossip=GossipConfig(strategy=strategy),
        membership=MembershipConfig(interval=0.2, suspect_after=60.0, dead_after=120.0),
        # The rate limit has its own tests; here it would only slow the fuzzing down.
        security=SecurityConfig(peer_call_rate=0.0),
    )
    return BackgroundNode(Model(), cfg, seed=0)


@pytest.fixture(scope="module")
def pairwise() -> Iterator[BackgroundNode]:
    with start("pairwise") as node:
        yield node


@pytest.fixture(scope="module")
def members_node() -> Iterator[BackgroundNode]:
    """A node of its own for the member-table tests: the members they bring in (at addresses
    nobody serves) are then probed, suspected and declared dead on the node's own clock,
    which must not show in the whole-state checks of the other tests."""
    with start("pairwise") as node:
        yield node


@pytest.fixture(scope="module")
def pushsum() -> Iterator[BackgroundNode]:
    with start("push-sum") as node:
        yield node


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    codes = ", ".join(f"{k} {v}" for k, v in sorted(answers.items(), key=lambda kv: -kv[1]))
    line = (
        f"test_fuzz: {sent['inputs']} bad inputs sent to live nodes; answers: {codes}; "
        f"valid pushes merged exactly: {merged['pushes']}"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and sent["inputs"]:
        with capture.global_and_fixture_disabled():  # shown also when output is captured
            reporter.write_line(line)


State = tuple[bytes, float, tuple[Any, ...], tuple[Any, ...]]


def state(bg: BackgroundNode) -> State:
    """Everything bad input must not touch: parameters (bits), weight, members, stored shards."""
    node = bg.node
    with node.slot.lock:
        params = b"".join(s.numpy().tobytes() for s in node.flat)
        weight = node.weight
    assert node.members is not None
    members = tuple(
        sorted((k, m.address, m.state, m.incarnation, m.rank) for k, m in node.members.table.members.items())
    )
    store = getattr(getattr(node, "store", None), "store", None)
    shards: tuple[Any, ...] = ()
    if store is not None:
        shards = (
            tuple(sorted(store.manifests)),
            tuple(sorted((sid, bytes(h.data)) for sid, h in store.shards.items())),
        )
    return params, weight, members, shards


# --- raw calls ------------------------------------------------------------------------------


def methods() -> list[tuple[str, bool, bool]]:
    """(path, client streams, server streams) of every RPC a node serves, from the protos."""
    out = []
    for info in pkgutil.iter_modules(gossip.proto.__path__):
        if info.name.endswith("_pb2"):
            mod = importlib.import_module(f"gossip.proto.{info.name}")
            for service in mod.DESCRIPTOR.services_by_name.values():
                for m in service.methods:
                    out.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return sorted(out)


METHODS = methods()
_channels: dict[str, grpc.Channel] = {}


def call(address: str, method: tuple[str, bool, bool], frames: Sequence[bytes]) -> grpc.StatusCode:
    """Send raw ``frames`` (one message for a unary request), read every reply; the final status."""
    ch = _channels.get(address)
    if ch is None:
        ch = _channels[address] = grpc.insecure_channel(address)
    path, client_streaming, server_streaming = method
    factory = {
        (False, False): ch.unary_unary,
        (False, True): ch.unary_stream,
        (True, False): ch.stream_unary,
        (True, True): ch.stream_stream,
    }[(client_streaming, server_streaming)]
    request: Any = iter(list(frames)) if client_streaming else (frames[0] if frames else b"")
    code: grpc.StatusCode = grpc.StatusCode.OK
    try:
        result = factory(path, None, None)(request, timeout=DEADLINE)
        if server_streaming:
            for _ in result:
                pass
            code = result.code()
    except grpc.RpcError as exc:
        code = exc.code()
    if path != GOSSIP + "Status" or frames != [b""]:  # not the liveness probes
        sent["inputs"] += 1
        answers[code.name] = answers.get(code.name, 0) + 1
    return code


@pytest.fixture(scope="module", autouse=True)
def close_channels() -> Iterator[None]:
    yield
    for ch in _channels.values():
        ch.close()
    _channels.clear()


def still_serving(bg: BackgroundNode) -> None:
    assert call(bg.address, (GOSSIP + "Status", False, False), [b""]) == grpc.StatusCode.OK


def check(bg: BackgroundNode, code: grpc.StatusCode, before: State) -> None:
    assert code in PROPER, code
    assert state(bg) == before
    still_serving(bg)


# --- valid frames to start from -------------------------------------------------------------


def header(flat: FlatParams, **fields: Any) -> bytes:
    h = wire.Header(
        fingerprint=flat.fingerprint,
        sender="fuzzer",
        step=1,
        codec="raw",
        total_bytes=payload_nbytes(flat.layout, "raw"),
        weight=0.5,
        chunk_bytes=16,
    )
    return wire.header_to_frame(h.__class__(**{**h.__dict__, **fields}))


def chunks(values: Sequence[float], chunk: int = 16) -> list[bytes]:
    raw = struct.pack(f"<{len(values)}f", *values)
    return [wire.chunk_frame(memoryview(raw[i : i + chunk])) for i in range(0, len(raw), chunk)]


def numel(bg: BackgroundNode) -> int:
    return bg.node.flat.numel


def valid_frames(bg: BackgroundNode) -> list[bytes]:
    return [header(bg.node.flat), *chunks([0.25 * i for i in range(numel(bg))])]


# --- the push-sum reference -----------------------------------------------------------------


def expected_after_push(bg: BackgroundNode, frames: Sequence[bytes]) -> tuple[bytes, float] | None:
    """The state a push of ``frames`` must leave, or None when the push is not valid."""
    node = bg.node
    if not frames:
        return None
    try:
        h = wire.header_from_frame(frames[0])
        if h.fingerprint != node.flat.fingerprint or h.total_bytes != payload_nbytes(
            node.flat.layout, h.codec
        ):
            return None
        if not h.weight > 0:
            return None
        receiver = PayloadReceiver(node.flat.layout, h.codec)
        for f in frames[1:]:
            receiver.write(wire.chunk_from_frame(f))
        z_in = receiver.finish()
    except (wire.WireError, ValueError):
        return None
    if not z_in.is_finite():
        return None
    with node.slot.lock:
        z, w = node.flat.clone(), node.weight
    w_new = w
    for zs, zi in zip(z, z_in, strict=True):
        w_new = averaging.push_sum_merge_(zs, w, zi, h.weight)
    return b"".join(s.numpy().tobytes() for s in z), w_new


def push_and_check(bg: BackgroundNode, frames: Sequence[bytes]) -> grpc.StatusCode:
    """Push ``frames``; a refused push changes nothing, a valid one exactly the merge (then undone)."""
    before = state(bg)
    node = bg.node
    with node.slot.lock:
        saved, saved_w = node.flat.clone(), node.weight
    expected = expected_after_push(bg, frames)
    code = call(bg.address, (GOSSIP + "Push", True, False), frames)
    assert code in PROPER, code
    if code == grpc.StatusCode.OK:
        merged["pushes"] += 1
        assert expected is not None, "the node took a push that is not valid"
        params, weight, _, _ = state(bg)
        assert (params, weight) == expected
        assert math.isfinite(weight)
        with node.slot.lock:
            node.flat.copy_(saved)
            node.party.weight = saved_w
    assert state(bg) == before
    still_serving(bg)
    return code


# --- 1. random bytes to every RPC -----------------------------------------------------------


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    frames=st.lists(st.binary(max_size=300), min_size=0, max_size=4),
)
def test_random_bytes_to_every_rpc(pairwise: BackgroundNode, method: Any, frames: list[bytes]) -> None:
    before = state(pairwise)

    code = call(pairwise.address, method, frames)

    check(pairwise, code, before)


@FUZZ
@given(method=st.sampled_from(METHODS), frames=st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_to_every_rpc_of_a_push_sum_node(
    pushsum: BackgroundNode, method: Any, frames: list[bytes]
) -> None:
    if method[0] == GOSSIP + "Push":
        push_and_check(pushsum, frames)
        return
    before = state(pushsum)

    code = call(pushsum.address, method, frames)

    check(pushsum, code, before)


# --- 2. mutated valid frames ----------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, frames: list[bytes]) -> list[bytes]:
    """``frames`` after 1-4 edits: bit flips, truncation, growth, drops, duplicates, swaps, junk."""
    out = list(frames)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup", "swap", "insert"]))
        if not out:
            op = "insert"
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out[i]:
            b = bytearray(out[i])
            j = draw(st.integers(0, len(b) - 1))
            b[j] ^= 1 << draw(st.integers(0, 7))
            out[i] = bytes(b)
        elif op == "truncate":
            out[i] = out[i][: draw(st.integers(0, len(out[i])))]
        elif op == "extend":
            out[i] += draw(st.binary(min_size=1, max_size=40))
        elif op == "drop":
            del out[i]
        elif op == "dup":
            out.insert(i, out[i])
        elif op == "swap":
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        else:
            out.insert(i, draw(st.binary(max_size=64)))
    return out


@FUZZ
@given(data=st.data())
def test_mutated_exchange_frames_change_nothing(pairwise: BackgroundNode, data: st.DataObject) -> None:
    frames = data.draw(mutated(valid_frames(pairwise)))
    before = state(pairwise)

    code = call(pairwise.address, (GOSSIP + "Exchange", True, True), frames)

    check(pairwise, code, before)


@FUZZ
@given(data=st.data())
def test_mutated_push_frames_are_refused_or_merged_exactly(
    pushsum: BackgroundNode, data: st.DataObject
) -> None:
    push_and_check(pushsum, data.draw(mutated(valid_frames(pushsum))))


@FUZZ
@given(data=st.data())
def test_mutated_member_tables_leave_parameters_alone(
    members_node: BackgroundNode, data: st.DataObject
) -> None:
    table = serde.table_to_bytes(
        MemberRecord("fz", "127.0.0.1:9", 1, 1, fingerprint=b"other model"),
        [MemberRecord(f"fz{i}", f"127.0.0.{i + 2}:9", 1, 1, fingerprint=b"other model") for i in range(3)],
        protocol="swim",  # the fixture's: mutations reach the merge, not only the protocol check
    )
    frames = data.draw(mutated([table]))
    method = data.draw(st.sampled_from(["Join", "Sync", "Leave", "Status"]))
    params_before = state(members_node)[:2]

    code = call(members_node.address, (GOSSIP + method, False, False), frames[:1])

    assert code in PROPER, code
    assert state(members_node)[:2] == params_before
    well_formed_members(members_node)
    still_serving(members_node)


# --- 3. valid protobufs with wrong values ---------------------------------------------------

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-45]),
)
U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64 - 1]))


@st.composite
def wrong_header(draw: st.DrawFn, flat: FlatParams) -> bytes:
    right = payload_nbytes(flat.layout, "raw")
    fields = {
        "fingerprint": draw(st.one_of(st.just(flat.fingerprint), st.binary(max_size=40))),
        "sender": draw(st.text(max_size=200)),
        "step": draw(U64),
        "codec": draw(st.integers(-3, 8)),
        "total_bytes": draw(st.one_of(st.sampled_from([right, right // 2, right - 4, right + 4]), U64)),
        "weight": draw(
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0]))
        ),
        "chunk_bytes": draw(
            st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 16, 4 << 20, (4 << 20) + 1]))
        ),
        "outcome": draw(st.integers(-2, 6)),
    }
    msg = pb.Frame()
    for k, v in fields.items():
        # A value the field cannot hold stays unset (a negative codec is fine, 2**64 is not).
        with contextlib.suppress(ValueError, TypeError):
            setattr(msg.header, k, v)
    return msg.SerializeToString()


@st.composite
def wrong_payload(draw: st.DrawFn, n: int) -> list[bytes]:
    count = draw(st.one_of(st.just(n), st.integers(0, 2 * n + 2)))
    values = draw(st.lists(FLOATS, min_size=count, max_size=count))
    chunk = draw(st.sampled_from([4, 8, 16, 12, 7, 1024]))
    return chunks(values, chunk)


@FUZZ
@given(data=st.data())
def test_wrong_but_valid_exchange_messages_change_nothing(
    pairwise: BackgroundNode, data: st.DataObject
) -> None:
    flat = pairwise.node.flat
    first = data.draw(st.one_of(wrong_header(flat), st.just(header(flat))))
    frames = [first, *data.draw(wrong_payload(flat.numel))]
    before = state(pairwise)

    code = call(pairwise.address, (GOSSIP + "Exchange", True, True), frames)

    check(pairwise, code, before)


@FUZZ
@given(data=st.data())
def test_wrong_but_valid_pushes_are_refused_or_merged_exactly(
    pushsum: BackgroundNode, data: st.DataObject
) -> None:
    flat = pushsum.node.flat
    weight = data.draw(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-300]))
    )
    first = data.draw(
        st.one_of(wrong_header(flat), st.just(header(flat, weight=abs(weight) if weight == weight else 0.5)))
    )
    frames = [first, *data.draw(wrong_payload(flat.numel))]

    code = push_and_check(pushsum, frames)

    if any(not math.isfinite(v) for f in frames[1:] for v in _floats(f)):
        assert code != grpc.StatusCode.OK  # NaN or Inf never gets in


def _floats(frame: bytes) -> list[float]:
    try:
        data = bytes(wire.chunk_from_frame(frame))
    except wire.WireError:
        return []
    return list(struct.unpack(f"<{len(data) // 4}f", data[: len(data) // 4 * 4]))


ADDRESS = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda h, p: f"{h}:{p}",
        st.sampled_from(["127.0.0.1", "", "::1", "[::1]", "host", "x" * 300]),
        st.one_of(st.integers(-5, 70000), st.sampled_from(["", "\u00b2", "80a", "0"])),
    ),
)


@st.composite
def wrong_member(draw: st.DrawFn) -> pb.Member:
    m = pb.Member(
        node_id=draw(st.one_of(st.text(max_size=20), st.text(min_size=120, max_size=200))),
        address=draw(ADDRESS),
        incarnation=draw(U64),
        heartbeat=draw(U64),
        rank=draw(st.integers(-(2**31), 2**31 - 1)),
        fingerprint=draw(st.binary(max_size=20)),
    )
    m.state = cast(Any, draw(st.integers(-1, 7)))  # unknown enum values too (proto3 enums are open)
    return m


def well_formed_members(bg: BackgroundNode) -> None:
    node = bg.node
    assert node.members is not None
    for m in list(node.members.table.members.values()):
        assert m.node_id and len(m.node_id) <= MAX_ID_CHARS and len(m.fingerprint) <= MAX_FINGERPRINT_BYTES
        assert dialable(m.address) and len(m.address) <= MAX_ADDRESS_CHARS
        assert m.node_id != node.node_id and m.rank >= -1


@FUZZ
@given(
    method=st.sampled_from(["Join", "Sync"]),
    sender=st.one_of(wrong_member(), st.none()),
    members=st.lists(wrong_member(), max_size=6),
    protocol=st.sampled_from(["swim", "swim", "", "heartbeat"]),
)
def test_wrong_but_valid_member_tables_keep_the_table_well_formed(
    members_node: BackgroundNode,
    method: str,
    sender: pb.Member | None,
    members: list[pb.Member],
    protocol: str,
) -> None:
    table = pb.MemberTable(members=members, protocol=protocol)
    if sender is not None:
        table.sender.CopyFrom(sender)
    params_before = state(members_node)[:2]

    code = call(members_node.address, (GOSSIP + method, False, False), [table.SerializeToString()])

    # Another protocol than the fixture's (swim) is refused whole, once the sender decodes.
    other = {grpc.StatusCode.FAILED_PRECONDITION} if protocol != "swim" else set()
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} | other, code
    assert state(members_node)[:2] == params_before
    well_formed_members(members_node)
    still_serving(members_node)


@FUZZ
@given(node_id=st.text(max_size=200), incarnation=U64)
def test_leave_for_anyone_changes_no_parameters(
    members_node: BackgroundNode, node_id: str, incarnation: int
) -> None:
    params_before = state(members_node)[:2]

    code = call(
        members_node.address,
        (GOSSIP + "Leave", False, False),
        [pb.LeaveRequest(node_id=node_id, incarnation=incarnation).SerializeToString()],
    )

    assert code == grpc.StatusCode.OK
    assert state(members_node)[:2] == params_before
    still_serving(members_node)


def test_huge_announced_sizes_are_refused_before_anything_is_buffered(pairwise: BackgroundNode) -> None:
    flat = pairwise.node.flat
    before = state(pairwise)
    cases: list[Callable[[], list[bytes]]] = [
        lambda: [header(flat, total_bytes=2**64 - 1)],
        lambda: [header(flat, chunk_bytes=2**32 - 1)],
        lambda: [header(flat), b"\x12" + b"\xff" * 9 + b"\x01"],  # a chunk announcing 2**63 bytes
        lambda: [header(flat), b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"],  # an overlong varint
    ]

    for make in cases:
        for method in ("Exchange", "Push"):
            kind = (GOSSIP + method, True, method == "Exchange")
            code = call(pairwise.address, kind, make())
            assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}, (
                method,
                code,
            )

    check(pairwise, grpc.StatusCode.OK, before)


# --- 4. compressed exchanges (--compress, gossip.core.choco) ------------------------------------
# A node running CHOCO-Gossip keeps, per neighbour, two reference copies and a count
# that must move only on a commit, in step with the neighbour's. Two neighbours' pairs
# are seeded (as after a few exchanges); no input here commits, so no input may change
# them, nor the parameters.

SPECS = ["topk:0.01+int8", "sign", "randk:0.05+int4"]
NEIGHBOURS = {"n1": 3, "n2": 1}  # seeded pairs: neighbour -> its committed exchanges


class Wide(torch.nn.Module):
    """605 values: topk:0.01 sends 7 of them (several index gaps), sign and int4 3 blocks of scales."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(20, 30, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g))


def choco(bg: BackgroundNode) -> Choco:
    c = bg.node.party.pipeline.choco
    assert c is not None
    return c


def start_compressed(spec: str, node_id: str) -> BackgroundNode:
    cfg = NodeConfig(
        node_id=node_id,
        gossip=GossipConfig(compress=spec),
        membership=MembershipConfig(interval=0.2, suspect_after=60.0, dead_after=120.0),
        security=SecurityConfig(peer_call_rate=0.0),
    )
    return BackgroundNode(Wide(), cfg, seed=0)


def seed_pairs(bg: BackgroundNode, rounds: dict[str, int]) -> None:
    """Pairs as a few committed exchanges leave them (before any call reaches the node)."""
    c = choco(bg)
    g = torch.Generator().manual_seed(2)
    for peer, n in rounds.items():
        pair = c.pair(peer)
        pair.own += torch.randn(c.dim, generator=g)
        pair.peer += torch.randn(c.dim, generator=g)
        pair.rounds = n


@pytest.fixture(scope="module", params=SPECS)
def compressed(request: pytest.FixtureRequest) -> Iterator[BackgroundNode]:
    with start_compressed(request.param, f"fuzz-{request.param}") as node:
        seed_pairs(node, NEIGHBOURS)
        yield node


Pairs = tuple[tuple[str, int, bytes, bytes], ...]


def pairs(bg: BackgroundNode) -> Pairs:
    """The node's pairs in their order of use: neighbour, count and both copies' bits (only a
    commit makes a pair or moves one, so a refused call leaves all of it as it was)."""
    return tuple(
        (peer, p.rounds, p.own.numpy().tobytes(), p.peer.numpy().tobytes())
        for peer, p in list(choco(bg)._pairs.items())
    )


def check_compressed(bg: BackgroundNode, code: grpc.StatusCode, before: tuple[State, Pairs]) -> None:
    assert code in PROPER, code
    assert (state(bg), pairs(bg)) == before
    still_serving(bg)


def exchange_unchanged(bg: BackgroundNode, frames: Sequence[bytes]) -> grpc.StatusCode:
    """One Exchange call of ``frames``; its status, once checked to have changed nothing."""
    before = state(bg), pairs(bg)
    code = call(bg.address, (GOSSIP + "Exchange", True, True), frames)
    check_compressed(bg, code, before)
    return code


def payload_of(bg: BackgroundNode, seed: int = 0) -> bytes:
    """A well-formed payload of the node's spec (what a neighbour at round 0 sends)."""
    g = torch.Generator().manual_seed(seed)
    payload, _ = choco(bg).compressor.compress(torch.randn(numel(bg), generator=g), g)
    return payload


def compressed_frames(
    bg: BackgroundNode, payload: bytes, chunk: int = 16, asking: bool = True, **fields: Any
) -> list[bytes]:
    """An exchange of ``payload`` in every respect valid (headers, spec, count), no commit frame: a
    caller's (``asking``: a first header without a length, then the same with it) or an answer's."""
    fields = {"pipeline": bg.node.party.pipeline.spec, "total_bytes": len(payload), **fields}
    heads = [header(bg.node.flat, **{**fields, "total_bytes": 0})] if asking else []
    heads.append(header(bg.node.flat, **fields))
    return [
        *heads,
        *(wire.chunk_frame(memoryview(payload[i : i + chunk])) for i in range(0, len(payload), chunk)),
    ]


def varint(v: int, width: int = 0) -> bytes:
    """LEB128, padded to ``width`` bytes with continuation bytes (an overlong encoding)."""
    out = bytearray()
    while True:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
        if not v and len(out) >= width:
            break
    out[-1] &= 0x7F
    return bytes(out)


@st.composite
def mutated_payload(draw: st.DrawFn, bg: BackgroundNode) -> bytes:
    """A payload of the node's spec with 1-3 edits to the fields a peer controls: the index count,
    the gaps (repeated, out of range, overlong), a block scale (NaN, Inf, negative), a code the
    coder never sends (int8 -128, int4 -8), its length, or any bit."""
    comp = choco(bg).compressor
    n = numel(bg)
    k = comp.kept(n)
    out = bytearray(payload_of(bg, draw(st.integers(0, 3))))
    values_at = len(out) - Compressor(coder=comp.coder).max_nbytes(k)  # where the values start
    blocks = -(-k // BLOCK)
    for _ in range(draw(st.integers(1, 3))):
        ops = ["flip", "truncate", "extend", "scale", "code"]
        if comp.sparsifier is not None:
            ops += ["count", "gaps"]
        op = draw(st.sampled_from(ops))
        if op == "count" and len(out) >= 4:
            out[:4] = draw(st.sampled_from([0, k - 1, k + 1, 2**32 - 1])).to_bytes(4, "little")
        elif op == "gaps" and comp.sparsifier is not None:
            gap = st.one_of(st.sampled_from([0, 1, n - 1, n, 2**35 - 1]), st.integers(0, 2 * n))
            gaps = draw(st.lists(gap, min_size=max(0, k - 1), max_size=k + 1))
            width = draw(st.sampled_from([0, 0, 5, 6]))  # 6: longer than a varint may be
            index = b"".join(varint(v, width if i == 0 else 0) for i, v in enumerate(gaps))
            out = bytearray(out[:4] + index + out[values_at:])
            values_at = 4 + len(index)
        elif op == "scale" and comp.coder in ("int8", "int4", "sign"):
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-45, 3.4e38]))
            at = values_at + 4 * draw(st.integers(0, blocks - 1))
            out[at : at + 4] = struct.pack("<f", bad)
        elif op == "code" and comp.coder in ("int8", "int4") and len(out) > values_at + 4 * blocks:
            at = draw(st.integers(values_at + 4 * blocks, len(out) - 1))
            out[at] = 0x80 if comp.coder == "int8" else out[at] & 0xF0  # -128; a low nibble of -8
        elif op == "truncate":
            del out[draw(st.integers(0, max(0, len(out) - 1))) :]
        elif op == "extend":
            out += draw(st.binary(min_size=1, max_size=16))
        elif out:
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def total_bytes_of(bg: BackgroundNode, payload: bytes) -> st.SearchStrategy[int]:
    """Mostly the payload's own length (its decoding is checked), else one the node must refuse."""
    most = choco(bg).max_nbytes()
    wrong = st.sampled_from([0, most + 1, len(payload) + 1, max(1, len(payload) - 1), 2**64 - 1])
    return st.one_of(st.just(len(payload)), st.just(len(payload)), wrong)


# Per spec (three nodes share the budget). Random bytes are not sent: they never get past
# the header checks, which the tests above fuzz already, to the compressed code.
COMPRESSED_FUZZ = settings(FUZZ, max_examples=30)


@COMPRESSED_FUZZ
@given(data=st.data())
def test_mutated_compressed_frames_change_nothing(compressed: BackgroundNode, data: st.DataObject) -> None:
    # From a stranger: a bit flip in a neighbour's count would be the out-of-step signal.
    frames = data.draw(mutated(compressed_frames(compressed, payload_of(compressed))))
    code = exchange_unchanged(compressed, frames)
    assert code != grpc.StatusCode.OK


@COMPRESSED_FUZZ
@given(data=st.data())
def test_mutated_compressed_payloads_are_refused_and_change_nothing(
    compressed: BackgroundNode, data: st.DataObject
) -> None:
    sender = data.draw(st.sampled_from(["fuzzer", *NEIGHBOURS]))
    payload = data.draw(mutated_payload(compressed))
    total = data.draw(total_bytes_of(compressed, payload))
    chunk = data.draw(st.sampled_from([1, 7, 16, 4096]))
    frames = compressed_frames(
        compressed, payload, chunk, sender=sender, pair_round=NEIGHBOURS.get(sender, 0), total_bytes=total
    )
    code = exchange_unchanged(compressed, frames)
    assert code != grpc.StatusCode.OK


@COMPRESSED_FUZZ
@given(data=st.data())
def test_wrong_but_valid_compressed_headers_change_nothing(
    compressed: BackgroundNode, data: st.DataObject
) -> None:
    # A stranger's count is wrong unless 0; a neighbour's is right only at its seeded count.
    # A neighbour's wrong count is the out-of-step signal (both sides forget the pair): that
    # path is tested in tests/node/test_compressed.py; here a wrong one comes only from strangers.
    payload = data.draw(st.one_of(st.just(payload_of(compressed)), mutated_payload(compressed)))
    sender, rounds = data.draw(
        st.one_of(
            st.tuples(st.sampled_from(["fuzzer", "n3", ""]), st.one_of(U64, st.sampled_from([0, 1, 3]))),
            st.sampled_from(sorted(NEIGHBOURS.items())),
        )
    )
    total = data.draw(total_bytes_of(compressed, payload))
    chunk_bytes = data.draw(st.sampled_from([0, 16, 4 << 20, (4 << 20) + 1]))
    codec = data.draw(st.sampled_from(["raw", "raw", "fp16"]))
    spec = compressed.node.party.pipeline.spec
    pipeline = data.draw(st.sampled_from([spec, spec, "", "choco[topk:0.5+int8;0.02]", spec + "+"]))
    frames = compressed_frames(
        compressed,
        payload,
        sender=sender,
        pair_round=rounds,
        total_bytes=total,
        chunk_bytes=chunk_bytes,
        codec=codec,
        pipeline=pipeline,
    )
    code = exchange_unchanged(compressed, frames)
    assert code != grpc.StatusCode.OK


def exchange_status(address: str, frames: Sequence[bytes]) -> tuple[grpc.StatusCode, str]:
    """One Exchange call of raw ``frames``: its status and message."""
    with grpc.insecure_channel(address) as ch:
        result = ch.stream_stream(GOSSIP + "Exchange")(iter(frames), timeout=DEADLINE)
        try:
            for _ in result:
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return result.code(), result.details() or ""


def test_a_valid_compressed_exchange_gets_as_far_as_the_commit(compressed: BackgroundNode) -> None:
    # The frames the fuzzing starts from are good up to the commit frame: so a refusal of
    # a mutated one came from the check of the field it changed.
    before = state(compressed), pairs(compressed)

    code, message = exchange_status(
        compressed.address, compressed_frames(compressed, payload_of(compressed), sender="n1", pair_round=3)
    )

    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "the caller closed without committing")
    check_compressed(compressed, grpc.StatusCode.OK, before)


def test_a_compressed_exchanges_two_headers_must_agree(compressed: BackgroundNode) -> None:
    # The first header announces no length (the caller computes its payload once accepted); the
    # second repeats it with the length (and a later step): anything else is refused.
    before = state(compressed), pairs(compressed)
    payload = payload_of(compressed)
    good = compressed_frames(compressed, payload, sender="n1", pair_round=3)
    one_header = compressed_frames(compressed, payload, asking=False, sender="n1", pair_round=3)
    second = {
        "another sender": dict(sender="n2", pair_round=5),
        "another count": dict(sender="n1", pair_round=4),
        "an outcome": dict(sender="n1", pair_round=3, outcome="accepted"),
        "another chunk size": dict(sender="n1", pair_round=3, chunk_bytes=32),
    }
    cases = {
        "a length in the first header": (one_header, "first header announces no length"),
        "no second header": ([good[0], *good[2:]], "expected a header frame"),
        **{
            name: (
                [good[0], compressed_frames(compressed, payload, asking=False, step=9, **f)[0], *good[2:]],
                "must repeat its first",
            )
            for name, f in second.items()
        },
    }
    for name, (frames, reason) in cases.items():
        code, message = exchange_status(compressed.address, frames)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in message, (name, message)

    check_compressed(compressed, grpc.StatusCode.OK, before)


def malformed(bg: BackgroundNode) -> dict[str, tuple[bytes, str]]:
    """Every refusal of :meth:`Compressor.decompress` a payload of the node's spec can meet, named:
    (payload, what the refusal says)."""
    comp = choco(bg).compressor
    n = numel(bg)
    k = comp.kept(n)
    good = payload_of(bg)
    values_at = len(good) - Compressor(coder=comp.coder).max_nbytes(k)
    values = good[values_at:]
    cases: dict[str, tuple[bytes, str]] = {
        "truncated": (good[:-1], "bytes of values where"),
        # A dense payload is as long as the spec allows: one byte more is refused from the header.
        "overlong": (good + b"\0", "bytes of values where" if comp.sparsifier else "this spec sends 1 to"),
        "nan scale": (good[:values_at] + struct.pack("<f", math.nan) + values[4:], "scale is negative"),
        "negative scale": (good[:values_at] + struct.pack("<f", -1.0) + values[4:], "scale is negative"),
        "infinite scale": (good[:values_at] + struct.pack("<f", math.inf) + values[4:], "scale is negative"),
    }
    if comp.coder in ("int8", "int4"):  # the largest scale times the largest code overflows
        big = good[:values_at] + struct.pack("<f", 3.4e38) + b"\x7f" * (len(values) - 4)
        cases["huge values"] = (big, "NaN or Inf")
    if comp.coder == "int8":
        cases["int8 -128"] = (good[:-1] + b"\x80", "-128 is never sent")
    if comp.sparsifier is not None:
        count = k.to_bytes(4, "little")
        ok_gaps = b"\x01" * k
        cases |= {
            "one index too few": ((k - 1).to_bytes(4, "little") + good[4:], "does not announce"),
            "one index too many": ((k + 1).to_bytes(4, "little") + good[4:], "does not announce"),
            "indices repeat": (count + b"\x01\x00" + b"\x01" * (k - 2) + values, "indices repeat"),
            "index out of range": (count + ok_gaps[:-1] + varint(n) + values, f"outside a vector of {n}"),
            "gap of six bytes": (count + varint(1, 6) + ok_gaps[1:] + values, "longer than 5 bytes"),
            "ends inside its indices": (count + b"\x81" * k, "ends inside its indices"),
        }
    return cases


def test_each_malformed_compressed_payload_is_refused_by_name_and_changes_nothing(
    compressed: BackgroundNode,
) -> None:
    before = state(compressed), pairs(compressed)

    for name, (payload, reason) in malformed(compressed).items():
        code, message = exchange_status(
            compressed.address, compressed_frames(compressed, payload, sender="n1", pair_round=3)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in message, (name, message)

    check_compressed(compressed, grpc.StatusCode.OK, before)


def test_a_neighbours_count_out_of_step_is_refused_and_only_that_pair_starts_over() -> None:
    with start_compressed("topk:0.01+int8", "fuzz-out-of-step") as bg:
        seed_pairs(bg, NEIGHBOURS)
        params, n2 = state(bg), pairs(bg)[1]

        code, message = exchange_status(
            bg.address, compressed_frames(bg, payload_of(bg), sender="n1", pair_round=2)
        )

        assert code == grpc.StatusCode.FAILED_PRECONDITION and "out of step" in message, message
        assert choco(bg).rounds("n1") == 0 and pairs(bg) == (n2,)
        assert state(bg) == params


def test_a_refused_exchange_leaves_no_pair() -> None:
    with start_compressed("topk:0.01+int8", "fuzz-no-pair") as bg:
        seed_pairs(bg, {f"n{i}": 2 for i in range(MAX_PAIRS)})
        before = state(bg), pairs(bg)
        keys = list(choco(bg)._pairs)

        code, _ = exchange_status(bg.address, compressed_frames(bg, payload_of(bg), sender="stranger"))

        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(choco(bg)._pairs) == keys  # not n0's pair dropped for the stranger's
        check_compressed(bg, code, before)


# --- 5. a compressing node's own exchange, answered badly ------------------------------------
# The node calls a peer that answers with a crafted reply (its count, payload length and
# payload fuzzed as above), then ends every call with an error, even after a commit frame:
# the node never gets its OK, so it may change nothing. And it may send the commit frame
# only for an answer that is well formed: its checks come before its commit.


class BadCallee:
    """A peer's Exchange on a real gRPC server (port 0) that answers with :attr:`reply`; it records
    each call's outcome: whether the caller committed."""

    def __init__(self) -> None:
        self.reply: list[bytes] = []
        self.whole = True  # the reply holds as many payload bytes as its header announced
        self.calls: list[bool] = []  # per call: the caller sent the commit frame
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(self.exchange)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("gossip.proto.Gossip", {"Exchange": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def exchange(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        reply, whole, committed = list(self.reply), self.whole, False
        try:
            next(requests, None)  # the caller's header
            yield from reply
            # A short answer ends here (the caller would wait for the rest until its deadline).
            for frame in requests if whole else ():  # its payload, then the commit frame if it commits
                if frame == wire.COMMIT_FRAME:
                    committed = True
                    break
        finally:
            self.calls.append(committed)
        context.abort(grpc.StatusCode.UNAVAILABLE, "gone before the OK")


@pytest.fixture(scope="module", params=SPECS[:2])
def calling(request: pytest.FixtureRequest) -> Iterator[tuple[BackgroundNode, BadCallee]]:
    bad = BadCallee()
    cfg = NodeConfig(
        node_id=f"fuzz-caller-{request.param}",
        # Picked again at once after each failed call.
        gossip=GossipConfig(compress=request.param, avoid_after_failure=0.001, busy_retries=1),
        # The bad peer answers no Sync or Probe: it must not turn suspect however long the
        # examples take, which only the heartbeat rule allows (swim suspects a failed probe).
        membership=MembershipConfig(
            interval=0.2, suspect_after=3600.0, dead_after=7200.0, member_protocol="heartbeat"
        ),
        # No snapshot from its steps: a publish into its own store would change its state.
        store=StoreConfig(publish_every=0),
        security=SecurityConfig(peer_call_rate=0.0),
    )
    try:
        with BackgroundNode(Wide(), cfg, seed=0) as node:
            assert node.node.members is not None
            bad_peer = MemberRecord("bad", bad.address, 1, 1, fingerprint=node.node.flat.fingerprint)
            node.node.members.table.merge([bad_peer])
            seed_pairs(node, NEIGHBOURS)
            yield node, bad
    finally:
        bad.server.stop(0)


def well_formed(bg: BackgroundNode, total: int, rounds: int, payload: bytes) -> bool:
    """Whether a reply of ``payload`` announced as ``total`` bytes at count ``rounds`` passes every
    check (the reference: :meth:`Compressor.decompress` itself)."""
    c = choco(bg)
    if rounds != 0 or total != len(payload) or not 0 < total <= c.max_nbytes():
        return False
    try:
        c.compressor.decompress(payload, numel(bg))
    except CompressError:
        return False
    return True


@COMPRESSED_FUZZ
@given(data=st.data())
def test_bad_answers_to_a_compressing_callers_exchange_change_nothing(
    calling: tuple[BackgroundNode, BadCallee], data: st.DataObject
) -> None:
    bg, bad = calling
    payload = data.draw(st.one_of(st.just(payload_of(bg, 1)), mutated_payload(bg)))
    total = data.draw(total_bytes_of(bg, payload))
    rounds = data.draw(st.sampled_from([0, 0, 1, 2**64 - 1]))
    bad.reply = compressed_frames(
        bg, payload, asking=False, sender="bad", pair_round=rounds, total_bytes=total
    )
    bad.reply[0] = header(
        bg.node.flat, **{**wire.header_from_frame(bad.reply[0]).__dict__, "outcome": "accepted"}
    )
    bad.whole = len(payload) == total
    before = state(bg), pairs(bg)
    calls = len(bad.calls)

    while bg.node.party.avoid.get("bad", 0.0) > time.monotonic():  # left out 1 ms after a failure
        time.sleep(0.001)
    bg.step()  # its own exchange: the bad peer is its only neighbour
    hang = time.monotonic() + 6 * DEADLINE  # the exchange's own deadline is 5 s
    while len(bad.calls) == calls or bg.node.slot.own_in_flight:
        assert time.monotonic() < hang, "the node's exchange did not end"
        time.sleep(0.002)

    assert (state(bg), pairs(bg)) == before
    assert bad.calls[calls:] == [well_formed(bg, total, rounds, payload)]
    still_serving(bg)


# --- the command line and config files ---------------------------------------------------------
# tests/test_cli.py covers bad flags, a missing config file, unknown keys and wrong
# types; these are the rest of the list.


def _gossip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gossip", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


CONFIG_CASES = {
    "config is a directory": ("cfg", "cannot read config file"),
    "config not toml": ("x = [\n", "is not valid TOML"),
    "config with a section": ("[node]\nlisten = '127.0.0.1:0'\n", "section [node] not supported"),
    "security knob of the wrong type": ("tls_cert = 5\n", "'tls_cert' must be str"),
    "token file of the wrong type": ("token_file = ['a']\n", "'token_file' must be str"),
    "negative call rate": ("peer_call_rate = -1.0\n", "peer_call_rate must be >= 0"),
    "unknown security key": ("tls_password = 'x'\n", "unknown key 'tls_password'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES.keys())
def test_bad_config_files_are_one_line_and_exit_code_2(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = CONFIG_CASES[case]
    path = tmp_path / "cfg"
    if case == "config is a directory":
        path.mkdir()
    else:
        path.write_text(text)

    code = cli_main(["node", "--config", str(path)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gossip node: error:") and expected in err, err


def test_a_port_in_use_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]

        done = _gossip("node", "--listen", f"127.0.0.1:{port}", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"gossip node: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_unreachable_seeds_are_one_line_and_exit_code_1(tmp_path: Path) -> None:
    done = _gossip("node", "--peers", "127.0.0.1:1", "--join-timeout", "2", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "gossip node: could not reach any seed within 2 s: 127.0.0.1:1 (UNAVAILABLE)"
    ]


# --- 7. the bulk port: the same frames over plain TCP ----------------------------------------

BULK_PATHS = [
    GOSSIP + "Exchange",
    GOSSIP + "Push",
    "/gossip.proto.Store/PutShard",
    "/gossip.proto.Store/GetShards",
]
BULK_FUZZ = settings(FUZZ, max_examples=100)


def bulk_call(bg: BackgroundNode, path: str, frames: Sequence[bytes], junk: bytes = b"") -> str:
    """One call on the node's bulk port (``junk``: raw bytes after the hello, instead of a
    call); the status it ended with, or CLOSED when the node closed the connection (bad wire)."""
    from gossip.transport import bulk

    assert bg.node._bulk is not None
    head = struct.Struct("<BI")
    with socket.create_connection(("127.0.0.1", bg.node._bulk.port), timeout=DEADLINE) as s:
        out = [bulk.hello("", "")]
        if junk:
            out.append(junk)
        else:
            call_body = struct.pack("<d", DEADLINE) + path.encode()
            out.append(head.pack(bulk.CALL, len(call_body)) + call_body)
            out += [head.pack(bulk.DATA, len(f)) + f for f in frames]
            out.append(head.pack(bulk.END, 0))
        try:
            s.sendall(b"".join(out))
            s.shutdown(socket.SHUT_WR)  # a frame the junk left unfinished ends here, not at a timeout
        except (BrokenPipeError, ConnectionResetError, OSError):
            return _closed()  # the node closed the connection while we were still sending
        got = b""
        while True:  # read frames up to the status
            while len(got) < head.size:
                more = _recv(s)
                if not more:
                    return _closed()
                got += more
            kind, n = head.unpack_from(got)
            while len(got) < head.size + n:
                more = _recv(s)
                if not more:
                    return _closed()
                got += more
            body, got = got[head.size : head.size + n], got[head.size + n :]
            if kind == bulk.STATUS:
                code = body.split(b"\n")[0].decode()
                sent["inputs"] += 1
                answers[f"bulk {code}"] = answers.get(f"bulk {code}", 0) + 1
                return code


def _closed() -> str:
    sent["inputs"] += 1
    answers["bulk connection closed"] = answers.get("bulk connection closed", 0) + 1
    return "CLOSED"


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except ConnectionResetError:
        return b""  # closed with our bytes unread: the same as closed


BULK_PROPER = {c.name for c in PROPER} | {"UNIMPLEMENTED"}


@BULK_FUZZ
@given(path=st.sampled_from(BULK_PATHS), frames=st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_to_every_bulk_method(pairwise: BackgroundNode, path: str, frames: list[bytes]) -> None:
    before = state(pairwise)

    code = bulk_call(pairwise, path, frames)

    assert code in BULK_PROPER, code
    assert state(pairwise) == before
    still_serving(pairwise)


@BULK_FUZZ
@given(data=st.data())
def test_mutated_exchange_frames_over_the_bulk_port_change_nothing(
    pairwise: BackgroundNode, data: st.DataObject
) -> None:
    frames = data.draw(mutated(valid_frames(pairwise)))
    before = state(pairwise)

    code = bulk_call(pairwise, GOSSIP + "Exchange", frames)

    assert code in BULK_PROPER, code
    assert state(pairwise) == before
    still_serving(pairwise)


@BULK_FUZZ
@given(junk=st.binary(min_size=1, max_size=400))
def test_random_bytes_on_a_bulk_connection_reach_no_method(pairwise: BackgroundNode, junk: bytes) -> None:
    before = state(pairwise)
    served = pairwise.node.stats.exchanges_served + pairwise.node.stats.exchanges_declined

    code = bulk_call(pairwise, "", [], junk=junk)

    assert code in BULK_PROPER | {"CLOSED"}, code
    assert state(pairwise) == before
    assert pairwise.node.stats.exchanges_served + pairwise.node.stats.exchanges_declined == served
    still_serving(pairwise)
