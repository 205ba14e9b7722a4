"""Averaging rules as pure functions on tensors.

Real nodes call the single-model rules on flat 1-D parameter vectors; the
simulator calls the round functions on stacked (n, d) tensors, one row per node.
Both share the same arithmetic, so the simulator's numbers are the protocol's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from gossip.core.compress import Compressor

# Rows per chunk in consensus_distance: bounds the float64 temporary to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


# The share of the difference each side of a pairwise exchange takes.
PAIRWISE_SCALE = 0.5


def pairwise_difference(own_snapshot: Tensor, other_snapshot: Tensor) -> Tensor:
    """other - own: a pairwise exchange's change before its scale (one pass; nodes form it per chunk)."""
    _check_same_shape(own_snapshot, other_snapshot, "pairwise_difference")
    return torch.sub(other_snapshot, own_snapshot)


def pairwise_delta(own_snapshot: Tensor, other_snapshot: Tensor) -> Tensor:
    """The push-pull update (other - own) / 2, to add to one's *current* parameters.

    As a delta, one exchange preserves the sum of all models exactly even if
    training moved the parameters since the snapshot was cut. Scaling by 1/2 is
    exact in binary floating point, so a node that keeps the unscaled difference
    and applies it with ``apply_delta_(x, diff, PAIRWISE_SCALE)`` gets the same
    bits (one pass fewer per byte).
    """
    return pairwise_difference(own_snapshot, other_snapshot).mul_(PAIRWISE_SCALE)


def apply_delta_(x: Tensor, delta: Tensor, scale: float = 1.0) -> None:
    """x += scale * delta, in place (one pass: the scale is fused into the add)."""
    _check_same_shape(x, delta, "apply_delta_")
    x.add_(delta, alpha=scale)


def norm(tensors: Sequence[Tensor]) -> float:
    """The L2 norm of all ``tensors`` as one vector, in their own precision.

    One pass (4 ms per 100 MiB of float32 here; a float64 accumulation cost 130 ms):
    a ratio compared with a tolerance, or a figure for a status, needs no more.
    """
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def relative_norm(delta: Sequence[Tensor], x: Sequence[Tensor]) -> float:
    """||delta|| / ||x|| over matching tensors (inf when x is zero and delta is not)."""
    return norm_ratio(norm(delta), norm(x))


def norm_ratio(dn: float, xn: float) -> float:
    """``dn / xn``, with 0/0 = 0 and d/0 = inf."""
    if xn == 0.0:
        return 0.0 if dn == 0.0 else math.inf
    return dn / xn


def push_sum_split(w: float) -> tuple[float, float]:
    """Halve a push-sum weight into (kept, sent); de-biased values do not change on a split."""
    half = w / 2.0
    return half, w - half


def push_sum_merge_(z: Tensor, w: float, z_in: Tensor, w_in: float) -> float:
    """Absorb an incoming push-sum message into de-biased ``z`` in place; return the new weight.

    With numerators x = z*w, the merge x + x_in over w + w_in is the weighted
    mean z <- (z*w + z_in*w_in) / (w + w_in), computed without forming x.
    """
    _check_same_shape(z, z_in, "push_sum_merge_")
    if not (math.isfinite(w) and math.isfinite(w_in) and w > 0.0 and w_in >= 0.0):
        raise ValueError(f"push-sum weights must be finite, w > 0 and w_in >= 0, got {w} and {w_in}")
    total = w + w_in
    z.mul_(w / total).add_(z_in, alpha=w_in / total)
    return total


def _rows(x: Tensor) -> Tensor:
    if x.dim() == 0:
        raise ValueError("expected stacked models with a leading node dimension, got a scalar")
    return x.reshape(x.shape[0], -1)


def consensus_distance(x: Tensor) -> float:
    """mean_i ||x_i - x̄||^2 over the rows of stacked models ``x`` (n, ...), in float64."""
    rows = _rows(x)
    n, d = rows.shape
    if n == 0:
        return 0.0
    mean = rows.mean(dim=0, dtype=torch.float64)
    total = 0.0
    # Chunked so that a large (n, d) float32 stack is never copied whole into float64.
    for chunk in rows.split(max(1, _CHUNK_ELEMENTS // max(d, 1))):
        total += float((chunk.to(torch.float64) - mean).square().sum())
    return total / n


def mix_(x: Tensor, w: Tensor | np.ndarray) -> Tensor:
    """One synchronous round x <- W x on stacked ``x`` (n, ...), in place; returns ``x``.

    ``w`` may be a numpy array, a dense tensor, or a sparse (COO or CSR) tensor;
    sparse W keeps a round on a sparse graph O(edges * d) instead of O(n^2 * d).
    """
    rows = _rows(x)
    n = rows.shape[0]
    if tuple(w.shape) != (n, n):
        raise ValueError(f"mix_: W has shape {tuple(w.shape)}, expected ({n}, {n})")
    # Matrix products want float32/float64; half-precision models mix in float32.
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    wt = torch.as_tensor(w).to(device=x.device, dtype=dtype)
    src = rows.to(dtype)
    out = torch.sparse.mm(wt, src) if wt.is_sparse or wt.layout == torch.sparse_csr else wt @ src
    x.copy_(out.reshape(x.shape))
    return x


def random_matching(g: nx.Graph, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A random maximal matching of ``g``'s edges, for one round of pairwise gossip.

    Nodes are visited in random order and each unmatched node pairs with a
    uniformly chosen unmatched neighbour, as if every node called a random free
    peer. Maximal: when a node is left alone, all its neighbours were taken.
    Directed graphs are read as undirected.
    """
    adj = g.to_undirected(as_view=True).adj if g.is_directed() else g.adj
    nodes = list(g.nodes)
    matched: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in rng.permutation(len(nodes)):
        u = nodes[k]
        if u in matched:
            continue
        free = [v for v in adj[u] if v != u and v not in matched]
        if free:
            v = free[int(rng.integers(len(free)))]
            matched.update((u, v))
            pairs.append((u, v))
    return pairs


def pairwise_round_(x: Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """Average each pair (i, j) of rows of stacked ``x`` in place, in list order.

    Disjoint pairs (a matching) are applied at once; overlapping pairs fall back
    to one exchange after another, which is what sequential gossip would do.
    """
    pairs = [(int(i), int(j)) for i, j in pairs if i != j]
    if not pairs:
        return
    ends = [v for p in pairs for v in p]
    if len(set(ends)) == len(ends):
        idx = torch.tensor(pairs, dtype=torch.long, device=x.device)
        average_pairs_(x, idx[:, 0], idx[:, 1])
        return
    for i, j in pairs:
        mean = (x[i] + x[j]) * 0.5
        x[i] = mean
        x[j] = mean


def push_sum_round_(x: Tensor, w: Tensor, out_peer: Sequence[int] | Tensor) -> None:
    """One synchronous push-sum round on stacked de-biased ``x`` (n, ...) and weights ``w`` (n,).

    Node i keeps half of (x_i*w_i, w_i) and sends half to ``out_peer[i]``
    (itself allowed, which keeps everything). Both tensors change in place; the
    mass sum_i x_i*w_i and the weight sum_i w_i are conserved.
    """
    n = x.shape[0]
    if w.shape != (n,):
        raise ValueError(f"push_sum_round_: weights have shape {tuple(w.shape)}, expected ({n},)")
    peers = torch.as_tensor(out_peer, dtype=torch.long, device=x.device)
    if peers.shape != (n,):
        raise ValueError(f"push_sum_round_: {peers.numel()} out-peers for {n} nodes")
    if n and (int(peers.min()) < 0 or int(peers.max()) >= n):
        raise ValueError("push_sum_round_: out-peer out of range")
    col = (-1,) + (1,) * (x.dim() - 1)
    half_w = w * 0.5
    half_num = x * half_w.to(x.dtype).view(col)
    num = half_num.index_add(0, peers, half_num)
    w.copy_(half_w.index_add(0, peers, half_w))
    x.copy_(num / w.to(x.dtype).view(col))


def random_matching_edges(u: Tensor, v: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random maximal matching of the edges (u[k], v[k]) on nodes 0..n-1, as a boolean edge mask.

    The vectorized counterpart of :func:`random_matching` for the simulator
    (Luby's algorithm): every remaining edge draws a distinct random rank and
    joins the matching when it ranks first among the remaining edges at both its
    ends; edges that touch a matched node drop out; repeat until none remain,
    in O(log edges) passes of tensor operations and no loop over nodes. Like
    :func:`random_matching` the result is maximal; the two draw matchings with
    somewhat different probabilities.
    """
    if u.shape != v.shape or u.dim() != 1:
        raise ValueError(
            f"random_matching_edges: u and v must be 1-D of one length, got {u.shape} and {v.shape}"
        )
    chosen = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    matched = torch.zeros(n, dtype=torch.bool, device=u.device)
    remaining = torch.nonzero(u != v).flatten()
    while remaining.numel():
        ru, rv = u[remaining], v[remaining]
        # A permutation gives distinct ranks: two edges at one node can never both win.
        rank = torch.randperm(remaining.numel(), generator=generator, device=u.device)
        best = torch.full((n,), remaining.numel(), dtype=rank.dtype, device=u.device)
        best.scatter_reduce_(0, ru, rank, "amin").scatter_reduce_(0, rv, rank, "amin")
        win = (best[ru] == rank) & (best[rv] == rank)
        chosen[remaining[win]] = True
        matched[ru[win]] = True
        matched[rv[win]] = True
        remaining = remaining[~(matched[ru] | matched[rv])]
    return chosen


def average_pairs_(
    x: Tensor,
    first: Tensor,
    second: Tensor,
    update_first: Tensor | None = None,
    update_second: Tensor | None = None,
) -> None:
    """Average rows first[k] and second[k] of stacked ``x`` in place, for disjoint pairs.

    The matching form of :func:`pairwise_round_`. ``update_first`` and
    ``update_second`` (boolean, one per pair) say which side takes the mean: an
    exchange whose last message was lost leaves one side averaged and the other
    as it was, which is what the push-pull protocol does when its commit is lost.
    """
    if first.shape != second.shape:
        raise ValueError(f"average_pairs_: {first.numel()} first ends but {second.numel()} second ends")
    mean = (x[first] + x[second]) * 0.5
    if update_first is None:
        x[first] = mean
    else:
        x[first[update_first]] = mean[update_first]
    if update_second is None:
        x[second] = mean
    else:
        x[second[update_second]] = mean[update_second]


def push_sum_round_lossy_(x: Tensor, w: Tensor, out_peer: Tensor, delivered: Tensor, acked: Tensor) -> None:
    """One push-sum round in which messages and acknowledgements may be lost.

    Node i sends half of its weight, with its de-biased ``x[i]``, to
    ``out_peer[i]``. The receiver merges it only if ``delivered[i]``; the
    sender gives up its half only if ``acked[i]`` (and the message was
    delivered), as a real node keeps its half until the send is acknowledged.
    So a lost message changes nothing, and a lost acknowledgement duplicates
    the half: numerator and weight always travel together, so every ``x[i]``
    stays a weighted mean of the models (no bias towards zero), while the sums
    of weight and mass grow by the duplicate. With everything delivered and
    acknowledged this is :func:`push_sum_round_`.
    """
    n = x.shape[0]
    if w.shape != (n,) or out_peer.shape != (n,) or delivered.shape != (n,) or acked.shape != (n,):
        raise ValueError(f"push_sum_round_lossy_: weights, peers and masks must have shape ({n},)")
    col = (-1,) + (1,) * (x.dim() - 1)
    sent = w * 0.5 * delivered.to(w.dtype)
    kept = w - sent * acked.to(w.dtype)
    num = x * kept.to(x.dtype).view(col)
    num.index_add_(0, out_peer, x * sent.to(x.dtype).view(col))
    w.copy_(kept.index_add(0, out_peer, sent))
    x.copy_(num / w.to(x.dtype).view(col))


def choco_round_(
    x: Tensor, x_hat: Tensor, w: Tensor, compressor: Compressor, gens: Sequence[torch.Generator], gamma: float
) -> list[int]:
    """One round of CHOCO-Gossip (Koloskova, Stich, Jaggi 2019, Algorithm 1) on stacked (n, d) rows.

    Each node i sends q_i = Q(x_i - x̂_i) to its neighbours; everyone adds q_i to its
    copy of x̂_i (the copies stay equal: q is the decoded payload), then
    x_i += γ Σ_j w_ij (x̂_j - x̂_i). The compression error is fed back through x̂:
    what was not sent this round is still in x_i - x̂_i next round, so the models
    reach exact consensus with any compressor for a small enough γ, and the sum of
    the models is preserved when W is doubly stochastic. Returns each node's
    payload size in bytes (sent once to each neighbour).
    """
    _check_same_shape(x, x_hat, "choco_round_")
    sizes = []
    for i in range(x.shape[0]):
        payload, q = compressor.compress(x[i] - x_hat[i], gens[i])
        x_hat[i] += q.to(x_hat.dtype)
        sizes.append(len(payload))
    x.add_(w @ x_hat - x_hat, alpha=gamma)
    return sizes
