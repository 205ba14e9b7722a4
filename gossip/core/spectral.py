"""Spectral facts of a topology: |λ2|, the gap, and the summary experiments report.

These are the ground truth experiments are checked against: gossip averaging on
W shrinks the consensus distance by about |λ2|² per round.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from gossip.core.topology import COMPLETE, RING_LIKE, Topology, ceil_log2


def second_eigenvalue(w: np.ndarray) -> float:
    """|λ2| of a mixing matrix, the per-round contraction factor of gossip averaging.

    For a symmetric W: the second largest eigenvalue magnitude. For a non-symmetric
    W: the spectral norm of W - 11^T/n, which bounds the contraction of the
    disagreement per round (eigenvalues alone do not); for normal matrices such as
    the circulant one-peer exponential W the two agree.
    """
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    if n < 2:
        return 0.0
    if np.allclose(w, w.T, rtol=0.0, atol=1e-12):
        mags = np.sort(np.abs(np.linalg.eigvalsh((w + w.T) / 2)))
        return float(mags[-2])
    return float(np.linalg.norm(w - 1.0 / n, ord=2))


def spectral_gap(w: np.ndarray) -> float:
    """1 - |λ2|; zero for a disconnected graph."""
    return 1.0 - second_eigenvalue(w)


def _diameter(g: nx.Graph) -> int:
    """Exact diameter by breadth-first search from every node, in scipy's C code."""
    from scipy.sparse.csgraph import shortest_path

    n = g.number_of_nodes()
    if n < 2:
        return 0
    adj = nx.to_scipy_sparse_array(g, nodelist=range(n), format="csr")
    # Sources in chunks keep the distance block near 4M entries on large graphs.
    step = max(1, (1 << 22) // n)
    return max(
        int(shortest_path(adj, directed=False, unweighted=True, indices=range(i, min(i + step, n))).max())
        for i in range(0, n, step)
    )


def _one_peer_rate(n: int) -> float:
    """Per-round contraction of one-peer exponential over a period, from its Fourier modes.

    Every W_t is circulant, so the period product is too and is diagonal in the
    Fourier basis: mode k shrinks by prod_s |cos(pi * k * 2^s / n)|. Modular
    integers keep the product exactly 0 where the theory says so (n = 2^k);
    cos(pi/2) in floating point is 6e-17, not 0.
    """
    tau = max(1, ceil_log2(n))
    k = np.arange(1, n, dtype=np.int64)
    factor = np.ones(n - 1)
    for s in range(tau):
        m = (k << s) % n
        factor *= np.where(2 * m == n, 0.0, np.abs(np.cos(np.pi * m / n)))
    return float(factor.max() ** (1.0 / tau)) if n > 1 else 0.0


def describe(top: Topology, rule: str = "metropolis") -> dict[str, float | int | str]:
    """Summary numbers of a topology, as experiments report them.

    Edges, degrees and diameter are of the union graph over one period. For
    one-peer exponential, lambda2 is the per-round factor over a period,
    ||W_{τ-1}...W_0 - 11^T/n||^(1/τ) (zero on 2^k nodes), and rule is 'one-peer'.
    """
    n = top.n
    if top.name in COMPLETE:
        edges, degrees, diameter = n * (n - 1) // 2, [n - 1], min(1, n - 1)
    else:
        g = top.union_graph()
        edges, degrees, diameter = g.number_of_edges(), [d for _, d in g.degree()], _diameter(g)
    if top.time_varying:
        lam, rule = _one_peer_rate(n), "one-peer"
    else:
        lam = second_eigenvalue(top.mixing_matrix(0, rule))
    return {
        "topology": top.name,
        "spec": top.spec,
        "nodes": n,
        "edges": edges,
        "degree_min": min(degrees),
        "degree_max": max(degrees),
        "diameter": diameter,
        "period": top.period(),
        "lambda2": lam,
        "spectral_gap": 1.0 - lam,
        "rule": rule,
    }


def draw(top: Topology, path: str) -> None:
    """Save a PNG drawing: a circle for ring-like graphs, a spring layout otherwise.

    Rendered on a bare Agg canvas (no pyplot), so it changes no global backend and
    is safe off the main thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if top.time_varying:
        g: nx.Graph = nx.DiGraph()
        g.add_nodes_from(range(top.n))
        g.add_edges_from(e for t in range(top.period()) for e in top.graph(t).edges)
    else:
        g = top.graph()
    pos = nx.circular_layout(g) if top.name in RING_LIKE else nx.spring_layout(g, seed=top.seed)
    labels = dict(enumerate(top.labels)) if top.labels else None
    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    small = top.n <= 64
    nx.draw_networkx(
        g,
        pos,
        ax=ax,
        with_labels=small,
        labels=labels if small else None,
        node_size=300 if small else 30,
        font_size=8,
        arrows=top.directed,
    )
    ax.set_title(f"{top.spec} (n={top.n})")
    ax.set_axis_off()
    fig.savefig(path, format="png", dpi=100)
