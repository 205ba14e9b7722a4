"""One node's Status as the dashboard uses it: checked, bounded, typed.

Everything here came from a peer. :func:`parse_reading` cuts every string and list
to a size and keeps numbers finite (JSON has no NaN); a reply it cannot use is
:class:`MalformedStatus`, and the dashboard shows that node as unreachable. Keys an
older node does not send get their defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from gossip.core.membership import MAX_ID_CHARS, STATES

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


def _text(d: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise MalformedStatus(f"{key} is not a string")
    return v[:limit]


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise MalformedStatus(f"{key} is not an integer")
    return v


def _number(v: Any, key: str) -> float | None:
    """A finite float, None for null or a non-finite value (JSON has no NaN)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise MalformedStatus(f"{key} is not a number")
    v = float(v)
    return v if math.isfinite(v) else None


def _list(d: dict[str, Any], key: str, limit: int = MAX_LIST) -> list[Any]:
    v = d.get(key, [])
    if not isinstance(v, list | tuple):
        raise MalformedStatus(f"{key} is not a list")
    return list(v[:limit])


def _store(raw: Any) -> StoreReading | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MalformedStatus("store is not an object")
    versions = _list(raw, "versions")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise MalformedStatus("store versions are not integers")
    under = [str(k)[:MAX_TEXT] for k in _list(raw, "under_replicated")]
    return StoreReading(
        tuple(versions),
        _int(raw, "shards_held"),
        _int(raw, "bytes_held"),
        tuple(under),
        _int(raw, "replication"),
    )


def parse_reading(raw: Any) -> Reading:
    """One node's Status (``fetch_status``'s dict), checked and bounded; MalformedStatus if unusable.

    Keys an older node does not send get their defaults.
    """
    if not isinstance(raw, dict):
        raise MalformedStatus("not an object")
    node_id = _text(raw, "node_id", MAX_ID_CHARS)
    if not node_id:
        raise MalformedStatus("no node id")
    members = []
    for m in _list(raw, "members"):
        if not isinstance(m, dict):
            raise MalformedStatus("a member is not an object")
        state = _text(m, "state")
        members.append(
            Member(
                _text(m, "node_id", MAX_ID_CHARS),
                _text(m, "address"),
                state if state in STATES else "unknown",
                _int(m, "rank"),
            )
        )
    neighbours = [str(n)[:MAX_ID_CHARS] for n in _list(raw, "neighbours")]
    partners = raw.get("exchanged_with", {})
    if not isinstance(partners, dict):
        raise MalformedStatus("exchanged_with is not an object")
    exchanged = {}
    for peer, count in list(partners.items())[:MAX_LIST]:
        if isinstance(count, bool) or not isinstance(count, int):
            raise MalformedStatus("exchanged_with counts are not integers")
        exchanged[str(peer)[:MAX_ID_CHARS]] = count
    sample = [_number(v, "sample") for v in _list(raw, "sample", MAX_SAMPLE)]
    return Reading(
        node_id=node_id,
        address=_text(raw, "address"),
        phase=_text(raw, "phase"),
        step=_int(raw, "step"),
        rank=_int(raw, "rank"),
        topology=_text(raw, "topology"),
        strategy=_text(raw, "strategy"),
        parameters=_int(raw, "parameters"),
        fingerprint=_text(raw, "fingerprint", 128),
        exchanges_ok=_int(raw, "exchanges_ok"),
        exchanges_failed=_int(raw, "exchanges_failed"),
        exchanges_declined=_int(raw, "exchanges_declined"),
        exchanges_served=_int(raw, "exchanges_served"),
        bytes_in=_int(raw, "bytes_in"),
        bytes_out=_int(raw, "bytes_out"),
        training=bool(raw.get("training", False)),
        resting=bool(raw.get("resting", False)),
        rtt_ms=_number(raw.get("rtt_ms"), "rtt_ms") or 0.0,
        epoch=_number(raw.get("epoch"), "epoch") or 0.0,
        train_loss=_number(raw.get("train_loss"), "train_loss"),
        eval_loss=_number(raw.get("eval_loss"), "eval_loss"),
        eval_accuracy=_number(raw.get("eval_accuracy"), "eval_accuracy"),
        members=tuple(members),
        neighbours=tuple(neighbours),
        exchanged_with=exchanged,
        # A sample with a hole cannot be compared coordinate by coordinate.
        sample=tuple(v for v in sample if v is not None) if None not in sample else (),
        store=_store(raw.get("store")),
    )
