"""The durable store between real nodes over gRPC on loopback (one process, port 0).

A node with a data dir stops without handing anything off (``leave=False``, as a
crash leaves things) and a new node starts with its id and folder: it must hold
every shard again before its first repair round, so no repair pull is ever made
for them. A node without a data dir, restarted the same way, pulls them back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from gossip.config import ConfigError, NodeConfig
from gossip.node.node import Node
from gossip.store.durable import DurableStore
from tests.node.test_store_node import SLOW, STORE, run, start
from tests.support.inproc import vector


def holds_all(node: Node, version: int) -> bool:
    m = node.store.store.manifest("m", version)
    return m is not None and all(node.store.store.holds(m, i) for i in range(m.num_shards))


async def restarted_pulls(tmp_path: Path, durable: bool) -> tuple[int, float, list[int]]:
    """(repair pulls the restarted node made, seconds from its start until it held every shard,
    the other nodes' pulls over the same time)."""
    stores = [
        dataclasses.replace(STORE, data_dir=str(tmp_path / f"n{i}") if durable else "") for i in range(3)
    ]
    nodes: list[Node] = []
    try:
        for i in range(3):
            nodes.append(await start(i, nodes[0].address if nodes else None, SLOW, stores[i]))
        for node in nodes:
            assert await node.wait_for_members(3, 30.0)
        await nodes[0].store.publish(nodes[0].flat.clone(), 1, 10)
        while not all(holds_all(n, 1) for n in nodes):  # R = 3 of 3: every node holds every shard
            await asyncio.sleep(0.05)
        before = [n.store.stats.repaired for n in (nodes[0], nodes[2])]

        await nodes[1].stop(leave=False)  # no handoff: what a crash leaves
        t0 = time.monotonic()
        nodes[1] = await start(1, nodes[0].address, SLOW, stores[1])
        while not holds_all(nodes[1], 1):
            assert time.monotonic() - t0 < 30, "the restarted node never held its shards again"
            await asyncio.sleep(0.005)
        served = time.monotonic() - t0
        await asyncio.sleep(1.0)  # five repair rounds (every 0.2 s)

        others = [n.store.stats.repaired - b for n, b in zip((nodes[0], nodes[2]), before, strict=True)]
        return nodes[1].store.stats.repaired, served, others
    finally:
        await asyncio.gather(*(node.stop(leave=False) for node in nodes), return_exceptions=True)


def test_a_node_restarted_on_its_data_dir_pulls_nothing_and_serves_its_shards_at_once(tmp_path: Path) -> None:
    pulls, served, others = run(restarted_pulls(tmp_path, durable=True))

    assert pulls == 0 and others == [0, 0]
    assert served < 2.0


def test_a_node_restarted_without_one_pulls_every_shard_back(tmp_path: Path) -> None:
    pulls, _, others = run(restarted_pulls(tmp_path, durable=False))

    assert pulls == 10 and others == [0, 0]  # 40 000 bytes in 4 KiB shards


def test_the_store_service_keeps_a_durable_store_only_with_a_data_dir(tmp_path: Path) -> None:
    async def kinds() -> list[bool]:
        out = []
        for data_dir in ("", str(tmp_path / "d")):
            node = await start(0, None, SLOW, dataclasses.replace(STORE, data_dir=data_dir))
            out.append(isinstance(node.store.store, DurableStore))
            await node.stop(leave=False)
        return out

    assert run(kinds()) == [False, True]


def test_a_node_without_an_id_keeps_the_one_its_data_dir_remembers(tmp_path: Path) -> None:
    async def main() -> None:
        folder = tmp_path / "d"
        cfg = NodeConfig(membership=SLOW, store=dataclasses.replace(STORE, data_dir=str(folder)))
        first = await Node.create(vector([0.0]), cfg, seed=0)
        await first.stop(leave=False)
        again = await Node.create(vector([0.0]), cfg, seed=1)
        try:
            assert again.node_id == first.node_id == (folder / "node_id").read_text()
        finally:
            await again.stop(leave=False)
        named = await Node.create(vector([0.0]), dataclasses.replace(cfg, node_id="given"), seed=2)
        await named.stop(leave=False)
        assert named.node_id == "given"  # --node-id wins, and the folder keeps its own
        (folder / "node_id").write_text("\x00bad")
        with pytest.raises(ConfigError, match="does not hold a node id"):
            await Node.create(vector([0.0]), cfg, seed=3)

    run(main())
