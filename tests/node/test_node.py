"""Several nodes in one process over real gRPC on loopback (port 0).

Each test runs its own event loop (``asyncio.run``) and stops every node it
started in a ``finally``, also when an assertion fails. Exchanges are driven the
way a training loop drives them, ``Node.step()`` from worker threads, except for
the synchronous push-sum rounds, which launch them the way ``step()`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import torch

from gossip.cli.output import status_text
from gossip.config import GossipConfig, NodeConfig
from gossip.core.averaging import consensus_distance
from gossip.core.codecs import encode, payload_nbytes
from gossip.core.membership import MembershipConfig
from gossip.core.params import FlatParams
from gossip.node.node import Node
from gossip.observe.status import fetch_status
from gossip.proto import gossip_pb2 as pb
from gossip.transport import frames as wire
from gossip.transport import serde
from tests.support.inproc import vec, vector, wait_until

T = TypeVar("T")

SERVICE = "/gossip.proto.Gossip/"
# Fast failure detection for the membership tests; a long one where a test must
# not see a member go suspect while it runs (a loaded 2-core machine stalls).
FAST = MembershipConfig(interval=0.1, suspect_after=0.5, dead_after=2.0, left_ttl=60.0)
SLOW = MembershipConfig(interval=0.1, suspect_after=60.0, dead_after=120.0)
CALL_TIMEOUT = 10.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
    """Run a test coroutine on a fresh loop; a hang becomes a TimeoutError (and the finally blocks run)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config(
    i: int,
    seed_address: str | None,
    gossip: GossipConfig | None = None,
    membership: MembershipConfig = SLOW,
    **kw: Any,
) -> NodeConfig:
    return NodeConfig(
        node_id=f"n{i}",
        peers=(seed_address,) if seed_address else (),
        # No averaging after training unless a test asks: exact counts and values stay exact.
        gossip=gossip or GossipConfig(idle_pause=0.0),
        membership=membership,
        **kw,
    )


@contextlib.asynccontextmanager
async def cluster(
    values: Iterable[torch.Tensor | Sequence[float]],
    gossip: GossipConfig | None = None,
    membership: MembershipConfig = SLOW,
    ranked: bool = False,
) -> AsyncIterator[list[Node]]:
    """Start one node per vector, all joined through the first; stop them all on the way out."""
    vals = list(values)
    nodes: list[Node] = []
    try:
        for i, v in enumerate(vals):
            rank_kw = {"rank": i, "world_size": len(vals)} if ranked else {}
            cfg = config(i, nodes[0].address if nodes else None, gossip, membership, **rank_kw)
            nodes.append(await Node.create(vector(v), cfg, seed=i))
        for n in nodes:
            assert await n.wait_for_members(len(nodes), 30.0), f"{n.node_id} did not see everyone"
        yield nodes
    finally:
        await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)


async def drive(nodes: Sequence[Node], steps: int, compute: float = 0.0, barrier: bool = False) -> None:
    """Each node's 'training thread': ``steps`` calls of step(), ``compute`` seconds apart, then finish."""
    sync = threading.Barrier(len(nodes)) if barrier else None

    def train(node: Node) -> None:
        for _ in range(steps):
            if sync is not None:
                sync.wait(CALL_TIMEOUT)
            node.step()
            if compute:
                time.sleep(compute)
        node.finish_training()

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, train, n) for n in nodes))


async def settle(nodes: Sequence[Node]) -> None:
    """After the training threads ended: wait for the exchanges in flight, then stop every node.

    Stopping before all are quiet would let a late retry hit a server that is going
    away; stop() then applies whatever arrived.
    """
    await wait_until(lambda: not any(n.slot.own_in_flight or n.slot.busy for n in nodes), 30.0, "quiet nodes")
    await asyncio.gather(*(n.stop(leave=False) for n in nodes))


def crash(node: Node) -> Coroutine[Any, Any, None]:
    """Die without a word: no more heartbeats, the server gone, no leave notice."""
    return node.stop(leave=False)


# --- pairwise averaging ---------------------------------------------------------------


def test_two_nodes_meet_exactly_in_the_middle() -> None:
    async def main() -> None:
        async with cluster([[1.0] * 8, [3.0] * 8]) as (a, b):
            await asyncio.to_thread(a.step)
            a.finish_training()
            await wait_until(lambda: a.stats.exchanges_ok == 1, CALL_TIMEOUT, "the exchange")

            assert torch.equal(vec(a), torch.full((8,), 2.0))
            assert torch.equal(vec(b), torch.full((8,), 2.0))
            assert float((vec(a) + vec(b)).sum()) == 32.0
            assert b.stats.exchanges_served == 1
            assert a.stats.exchanges_failed == b.stats.exchanges_failed == 0

    run(main())


def test_six_nodes_reach_consensus_and_preserve_the_sum() -> None:
    n, d, rounds = 6, 64, 40
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 10

    async def main() -> list[Node]:
        async with cluster(start, GossipConfig(backoff=0.005, idle_pause=0.0)) as nodes:
            t0 = time.monotonic()
            await drive(nodes, rounds, compute=0.002)
            await settle(nodes)
            assert time.monotonic() - t0 < 60.0
            return nodes

    nodes = run(main())
    end = torch.stack([vec(node) for node in nodes])
    total = start.sum(dim=0).double()
    assert torch.allclose(end.sum(dim=0).double(), total, rtol=1e-6, atol=1e-6 * float(total.abs().max()))
    assert consensus_distance(end) < 1e-3 * consensus_distance(start)
    assert sum(node.stats.exchanges_declined for node in nodes) > 0
    assert sum(node.stats.exchanges_failed for node in nodes) == 0
    ok = sum(node.stats.exchanges_ok for node in nodes)
    assert ok == sum(node.stats.exchanges_served for node in nodes) > 0
    assert all(math.isfinite(x) for x in end.flatten().tolist())


def test_two_nodes_picking_each_other_at_once_do_not_deadlock() -> None:
    async def main() -> tuple[Node, Node]:
        async with cluster([[1.0] * 4, [3.0] * 4]) as (a, b):
            await drive([a, b], 30, barrier=True)
            await settle([a, b])
            return a, b

    a, b = run(main(), timeout=60.0)
    assert a.stats.exchanges_failed == b.stats.exchanges_failed == 0
    assert a.stats.exchanges_ok + b.stats.exchanges_ok > 0
    # Every successful exchange averages exactly; declined ones change nothing.
    assert torch.equal(vec(a), torch.full((4,), 2.0))
    assert torch.equal(vec(b), torch.full((4,), 2.0))


# --- push-sum -----------------------------------------------------------------------------


def test_push_sum_on_one_peer_exponential_converges_to_the_mean_and_keeps_the_mass() -> None:
    n, d = 4, 16
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 5 + 3
    g = GossipConfig(strategy="push-sum", topology="one-peer-exponential", idle_pause=0.0)

    async def main() -> list[Node]:
        async with cluster(start, g, ranked=True) as nodes:
            await drive(nodes, 30, compute=0.002)
            await settle(nodes)
            return nodes

    nodes = run(main())
    weights = torch.tensor([node.weight for node in nodes], dtype=torch.float64)
    z = torch.stack([vec(node) for node in nodes]).double()
    assert sum(node.stats.exchanges_ok for node in nodes) >= n * 10
    assert float(weights.sum()) == pytest.approx(n, rel=1e-12)
    mass = (z * weights[:, None]).sum(dim=0)
    torch.testing.assert_close(mass, start.double().sum(dim=0), rtol=1e-5, atol=1e-5)
    mean = start.double().mean(dim=0)
    torch.testing.assert_close(z, mean.expand(n, d), rtol=1e-3, atol=1e-3)


async def rounds(nodes: Sequence[Node], count: int) -> None:
    """Synchronous rounds without training: every node cuts its snapshot, then all exchange at once.

    This is what ``step()`` does minus the training thread, so results apply the
    moment they arrive, also while the node's own exchange is still in flight.
    """
    for _ in range(count):
        # No await between the launches: every snapshot is cut before any push goes out.
        assert all(node.gossip_now() for node in nodes)
        await wait_until(
            lambda: not any(n.slot.own_in_flight or n.slot.busy for n in nodes), CALL_TIMEOUT, "a round"
        )


def test_push_sum_rounds_on_one_peer_exponential_reach_the_exact_mean() -> None:
    n, d = 4, 16
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(2)) * 5 + 3
    g = GossipConfig(strategy="push-sum", topology="one-peer-exponential", idle_pause=0.0)

    async def main() -> tuple[torch.Tensor, torch.Tensor, list[Node]]:
        async with cluster(start, g, ranked=True) as nodes:
            await rounds(nodes, 2)  # log2(n) rounds of one-peer exponential: the exact average
            z = torch.stack([vec(node) for node in nodes]).double()
            w = torch.tensor([node.weight for node in nodes], dtype=torch.float64)
            return z, w, nodes

    z, w, nodes = run(main())
    assert [node.stats.exchanges_ok for node in nodes] == [2] * n
    assert w.tolist() == [1.0] * n
    torch.testing.assert_close((z * w[:, None]).sum(dim=0), start.double().sum(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, start.double().mean(dim=0).expand(n, d), rtol=1e-6, atol=1e-6)


# --- bad input at the server ---------------------------------------------------------------

D = 32  # elements of the receiver's vector in the bad-input tests


def good_header(flat: FlatParams, **overrides: Any) -> bytes:
    h = wire.Header(
        fingerprint=flat.fingerprint,
        sender="tester",
        step=1,
        codec="raw",
        total_bytes=payload_nbytes(flat.layout, "raw"),
        chunk_bytes=4096,
    )
    return wire.header_to_frame(dataclasses.replace(h, **overrides))


def payload_frames(values: torch.Tensor, chunk: int = 48) -> list[bytes]:
    flat = vector(values)
    return [wire.chunk_frame(c) for c in wire.iter_chunks(encode(flat, "raw"), chunk)]


def raw_header(**fields: Any) -> bytes:
    """A header frame straight from protobuf, for values the wire helpers refuse to write."""
    return pb.Frame(header=pb.Header(**fields)).SerializeToString()


# The bad messages go out through the synchronous client in a worker thread: when a
# server ends a stream while the client still writes, grpc.aio's client replaces the
# server's status by INTERNAL "Internal error from Core" about a third of the time
# (grpc/grpc#36066), which would hide the code under test. The sync client reports it.


def _send_exchange_sync(address: str, frames: Sequence[bytes]) -> tuple[grpc.StatusCode, list[bytes]]:
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(SERVICE + "Exchange", None, None)(iter(frames), timeout=CALL_TIMEOUT)
        replies: list[bytes] = []
        try:
            replies.extend(call)
        except grpc.RpcError as exc:
            return exc.code(), replies
        return call.code(), replies


async def send_exchange(address: str, frames: Sequence[bytes]) -> tuple[grpc.StatusCode, list[bytes]]:
    """Write ``frames``, close, read whatever comes back; returns the final status and the replies."""
    return await asyncio.to_thread(_send_exchange_sync, address, frames)


def _send_push_sync(address: str, frames: Sequence[bytes]) -> tuple[grpc.StatusCode, bytes | None]:
    with grpc.insecure_channel(address) as ch:
        try:
            ack = ch.stream_unary(SERVICE + "Push", None, None)(iter(frames), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code(), None
        return grpc.StatusCode.OK, ack


async def send_push(address: str, frames: Sequence[bytes]) -> tuple[grpc.StatusCode, bytes | None]:
    return await asyncio.to_thread(_send_push_sync, address, frames)


async def proper_exchange(node: Node, values: torch.Tensor) -> torch.Tensor:
    """A well-behaved caller: send ``values``, read the whole answer, commit, close."""
    async with grpc.aio.insecure_channel(node.address) as ch:
        call = ch.stream_stream(SERVICE + "Exchange")(timeout=CALL_TIMEOUT)
        for f in [good_header(node.flat), *payload_frames(values)]:
            await call.write(f)
        reply = wire.header_from_frame(await call.read())
        assert reply.outcome == "accepted", reply
        answer = bytearray()
        while len(answer) < reply.total_bytes:
            answer += wire.chunk_from_frame(await call.read())
        await call.write(wire.COMMIT_FRAME)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        return torch.frombuffer(answer, dtype=torch.float32).clone()


def receiver_values() -> torch.Tensor:
    # Small integers: every average below is exact in float32.
    return torch.arange(D, dtype=torch.float32)


def nan_payload() -> torch.Tensor:
    v = receiver_values()
    v[5] = float("nan")
    return v


# (frames builder taking the receiver's flat, expected code)
EXCHANGE_CASES: dict[str, tuple[Callable[[FlatParams], list[bytes]], grpc.StatusCode]] = {
    "wrong-fingerprint": (
        lambda f: [good_header(f, fingerprint=b"\x01" * 16), *payload_frames(receiver_values())],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "wrong-total-bytes": (
        lambda f: [good_header(f, total_bytes=D * 4 + 4), *payload_frames(torch.zeros(D + 1))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown-codec": (
        lambda f: [raw_header(fingerprint=f.fingerprint, codec=42, total_bytes=D * 4)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unspecified-codec": (
        lambda f: [raw_header(fingerprint=f.fingerprint, codec=0, total_bytes=D * 4)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "garbage-first-frame": (lambda f: [b"\xff\xfe\xfd garbage"], grpc.StatusCode.INVALID_ARGUMENT),
    "empty-stream": (lambda f: [], grpc.StatusCode.INVALID_ARGUMENT),
    "request-with-outcome": (
        lambda f: [good_header(f, outcome="accepted"), *payload_frames(receiver_values())],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "nan-payload": (
        lambda f: [good_header(f), *payload_frames(nan_payload())],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "extra-chunk-after-payload": (
        lambda f: [good_header(f), *payload_frames(receiver_values()), wire.chunk_frame(memoryview(b"1234"))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "chunk-longer-than-payload": (
        lambda f: [good_header(f), *payload_frames(torch.zeros(D + 1), chunk=4 * (D + 1))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "truncated-payload": (
        lambda f: [good_header(f), *payload_frames(receiver_values())[:-1]],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "chunk-instead-of-header": (
        lambda f: payload_frames(receiver_values()),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "header-instead-of-chunk": (
        lambda f: [good_header(f), good_header(f)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "malformed-chunk-frame": (
        lambda f: [good_header(f), b"\x12\x80"],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


async def assert_untouched_and_serving(node: Node, before: torch.Tensor, weight: float = 1.0) -> None:
    assert torch.equal(vec(node), before), "a rejected message changed the receiver's parameters"
    assert node.weight == weight
    reply = await fetch_status(node.address, CALL_TIMEOUT)
    assert reply["node_id"] == node.node_id
    assert reply["phase"] == "running"


@pytest.mark.parametrize("case", list(EXCHANGE_CASES))
def test_exchange_rejects_bad_input_and_changes_nothing(case: str) -> None:
    build, code = EXCHANGE_CASES[case]

    async def main() -> None:
        async with cluster([receiver_values()]) as (node,):
            before = vec(node).clone()

            got, _ = await send_exchange(node.address, build(node.flat))

            assert got == code, f"{case}: {got}"
            await assert_untouched_and_serving(node, before)
            # Not left busy: a proper exchange afterwards is accepted and averages exactly.
            answer = await proper_exchange(node, before + 2)
            assert torch.equal(answer, before)
            assert torch.equal(vec(node), before + 1)
            assert node.stats.exchanges_served == 1

    run(main())


def push_header(flat: FlatParams, weight: float = 0.5, **overrides: Any) -> bytes:
    return good_header(flat, weight=weight, **overrides)


PUSH_CASES: dict[str, tuple[Callable[[FlatParams], list[bytes]], grpc.StatusCode]] = {
    "negative-weight": (
        lambda f: [raw_header(fingerprint=f.fingerprint, codec=1, total_bytes=D * 4, weight=-0.5)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "zero-weight": (
        lambda f: [push_header(f, weight=0.0), *payload_frames(receiver_values())],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "nan-weight": (
        lambda f: [raw_header(fingerprint=f.fingerprint, codec=1, total_bytes=D * 4, weight=math.nan)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "wrong-fingerprint": (
        lambda f: [push_header(f, fingerprint=b"\x02" * 16), *payload_frames(receiver_values())],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "nan-payload": (
        lambda f: [push_header(f), *payload_frames(nan_payload())],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "truncated-payload": (
        lambda f: [push_header(f), *payload_frames(receiver_values())[:-1]],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "payload-longer-than-announced": (
        lambda f: [push_header(f), *payload_frames(receiver_values()), wire.chunk_frame(memoryview(b"1234"))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "chunk-instead-of-header": (
        lambda f: payload_frames(receiver_values()),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "garbage-first-frame": (lambda f: [b"\x0a\xff\xff\xff"], grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(PUSH_CASES))
def test_push_rejects_bad_input_and_changes_nothing(case: str) -> None:
    build, code = PUSH_CASES[case]
    g = GossipConfig(strategy="push-sum", idle_pause=0.0)

    async def main() -> None:
        async with cluster([receiver_values()], g) as (node,):
            before = vec(node).clone()

            got, _ = await send_push(node.address, build(node.flat))

            assert got == code, f"{case}: {got}"
            await assert_untouched_and_serving(node, before)
            # A proper push afterwards lands: weights 1 and 1 average the values exactly.
            got, ack = await send_push(
                node.address, [push_header(node.flat, 1.0), *payload_frames(before + 2)]
            )
            assert got == grpc.StatusCode.OK and ack is not None and serde.push_ack_from_bytes(ack)
            assert torch.equal(vec(node), before + 1)
            assert node.weight == 2.0

    run(main())


def test_push_to_a_pairwise_node_is_refused() -> None:
    async def main() -> None:
        async with cluster([receiver_values()]) as (node,):
            before = vec(node).clone()
            got, _ = await send_push(node.address, [push_header(node.flat), *payload_frames(before + 2)])
            assert got == grpc.StatusCode.FAILED_PRECONDITION
            await assert_untouched_and_serving(node, before)

    run(main())


def _member(**overrides: Any) -> pb.Member:
    fields: dict[str, Any] = {
        "node_id": "intruder",
        "address": "127.0.0.1:1",
        "incarnation": 1,
        "heartbeat": 1,
        "state": pb.STATE_ALIVE,
        "rank": -1,
    }
    fields.update(overrides)
    return pb.Member(**fields)


def table_case(case: str, protocol: str) -> pb.MemberTable:
    """A bad member table in the words of a node that runs ``protocol`` (refused for what it
    holds, not for its protocol: tests/node/test_swim_nodes.py has that)."""
    msg = pb.MemberTable()
    msg.CopyFrom(TABLE_CASES[case])
    msg.protocol = protocol
    return msg


TABLE_CASES: dict[str, pb.MemberTable] = {
    "no-sender": pb.MemberTable(members=[_member()]),
    "empty-node-id": pb.MemberTable(sender=_member(node_id="")),
    "address-without-port": pb.MemberTable(
        sender=_member(), members=[_member(node_id="x", address="nohost")]
    ),
    "dead-state-on-the-wire": pb.MemberTable(
        sender=_member(), members=[_member(node_id="x", state=pb.STATE_DEAD)]
    ),
    "rank-below-minus-one": pb.MemberTable(sender=_member(rank=-5)),
    "over-long-node-id": pb.MemberTable(sender=_member(node_id="x" * 1000)),
    "oversized-fingerprint": pb.MemberTable(
        sender=_member(), members=[_member(node_id="x", fingerprint=b"f" * 4096)]
    ),
}


@pytest.mark.parametrize("method", ["Join", "Sync"])
def test_with_swim_a_dead_claim_that_replaces_its_sender_is_taken_as_news(method: str) -> None:
    """A stranger, then a dead claim about another id at the stranger's address: the claim
    replaces the stranger in the same message, which is answered, not a server error."""

    async def main() -> None:
        async with cluster([receiver_values(), receiver_values()]) as (node, other):
            assert node.members is not None and node.members.swim is not None
            before = vec(node).clone()
            async with grpc.aio.insecure_channel(node.address) as ch:
                call = ch.unary_unary(
                    SERVICE + method,
                    request_serializer=pb.MemberTable.SerializeToString,
                    response_deserializer=pb.MemberTable.FromString,
                )
                await call(table_case("dead-state-on-the-wire", "swim"), timeout=CALL_TIMEOUT)
            table = node.members.table.members
            assert "intruder" not in table and table["x"].state == "dead"
            assert table[other.node_id].state == "alive"
            await assert_untouched_and_serving(node, before)

    run(main())


@pytest.mark.parametrize("method", ["Join", "Sync"])
@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_invalid_member_table_is_rejected(method: str, case: str) -> None:
    # A dead state is a claim swim spreads as news (the next test); the heartbeat rule refuses it.
    membership = dataclasses.replace(SLOW, member_protocol="heartbeat") if case.startswith("dead") else SLOW

    async def main() -> None:
        async with cluster([receiver_values(), receiver_values()], membership=membership) as (node, _):
            assert node.members is not None
            before = vec(node).clone()
            members_before = {k: (m.state, m.address) for k, m in node.members.table.members.items()}
            async with grpc.aio.insecure_channel(node.address) as ch:
                call = ch.unary_unary(
                    SERVICE + method,
                    request_serializer=pb.MemberTable.SerializeToString,
                    response_deserializer=pb.MemberTable.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(table_case(case, membership.member_protocol), timeout=CALL_TIMEOUT)

            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert {k: (m.state, m.address) for k, m in node.members.table.members.items()} == members_before
            await assert_untouched_and_serving(node, before)

    run(main())


# --- status ----------------------------------------------------------------------------------


def test_status_lists_members_with_states_and_counters() -> None:
    async def main() -> None:
        async with cluster([[1.0] * 4, [3.0] * 4, [5.0] * 4]) as (a, b, c):
            await drive([a], 3)
            await wait_until(lambda: a.stats.exchanges_ok == 3, CALL_TIMEOUT, "three exchanges")
            await c.stop()

            reply = await fetch_status(a.address, CALL_TIMEOUT)

            assert reply["node_id"] == "n0" and reply["address"] == a.address
            states = {m["node_id"]: (m["address"], m["state"]) for m in reply["members"]}
            assert states == {"n1": (b.address, "alive"), "n2": (c.address, "left")}
            assert reply["exchanges_ok"] == 3 and reply["exchanges_failed"] == 0
            assert reply["exchanges_served"] == a.stats.exchanges_served
            assert reply["bytes_out"] == a.stats.bytes_out > 0
            assert reply["step"] == 3 and reply["phase"] == "running"
            assert reply["neighbours"] == ["n1"]
            assert reply["training"] is False and reply["resting"] is False
            assert reply["store"]["replication"] == 3
            # Who it exchanged with, and how long its own exchanges took.
            assert sum(reply["exchanged_with"].values()) == 3 + reply["exchanges_served"]
            assert set(reply["exchanged_with"]) <= {"n1", "n2"}
            assert sum(reply["exchange_seconds_buckets"]) == 3 > 0 < reply["exchange_seconds_sum"]
            assert len(reply["exchange_seconds_buckets"]) == len(reply["exchange_seconds_bounds"]) + 1
            assert reply["last_delta_norm"] == a.stats.last_delta_norm is not None
            assert reply["calls_refused"] == reply["calls_delayed"] == 0
            # Control calls received, by method: the others joining and syncing, this call;
            # exchanges are the data plane, not counted; an unknown method counts as one name.
            calls = reply["control_calls"]
            assert calls["Gossip/Status"] >= 1 and calls["Gossip/Join"] >= 2 and calls["Gossip/Sync"] >= 1
            assert set(calls) <= {
                "Gossip/Status",
                "Gossip/Join",
                "Gossip/Sync",
                "Gossip/Leave",
                "Store/Holdings",
            }
            async with grpc.aio.insecure_channel(a.address) as ch:
                for name in ("/gossip.proto.Gossip/Nope", "/x.Y/Z"):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await ch.unary_unary(name)(b"", timeout=CALL_TIMEOUT)
            again = (await fetch_status(a.address, CALL_TIMEOUT))["control_calls"]
            assert again["unknown"] == 2 and again["Gossip/Status"] == calls["Gossip/Status"] + 1
            busiest = min(calls.items(), key=lambda kv: (-kv[1], kv[0]))
            assert f"calls received: {busiest[0]} {busiest[1]:,}" in status_text(reply)
            # A four-element model is sampled whole, for the spread estimate.
            assert reply["sample"] == torch.cat(list(a.flat)).tolist()
            # Nothing trains here: no figures until someone reports them, then those.
            assert reply["train_loss"] is reply["eval_accuracy"] is None and reply["evals"] == 0
            a.report(epoch=1.5, train_loss=0.25)
            a.report(eval_loss=0.5, eval_accuracy=0.75)
            a.report(train_loss=float("nan"))
            reply = await fetch_status(a.address, CALL_TIMEOUT)
            assert (reply["epoch"], reply["eval_loss"], reply["eval_accuracy"], reply["evals"]) == (
                1.5,
                0.5,
                0.75,
                1,
            )
            assert reply["train_loss"] is None  # NaN has no JSON form
            assert a.status().train_loss != a.status().train_loss  # but the status keeps it

    run(main())


def test_status_reports_the_change_one_exchange_applied_on_both_sides() -> None:
    async def main() -> None:
        async with cluster([[1.0] * 4, [3.0] * 4]) as (a, b):
            await drive([a], 1)  # one exchange (and no averaging after training here)
            await wait_until(
                lambda: None not in (a.stats.last_delta_norm, b.stats.last_delta_norm),
                CALL_TIMEOUT,
                "both adds",
            )
            # Each moves by (3 - 1) / 2 in four entries: ||(1, 1, 1, 1)|| = 2.
            assert a.stats.last_delta_norm == b.stats.last_delta_norm == 2.0
            assert (a.stats.exchanged_with, b.stats.exchanged_with) == ({"n1": 1}, {"n0": 1})

    run(main())


# --- the outer optimizer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "expected"),
    [("nesterov:0.7:0.9", 1 + 0.7 * 1.9), ("nesterov:1:0", 2.0), ("none", 2.0)],
)
def test_an_own_exchange_takes_the_outer_step_on_the_averaged_pseudo_gradient(
    outer: str, expected: float
) -> None:
    """Anchor 1, averaged with 3: g = 1 - 2 = -1, m = -1, anchor <- 1 - 0.7 * (g + 0.9 m) = 2.33."""

    async def main() -> None:
        g = GossipConfig(idle_pause=0.0, max_lag=0, outer=outer)
        async with cluster([[1.0] * 4, [3.0] * 4], gossip=g) as (a, b):
            await asyncio.to_thread(a.step)  # the first anchor (1), and an exchange with b
            await asyncio.to_thread(a.step)  # waits for it (max_lag 0) and applies it, outer step included
            assert torch.allclose(vec(a), torch.full((4,), expected))
            if outer != "none":
                assert a.party.anchor is not None and torch.allclose(
                    vec(a), a.party.anchor.segments["float32"]
                )
            # The callee averages plainly (2 after the first exchange, then halfway to a's 2.33).
            b_after = torch.full((4,), (2.0 + expected) / 2)
            await wait_until(lambda: torch.allclose(vec(b), b_after), CALL_TIMEOUT, "the second exchange")
            assert b.party.anchor is None  # it never trained
            a.finish_training()

    run(main())


# --- membership ------------------------------------------------------------------------------


def state_of(node: Node, node_id: str) -> str | None:
    assert node.members is not None
    m = node.members.table.members.get(node_id)
    return m.state if m is not None else None


def test_crashed_node_becomes_suspect_then_dead_and_is_not_picked() -> None:
    async def main() -> None:
        async with cluster([[1.0], [2.0], [3.0]], membership=FAST) as (a, b, c):
            seen: dict[str, list[str]] = {"n0": [], "n1": []}

            await crash(c)

            async def watch(node: Node) -> None:
                while (s := state_of(node, "n2")) != "dead":
                    if not seen[node.node_id] or seen[node.node_id][-1] != s:
                        seen[node.node_id].append(str(s))
                    await asyncio.sleep(0.01)
                seen[node.node_id].append("dead")

            await asyncio.wait_for(asyncio.gather(watch(a), watch(b)), 30.0)
            for node in (a, b):
                assert "suspect" in seen[node.node_id], seen
                assert seen[node.node_id][-1] == "dead"
                assert "n2" not in [m.node_id for m in node.neighbours()]
            reply = await fetch_status(a.address, CALL_TIMEOUT)
            assert {m["node_id"]: m["state"] for m in reply["members"]}["n2"] == "dead"

    run(main())


def test_leaving_node_shows_as_left_at_once() -> None:
    async def main() -> None:
        async with cluster([[1.0], [2.0], [3.0]], membership=FAST) as (a, b, c):
            await c.stop()

            for node in (a, b):
                assert state_of(node, "n2") == "left"
                assert "n2" not in [m.node_id for m in node.neighbours()]
            # And it stays left: stale gossip about it does not bring it back.
            await asyncio.sleep(0.5)
            assert state_of(a, "n2") == state_of(b, "n2") == "left"

    run(main())


@pytest.mark.parametrize("same_id", [True, False], ids=["same-id", "new-id"])
def test_restarted_node_at_the_same_address_is_alive_again(same_id: bool) -> None:
    async def main() -> None:
        async with cluster([[1.0], [2.0], [3.0]], membership=FAST) as (a, b, c):
            address = c.address
            await crash(c)
            await wait_until(lambda: state_of(a, "n2") == state_of(b, "n2") == "dead", 30.0, "n2 dead")

            new_id = "n2" if same_id else "n2-reborn"
            cfg = NodeConfig(listen=address, peers=(a.address,), node_id=new_id, membership=FAST)
            c2 = await Node.create(vector([3.0]), cfg)
            try:
                assert c2.address == address

                def back(node: Node) -> bool:
                    return new_id in [m.node_id for m in node.neighbours()]

                await wait_until(lambda: back(a) and back(b), 30.0, "the restarted node to be alive")
                for node in (a, b):
                    assert node.members is not None
                    at_address = [m for m in node.members.table.members.values() if m.address == address]
                    assert [(m.node_id, m.state) for m in at_address] == [(new_id, "alive")]
            finally:
                await c2.stop(leave=False)

    run(main())


# --- failures cost one timeout ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def black_hole(address: str) -> AsyncIterator[None]:
    """A listener that accepts connections and never says a word (a frozen process)."""
    host, _, port = address.rpartition(":")
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(hold, host, int(port))
    try:
        yield
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@pytest.mark.parametrize("how", ["refused", "black-hole"])
def test_dead_peer_costs_one_timeout_and_is_avoided(how: str) -> None:
    timeout = 1.0
    g = GossipConfig(exchange_timeout=timeout, avoid_after_failure=60.0, idle_pause=0.0)

    async def main() -> None:
        async with cluster([[1.0] * 4, [3.0] * 4], g) as (a, ghost):
            await crash(ghost)
            async with black_hole(ghost.address) if how == "black-hole" else contextlib.nullcontext():
                t0 = time.monotonic()
                await asyncio.to_thread(a.step)
                a.finish_training()
                await wait_until(lambda: a.stats.exchanges_failed == 1, timeout + 10.0, "the failure")
                elapsed = time.monotonic() - t0

                assert elapsed < timeout + 2.0, f"a dead peer cost {elapsed:.2f} s"
                assert a.stats.exchanges_ok == 0
                assert torch.equal(vec(a), torch.ones(4))
                assert "n1" not in [m.node_id for m in a.neighbours()]

                # The next pick goes to a live node, not to the dead one.
                c = await Node.create(vector([5.0] * 4), config(2, a.address, g, SLOW))
                try:
                    await wait_until(lambda: "n2" in [m.node_id for m in a.neighbours()], 30.0, "n2")
                    await drive([a], 1)
                    await wait_until(lambda: a.stats.exchanges_ok == 1, CALL_TIMEOUT, "the exchange")
                    assert a.stats.exchanges_failed == 1
                    assert c.stats.exchanges_served == 1
                    assert torch.equal(vec(a), torch.full((4,), 3.0))
                finally:
                    await c.stop(leave=False)

    run(main())


def test_a_node_answering_a_slow_exchange_waits_for_it_after_max_lag_steps() -> None:
    """max_lag bounds the steps run ahead of an incoming exchange too, not only of its own."""

    async def go() -> None:
        g = GossipConfig(exchange_timeout=1.0, max_lag=2, idle_pause=0.0)
        async with cluster([[1.0] * D], gossip=g) as (node,), grpc.aio.insecure_channel(node.address) as ch:
            # A caller that sends its header, is accepted, then sends nothing more.
            call = ch.stream_stream(SERVICE + "Exchange")(timeout=CALL_TIMEOUT)
            await call.write(good_header(node.flat))
            assert wire.header_from_frame(await call.read()).outcome == "accepted"
            await asyncio.to_thread(node.step)  # one step ahead: runs on
            assert node.slot.incoming_in_flight, "the first step should not wait"
            await asyncio.to_thread(node.step)  # two steps ahead: waits for the exchange to end
            assert not node.slot.incoming_in_flight
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.to_thread(node.step)  # nothing in flight: no wait, and no harm done
            assert torch.equal(vec(node), torch.ones(D))

    run(go())
