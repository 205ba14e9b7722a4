"""A version whose publisher went silent is finished by its next owner (real nodes, gRPC)."""

from __future__ import annotations

import asyncio
import dataclasses

from gossip.cli.output import status_text
from gossip.core.ring import Ring
from gossip.node.node import Node
from gossip.observe.status import fetch_status
from gossip.store.reconstruct import fetch_snapshot
from tests.node.test_store_node import FAST, STORE, cluster, run
from tests.support.inproc import wait_until


def test_the_next_owner_publishes_a_version_its_silent_publisher_never_did() -> None:
    async def main() -> None:
        store = dataclasses.replace(STORE, publish_every=5)
        async with cluster(3, membership=FAST, store=store) as nodes:
            silent_id = Ring([n.node_id for n in nodes]).owner("m/v1")
            (silent,) = [n for n in nodes if n.node_id == silent_id]
            others = [n for n in nodes if n is not silent]
            heir_id = Ring([n.node_id for n in others]).owner("m/v1")

            def train(node: Node) -> None:
                for _ in range(5):  # step 5: v1 is due, from the silent node that never gets there
                    node.step()

            await asyncio.gather(*(asyncio.to_thread(train, n) for n in others))
            for n in others:
                assert n.store.info().awaiting == [(1, silent_id)]
            reply = await fetch_status(others[0].address, 10.0)  # gossip status shows it
            assert reply["store"]["awaiting"] == [{"version": 1, "publisher": silent_id}]
            assert f"awaiting    v1 from {silent_id}  (finished 0 " in status_text(reply)
            await silent.stop(leave=False)
            await wait_until(
                lambda: all(n.store.placement.publisher("m", 1) == heir_id for n in others),
                20,
                "the silent node seen dead",
            )

            # Still training: a copy taken now could mix two steps; the next version would supersede.
            await asyncio.sleep(1.0)  # five repair rounds
            assert all(n.store.store.manifest("m", 1) is None for n in others)
            assert all(n.store.info().awaiting == [(1, silent_id)] for n in others)

            for n in others:
                n.finish_training()
            await wait_until(
                lambda: all(n.store.store.manifest("m", 1) is not None for n in others), 20, "v1 finished"
            )
            m = others[0].store.store.manifest("m", 1)
            assert m is not None and (m.publisher, m.step) == (heir_id, 5)
            await wait_until(lambda: sum(n.store.stats.finished for n in others) == 1, 10, "the count")
            assert [n.store.stats.finished for n in others if n.node_id == heir_id] == [1]
            await wait_until(lambda: all(not n.store.info().awaiting for n in others), 10, "nothing awaited")
            rebuilt = await fetch_snapshot(others[0].address, "m")
            assert rebuilt.manifest.version == 1
            info = others[0].store.info().to_json()
            assert info["awaiting"] == [] and info["finished"] in (0, 1)

    run(main(), timeout=90)
