"""A node's Prometheus metrics: read from its status at scrape time, served over HTTP.

``gossip node --prometheus HOST:PORT`` serves them at ``http://HOST:PORT/metrics``
(docs: "Metrics" lists each one). Nothing is counted twice: the collector turns
:meth:`Node.status` and the store's :meth:`~gossip.store.service.StoreService.info`
into metric families when Prometheus asks, so a scrape shows the same numbers as
``gossip status --json`` at that moment. The endpoint runs on the node's event loop
(aiohttp), like the gRPC ``Status`` call, so a scrape reads the node between two of
its callbacks and never races the loop from another thread. Each endpoint has a
registry of its own: one process may run many nodes (tests, benchmarks).

The node's id is a label of ``gossip_info`` only, not of every series (Prometheus
already tells targets apart by ``instance``): join it in where wanted with
``... * on(instance) group_left(node_id) gossip_info``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gossip import __version__
from gossip.core.addresses import join_host_port, metrics_address
from gossip.core.status import NodeStatus
from gossip.store.shards import StoreInfo

if TYPE_CHECKING:
    from gossip.node.node import Node

__all__ = ["MetricsServer", "NodeCollector", "node_metrics", "serve", "store_metrics"]

log = logging.getLogger(__name__)

PHASES = ("created", "joining", "running", "leaving", "stopped")
MEMBER_STATES = ("alive", "suspect", "dead", "left")
# A scrape still in flight when the node stops gets this long to finish.
_SHUTDOWN_SECONDS = 1.0


def _gauge(name: str, doc: str, value: float | None, unit: str = "") -> Iterator[Metric]:
    """One unlabelled gauge, or nothing while the value is unknown (no NaN stand-ins)."""
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value, unit=unit)


def _counter(name: str, doc: str, value: float, unit: str = "") -> Metric:
    return CounterMetricFamily(name, doc, value=value, unit=unit)


def node_metrics(s: NodeStatus) -> Iterator[Metric]:
    """The metric families of one node's status (docs/metrics.md describes each)."""
    yield InfoMetricFamily(
        "gossip",
        "The node: id, advertised address, rank, topology, averaging strategy and model layout",
        value={
            "node_id": s.node_id,
            "address": s.address,
            "rank": str(s.rank),
            "topology": s.topology,
            "strategy": s.strategy,
            "fingerprint": s.fingerprint.hex(),
            "version": __version__,
        },
    )
    phase = GaugeMetricFamily(
        "gossip_phase", "1 for the node's lifecycle phase, 0 for the others", labels=["phase"]
    )
    for p in PHASES:
        phase.add_metric([p], 1.0 if s.phase == p else 0.0)
    yield phase
    yield GaugeMetricFamily("gossip_training", "1 while the node trains", value=float(s.training))
    yield GaugeMetricFamily(
        "gossip_resting",
        "1 once training ended and averaging settled to the slow rest pace",
        value=float(s.resting),
    )
    yield GaugeMetricFamily(
        "gossip_uptime_seconds", "Seconds since the node was created", value=s.uptime_seconds, unit="seconds"
    )
    yield GaugeMetricFamily(
        "gossip_model_parameters", "Numbers in the model's flat layout", value=s.parameters
    )
    yield GaugeMetricFamily("gossip_step", "Optimizer steps the node has taken", value=s.step)
    yield GaugeMetricFamily(
        "gossip_epoch", "Epochs of its own data the trainer has gone through", value=s.epoch
    )
    yield from _gauge("gossip_train_loss", "The last training batch's loss", s.train_loss)
    yield from _gauge("gossip_eval_loss", "The last evaluation's loss on the node's test set", s.eval_loss)
    yield from _gauge(
        "gossip_eval_accuracy_ratio",
        "The last evaluation's accuracy on the node's test set (0 to 1)",
        s.eval_accuracy,
        unit="ratio",
    )
    yield _counter("gossip_evaluations", "Evaluations the trainer reported", s.evals)
    exchanges = CounterMetricFamily(
        "gossip_exchanges",
        "Exchanges by outcome: ok (started here, completed), failed (started here, did not), "
        "declined (a peer was busy), served (a peer's, completed)",
        labels=["outcome"],
    )
    for outcome, n in (
        ("ok", s.exchanges_ok),
        ("failed", s.exchanges_failed),
        ("declined", s.exchanges_declined),
        ("served", s.exchanges_served),
    ):
        exchanges.add_metric([outcome], n)
    yield exchanges
    if s.exchange_seconds_buckets:
        cumulative, buckets = 0, []
        for bound, n in zip(
            (*s.exchange_seconds_bounds, float("inf")), s.exchange_seconds_buckets, strict=True
        ):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            "gossip_exchange_duration_seconds",
            "Duration of the exchanges this node started and completed",
            buckets=buckets,
            sum_value=s.exchange_seconds_sum,
            unit="seconds",
        )
    peers = CounterMetricFamily(
        "gossip_peer_exchanges",
        "Exchanges completed with each peer (started here or served)",
        labels=["peer"],
    )
    for peer, n in sorted(s.exchanged_with.items()):
        peers.add_metric([peer], n)
    yield peers
    yield _counter("gossip_received_bytes", "Bytes of exchange payload received", s.bytes_in, unit="bytes")
    yield _counter("gossip_sent_bytes", "Bytes of exchange payload sent", s.bytes_out, unit="bytes")
    yield GaugeMetricFamily(
        "gossip_push_sum_weight", "The push-sum weight (1 under pairwise averaging)", value=s.weight
    )
    yield from _gauge(
        "gossip_delta_norm", "L2 norm of the last change averaging applied to the model", s.last_delta_norm
    )
    members = GaugeMetricFamily(
        "gossip_members",
        "Other nodes in this node's member table, by the state it sees them in",
        labels=["state"],
    )
    for state in MEMBER_STATES:
        members.add_metric([state], sum(1 for m in s.members if m.state == state))
    yield members
    yield GaugeMetricFamily(
        "gossip_neighbours", "Members the topology lets this node pick now", value=len(s.neighbours)
    )
    limited = CounterMetricFamily(
        "gossip_rate_limited_calls",
        "Control calls the rate limit refused (RESOURCE_EXHAUSTED) or held back before serving",
        labels=["action"],
    )
    limited.add_metric(["refused"], s.calls_refused)
    limited.add_metric(["delayed"], s.calls_delayed)
    yield limited
    control = CounterMetricFamily(
        "gossip_control_calls",
        "Control calls received (all but the exchange and shard transfers), by service and method",
        labels=["method"],
    )
    for method, n in sorted(s.control_calls.items()):
        control.add_metric([method], n)
    yield control
    if s.max_send_rate:  # --max-send-rate
        yield GaugeMetricFamily(
            "gossip_max_send_rate_bytes_per_second", "The node's send limit", value=s.max_send_rate
        )
        yield _counter("gossip_paced_sent_bytes_total", "Bytes the send limit let through", s.paced_bytes)
        yield _counter(
            "gossip_paced_wait_seconds_total",
            "Seconds frames waited for the send limit, all together",
            s.paced_wait_seconds,
        )


def store_metrics(info: StoreInfo) -> Iterator[Metric]:
    """The metric families of one node's shard store (the ``store`` part of ``gossip status``)."""
    versions = sorted(h.version for h in info.holdings if h.model_id == info.model_id)
    yield GaugeMetricFamily(
        "gossip_store_versions", "Snapshot versions of the node's model held here", value=len(versions)
    )
    yield from _gauge(
        "gossip_store_latest_version",
        "The newest snapshot version held here",
        versions[-1] if versions else None,
    )
    yield GaugeMetricFamily("gossip_store_shards_held", "Snapshot shards held here", value=info.shards_held)
    yield GaugeMetricFamily(
        "gossip_store_held_bytes", "Bytes of the shards held here", value=info.bytes_held, unit="bytes"
    )
    yield GaugeMetricFamily("gossip_store_shards_pending", "Shards being received", value=info.shards_pending)
    yield GaugeMetricFamily(
        "gossip_store_shards_under_replicated",
        "Shards this node owns that have fewer copies than the replication factor (last repair round)",
        value=len(info.under_replicated),
    )
    yield GaugeMetricFamily("gossip_store_replication", "Copies kept of every shard", value=info.replication)
    yield GaugeMetricFamily(
        "gossip_store_ring_share_ratio",
        "Share of the hash ring this node owns (0 to 1)",
        value=info.ring_share,
        unit="ratio",
    )
    yield GaugeMetricFamily(
        "gossip_store_ring_members", "Nodes on this node's hash ring", value=info.ring_members
    )
    yield _counter("gossip_store_published", "Snapshots this node published", info.published)
    yield _counter("gossip_store_repaired", "Shards pulled to restore a copy this node owns", info.repaired)
    yield _counter(
        "gossip_store_corrupt_dropped",
        "Held shards dropped for not matching their digest",
        info.corrupt_dropped,
    )


class NodeCollector(Collector):
    """Reads a node's status (and its store's) on every scrape; nothing until it has a node to read."""

    def __init__(
        self, status: Callable[[], NodeStatus] | None = None, store: Callable[[], StoreInfo] | None = None
    ) -> None:
        self.watch(status, store)

    def watch(self, status: Callable[[], NodeStatus] | None, store: Callable[[], StoreInfo] | None) -> None:
        self._status, self._store = status, store

    def collect(self) -> Iterator[Metric]:
        if self._status is not None:
            yield from node_metrics(self._status())
        if self._store is not None:
            yield from store_metrics(self._store())


class MetricsServer:
    """One node's ``/metrics`` endpoint on the running event loop; :meth:`stop` closes its socket."""

    def __init__(self, collector: NodeCollector, runner: web.AppRunner, address: str) -> None:
        self.collector = collector
        self._runner = runner
        self.address = address  # HOST:PORT as bound (the real port when 0 was asked for)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    @classmethod
    async def start(cls, spec: str, collector: NodeCollector | None = None) -> MetricsServer:
        """Serve on ``spec`` (HOST:PORT, :PORT or PORT); OSError with one line if it cannot bind.

        Until :meth:`watch` names a node (or ``collector`` reads one) a scrape finds no
        metrics: ``gossip node`` binds before its data loads, so a taken port fails at once.
        """
        host, port = metrics_address(spec, "--prometheus")
        collector = collector or NodeCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)

        async def metrics(request: web.Request) -> web.Response:
            # Prometheus asks for OpenMetrics (which also carries the units); a browser gets text.
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encode(registry), headers={"Content-Type": content_type})

        async def index(request: web.Request) -> web.Response:
            return web.Response(text="gossip node: metrics at /metrics\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/", index)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
            raise OSError(
                f"cannot serve Prometheus metrics on {join_host_port(host, port)}: {reason}"
            ) from None
        bound = runner.addresses[0]
        return cls(collector, runner, join_host_port(host, int(bound[1])))

    def watch(self, node: Node) -> None:
        """From now on, serve ``node``'s metrics."""
        self.collector.watch(node.status, node.store.info)
        log.info("node %s: Prometheus metrics at %s", node.node_id, self.url)

    async def stop(self) -> None:
        """Close the socket; a scrape in flight gets a second to finish."""
        await self._runner.cleanup()


async def serve(node: Node, spec: str) -> MetricsServer:
    """Serve ``node``'s metrics on ``spec`` until :meth:`MetricsServer.stop`."""
    server = await MetricsServer.start(spec)
    server.watch(node)
    return server
