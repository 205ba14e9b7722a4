"""What a node reports about itself (``gossip status``), as plain values.

The node fills a :class:`NodeStatus`; the transport encodes it and the client
decodes it into the same type, so both ends and the JSON agree field by field.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Upper bounds (seconds) of the exchange-duration histogram's buckets; one more
# bucket past the last holds the longer ones. From a 1 MiB exchange on loopback
# (~5 ms) to a large model over a slow link (minutes).
EXCHANGE_SECONDS_BOUNDS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
SAMPLE_SIZE = 64  # model coordinates each node reports for the consensus-spread estimate


@dataclass
class Histogram:
    """Durations counted into fixed buckets (not cumulative), and their sum."""

    bounds: tuple[float, ...] = EXCHANGE_SECONDS_BOUNDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(EXCHANGE_SECONDS_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


@dataclass
class TrainingReport:
    """What the trainer last told the node (``Node.report``); None until it says."""

    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    evals: int = 0

    def update(
        self,
        epoch: float | None = None,
        train_loss: float | None = None,
        eval_loss: float | None = None,
        eval_accuracy: float | None = None,
    ) -> None:
        """Take what is given, keep the rest; an evaluation (a loss or an accuracy) counts one more."""
        if epoch is not None:
            self.epoch = float(epoch)
        if train_loss is not None:
            self.train_loss = float(train_loss)
        if eval_loss is not None or eval_accuracy is not None:
            self.eval_loss = self.eval_loss if eval_loss is None else float(eval_loss)
            self.eval_accuracy = self.eval_accuracy if eval_accuracy is None else float(eval_accuracy)
            self.evals += 1


def sample_coordinates(fingerprint: bytes, numel: int, k: int = SAMPLE_SIZE) -> list[int]:
    """``k`` distinct coordinates of a ``numel``-element model, the same for every node with this fingerprint."""
    rng = random.Random(fingerprint)
    if numel <= k:
        return list(range(numel))
    return sorted(rng.sample(range(numel), k))


def spread_estimate(samples: Sequence[Sequence[float]], numel: int) -> float | None:
    """Consensus distance ``sqrt(sum_i ||x_i - mean x||^2 / n)`` estimated from sampled coordinates.

    Each sample holds the same coordinates of every node's model, drawn uniformly,
    so ``numel / k`` times their mean squared deviation is an unbiased estimate of
    the whole models'. None with fewer than two nodes or mismatched samples.
    """
    rows = [list(s) for s in samples if len(s) > 0]
    if len(rows) < 2 or len({len(r) for r in rows}) != 1:
        return None
    k = len(rows[0])
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    sq = sum((v - m) ** 2 for r in rows for v, m in zip(r, mean, strict=True)) / len(rows)
    return math.sqrt(sq * max(numel, k) / k)


@dataclass(frozen=True)
class MemberView:
    node_id: str
    address: str
    state: str  # alive, suspect, dead or left (as this node sees it)
    rank: int
    heartbeat: int
    seconds_since_heartbeat: float


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    phase: str  # created, joining, running, leaving, stopped
    step: int
    rank: int
    topology: str
    strategy: str
    parameters: int
    fingerprint: bytes
    weight: float
    uptime_seconds: float
    exchanges_ok: int
    exchanges_failed: int
    exchanges_declined: int
    exchanges_served: int
    bytes_in: int
    bytes_out: int
    members: tuple[MemberView, ...] = ()
    neighbours: tuple[str, ...] = ()
    training: bool = False  # between the first step and the end of training
    resting: bool = False  # done training and settled: averaging only at the slow rest pace
    # What the trainer reported (Node.report); None until it did.
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    evals: int = 0
    last_delta_norm: float | None = None  # L2 norm of the last change averaging applied (<= 1/s)
    # Exchanges this node started and completed: duration histogram (not cumulative).
    exchange_seconds_bounds: tuple[float, ...] = EXCHANGE_SECONDS_BOUNDS
    exchange_seconds_buckets: tuple[int, ...] = ()
    exchange_seconds_sum: float = 0.0
    exchanged_with: Mapping[str, int] = field(default_factory=dict)  # peer -> exchanges completed
    calls_refused: int = 0  # control calls the per-peer rate limit refused
    calls_delayed: int = 0  # control calls it held back before serving
    control_calls: Mapping[str, int] = field(default_factory=dict)  # "Service/Method" -> calls received
    sample: tuple[float, ...] = ()  # the model at sample_coordinates(fingerprint, parameters)
    # --max-send-rate (bytes per second, 0: none): bytes let through, seconds spent waiting.
    max_send_rate: float = 0.0
    paced_bytes: int = 0
    paced_wait_seconds: float = 0.0
    bulk_port: int = 0  # plain-TCP port of bulk calls (gossip.transport.bulk); 0: none
    pipeline: str = ""  # the exchange pipeline besides the codec ('' for the plain delta rule)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fingerprint"] = self.fingerprint.hex()
        out["uptime_seconds"] = round(self.uptime_seconds, 3)
        out["members"] = [
            {**asdict(m), "seconds_since_heartbeat": round(m.seconds_since_heartbeat, 3)}
            for m in self.members
        ]
        out["neighbours"] = list(self.neighbours)
        out["exchange_seconds_bounds"] = list(self.exchange_seconds_bounds)
        out["exchange_seconds_buckets"] = list(self.exchange_seconds_buckets)
        out["exchanged_with"] = dict(self.exchanged_with)
        out["control_calls"] = dict(self.control_calls)
        out["sample"] = list(self.sample)
        for key in ("train_loss", "eval_loss", "eval_accuracy", "last_delta_norm"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None  # JSON has no NaN or infinity (a diverged loss reads as null)
        return out
