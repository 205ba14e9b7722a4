"""Communication graphs by name and their mixing matrices (spectral facts: ``spectral``).

A topology turns ranks 0..n-1 into neighbourhoods. Every graph here is simple,
undirected and connected, except one-peer exponential, which is directed and
changes every round. The numbers computed here (|λ2|, the spectral gap) are what
experiments are checked against, so they are computed exactly (dense
eigenvalues or closed forms), never estimated by iteration.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from gossip.core.weights import edge_index, metropolis_hastings, uniform_weights


class TopologyError(ValueError):
    """A topology spec or size that cannot be built; the message is one line."""


TOPOLOGY_NAMES: tuple[str, ...] = (
    "ring",
    "torus",
    "hypercube",
    "exponential",
    "one-peer-exponential",
    "complete",
    "star",
    "random-regular",
    "erdos-renyi",
    "small-world",
    "random",
)

# The accepted spellings, for help texts and error messages.
TOPOLOGY_SPECS: tuple[str, ...] = (
    *TOPOLOGY_NAMES[:7],
    "random-regular:D",
    "erdos-renyi:P",
    "small-world[:K,P]",
    "random",
    "PATH.{edgelist,adjlist,graphml,gml}",
)

MIXING_RULES: tuple[str, ...] = ("metropolis", "uniform")


def _read_gml(path: Path) -> nx.Graph:
    try:
        return nx.read_gml(path)
    except nx.NetworkXError:
        # Some nodes lack a 'label' attribute: fall back to the numeric GML ids.
        return nx.read_gml(path, label=None)


_READERS: dict[str, Any] = {
    # data=False ignores extra columns such as weights instead of failing on them.
    ".edgelist": lambda p: nx.read_edgelist(p, nodetype=str, data=False),
    ".edges": lambda p: nx.read_edgelist(p, nodetype=str, data=False),
    ".adjlist": lambda p: nx.read_adjlist(p, nodetype=str),
    ".graphml": nx.read_graphml,
    ".gml": _read_gml,
}


RING_LIKE = frozenset({"ring", "exponential", "one-peer-exponential", "small-world", "complete", "random"})
# Complete graphs are handled arithmetically: at thousands of nodes the networkx graph
# alone takes seconds and hundreds of MiB, and nothing but graph() needs it.
COMPLETE = frozenset({"complete", "random"})
_RANDOM = frozenset({"random-regular", "erdos-renyi", "small-world"})
_SMALL_WORLD_DEFAULTS = (4.0, 0.1)
# Random graphs are redrawn with seed, seed+1, ... until connected.
_MAX_TRIES = 100


def ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def one_peer_exponential_partner(rank: int, n: int, t: int) -> int:
    """The out-peer of ``rank`` at round ``t``: (rank + 2^(t mod ceil(log2 n))) mod n."""
    return (rank + (1 << (t % max(1, ceil_log2(n))))) % n


def one_peer_exponential_partners(n: int, t: int) -> np.ndarray:
    """The out-peers of all ranks at round ``t``, as :func:`one_peer_exponential_partner` for each."""
    return (np.arange(n, dtype=np.int64) + (1 << (t % max(1, ceil_log2(n))))) % n


def _one_peer_in_peer(rank: int, n: int, t: int) -> int:
    return (rank - (1 << (t % max(1, ceil_log2(n))))) % n


def _number(text: str, kind: type[int] | type[float], spec: str) -> float:
    try:
        return float(kind(text))
    except ValueError:
        raise TopologyError(f"cannot read {text!r} in {spec!r} as {kind.__name__}") from None


def _parse_spec(spec: str) -> tuple[str, tuple[float, ...]]:
    """Split a spec into (name, numeric arguments); 'file' stands for a graph file."""
    # The suffix first: file names may contain ':' (host:port.edgelist), names never end in one.
    if Path(spec).suffix.lower() in _READERS:
        return "file", ()
    head, sep, tail = spec.strip().partition(":")
    name = head.lower()
    if name not in TOPOLOGY_NAMES:
        raise TopologyError(f"unknown topology {spec!r}; expected one of {', '.join(TOPOLOGY_SPECS)}")
    parts = [p.strip() for p in tail.split(",")] if sep else []
    if name == "random-regular":
        if len(parts) != 1:
            raise TopologyError(f"random-regular needs one degree, e.g. random-regular:4, got {spec!r}")
        return name, (_number(parts[0], int, spec),)
    if name == "erdos-renyi":
        if len(parts) != 1:
            raise TopologyError(f"erdos-renyi needs one probability, e.g. erdos-renyi:0.3, got {spec!r}")
        p = _number(parts[0], float, spec)
        if not 0.0 < p <= 1.0:
            raise TopologyError(f"erdos-renyi probability must be in (0, 1], got {p}")
        return name, (p,)
    if name == "small-world":
        if len(parts) > 2:
            raise TopologyError(f"small-world takes at most K,P, e.g. small-world:4,0.1, got {spec!r}")
        k = _number(parts[0], int, spec) if parts else _SMALL_WORLD_DEFAULTS[0]
        p = _number(parts[1], float, spec) if len(parts) == 2 else _SMALL_WORLD_DEFAULTS[1]
        if not 0.0 <= p <= 1.0:
            raise TopologyError(f"small-world rewiring probability must be in [0, 1], got {p}")
        return name, (k, p)
    if sep:
        raise TopologyError(f"{name} takes no parameters, got {spec!r}")
    return name, ()


def _torus_shape(n: int) -> tuple[int, int]:
    """The closest factor pair a <= b of n, both at least 3 (smaller sides give multi-edges)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if a < 3:
        # a is the largest divisor <= sqrt(n), so no other factorisation can work either.
        def ok(m: int) -> bool:
            return max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0) >= 3

        below = next((m for m in range(n - 1, 8, -1) if ok(m)), None)
        above = next(m for m in range(max(n + 1, 9), 2 * n + 10) if ok(m))
        hint = f"{below} or {above}" if below else str(above)
        raise TopologyError(f"torus needs n = a*b with a, b >= 3, got {n}; try {hint}")
    return a, n // a


def _check_size(name: str, args: tuple[float, ...], n: int) -> None:
    if name == "torus":
        _torus_shape(n)
    elif name == "hypercube" and n & (n - 1):
        low = 1 << (n.bit_length() - 1)
        raise TopologyError(
            f"hypercube needs a power-of-two number of nodes, got {n}; try {low} or {2 * low}"
        )
    elif name == "random-regular":
        d = int(args[0])
        if not 1 <= d < n:
            raise TopologyError(f"random-regular:{d} needs 1 <= D < n, got n={n}")
        if n * d % 2:
            raise TopologyError(f"random-regular:{d} needs n*D even, got n={n}")
    elif name == "small-world":
        k = int(args[0])
        if k < 2 or k % 2 or k >= n:
            raise TopologyError(f"small-world:{k} needs an even K with 2 <= K < n, got n={n}")


def _simple_graph(n: int, edges: Any) -> nx.Graph:
    """A graph on ranks 0..n-1 in order, without self-loops, so rows of W follow ranks."""
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from((u, v) for u, v in edges if u != v)
    return g


def _retry_connected(make: Any, what: str, n: int, seed: int, hint: str) -> nx.Graph:
    for s in range(seed, seed + _MAX_TRIES):
        g = make(s)
        if nx.is_connected(g):
            return g
    raise TopologyError(
        f"{what} on {n} nodes stayed disconnected for seeds {seed}..{seed + _MAX_TRIES - 1}; {hint}"
    )


def _build(name: str, args: tuple[float, ...], n: int, seed: int) -> nx.Graph:
    if name == "ring":
        edges: Any = [(i, (i + 1) % n) for i in range(n)]
    elif name == "torus":
        a, b = _torus_shape(n)
        edges = [(r * b + c, r * b + (c + 1) % b) for r in range(a) for c in range(b)]
        edges += [(r * b + c, ((r + 1) % a) * b + c) for r in range(a) for c in range(b)]
    elif name == "hypercube":
        edges = [(i, i ^ (1 << j)) for i in range(n) for j in range(n.bit_length() - 1)]
    elif name == "exponential":
        edges = [(i, (i + (1 << k)) % n) for i in range(n) for k in range(ceil_log2(n))]
    elif name in ("complete", "random"):
        edges = nx.complete_graph(n).edges
    elif name == "star":
        edges = [(0, i) for i in range(1, n)]
    elif name == "random-regular":
        d = int(args[0])
        edges = _retry_connected(
            lambda s: nx.random_regular_graph(d, n, seed=s),
            f"random-regular:{d}",
            n,
            seed,
            "use D >= 3",
        ).edges
    elif name == "erdos-renyi":
        p = args[0]
        hint = f"raise P above ln(n)/n = {np.log(max(n, 2)) / n:.3g}"
        edges = _retry_connected(
            lambda s: nx.gnp_random_graph(n, p, seed=s), f"erdos-renyi:{p}", n, seed, hint
        ).edges
    elif name == "small-world":
        k, p = int(args[0]), args[1]
        try:
            edges = nx.connected_watts_strogatz_graph(n, k, p, tries=_MAX_TRIES, seed=seed).edges
        except nx.NetworkXError as e:
            raise TopologyError(f"small-world:{k},{p} on {n} nodes: {e}") from None
    else:
        raise AssertionError(f"no builder for {name}")
    return _simple_graph(n, edges)


def _label_key(label: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    # Natural order, so "node-2" comes before "node-10" and numeric labels sort as numbers.
    parts = re.split(r"(\d+)", label)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p), label


def _read_graph_file(path: str, n: int | None) -> tuple[nx.Graph, tuple[str, ...]]:
    p = Path(path)
    if not p.is_file():
        raise TopologyError(f"graph file {path} not found")
    try:
        raw = _READERS[p.suffix.lower()](p)
    except (OSError, nx.NetworkXError, ValueError, TypeError, KeyError) as e:
        raise TopologyError(f"cannot read graph file {path}: {e}") from None
    names = {v: str(v) for v in raw}
    labels = tuple(sorted(set(names.values()), key=_label_key))
    if len(labels) != len(names):
        raise TopologyError(f"graph file {path} has nodes whose labels collide as strings")
    if not labels:
        raise TopologyError(f"graph file {path} has no nodes")
    rank = {lab: i for i, lab in enumerate(labels)}
    g = _simple_graph(len(labels), ((rank[names[u]], rank[names[v]]) for u, v in raw.edges()))
    if not nx.is_connected(g):
        parts = nx.number_connected_components(g)
        raise TopologyError(f"graph file {path} is not connected ({parts} components)")
    if n is not None and n != len(labels):
        raise TopologyError(f"graph file {path} has {len(labels)} nodes, but n={n} was given")
    return g, labels


@dataclass(frozen=True)
class Topology:
    """A named graph on ranks 0..n-1; build it with :meth:`parse`.

    ``ring`` on 2 nodes is the single edge 0-1 (a simple graph has no double
    edge), which mixes like ``complete``; on 1 node every graph is a single node.
    ``random`` has the complete graph's semantics: any alive member is a
    neighbour, and its mixing matrix is the complete graph's.
    """

    spec: str
    n: int
    seed: int = 0
    # Graphs and matrices are built lazily and kept; compare=False keeps equality and hash on the fields.
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            n = operator.index(self.n)
        except TypeError:
            raise TopologyError(f"number of nodes must be an integer, got {self.n!r}") from None
        if isinstance(self.n, bool) or n < 1:
            raise TopologyError(f"number of nodes must be at least 1, got {self.n!r}")
        object.__setattr__(self, "n", n)
        name, args = _parse_spec(self.spec)
        if name != "file":
            _check_size(name, args, n)
        self._cache["spec"] = (name, args)

    @classmethod
    def parse(cls, spec: str, n: int | None, seed: int = 0) -> Topology:
        """Validate ``spec`` and ``n`` and build the graph; ``n`` may be None only for a graph file."""
        name, _ = _parse_spec(spec)
        if name == "file":
            g, labels = _read_graph_file(spec, n)
            top = cls(spec, g.number_of_nodes(), seed)
            top._cache["labels"] = labels
            top._cache["static"] = nx.freeze(g)
            return top
        if n is None:
            raise TopologyError(f"topology {spec!r} needs a number of nodes")
        top = cls(spec, n, seed)
        if name in _RANDOM:
            # Built now so that a disconnected random graph fails here, not mid-run.
            top.graph()
        return top

    @property
    def name(self) -> str:
        """The base name ('ring', 'random-regular', ...), or 'file' for a graph file."""
        return str(self._cache["spec"][0])

    @property
    def time_varying(self) -> bool:
        return self.name == "one-peer-exponential"

    @property
    def directed(self) -> bool:
        return self.name == "one-peer-exponential"

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Node labels of a graph file in rank order (natural sort order); None otherwise."""
        if self.name != "file":
            return None
        self._static()
        labels: tuple[str, ...] = self._cache["labels"]
        return labels

    def period(self) -> int:
        """Rounds after which the graph sequence repeats."""
        return max(1, ceil_log2(self.n)) if self.time_varying else 1

    def _static(self) -> nx.Graph:
        if "static" not in self._cache:
            name, args = self._cache["spec"]
            if name == "file":
                g, self._cache["labels"] = _read_graph_file(self.spec, self.n)
            elif name == "one-peer-exponential":
                g = _simple_graph(self.n, [])
            else:
                g = _build(name, args, self.n, self.seed)
            self._cache["static"] = nx.freeze(g)
        return self._cache["static"]

    def graph(self, t: int = 0) -> nx.Graph | nx.DiGraph:
        """The (frozen) graph used at round ``t``, with ranks as node ids."""
        if not self.time_varying:
            return self._static()
        key = ("graph", t % self.period())
        if key not in self._cache:
            g = nx.DiGraph()
            g.add_nodes_from(range(self.n))
            if self.n > 1:
                g.add_edges_from((i, one_peer_exponential_partner(i, self.n, t)) for i in range(self.n))
            self._cache[key] = nx.freeze(g)
        return self._cache[key]

    def union_graph(self) -> nx.Graph:
        """The undirected union of the graphs over one period."""
        if not self.time_varying:
            return self._static()
        edges = [e for t in range(self.period()) for e in self.graph(t).edges]
        return _simple_graph(self.n, edges)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.n:
            raise TopologyError(f"rank {rank} out of range for {self.n} nodes")

    def neighbors(self, rank: int, t: int = 0) -> list[int]:
        """Ranks ``rank`` talks to at round ``t``; for one-peer exponential both its out- and in-peer."""
        self._check_rank(rank)
        if self.time_varying:
            peers = {one_peer_exponential_partner(rank, self.n, t), _one_peer_in_peer(rank, self.n, t)}
            return sorted(peers - {rank})
        if self.name in COMPLETE:
            return [*range(rank), *range(rank + 1, self.n)]
        if "adj" not in self._cache:
            g = self._static()
            self._cache["adj"] = [sorted(g.adj[i]) for i in range(self.n)]
        return list(self._cache["adj"][rank])

    def out_neighbors(self, rank: int, t: int = 0) -> list[int]:
        """Ranks ``rank`` may push to at round ``t`` (push-sum); the neighbours on undirected graphs."""
        if not self.time_varying:
            return self.neighbors(rank, t)
        self._check_rank(rank)
        return [one_peer_exponential_partner(rank, self.n, t)] if self.n > 1 else []

    def mixing_matrix(self, t: int = 0, rule: str = "metropolis") -> np.ndarray:
        """The n x n float64 mixing matrix W of round ``t``: x <- W x averages one round.

        Undirected graphs give a symmetric doubly stochastic W by ``rule``. One-peer
        exponential ignores ``rule``: W_t = (I + P_t)/2, where row i takes half of
        its in-peer's value; it is circulant and doubly stochastic.
        """
        if rule not in MIXING_RULES:
            raise TopologyError(f"unknown mixing rule {rule!r}; expected one of {', '.join(MIXING_RULES)}")
        key = ("w", rule if not self.time_varying else "one-peer", t % self.period())
        if key not in self._cache:
            if self.time_varying:
                w = 0.5 * np.eye(self.n)
                rows = np.arange(self.n)
                cols = np.array([_one_peer_in_peer(i, self.n, t) for i in range(self.n)])
                np.add.at(w, (rows, cols), 0.5)
            elif self.name in COMPLETE:
                # Both rules give 1/n everywhere; written directly so it is exact.
                w = np.full((self.n, self.n), 1.0 / self.n)
            elif rule == "metropolis":
                w = metropolis_hastings(self._static())
            else:
                w = uniform_weights(self._static())
            self._cache[key] = w
        # A copy: callers (the simulator) may scale or cast it in place.
        return np.array(self._cache[key])

    def mixing_entries(
        self, t: int = 0, rule: str = "metropolis"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of :meth:`mixing_matrix` as (rows, cols, values), sorted by row then column.

        Every off-diagonal edge weight and every diagonal entry is listed, so
        a simulator can rescale them per round (lost messages, dead nodes)
        without building the dense n x n matrix, which at thousands of nodes
        costs far more than the graph.
        """
        if rule not in MIXING_RULES:
            raise TopologyError(f"unknown mixing rule {rule!r}; expected one of {', '.join(MIXING_RULES)}")
        n = self.n
        diag = np.arange(n, dtype=np.int64)
        if self.time_varying or self.name in COMPLETE:
            w = self.mixing_matrix(t, rule)
            rows, cols = np.nonzero(w)
            rows = np.concatenate([rows, diag])
            cols = np.concatenate([cols, diag])
            keep = np.unique(rows * n + cols)
            rows, cols = keep // n, keep % n
            return rows, cols, w[rows, cols]
        _, u, v, deg = edge_index(self._static())
        if rule == "metropolis":
            weights = 1.0 / (1.0 + np.maximum(deg[u], deg[v]))
        else:
            weights = np.full(len(u), 1.0 / (1.0 + (int(deg.max()) if n else 0)))
        self_weight = 1.0 - np.bincount(u, weights, minlength=n) - np.bincount(v, weights, minlength=n)
        rows = np.concatenate([u, v, diag])
        cols = np.concatenate([v, u, diag])
        values = np.concatenate([weights, weights, self_weight])
        order = np.lexsort((cols, rows))
        return rows[order], cols[order], values[order]
