"""``--member-protocol swim`` between real nodes over gRPC on loopback (one process, port 0).

The rules are unit-tested on a fake clock (tests/unit/test_swim.py); here the node
layer runs them: probes are Sync calls, their answers signs of life, news rides on
both, and a node that stops answering is suspected, then declared dead by all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import torch

from gossip.config import NodeConfig, StoreConfig
from gossip.core.errors import PeerError
from gossip.core.membership import MembershipConfig
from gossip.core.params import FlatParams, Layout
from gossip.node.node import JoinError, Node
from gossip.transport import serde
from gossip.transport.channels import GOSSIP
from tests.support.inproc import wait_until

SWIM = MembershipConfig(interval=0.1, suspect_after=0.5, dead_after=1.5, member_protocol="swim")
NODES = 10


async def start(i: int, seed: str | None) -> Node:
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(100))]))
    cfg = NodeConfig(
        node_id=f"s{i}",
        peers=(seed,) if seed else (),
        membership=SWIM,
        store=StoreConfig(publish_every=0),
    )
    return await Node.create(flat, cfg, seed=i)


@contextlib.asynccontextmanager
async def cluster(n: int) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for i in range(n):
            nodes.append(await start(i, nodes[0].address if nodes else None))
        yield nodes
    finally:
        await asyncio.gather(*(node.stop(leave=False) for node in nodes), return_exceptions=True)


def states(nodes: list[Node], node_id: str) -> set[str]:
    out = set()
    for node in nodes:
        assert node.members is not None
        if node.node_id != node_id:
            m = node.members.table.members.get(node_id)
            out.add(m.state if m is not None else "unknown")
    return out


def test_swim_nodes_find_each_other_and_all_declare_a_stopped_one_dead_and_no_other() -> None:
    async def main() -> None:
        async with cluster(NODES) as nodes:
            for node in nodes:
                assert await node.wait_for_members(NODES, 30.0), node.node_id
            victim = nodes[4]
            await victim.stop(leave=False)
            survivors = [n for n in nodes if n is not victim]

            took = await wait_until(lambda: states(survivors, victim.node_id) == {"dead"}, 30, "the death")

            assert all(states(survivors, n.node_id) == {"alive"} for n in survivors)
            assert took < 15.0  # suspicion timeout (a few s here) plus the probes and news

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_swim_probe_carries_news_not_the_table() -> None:
    async def main() -> None:
        async with cluster(NODES) as nodes:
            for node in nodes:
                assert await node.wait_for_members(NODES, 30.0)
            members = nodes[0].members
            assert members is not None and members.swim is not None
            for _ in range(100):  # the join news, sent out
                members.swim.news()

            probe = serde.table_message_from_bytes(members.encoded(full=False, to="s3"), "swim")
            whole = serde.table_message_from_bytes(members.encoded(), "swim")

            assert probe[1] == [] and not probe[2]  # only its own record: nothing new
            assert len(whole[1]) == NODES and whole[2]  # the others and itself, marked whole

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_suspicion_travels_to_the_member_which_refutes_it_over_the_wire() -> None:
    async def main() -> None:
        async with cluster(4) as nodes:
            for node in nodes:
                assert await node.wait_for_members(4, 30.0)
            a, b = nodes[0].members, nodes[2].members
            assert a is not None and a.swim is not None and b is not None
            a.swim.probe_failed("s2")  # as if a probe of s2 was lost

            await wait_until(lambda: b.me.heartbeat >= 1, 20, "s2 to hear the claim and refute it")
            await wait_until(lambda: states(nodes, "s2") == {"alive"}, 20, "the refutation everywhere")

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_member_one_node_cannot_reach_is_probed_through_others_and_not_suspected() -> None:
    async def main() -> None:
        async with cluster(4) as nodes:
            for node in nodes:
                assert await node.wait_for_members(4, 30.0)
            a, c = nodes[0], nodes[2]
            assert a.members is not None and a.members.swim is not None
            # The path from a to c fails (a link down one way, a firewall): a's own calls to c
            # are refused before they leave; everyone else reaches c, and c reaches a.
            direct = a.members.channels.unary

            async def unary(address: str, method: str, request: bytes, timeout: float) -> bytes:
                if address == c.address:
                    raise PeerError(address, "UNAVAILABLE", "the path from a to c is down")
                return await direct(address, method, request, timeout)

            a.members.channels.unary = unary  # type: ignore[method-assign]
            await wait_until(
                lambda: a.members is not None and a.members.indirect_saves >= 3, 30, "probes of c"
            )
            # Probed through the others each time a's own probe failed: never suspected.
            assert states(nodes, c.node_id) == {"alive"} and c.members is not None
            assert c.members.me.heartbeat == 0  # nothing to refute: no claim was ever made

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_probe_request_reaches_only_members_and_says_whether_they_answered() -> None:
    async def main() -> None:
        async with cluster(3) as nodes:
            for node in nodes:
                assert await node.wait_for_members(3, 30.0)
            helper, target = nodes[1], nodes[2]

            async def probe(node_id: str, address: str) -> bool:
                reply = await nodes[0].channels.unary(
                    helper.address, GOSSIP + "Probe", serde.probe_to_bytes(node_id, address), 5.0
                )
                return serde.probe_reply_from_bytes(reply)

            assert await probe(target.node_id, target.address) is True
            # Not a member here, or not at that address: refused, and nothing is dialled.
            for node_id, address in (("x9", target.address), (target.node_id, "127.0.0.1:1")):
                with pytest.raises(PeerError) as err:
                    await probe(node_id, address)
                assert err.value.code == "FAILED_PRECONDITION"
            with pytest.raises(PeerError) as err:
                await probe("", "nowhere")
            assert err.value.code == "INVALID_ARGUMENT"
            await target.stop(leave=False)
            assert await probe(target.node_id, target.address) is False

    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.parametrize(("seed_runs", "joiner_runs"), [("swim", "heartbeat"), ("heartbeat", "swim")])
def test_a_node_of_another_member_protocol_is_refused_at_join_with_the_reason(
    seed_runs: str, joiner_runs: str
) -> None:
    """Every node of a cluster must run the same membership protocol: the seed refuses the
    joiner's table and takes nothing in, and the joiner fails at once (not after the join
    timeout) with a JoinError naming both. (A seed older than the check answers with a table
    without a protocol, which the joiner reads as heartbeat's: tests/unit/test_wire.py.)"""

    def config(i: int, protocol: str, seed: str | None) -> NodeConfig:
        membership = replace(SWIM, member_protocol=protocol)
        return NodeConfig(
            node_id=f"{protocol}{i}",
            peers=(seed,) if seed else (),
            membership=membership,
            store=StoreConfig(publish_every=0),
            join_timeout=30.0,
        )

    async def main() -> None:
        flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(100))]))
        seed = await Node.create(flat, config(0, seed_runs, None), seed=0)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(JoinError) as info:
                late = await Node.create(flat.clone(), config(1, joiner_runs, seed.address), seed=1)
                await late.stop(leave=False)
            took = loop.time() - began

            joiner = f"{joiner_runs}1"
            assert str(info.value).startswith(f"seed {seed.address} refused this node: member {joiner} (")
            assert str(info.value).endswith(
                f"runs --member-protocol {joiner_runs}, this node {seed_runs}: "
                "every node of a cluster must run the same one"
            )
            assert seed.members is not None and joiner not in seed.members.table.members
            assert took < 10.0  # at once, not after the 30 s join timeout
        finally:
            await seed.stop(leave=False)

    asyncio.run(asyncio.wait_for(main(), 60))
