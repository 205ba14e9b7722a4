"""Compressed pairwise exchanges (--compress, gossip.core.choco) between real nodes over gRPC."""

from __future__ import annotations

import asyncio

import torch

from gossip.cli.output import status_text
from gossip.config import GossipConfig
from gossip.core.choco import Choco
from gossip.node.node import Node
from gossip.observe.status import fetch_status
from tests.node.test_node import CALL_TIMEOUT, cluster, config, drive, run
from tests.support.inproc import vec, vector, wait_until


def choco(node: Node) -> Choco:
    c = node.party.pipeline.choco
    assert c is not None
    return c


def in_step(a: Node, b: Node) -> bool:
    """Whether a's copies for b are b's copies for a, mirrored, bit for bit."""
    pa, pb = choco(a).pair(b.node_id), choco(b).pair(a.node_id)
    return pa.rounds == pb.rounds and torch.equal(pa.own, pb.peer) and torch.equal(pa.peer, pb.own)


def start(d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(d, generator=g) * 3 + 1, torch.randn(d, generator=g) * 3 - 1]


def test_two_nodes_with_topk_int8_converge_to_the_exact_mean_when_not_training() -> None:
    d = 1000
    x0 = start(d)
    mean = (x0[0] + x0[1]) / 2

    async def main() -> None:
        # The default step for topk:0.01 (0.02): about 570 exchanges to 1e-3 (a larger one diverges).
        # Steps without training: each waits for the exchange the step before started (max_lag 0).
        g = GossipConfig(compress="topk:0.01+int8", idle_pause=0.0, max_lag=0)
        async with cluster(x0, gossip=g) as (a, b):
            await drive([a], 800)
            await wait_until(lambda: a.slot.idle and b.slot.idle, CALL_TIMEOUT, "quiet nodes")
            assert float((vec(a) - mean).abs().max()) < 1e-3 and float((vec(b) - mean).abs().max()) < 1e-3
            total = vec(a).double() + vec(b).double()
            assert torch.allclose(total, (x0[0] + x0[1]).double(), atol=1e-4)
            assert a.stats.exchanges_ok == b.stats.exchanges_served == choco(a).rounds("n1") > 600
            assert in_step(a, b)
            # Each payload: 10 indices (varint gaps, 1-2 bytes each) and 10 int8 values with one scale.
            per_exchange = a.stats.bytes_out / a.stats.exchanges_ok
            assert per_exchange <= 4 + 2 * 10 + 4 + 10
            # Each side counts what it sent, the callee its answers too: what the other received.
            assert a.stats.bytes_out == b.stats.bytes_in and b.stats.bytes_out == a.stats.bytes_in
            assert per_exchange * 100 < 4 * d

    run(main(), timeout=120.0)


def test_both_sides_keep_bit_identical_copies_and_the_sum() -> None:
    d = 512
    x0 = start(d)

    async def main() -> None:
        g = GossipConfig(compress="randk:0.1+int4", idle_pause=0.0, max_lag=0)
        async with cluster(x0, gossip=g) as (a, b):
            for _ in range(6):
                await asyncio.to_thread(a.step)
                await asyncio.to_thread(b.step)
            a.finish_training()
            b.finish_training()
            await wait_until(lambda: a.slot.idle and b.slot.idle, CALL_TIMEOUT, "quiet nodes")
            assert in_step(a, b)
            assert choco(a).rounds("n1") == a.stats.exchanges_ok + a.stats.exchanges_served > 0
            reply = await fetch_status(a.address, CALL_TIMEOUT)  # gossip status shows the pipeline
            assert reply["pipeline"] == "choco[randk:0.1+int4;0.1]"
            assert "pipeline choco[randk:0.1+int4;0.1]" in status_text(reply)
            total = (vec(a) + vec(b)).double()
            assert torch.allclose(total, (x0[0] + x0[1]).double(), atol=1e-4)

    run(main())


def test_a_peer_with_another_spec_is_refused_and_nothing_changes() -> None:
    x0 = start(64)

    async def main() -> None:
        a = await Node.create(
            vector(x0[0]), config(0, None, GossipConfig(idle_pause=0.0, compress="int8")), seed=0
        )
        b = await Node.create(
            vector(x0[1]), config(1, a.address, GossipConfig(idle_pause=0.0, compress="sign")), seed=1
        )
        try:
            assert await a.wait_for_members(2, 30.0)
            await asyncio.to_thread(a.step)
            a.finish_training()
            await wait_until(lambda: a.stats.exchanges_failed >= 1, CALL_TIMEOUT, "the refusal")
            assert torch.equal(vec(a), x0[0]) and torch.equal(vec(b), x0[1])
            assert b.stats.exchanges_served == 0
            assert choco(a).rounds("n1") == choco(b).rounds("n0") == 0
        finally:
            await asyncio.gather(a.stop(leave=False), b.stop(leave=False))

    run(main())


def test_copies_out_of_step_are_refused_once_then_both_start_over() -> None:
    x0 = start(256)

    async def main() -> None:
        g = GossipConfig(compress="topk:0.1+int8", idle_pause=0.0, max_lag=0, avoid_after_failure=0.001)
        async with cluster(x0, gossip=g) as (a, b):
            for _ in range(3):
                await asyncio.to_thread(a.step)
            await wait_until(lambda: choco(b).rounds("n0") == 3, CALL_TIMEOUT, "three exchanges")
            await wait_until(lambda: not a.slot.own_in_flight, CALL_TIMEOUT, "the caller's end")
            assert in_step(a, b) and choco(a).rounds("n1") == 3
            # b took its half of an exchange that a did not (a lost status after the commit).
            pair = choco(b).pair("n0")
            pair.rounds += 1
            pair.own += 1.0
            a.slot.apply_pending()  # the third exchange's add (a trains: it waits for a step)
            before = vec(a).clone(), vec(b).clone()
            await asyncio.to_thread(a.step)
            await asyncio.sleep(0.05)  # past the 1 ms a failed peer is left out of the picks
            await asyncio.to_thread(a.step)
            a.finish_training()
            b.finish_training()
            await wait_until(lambda: a.slot.idle and b.slot.idle, CALL_TIMEOUT, "quiet nodes")
            assert a.stats.exchanges_failed == 1  # refused: out of step; both forgot the pair
            assert a.stats.exchanges_ok == 4  # ... and the next exchange started it over
            assert in_step(a, b) and choco(a).rounds("n1") == 1
            assert not torch.equal(vec(a), before[0])
            total = (vec(a) + vec(b)).double()
            assert torch.allclose(total, (before[0] + before[1]).double(), atol=1e-4)

    run(main())
