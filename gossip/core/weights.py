"""Mixing weights on an undirected graph: Metropolis-Hastings and max-degree (uniform)."""

from __future__ import annotations

import networkx as nx
import numpy as np


class WeightsError(ValueError):
    """A graph mixing weights cannot be built for."""


def edge_index(g: nx.Graph) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    if g.is_directed():
        raise WeightsError("mixing weights need an undirected graph")
    index = {v: i for i, v in enumerate(g)}
    edges = nx.Graph(g).edges if g.is_multigraph() else g.edges
    pairs = np.array([(index[u], index[v]) for u, v in edges if u != v], dtype=np.int64)
    pairs = pairs.reshape(-1, 2)
    u, v = pairs[:, 0], pairs[:, 1]
    deg = np.bincount(u, minlength=len(index)) + np.bincount(v, minlength=len(index))
    return len(index), u, v, deg


def from_edge_weights(n: int, u: np.ndarray, v: np.ndarray, weights: np.ndarray) -> np.ndarray:
    w = np.zeros((n, n))
    w[u, v] = weights
    w[v, u] = weights
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w


def metropolis_hastings(g: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings weights: W_ij = 1/(1 + max(d_i, d_j)) on edges, W_ii = 1 - row sum.

    Rows follow ``g``'s node order (ranks for Topology graphs); self-loops are ignored.
    """
    n, u, v, deg = edge_index(g)
    return from_edge_weights(n, u, v, 1.0 / (1.0 + np.maximum(deg[u], deg[v])))


def uniform_weights(g: nx.Graph) -> np.ndarray:
    """Max-degree weights: W_ij = 1/(1 + d_max) on edges, W_ii = 1 - d_i/(1 + d_max).

    The +1 keeps every W_ii positive, so W is aperiodic even on bipartite regular
    graphs (an even ring), where 1/d_max would leave an eigenvalue at -1.
    """
    n, u, v, deg = edge_index(g)
    d_max = int(deg.max()) if n else 0
    return from_edge_weights(n, u, v, np.full(len(u), 1.0 / (1.0 + d_max)))
