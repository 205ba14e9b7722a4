"""Idle nodes rest: after training they average until settled, then back off; they wake when needed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from gossip.config import GossipConfig, NodeConfig
from gossip.core.membership import MembershipConfig
from gossip.node.node import Node
from tests.support.inproc import vec, vector, wait_until

T = TypeVar("T")
SLOW = MembershipConfig(interval=0.1, suspect_after=60.0, dead_after=120.0)
REST = GossipConfig(idle_pause=0.01, rest_pause=0.4, rest_tolerance=1e-6)


def run(coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def start(i: int, values: list[float], seed: str | None = None) -> Node:
    cfg = NodeConfig(node_id=f"n{i}", peers=(seed,) if seed else (), membership=SLOW, gossip=REST)
    return await Node.create(vector(values), cfg, seed=i)


def took_part(node: Node) -> int:
    return node.stats.exchanges_ok + node.stats.exchanges_served


async def train(node: Node, steps: int, pause: float = 0.0) -> None:
    def loop() -> None:
        for _ in range(steps):
            node.step()
            time.sleep(pause)
        node.finish_training()

    await asyncio.to_thread(loop)


def test_two_idle_nodes_settle_then_exchange_rarely_and_wake_for_a_newcomer() -> None:
    async def main() -> None:
        a = await start(0, [1.0] * 8)
        b = await start(1, [3.0] * 8, a.address)
        c: Node | None = None
        try:
            assert await a.wait_for_members(2, 20.0) and await b.wait_for_members(2, 20.0)
            await asyncio.gather(train(a, 3), train(b, 3))

            await wait_until(lambda: a.status().resting and b.status().resting, 20.0, "both to rest")
            assert torch.allclose(vec(a), torch.full((8,), 2.0)) and torch.allclose(
                vec(b), torch.full((8,), 2.0)
            )
            before, t0 = took_part(a), time.monotonic()
            await asyncio.sleep(2.0)
            seen = took_part(a) - before
            # Each side starts one exchange per rest pause (0.4 s, jittered by 20 %) at most.
            assert seen <= 2 * (time.monotonic() - t0) / (0.8 * REST.rest_pause) + 2, seen

            c = await start(2, [5.0] * 8, a.address)
            await wait_until(lambda: not a.status().resting, 10.0, "a newcomer to wake a")
            # They average with the newcomer (which never trained) until all hold the mean, 3.
            await wait_until(
                lambda: all(torch.allclose(vec(n), torch.full((8,), 3.0), atol=1e-4) for n in (a, b, c)),
                30.0,
                "the three to agree",
            )
            # The sum is kept: between exchanges, that is (the three keep averaging, and in the
            # moment between the callee's add and the caller's one an exchange's half is counted
            # once; over the bulk port that moment was long enough to be read once in CI).
            await wait_until(
                lambda: torch.allclose(vec(a) + vec(b) + vec(c), torch.full((8,), 9.0), atol=1e-5),
                10.0,
                "the sum of the three, between exchanges, to be 9",
            )
        finally:
            await asyncio.gather(*(n.stop(leave=False) for n in (a, b, c) if n is not None))

    run(main())


def test_a_resting_node_wakes_when_a_neighbour_still_trains() -> None:
    async def main() -> None:
        a = await start(0, [1.0] * 8)
        b = await start(1, [1.0] * 8, a.address)
        try:
            assert await a.wait_for_members(2, 20.0) and await b.wait_for_members(2, 20.0)
            await train(a, 1)
            await wait_until(lambda: a.status().resting, 20.0, "a to rest (nothing to average)")
            stop = threading.Event()

            def b_trains() -> None:  # b's steps advance; each of its exchanges tells a its step
                while not stop.is_set():
                    b.step()
                    time.sleep(0.02)

            worker = asyncio.ensure_future(asyncio.to_thread(b_trains))
            try:
                await wait_until(lambda: not a.status().resting, 10.0, "a to wake")
            finally:
                stop.set()
                await worker
        finally:
            await asyncio.gather(a.stop(leave=False), b.stop(leave=False))

    run(main())


def test_stop_ends_promptly_while_nodes_average_after_training() -> None:
    # Regression: the averaging loop waited with asyncio.wait_for, which on Python 3.11
    # can turn a cancel that meets its 20 ms timeout into a TimeoutError; the loop then
    # swallowed it and stop() waited for the cancelled loop forever.
    async def main() -> list[float]:
        took = []
        for _ in range(10):
            a = await start(0, [1.0] * 8)
            b = await start(1, [3.0] * 8, a.address)
            assert await a.wait_for_members(2, 20.0)
            await asyncio.gather(train(a, 1), train(b, 1))
            await asyncio.sleep(0.05)  # both averaging every 10 ms
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(a.stop(), b.stop()), 20.0)
            took.append(time.monotonic() - t0)
        return took

    took = run(main(), timeout=120.0)
    assert max(took) < 10.0, took
