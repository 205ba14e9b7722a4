"""Prometheus endpoints of real nodes (in-process, port 0), scraped over HTTP while they exchange.

Each node serves its own registry on the node's event loop; a scrape is compared
with ``fetch_status`` (what ``gossip status --json`` prints) of the same node,
taken just before and just after it: counters lie between the two, a value the
two agree on is the scrape's too.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gossip.config import GossipConfig, NodeConfig, StoreConfig
from gossip.core.membership import MembershipConfig
from gossip.node.node import Node
from gossip.observe.metrics import MetricsServer, serve
from gossip.observe.status import fetch_status
from tests.support.inproc import vector, wait_until

SLOW = MembershipConfig(interval=0.1, suspect_after=60.0, dead_after=120.0)
# Two shards of 4 KiB per snapshot, one snapshot every 5 steps: the store has something to report.
# Every version kept: what a node holds only grows while the test reads it.
STORE = StoreConfig(shard_bytes=4096, model_id="m", publish_every=5, keep_versions=100, repair_interval=0.2)
DIM = 2048
TIMEOUT = 10.0
COUNTERS = ("gossip_exchanges_total", "gossip_received_bytes_total", "gossip_sent_bytes_total")


def run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


async def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by (name, labels); off the event loop, which serves it."""
    text = await asyncio.to_thread(_get, server.url)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def one(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def start_nodes(count: int) -> tuple[list[Node], list[MetricsServer]]:
    nodes: list[Node] = []
    servers: list[MetricsServer] = []
    for i in range(count):
        cfg = NodeConfig(
            node_id=f"n{i}",
            peers=(nodes[0].address,) if nodes else (),
            gossip=GossipConfig(idle_pause=0.0),
            membership=SLOW,
            store=STORE,
        )
        node = Node(vector([float(i)] * DIM), cfg, seed=i)
        await node.start()
        nodes.append(node)
        servers.append(await serve(node, "127.0.0.1:0"))
    for n in nodes:
        assert await n.wait_for_members(count, 30.0)
    return nodes, servers


async def train(nodes: list[Node], steps: int, first: int = 0) -> None:
    """Each node's 'training thread': steps with a report after each, an evaluation every 10."""

    def loop(node: Node) -> None:
        for k in range(first, first + steps):
            node.report(epoch=k / 10, train_loss=1.0 / (k + 1))
            node.step()
            if k % 10 == 9:
                node.report(eval_loss=0.5, eval_accuracy=0.75)

    await asyncio.gather(*(asyncio.to_thread(loop, n) for n in nodes))


async def stop_all(nodes: list[Node], servers: list[MetricsServer]) -> None:
    await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)
    await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


@pytest.mark.timeout(90)
def test_scrapes_agree_with_status_and_counters_only_grow() -> None:
    async def main() -> None:
        nodes, servers = await start_nodes(3)
        try:
            await train(nodes, 20)
            await wait_until(lambda: nodes[0].stats.exchanges_ok > 0, TIMEOUT, "an exchange")
            first = await scrape(servers[0])
            await train(nodes, 20, first=20)

            before = await fetch_status(nodes[0].address, TIMEOUT)
            got = await scrape(servers[0])
            after = await fetch_status(nodes[0].address, TIMEOUT)
            other = await scrape(servers[1])
        finally:
            await stop_all(nodes, servers)

        # Counters (and every histogram bucket) only grow between two scrapes.
        grown = [k for k, v in first.items() if k[0].endswith(("_total", "_bucket", "_count")) and got[k] < v]
        assert grown == [] and len([k for k in first if k[0].endswith("_total")]) >= 8
        assert got[("gossip_step", ())] > first[("gossip_step", ())]

        def between(name: str, key: str, **labels: str) -> None:
            assert before[key] <= one(got, name, **labels) <= after[key], (name, before[key], after[key])

        for outcome in ("ok", "failed", "declined", "served"):
            between("gossip_exchanges_total", f"exchanges_{outcome}", outcome=outcome)
        between("gossip_received_bytes_total", "bytes_in")
        between("gossip_sent_bytes_total", "bytes_out")
        between("gossip_uptime_seconds", "uptime_seconds")
        between("gossip_rate_limited_calls_total", "calls_refused", action="refused")
        between("gossip_rate_limited_calls_total", "calls_delayed", action="delayed")
        assert before["exchanges_ok"] > 0 and before["bytes_out"] > 0
        # Training has ended: what the trainer reported no longer moves.
        assert before["step"] == after["step"] == one(got, "gossip_step") == 40
        assert one(got, "gossip_epoch") == before["epoch"] == 3.9
        assert one(got, "gossip_train_loss") == pytest.approx(before["train_loss"]) == 1 / 40
        assert one(got, "gossip_eval_accuracy_ratio") == before["eval_accuracy"] == 0.75
        assert one(got, "gossip_eval_loss") == before["eval_loss"] == 0.5
        assert one(got, "gossip_evaluations_total") == before["evals"] == 4
        # The histogram counts the exchanges this node started and completed, in cumulative buckets.
        if before["exchange_seconds_buckets"] == after["exchange_seconds_buckets"]:
            assert one(got, "gossip_exchange_duration_seconds_count") == sum(
                before["exchange_seconds_buckets"]
            )
            assert one(got, "gossip_exchange_duration_seconds_bucket", le="+Inf") == before["exchanges_ok"]
        assert one(got, "gossip_members", state="alive") == 2 == len(before["members"])
        assert one(got, "gossip_push_sum_weight") == before["weight"] == 1.0
        assert one(got, "gossip_phase", phase="running") == 1
        info = [dict(k[1]) for k in got if k[0] == "gossip_info"]
        assert info == [
            {
                "node_id": "n0",
                "address": before["address"],
                "rank": "-1",
                "topology": "random",
                "strategy": "pairwise",
                "fingerprint": before["fingerprint"],
                "version": info[0]["version"],
            }
        ]
        assert [dict(k[1])["node_id"] for k in other if k[0] == "gossip_info"] == ["n1"]  # its own registry
        assert (
            before["store"]["shards_held"]
            <= one(got, "gossip_store_shards_held")
            <= after["store"]["shards_held"]
        )
        versions = one(got, "gossip_store_versions")
        assert len(before["store"]["versions"]) <= versions <= len(after["store"]["versions"])
        assert one(got, "gossip_store_versions") >= 1

    run(main())


@pytest.mark.timeout(60)
def test_stopping_the_endpoint_closes_its_port_and_leaves_no_thread() -> None:
    async def main() -> tuple[int, set[str]]:
        threads = {t.name for t in threading.enumerate()}
        nodes, servers = await start_nodes(1)
        port = int(servers[0].address.rpartition(":")[2])
        assert one(await scrape(servers[0]), "gossip_phase", phase="running") == 1
        await stop_all(nodes, servers)
        return port, {t.name for t in threading.enumerate()} - threads

    port, new_threads = run(main())

    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT),
    ):
        pass
    assert not [t for t in new_threads if "asyncio" not in t], new_threads  # to_thread's workers only


@pytest.fixture
def busy_port() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.timeout(30)
def test_a_port_in_use_is_one_clear_error(busy_port: int) -> None:
    async def main() -> None:
        node = Node(vector([0.0] * 4), NodeConfig(node_id="n0", membership=SLOW))
        with pytest.raises(
            OSError, match=f"cannot serve Prometheus metrics on 127.0.0.1:{busy_port}: Address"
        ):
            await serve(node, f"127.0.0.1:{busy_port}")

    run(main())


def gossip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gossip", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.timeout(150)
def test_cli_rejects_a_bad_address_and_a_port_in_use_in_one_line(busy_port: int) -> None:
    bad = gossip("node", "--prometheus", "nonsense")
    used = gossip("node", "--prometheus", f"127.0.0.1:{busy_port}", "--wait-for", "1", "--exit-when-done")

    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "gossip node: error: --prometheus: 'nonsense' is not HOST:PORT, :PORT or PORT "
        "(a port from 0 to 65535)"
    ], bad.stderr
    assert used.returncode == 1, used.stderr
    assert used.stderr.splitlines() == [
        f"gossip node: cannot serve Prometheus metrics on 127.0.0.1:{busy_port}: Address already in use"
    ], used.stderr
