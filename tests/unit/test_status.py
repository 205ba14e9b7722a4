"""What a node reports: the duration histogram, the sampled coordinates and the spread estimate, the wire form."""

from __future__ import annotations

import math
import random

import pytest

from gossip.core.status import (
    EXCHANGE_SECONDS_BOUNDS,
    Histogram,
    MemberView,
    NodeStatus,
    sample_coordinates,
    spread_estimate,
)
from gossip.proto import gossip_pb2 as pb
from gossip.transport import serde

pytestmark = pytest.mark.unit


def test_histogram_counts_each_duration_in_the_first_bucket_that_holds_it() -> None:
    h = Histogram()
    for s in (0.001, 0.005, 0.0051, 400.0):
        h.observe(s)
    assert len(h.counts) == len(EXCHANGE_SECONDS_BOUNDS) + 1
    assert h.counts[0] == 2  # bounds are inclusive, as Prometheus' le
    assert h.counts[1] == 1 and h.counts[-1] == 1 and sum(h.counts) == 4
    assert h.total == pytest.approx(400.0111)


def test_sample_coordinates_are_distinct_sorted_in_range_and_the_same_for_one_model() -> None:
    fp = b"\x01" * 32
    c = sample_coordinates(fp, 10_000)
    assert c == sample_coordinates(fp, 10_000) and c == sorted(set(c)) and len(c) == 64
    assert all(0 <= i < 10_000 for i in c)
    assert sample_coordinates(b"\x02" * 32, 10_000) != c
    assert sample_coordinates(fp, 5) == [0, 1, 2, 3, 4]  # a small model is reported whole


def test_spread_estimate_is_exact_on_whole_models_and_unbiased_on_samples() -> None:
    rng = random.Random(0)
    n, numel = 6, 4000
    models = [[rng.gauss(i, 1.0) for _ in range(numel)] for i in range(n)]
    mean = [sum(col) / n for col in zip(*models, strict=True)]
    exact = math.sqrt(sum((v - m) ** 2 for x in models for v, m in zip(x, mean, strict=True)) / n)
    assert spread_estimate(models, numel) == pytest.approx(exact)
    estimates = []
    for seed in range(200):
        at = sample_coordinates(seed.to_bytes(4, "big"), numel)
        estimates.append(spread_estimate([[x[i] for i in at] for x in models], numel) ** 2)  # type: ignore[operator]
    assert sum(estimates) / len(estimates) == pytest.approx(exact**2, rel=0.05)
    assert spread_estimate(models[:1], numel) is None  # one node has no spread
    assert spread_estimate([[1.0, 2.0], [1.0]], numel) is None  # samples of other coordinates


def test_status_survives_the_wire_with_every_new_field_and_json_has_no_nan() -> None:
    s = NodeStatus(
        node_id="n0",
        address="127.0.0.1:1",
        phase="running",
        step=7,
        rank=0,
        topology="ring",
        strategy="pairwise",
        parameters=3,
        fingerprint=b"\x00" * 32,
        weight=1.0,
        uptime_seconds=2.5,
        exchanges_ok=2,
        exchanges_failed=0,
        exchanges_declined=1,
        exchanges_served=3,
        bytes_in=10,
        bytes_out=12,
        members=(MemberView("n1", "127.0.0.1:2", "suspect", 1, 4, 0.5),),
        epoch=1.25,
        train_loss=float("nan"),
        eval_loss=None,
        eval_accuracy=0.5,
        evals=2,
        last_delta_norm=0.125,
        exchange_seconds_buckets=(1,) + (0,) * len(EXCHANGE_SECONDS_BOUNDS),
        exchange_seconds_sum=0.003,
        exchanged_with={"n1": 5},
        calls_refused=4,
        calls_delayed=6,
        control_calls={"Gossip/Sync": 3, "unknown": 1},
        sample=(0.5, -1.0, 2.0),
    )
    back = serde.status_from_bytes(serde.status_to_bytes(s))
    assert back.eval_loss is None and math.isnan(back.train_loss or 0.0)
    j, k = back.to_json(), s.to_json()
    assert j == k and j["train_loss"] is None and j["exchanged_with"] == {"n1": 5}
    assert j["control_calls"] == {"Gossip/Sync": 3, "unknown": 1}
    assert j["exchange_seconds_bounds"] == list(EXCHANGE_SECONDS_BOUNDS) and j["sample"] == [0.5, -1.0, 2.0]
    # An older node's reply (none of the new fields) reads as "not reported", not as zeros that lie.
    old = serde.status_from_bytes(pb.StatusReply(node_id="n9", step=3).SerializeToString())
    assert old.train_loss is old.eval_accuracy is old.last_delta_norm is None
    assert old.exchanged_with == {} == old.control_calls and old.sample == () and old.step == 3
