"""One node's Status as the dashboard keeps it: bounded, finite, typed.

Everything here came from a peer. :func:`reading_from` cuts every string and list
to a size and keeps numbers finite (JSON has no NaN); a reply it cannot use is
:class:`MalformedStatus`, and the dashboard shows that node as unreachable, as it
does a reply that does not decode at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gossip.core.membership import MAX_ID_CHARS, STATES
from gossip.observe.status import Answer

MAX_TEXT = 200  # characters kept of any other string a peer sends
MAX_LIST = 1024  # members, neighbours, exchange partners kept of one reply
MAX_SAMPLE = 256  # nodes send 64 coordinates; room, but bounded
# HOST:PORT the dashboard will dial: a DNS name or IPv4 address, or an IPv6 one in
# brackets; no gRPC target schemes (unix:, dns:///), nothing else a table may carry.
_DIALABLE = re.compile(r"(?:[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}")


class MalformedStatus(ValueError):
    """A Status reply the dashboard will not use: the node is shown as unreachable."""


def dialable(address: str) -> bool:
    return bool(_DIALABLE.fullmatch(address)) and 0 < int(address.rpartition(":")[2]) <= 65535


# --- one node's reading, checked ---------------------------------------------------------


@dataclass(frozen=True)
class Member:
    node_id: str
    address: str
    state: str
    rank: int


@dataclass(frozen=True)
class StoreReading:
    versions: tuple[int, ...]
    shards_held: int
    bytes_held: int
    under_replicated: tuple[str, ...]
    replication: int


@dataclass(frozen=True)
class Reading:
    """What the dashboard keeps of one node's answer."""

    node_id: str
    address: str
    phase: str
    step: int
    rank: int
    topology: str
    strategy: str
    parameters: int
    fingerprint: str
    exchanges_ok: int
    exchanges_failed: int
    exchanges_declined: int
    exchanges_served: int
    bytes_in: int
    bytes_out: int
    training: bool
    resting: bool
    rtt_ms: float
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    members: tuple[Member, ...] = ()
    neighbours: tuple[str, ...] = ()
    exchanged_with: dict[str, int] = field(default_factory=dict)
    sample: tuple[float, ...] = ()
    store: StoreReading | None = None

    @property
    def loss(self) -> float | None:
        return self.train_loss if self.train_loss is not None else self.eval_loss


def _finite(v: float | None) -> float | None:
    """None for a missing or non-finite value: JSON has no NaN or infinity."""
    return v if v is not None and math.isfinite(v) else None


def reading_from(answer: Answer) -> Reading:
    """One node's answer, bounded (every string and list cut to a size, every number finite).

    The protobuf decoding already fixed every field's type; a reply without a node
    id is MalformedStatus. Fields an older node does not send decode as their
    defaults (no loss, no sample, no exchange partners).
    """
    s = answer.status
    if not s.node_id:
        raise MalformedStatus("no node id")
    members = tuple(
        Member(
            m.node_id[:MAX_ID_CHARS],
            m.address[:MAX_TEXT],
            m.state if m.state in STATES else "unknown",
            m.rank,
        )
        for m in s.members[:MAX_LIST]
    )
    sample = s.sample[:MAX_SAMPLE]
    store = None
    if answer.store is not None:
        info = answer.store
        store = StoreReading(
            versions=tuple(
                sorted(
                    {h.version for h in info.holdings[:MAX_LIST] if h.model_id == info.model_id}, reverse=True
                )
            ),
            shards_held=info.shards_held,
            bytes_held=info.bytes_held,
            under_replicated=tuple(k[:MAX_TEXT] for k in info.under_replicated[:MAX_LIST]),
            replication=info.replication,
        )
    return Reading(
        node_id=s.node_id[:MAX_ID_CHARS],
        address=s.address[:MAX_TEXT],
        phase=s.phase[:MAX_TEXT],
        step=s.step,
        rank=s.rank,
        topology=s.topology[:MAX_TEXT],
        strategy=s.strategy[:MAX_TEXT],
        parameters=s.parameters,
        fingerprint=s.fingerprint[:64].hex(),
        exchanges_ok=s.exchanges_ok,
        exchanges_failed=s.exchanges_failed,
        exchanges_declined=s.exchanges_declined,
        exchanges_served=s.exchanges_served,
        bytes_in=s.bytes_in,
        bytes_out=s.bytes_out,
        training=s.training,
        resting=s.resting,
        rtt_ms=answer.rtt_ms,
        epoch=_finite(s.epoch) or 0.0,
        train_loss=_finite(s.train_loss),
        eval_loss=_finite(s.eval_loss),
        eval_accuracy=_finite(s.eval_accuracy),
        members=members,
        neighbours=tuple(n[:MAX_ID_CHARS] for n in s.neighbours[:MAX_LIST]),
        exchanged_with={p[:MAX_ID_CHARS]: c for p, c in list(s.exchanged_with.items())[:MAX_LIST]},
        # A sample with a hole cannot be compared coordinate by coordinate.
        sample=tuple(sample) if all(math.isfinite(v) for v in sample) else (),
        store=store,
    )
