"""The Prometheus families a node's status turns into, and the --prometheus address (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gossip.config import ConfigError, RunOptions, SimulateConfig
from gossip.core.addresses import metrics_address
from gossip.core.status import EXCHANGE_SECONDS_BOUNDS, MemberView, NodeStatus
from gossip.observe.metrics import NodeCollector
from gossip.store.shards import Holding, StoreInfo

pytestmark = pytest.mark.unit


def status(**kw: Any) -> NodeStatus:
    buckets = [0] * (len(EXCHANGE_SECONDS_BOUNDS) + 1)
    buckets[0], buckets[3], buckets[-1] = 2, 1, 1  # <= 5 ms, <= 50 ms, > 300 s
    base: dict[str, Any] = dict(
        node_id="n0",
        address="127.0.0.1:7000",
        phase="running",
        step=42,
        rank=0,
        topology="ring",
        strategy="pairwise",
        parameters=1000,
        fingerprint=b"\xab\xcd",
        weight=1.0,
        uptime_seconds=12.5,
        exchanges_ok=4,
        exchanges_failed=1,
        exchanges_declined=2,
        exchanges_served=3,
        bytes_in=4000,
        bytes_out=5000,
        members=(
            MemberView("n1", "127.0.0.1:7001", "alive", 1, 5, 0.1),
            MemberView("n2", "127.0.0.1:7002", "alive", 2, 5, 0.1),
            MemberView("n3", "127.0.0.1:7003", "dead", 3, 2, 9.0),
        ),
        neighbours=("n1",),
        training=True,
        epoch=1.5,
        train_loss=0.25,
        evals=2,
        exchange_seconds_buckets=tuple(buckets),
        exchange_seconds_sum=400.06,
        exchanged_with={"n1": 6, "n2": 1},
        calls_refused=7,
        calls_delayed=8,
        control_calls={"Gossip/Sync": 30, "Store/Holdings": 9},
    )
    base.update(kw)
    return NodeStatus(**base)


def store() -> StoreInfo:
    return StoreInfo(
        model_id="mlp",
        replication=3,
        publish_every=20,
        vnodes=64,
        ring_share=0.4,
        ring_members=3,
        holdings=[
            Holding("mlp", 2, b"", b"", 4),
            Holding("mlp", 3, b"", b"", 4),
            Holding("other", 9, b"", b"", 1),
        ],
        shards_held=5,
        bytes_held=5 << 20,
        shards_pending=1,
        under_replicated=["mlp/3/0", "mlp/3/1"],
        published=2,
        repaired=3,
        corrupt_dropped=0,
    )


def scrape(s: NodeStatus, info: StoreInfo | None = None) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(lambda: s, (lambda: info) if info else None))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    (v,) = [
        s.value
        for s in families[name].samples
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return float(v)


def test_every_family_has_its_type_and_a_conventional_name() -> None:
    fams = scrape(status(eval_loss=0.3, eval_accuracy=0.9, last_delta_norm=0.01), store())

    types = {name: f.type for name, f in fams.items()}
    assert all(name.startswith("gossip") for name in types)
    for name in (
        "gossip_exchanges",
        "gossip_received_bytes",
        "gossip_sent_bytes",
        "gossip_rate_limited_calls",
        "gossip_control_calls",
    ):
        assert types[name] == "counter", name
    for name in (
        "gossip_step",
        "gossip_epoch",
        "gossip_train_loss",
        "gossip_eval_accuracy_ratio",
        "gossip_members",
    ):
        assert types[name] == "gauge", name
    assert types["gossip_exchange_duration_seconds"] == "histogram"
    assert types["gossip_info"] == "gauge"  # text format 0.0.4 has no info type
    counters = [s.name for f in fams.values() if f.type == "counter" for s in f.samples]
    assert counters and all(name.endswith("_total") for name in counters)
    assert {"gossip_store_shards_held", "gossip_store_versions", "gossip_uptime_seconds"} <= set(types)


def test_values_are_the_status_fields() -> None:
    fams = scrape(status(), store())

    assert value(fams, "gossip_step") == 42 and value(fams, "gossip_epoch") == 1.5
    assert value(fams, "gossip_exchanges", "gossip_exchanges_total", outcome="served") == 3
    assert value(fams, "gossip_exchanges", "gossip_exchanges_total", outcome="declined") == 2
    assert value(fams, "gossip_received_bytes", "gossip_received_bytes_total") == 4000
    assert value(fams, "gossip_rate_limited_calls", "gossip_rate_limited_calls_total", action="refused") == 7
    assert value(fams, "gossip_control_calls", "gossip_control_calls_total", method="Store/Holdings") == 9
    assert value(fams, "gossip_members", state="alive") == 2
    assert value(fams, "gossip_members", state="dead") == 1
    assert value(fams, "gossip_members", state="suspect") == 0
    assert value(fams, "gossip_phase", phase="running") == 1
    assert value(fams, "gossip_phase", phase="stopped") == 0
    assert value(fams, "gossip_peer_exchanges", "gossip_peer_exchanges_total", peer="n1") == 6
    assert value(fams, "gossip_info", node_id="n0", fingerprint="abcd", topology="ring") == 1
    assert value(fams, "gossip_store_versions") == 2 and value(fams, "gossip_store_latest_version") == 3
    assert value(fams, "gossip_store_shards_under_replicated") == 2
    assert value(fams, "gossip_store_held_bytes") == 5 << 20


def test_the_histogram_is_cumulative_and_counts_every_exchange() -> None:
    fams = scrape(status())

    buckets = [s for s in fams["gossip_exchange_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in EXCHANGE_SECONDS_BOUNDS), "+Inf"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[0] == 2 and counts[3] == 3 and counts[-2] == 3
    h = fams["gossip_exchange_duration_seconds"]
    assert value(fams, "gossip_exchange_duration_seconds", "gossip_exchange_duration_seconds_count") == 4
    assert value(fams, "gossip_exchange_duration_seconds", "gossip_exchange_duration_seconds_sum") == 400.06
    assert h.type == "histogram"


def test_unknown_values_are_left_out_not_faked() -> None:
    fams = scrape(status(train_loss=None, eval_loss=None, eval_accuracy=None, exchange_seconds_buckets=()))

    for name in ("gossip_train_loss", "gossip_eval_loss", "gossip_eval_accuracy_ratio", "gossip_delta_norm"):
        assert name not in fams
    assert "gossip_exchange_duration_seconds" not in fams
    assert "gossip_store_shards_held" not in fams  # no store given


def test_peer_controlled_labels_are_escaped() -> None:
    hostile = 'n"1\n<script>\\'
    fams = scrape(status(node_id=hostile, exchanged_with={hostile: 1}))

    assert value(fams, "gossip_info", node_id=hostile) == 1
    assert value(fams, "gossip_peer_exchanges", "gossip_peer_exchanges_total", peer=hostile) == 1


def test_openmetrics_carries_the_units() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(lambda: status(eval_accuracy=0.5), store))

    fams = {f.name: f for f in parse_openmetrics(generate_openmetrics(registry).decode())}

    assert fams["gossip_uptime_seconds"].unit == "seconds"
    assert fams["gossip_sent_bytes"].unit == "bytes"
    assert fams["gossip_exchange_duration_seconds"].unit == "seconds"
    assert fams["gossip_eval_accuracy_ratio"].unit == "ratio"
    assert fams["gossip"].type == "info"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_metrics_address_binds_loopback_unless_told(spec: str, expected: tuple[str, int]) -> None:
    assert metrics_address(spec, "--prometheus") == expected


@pytest.mark.parametrize("spec", ["nonsense", "", "host:", "70000", "1:2:3", "a b:1", "host:-1"])
def test_metrics_address_rejects_what_is_not_an_address(spec: str) -> None:
    with pytest.raises(ConfigError, match="--prometheus"):
        RunOptions(prometheus=spec or " ").validate()


def test_simulate_gives_each_node_its_own_port() -> None:
    sim = SimulateConfig(nodes=3, prometheus="9100")

    assert [sim.metrics_address(r) for r in range(3)] == [
        "127.0.0.1:9100",
        "127.0.0.1:9101",
        "127.0.0.1:9102",
    ]
    assert SimulateConfig(nodes=3, prometheus=":0").metrics_address(2) == "127.0.0.1:0"
    assert SimulateConfig(nodes=3).metrics_address(0) == ""
    with pytest.raises(ConfigError, match="65535"):
        SimulateConfig(nodes=3, prometheus="65534").validate()


def test_a_collector_without_a_node_yet_has_nothing_to_say() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector())

    assert generate_latest(registry) == b""


def test_the_send_limit_shows_only_when_there_is_one() -> None:
    assert not any(name.startswith("gossip_paced") for name in scrape(status()))
    fams = scrape(status(max_send_rate=6.25e6, paced_bytes=123456, paced_wait_seconds=1.5))
    assert value(fams, "gossip_max_send_rate_bytes_per_second") == 6.25e6
    assert value(fams, "gossip_paced_sent_bytes", "gossip_paced_sent_bytes_total") == 123456
    assert value(fams, "gossip_paced_wait_seconds", "gossip_paced_wait_seconds_total") == 1.5
