"""The cluster as the dashboard's page shows it, built from rounds of node readings.

:class:`ClusterState` takes one round of :class:`~gossip.observe.readings.Reading`
(or why a node gave none) after another and keeps: the member states (the
answering nodes' tables, by majority) and events when they change, the edges and
which of them carried an exchange since the last round, throughput from counter
deltas, the consensus-spread estimate, and bounded histories. Pure: no I/O, the
caller passes the time.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from gossip.core.status import spread_estimate
from gossip.observe.readings import MAX_LIST, MAX_TEXT, Reading, StoreReading, dialable

HISTORY = 600  # points kept per node and for the cluster's curves: 10 minutes at one poll a second
EVENTS = 200  # events kept
# Most severe first: a tie between observers goes to the worse state.
_SEVERITY = {"left": 3, "dead": 2, "suspect": 1, "alive": 0}


def merged_state(votes: list[str]) -> str:
    """The cluster's view of a member: the state most observers hold, ties to the more severe."""
    counts = Counter(votes)
    return max(counts, key=lambda s: (counts[s], _SEVERITY.get(s, -1)))


@dataclass
class NodeView:
    """One node as the page shows it; its last reading stays when it stops answering."""

    node_id: str
    address: str
    rank: int = -1
    reading: Reading | None = None
    store: StoreReading | None = None  # the last store reading (asked every few rounds only)
    prev: Reading | None = None  # the reading before ``reading``: deltas are taken between the two
    prev_time: float = 0.0
    reachable: bool = False
    error: str = "not asked yet"
    state: str = ""  # the cluster's view (its peers' tables), "" until someone lists it
    last_seen: float | None = None
    x: float = 0.0
    y: float = 0.0
    # (round, time, step, loss, accuracy), one per answer
    history: deque[tuple[int, float, int, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )


_EVENT_TEXT = {
    ("suspect", ""): "suspect",
    ("dead", ""): "declared dead",
    ("left", ""): "left the cluster",
    ("alive", "suspect"): "no longer suspect",
    ("alive", "dead"): "rejoined",
    ("alive", "left"): "rejoined",
}

SPREAD_METHOD = (
    "sqrt(P/k * mean_i |s_i - mean s|^2) over the k sampled coordinates s_i every node reports "
    "(the same ones on every node): an estimate of the RMS distance of the P-parameter models "
    "from their average"
)


class ClusterState:
    """The cluster as the page shows it, built from one round of readings after another."""

    def __init__(self, seed: str, history: int = HISTORY) -> None:
        self.seed = seed
        self.history = history
        self.round = 0
        self.time: float | None = None
        self.nodes: dict[str, NodeView] = {}
        # (a, b) with a < b -> {"current": listed as neighbours this round, "lit": exchanged on since last}
        self.edges: dict[tuple[str, str], dict[str, bool]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.series: deque[dict[str, Any]] = deque(maxlen=history)
        self.last_round_seconds = 0.0
        self._layout_for: tuple[str, ...] = ()

    def targets(self) -> list[tuple[str | None, str]]:
        """(node id or None, address) of every node to ask in the next round.

        Members their peers hold dead or departed are shown, not asked, unless they
        still answered last round. When nobody is left to ask (the whole cluster
        went away) every known address and the seed are tried again.
        """
        out: list[tuple[str | None, str]] = []
        known: list[tuple[str | None, str]] = []
        # One call per address: answers say whose it is (a restart may have taken it over).
        order = sorted(self.nodes.values(), key=lambda v: (not v.reachable, v.state in ("dead", "left")))
        seen: set[str] = set()
        for v in order:
            if not dialable(v.address) or v.address in seen:
                continue
            seen.add(v.address)
            known.append((v.node_id, v.address))
            if v.reachable or v.state not in ("dead", "left"):
                out.append((v.node_id, v.address))
        if not out:
            out = known
            if self.seed not in {a for _, a in out}:
                out.append((None, self.seed))
        return out

    def update(
        self, now: float, results: list[tuple[str | None, str, Reading | str]], seconds: float
    ) -> None:
        """Take one round: each target asked, with its Reading or why it gave none (one line)."""
        self.round += 1
        self.last_round_seconds = seconds
        first = self.round == 1
        answered: list[Reading] = []
        answering_at = {v.address: v for v in self.nodes.values() if v.reachable}
        for node_id, address, got in results:
            if isinstance(got, Reading):
                other = answering_at.get(address)
                if other is not None and other.node_id != got.node_id:  # a restart under a new id
                    other.reachable, other.error = False, f"{got.node_id} answers at its address now"
                self._answered(now, address, got, first)
                answered.append(got)
            elif node_id is not None and node_id in self.nodes:
                self._silent(now, self.nodes[node_id], got)
        self._merge_tables(now, answered, first)
        asked = {node_id for node_id, _, _ in results}
        for v in self.nodes.values():
            if v.reachable or v.node_id in asked:
                continue
            if not dialable(v.address):
                v.error = "its address is not HOST:PORT: not asked"
            elif v.state in ("dead", "left"):
                v.error = f"{v.state} in its peers' tables: not asked"
        self._update_edges(answered)
        self._layout()
        exchanges, nbytes = self._throughput(answered)
        self.series.append(
            {
                "round": self.round,
                "t": now,
                "spread": self._spread(answered),
                "exchanges_per_s": exchanges,
                "bytes_per_s": nbytes,
                "answering": len(answered),
                "round_seconds": round(seconds, 4),
            }
        )
        self.time = now

    def _view(self, node_id: str, address: str, rank: int) -> NodeView:
        return NodeView(node_id, address, rank, history=deque(maxlen=self.history))

    def _event(self, now: float, node_id: str, what: str) -> None:
        self.events.append({"t": now, "node_id": node_id, "what": what})

    def _answered(self, now: float, address: str, r: Reading, first: bool) -> None:
        v = self.nodes.get(r.node_id)
        if v is None:
            v = self.nodes[r.node_id] = self._view(r.node_id, address, r.rank)
            if not first:
                self._event(now, r.node_id, "joined")
        elif not v.reachable and v.reading is not None:
            self._event(now, r.node_id, "answers again")
        v.address, v.rank = address, r.rank
        if v.reading is not None and v.last_seen is not None:
            v.prev, v.prev_time = v.reading, v.last_seen
        v.reading, v.reachable, v.error, v.last_seen = r, True, "", now
        if r.store is not None:
            v.store = r.store
        v.history.append((self.round, now, r.step, r.loss, r.eval_accuracy))

    def _silent(self, now: float, v: NodeView, why: str) -> None:
        if v.reachable:
            self._event(now, v.node_id, "stopped answering the dashboard")
        v.reachable, v.error = False, why[:MAX_TEXT]

    def _merge_tables(self, now: float, answered: list[Reading], first: bool) -> None:
        """Member states from the answering nodes' tables (each one's own entry aside), with events."""
        votes: dict[str, list[str]] = {}
        for r in answered:
            for m in r.members:
                if not m.node_id or m.node_id == r.node_id:
                    continue
                votes.setdefault(m.node_id, []).append(m.state)
                v = self.nodes.get(m.node_id)
                if v is None:
                    if len(self.nodes) >= MAX_LIST:
                        continue
                    v = self.nodes[m.node_id] = self._view(m.node_id, m.address, m.rank)
                    if not first:
                        self._event(now, m.node_id, "joined")
                if not v.reachable:  # what a node says of its own address wins
                    v.address, v.rank = m.address, m.rank
        speaking = {r.node_id for r in answered}
        for node_id, v in self.nodes.items():
            if node_id in votes:
                state = merged_state(votes[node_id])
            elif node_id in speaking:
                state = "alive"  # nobody else lists it (yet): it speaks for itself
            else:
                continue
            if state != v.state:
                text = _EVENT_TEXT.get((state, v.state)) or _EVENT_TEXT.get((state, ""))
                if text and not first:  # the first round is the starting picture, not news
                    self._event(now, node_id, text)
                v.state = state

    def _edge(self, a: str, b: str) -> dict[str, bool] | None:
        if a == b or a not in self.nodes or b not in self.nodes:
            return None
        key = (a, b) if a < b else (b, a)
        e = self.edges.get(key)
        if e is None:
            if len(self.edges) >= 8 * MAX_LIST:
                return None
            e = self.edges[key] = {"current": False, "lit": False}
        return e

    def _update_edges(self, answered: list[Reading]) -> None:
        """Edges: each node's neighbours; lit when its count of exchanges with that peer grew."""
        for e in self.edges.values():
            e["current"] = e["lit"] = False
        for r in answered:
            for nb in r.neighbours:
                edge = self._edge(r.node_id, nb)
                if edge is not None:
                    edge["current"] = True
            prev = self.nodes[r.node_id].prev
            if prev is None:
                continue
            for peer, count in r.exchanged_with.items():
                if count > prev.exchanged_with.get(peer, 0):
                    edge = self._edge(r.node_id, peer)
                    if edge is not None:
                        edge["lit"] = True

    def _throughput(self, answered: list[Reading]) -> tuple[float | None, float | None]:
        """Exchanges/s (each counted once, by its caller) and bytes/s sent, summed over the nodes.

        Each node's rate is its counter's growth since its previous answer, over
        that time; a counter that went backwards (a restart) counts nothing.
        """
        exchanges = nbytes = 0.0
        rated = 0
        for r in answered:
            v = self.nodes[r.node_id]
            if v.prev is None or v.last_seen is None or v.last_seen <= v.prev_time:
                continue
            dt = v.last_seen - v.prev_time
            exchanges += max(0, r.exchanges_ok - v.prev.exchanges_ok) / dt
            nbytes += max(0, r.bytes_out - v.prev.bytes_out) / dt
            rated += 1
        return (round(exchanges, 3), round(nbytes, 1)) if rated else (None, None)

    def _spread(self, answered: list[Reading]) -> float | None:
        """The spread estimate over the largest group of answering nodes with one model layout."""
        groups: dict[tuple[str, int, int], list[Reading]] = {}
        for r in answered:
            if r.sample:
                groups.setdefault((r.fingerprint, r.parameters, len(r.sample)), []).append(r)
        if not groups:
            return None
        (_, parameters, _), rs = max(groups.items(), key=lambda kv: len(kv[1]))
        return spread_estimate([r.sample for r in rs], parameters)

    def _layout(self) -> None:
        """Nodes on a circle by rank, then id; recomputed only when the set of nodes changes."""
        order = sorted(self.nodes.values(), key=lambda v: (v.rank < 0, v.rank, v.node_id))
        ids = tuple(v.node_id for v in order)
        if ids == self._layout_for:
            return
        self._layout_for = ids
        for i, v in enumerate(order):
            angle = 2 * math.pi * i / len(order) - math.pi / 2
            v.x, v.y = round(math.cos(angle), 4), round(math.sin(angle), 4)

    # --- what /api/state sends -----------------------------------------------------------------

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """The page's data: everything current, and the history points of rounds after ``since``."""
        order = sorted(self.nodes.values(), key=lambda v: (v.rank < 0, v.rank, v.node_id))
        accuracy = any(v.reading is not None and v.reading.eval_accuracy is not None for v in order)
        return {
            "round": self.round,
            "time": self.time,
            "seed": self.seed,
            "color_by": "accuracy" if accuracy else "step",
            "spread_method": SPREAD_METHOD,
            "nodes": [self._node_json(v, since) for v in order],
            "edges": [{"a": a, "b": b, **e} for (a, b), e in self.edges.items()],
            "series": [p for p in self.series if p["round"] > since],
            "events": list(self.events),
            "store": self._store_json(),
        }

    @staticmethod
    def _node_json(v: NodeView, since: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": v.node_id,
            "address": v.address,
            "rank": v.rank,
            "x": v.x,
            "y": v.y,
            "reachable": v.reachable,
            "state": v.state or "unknown",
            "error": v.error,
            "last_seen": v.last_seen,
            "history": [list(h) for h in v.history if h[0] > since],
        }
        r = v.reading
        if r is not None:
            out.update(
                {
                    k: getattr(r, k)
                    for k in (
                        "phase",
                        "step",
                        "epoch",
                        "train_loss",
                        "eval_loss",
                        "eval_accuracy",
                        "topology",
                        "strategy",
                        "parameters",
                        "exchanges_ok",
                        "exchanges_served",
                        "exchanges_failed",
                        "exchanges_declined",
                        "bytes_in",
                        "bytes_out",
                        "training",
                        "resting",
                        "rtt_ms",
                    )
                }
            )
            if v.store is not None:
                s = v.store
                out["store"] = {
                    "versions": len(s.versions),
                    "latest": max(s.versions, default=None),
                    "shards_held": s.shards_held,
                    "bytes_held": s.bytes_held,
                    "under_replicated": len(s.under_replicated),
                }
        return out

    def _store_json(self) -> dict[str, Any] | None:
        """Store health over the nodes' last readings: versions known, under-replicated shards."""
        stores = [v.store for v in self.nodes.values() if v.store is not None]
        if not stores:
            return None
        versions = sorted({ver for s in stores for ver in s.versions}, reverse=True)
        return {
            "nodes": len(stores),
            "versions": versions[:20],
            "version_count": len(versions),
            "under_replicated": len({k for s in stores for k in s.under_replicated}),
            "shards_held": sum(s.shards_held for s in stores),
            "bytes_held": sum(s.bytes_held for s in stores),
        }
