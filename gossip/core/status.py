"""What a node reports about itself (``gossip status``), as plain values.

The node fills a :class:`NodeStatus`; the transport encodes it and the client
decodes it into the same type, so both ends and the JSON agree field by field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fingerprint"] = self.fingerprint.hex()
        out["uptime_seconds"] = round(self.uptime_seconds, 3)
        out["members"] = [
            {**asdict(m), "seconds_since_heartbeat": round(m.seconds_since_heartbeat, 3)}
            for m in self.members
        ]
        out["neighbours"] = list(self.neighbours)
        return out
