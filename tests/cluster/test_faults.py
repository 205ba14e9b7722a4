"""Faults of whole processes: a node paused with SIGSTOP past the failure timeout, then resumed,
and a peer that takes calls and never answers.

The paused node is a child process (so it can be stopped) running a node with
fast failure detection; the observers run in this process. The child is ended by
its PID in a ``finally``, also when an assertion fails. The peer that never
answers is a real gRPC server in this process whose handlers wait forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import torch

from gossip.config import NodeConfig
from gossip.core.membership import MemberRecord, MembershipConfig
from gossip.core.params import FlatParams, Layout
from gossip.node.members import MAX_SYNCS_IN_FLIGHT
from gossip.node.node import Node
from tests.support.inproc import wait_until

FAST = MembershipConfig(interval=0.1, suspect_after=0.6, dead_after=1.5, left_ttl=60.0)

CHILD = """
import asyncio, sys
import torch
from gossip.config import NodeConfig
from gossip.core.membership import MembershipConfig
from gossip.node.node import Node
from gossip.core.params import FlatParams, Layout

async def main() -> None:
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(4))]))
    membership = MembershipConfig(interval=0.1, suspect_after=0.6, dead_after=1.5, left_ttl=60.0)
    cfg = NodeConfig(node_id="paused", peers=tuple(sys.argv[1:]), membership=membership)
    node = await Node.create(flat, cfg)
    print(node.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def flat4() -> FlatParams:
    return FlatParams.zeros(Layout.from_named([("w", torch.empty(4))]))


def state_of(node: Node, node_id: str) -> str:
    assert node.members is not None
    m = node.members.table.members.get(node_id)
    return m.state if m is not None else "absent"


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP and SIGCONT")
def test_a_paused_node_is_declared_dead_then_rejoins_when_resumed() -> None:
    async def main() -> list[str]:
        flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(4))]))
        observer = await Node.create(flat, NodeConfig(node_id="observer", membership=FAST))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, observer.address], stdout=subprocess.PIPE, text=True
        )
        seen: list[str] = []
        try:
            assert observer.members is not None
            members = observer.members.table.members

            def state() -> str:
                m = members.get("paused")
                s = m.state if m is not None else "absent"
                if not seen or seen[-1] != s:
                    seen.append(s)
                return s

            await wait_until(lambda: state() == "alive", 60.0, "the child to join")
            os.kill(child.pid, signal.SIGSTOP)
            await wait_until(lambda: state() == "dead", 15.0, "the paused node to be declared dead")
            assert "paused" not in {m.node_id for m in observer.neighbours()}
            os.kill(child.pid, signal.SIGCONT)
            await wait_until(lambda: state() == "alive", 15.0, "the resumed node to rejoin")

            assert "paused" in {m.node_id for m in observer.neighbours()}
            assert observer.phase == "running"
            return seen
        finally:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
            await observer.stop(leave=False)

    seen = asyncio.run(asyncio.wait_for(main(), 90.0))
    # e.g. absent, alive, (suspect,) dead, alive
    assert "dead" in seen and "alive" in seen[: seen.index("dead")] and seen[-1] == "alive"


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP and SIGCONT")
def test_a_paused_seed_declares_no_one_dead_and_is_found_again(tmp_path: Path) -> None:
    # The child is the seed: it has no seeds of its own to fall back to, and its two
    # peers see each other alive, so they never fall back to it either.
    log_path = tmp_path / "child.log"

    async def main() -> None:
        with log_path.open("w") as log:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=log, text=True
            )
        nodes: list[Node] = []
        try:
            assert child.stdout is not None
            address = (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60.0)).strip()
            for name in ("a", "b"):
                cfg = NodeConfig(node_id=name, peers=(address,), membership=FAST)
                nodes.append(await Node.create(flat4(), cfg))
            a = nodes[0]
            await wait_until(
                lambda: all(state_of(n, "paused") == "alive" for n in nodes) and state_of(a, "b") == "alive",
                30.0,
                "everyone to know everyone",
            )

            os.kill(child.pid, signal.SIGSTOP)
            await wait_until(
                lambda: all(state_of(n, "paused") == "dead" for n in nodes),
                15.0,
                "the seed to be declared dead",
            )
            os.kill(child.pid, signal.SIGCONT)

            await wait_until(
                lambda: all(state_of(n, "paused") == "alive" for n in nodes),
                15.0,
                "the seed to be found again",
            )
            # Its answer to a probe can bring it back before its own loop ran once after
            # the pause (the heartbeat it last sent may be newer than the one the others
            # saw): wait for that loop to have looked at the clock.
            await wait_until(
                lambda: "that silence is not held against peers" in log_path.read_text(),
                15.0,
                "the resumed seed to notice its own pause",
            )
        finally:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
            await asyncio.gather(*(n.stop(leave=False) for n in nodes))

    asyncio.run(asyncio.wait_for(main(), 90.0))
    log = log_path.read_text()
    # Resumed, it heard no one for a while, but the silence was its own.
    assert "declared dead" not in log, log
    assert "late; that silence is not held against peers" in log, log


class HungPeer:
    """A real gRPC server that takes every Gossip call and never answers, like a stopped process."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts  # calls taken, open now and most open at once, shared by several peers
        self.server: grpc.aio.Server | None = None

    async def start(self) -> str:
        async def hang(_request: bytes, _context: Any) -> bytes:
            c = self.counts
            c["taken"] += 1
            c["open"] += 1
            c["most_open"] = max(c["most_open"], c["open"])
            try:
                await asyncio.Event().wait()
            finally:
                c["open"] -= 1
            raise AssertionError("unreachable")

        methods = {name: grpc.unary_unary_rpc_method_handler(hang) for name in ("Sync", "Join", "Status")}
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("gossip.proto.Gossip", methods),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"


@pytest.mark.parametrize("protocol", ["heartbeat", "swim"])
def test_peers_that_never_answer_stall_neither_the_heartbeat_nor_the_sweep(protocol: str) -> None:
    # Every sync (swim: probe) of the node goes to a peer that holds it until its 10 s
    # deadline. Inline, each would stop the membership loop for those 10 s. With swim
    # the node's own heartbeat does not move (it is its refutation counter), so the
    # loop's rounds are counted by the sweeps instead.
    rpc_timeout = 10.0
    membership = dataclasses.replace(FAST, member_protocol=protocol)

    async def main() -> tuple[float, float]:
        counts = {"taken": 0, "open": 0, "most_open": 0}
        peers = [HungPeer(counts), HungPeer(counts)]
        addresses = [await p.start() for p in peers]
        node = await Node.create(
            flat4(), NodeConfig(node_id="n", membership=membership, rpc_timeout=rpc_timeout)
        )
        try:
            assert node.members is not None
            ms = node.members.table
            assert ms is not None
            rounds = [0]
            sweep = ms.sweep

            def counted() -> list[str]:
                rounds[0] += 1
                return sweep()

            ms.sweep = counted  # type: ignore[method-assign]
            t0 = time.monotonic()
            ms.merge(
                [MemberRecord(f"hung{i}", a, incarnation=1, heartbeat=1) for i, a in enumerate(addresses)]
            )
            beats = [(t0, rounds[0])]

            def sample() -> bool:
                if rounds[0] != beats[-1][1]:
                    beats.append((time.monotonic(), rounds[0]))
                return all(state_of(node, f"hung{i}") == "dead" for i in range(len(peers)))

            await wait_until(sample, FAST.dead_after + 5.0, "the silent peers to be declared dead")
            died_after = time.monotonic() - t0
            beats.append((time.monotonic(), rounds[0]))
            longest_gap = max(t - s for (s, _), (t, _) in itertools.pairwise(beats))
            assert counts["taken"] >= 1, "the node never called the silent peers"
            assert counts["most_open"] <= MAX_SYNCS_IN_FLIGHT
            return died_after, longest_gap
        finally:
            await node.stop(leave=False)
            await asyncio.gather(*(p.server.stop(0) for p in peers if p.server is not None))

    died_after, longest_gap = asyncio.run(asyncio.wait_for(main(), 60.0))
    assert died_after < FAST.dead_after + 5.0 < rpc_timeout
    # Beats every interval (0.1 s); a loaded machine may delay one, never by a sync's deadline.
    assert longest_gap < 3.0 < rpc_timeout


@pytest.mark.parametrize("protocol", ["heartbeat", "swim"])
def test_two_members_that_declared_each_other_dead_find_each_other_again(protocol: str) -> None:
    # A partition that healed: each side heard nothing from the other for long past
    # dead_after (swim: suspected the other, which did not refute in time), and neither
    # has a seed to fall back to. Only probing the dead helps.
    membership = dataclasses.replace(FAST, member_protocol=protocol)

    async def main() -> None:
        a = await Node.create(flat4(), NodeConfig(node_id="a", membership=membership))
        b = await Node.create(flat4(), NodeConfig(node_id="b", peers=(a.address,), membership=membership))
        try:
            await wait_until(lambda: state_of(a, "b") == state_of(b, "a") == "alive", 15.0, "the join")
            assert b.members is not None
            b.members.config = dataclasses.replace(b.members.config, peers=())  # b forgets its seed
            for n, other in ((a, "b"), (b, "a")):
                assert n.members is not None
                if n.members.swim is not None:
                    n.members.swim.probe_failed(other)
                n.members.table.clock = lambda: time.monotonic() + 100.0  # as if cut off for 100 s
                n.members.table.sweep()  # at once for both, before any sync can come between
            assert state_of(a, "b") == state_of(b, "a") == "dead"

            await wait_until(lambda: state_of(a, "b") == state_of(b, "a") == "alive", 15.0, "a probe to heal")
        finally:
            await asyncio.gather(a.stop(leave=False), b.stop(leave=False))

    asyncio.run(asyncio.wait_for(main(), 60.0))
