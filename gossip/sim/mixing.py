"""One round of averaging for all N simulated nodes at once, with faults.

A mixer reads the round's snapshot ``x`` (n, d), one row per node, and
returns the mixed stack as a new tensor; the training loop adds the round's
local updates on top, which is the delta semantics of the real nodes (an
exchange moves a node by ``mixed(snapshot) - snapshot``, whatever training did
meanwhile). The arithmetic is that of :mod:`gossip.core.averaging` and the graphs,
weights and schedules are those of :mod:`gossip.core.topology`.

Faults, per round: ``active`` marks the nodes that take part (dead nodes and
stragglers that miss the round do not), and every message is lost with
probability ``loss``, independently. What each strategy then does:

- sync (D-PSGD): row i of W needs x_j from each neighbour j; a message that
  is lost, or that an inactive node never sent, leaves its weight W_ij on x_i
  itself, so every row still sums to one. An inactive node keeps its row.
  Dead nodes are never detected: their neighbours keep waiting for them and
  weighting themselves instead. Loss makes W non-symmetric, so the average
  drifts; with no loss, dead nodes only leave the alive average untouched.
- pairwise (push-pull): a random maximal matching of the edges between active
  nodes (a busy or dead peer is not picked, as real nodes pick among alive
  members); the initiator's request, the answer and the commit are three
  messages. Request or answer lost: nobody moves. Commit lost: the initiator
  averaged, the other side did not, and the sum of the models changes.
- push-sum: each active node sends half its weight to one out-peer (the
  one-peer exponential schedule, or a random active neighbour on static
  graphs). A lost message changes nothing (the sender keeps its half until
  acknowledged), so the sums of weights and of weighted models are conserved
  exactly; a lost acknowledgement duplicates the half, which keeps every
  de-biased model a weighted mean of models but moves the consensus value.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from gossip.core import averaging, choco
from gossip.core.compress import Compressor
from gossip.core.topology import Topology, one_peer_exponential_partners

STRATEGIES: tuple[str, ...] = ("sync", "pairwise", "push-sum")

# Dense W when more than this fraction of its entries is non-zero: a dense
# matrix product then beats the sparse one.
_DENSE_FILL = 0.125


def _complete(top: Topology) -> bool:
    return top.name in ("complete", "random")


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


class Mixer:
    """Base of the strategies; ``mix`` returns (mixed stack, payload messages sent)."""

    name: ClassVar[str] = ""

    def __init__(
        self, top: Topology, generator: torch.Generator, rule: str = "metropolis", loss: float = 0.0
    ):
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"message loss must be in [0, 1), got {loss}")
        self.top = top
        self.n = top.n
        self.gen = generator
        self.rule = rule
        self.loss = loss

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        raise NotImplementedError

    def average(self, x: Tensor, alive: Tensor | None = None) -> Tensor:
        """The network's average model over ``alive`` rows (all when None)."""
        rows = x if alive is None else x[alive]
        return rows.mean(dim=0)

    def _kept(self, k: int) -> Tensor:
        """k independent 'message arrived' draws."""
        if self.loss == 0.0:
            return torch.ones(k, dtype=torch.bool)
        return _uniform(k, self.gen) >= self.loss


class _Entries:
    """W's entries (rows sorted) as tensors, and W itself as a dense or CSR tensor."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int, dtype: torch.dtype):
        self.n = n
        self.rows = torch.from_numpy(rows)
        self.cols = torch.from_numpy(cols)
        self.values = torch.from_numpy(values).to(dtype)
        self.off = self.rows != self.cols
        self.diag = torch.nonzero(~self.off).flatten()  # one per row, in row order
        self.messages = int(self.off.sum())
        self.dense = len(values) > _DENSE_FILL * n * n
        self.crow = torch.zeros(n + 1, dtype=torch.int64)
        self.crow[1:] = torch.cumsum(torch.bincount(self.rows, minlength=n), 0)
        self.matrix = self.build(self.values)

    def build(self, values: Tensor) -> Tensor:
        if self.dense:
            w = torch.zeros(self.n, self.n, dtype=values.dtype)
            w[self.rows, self.cols] = values
            return w
        with warnings.catch_warnings():
            # "Sparse CSR tensor support is in beta": CSR products are what we want here.
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow, self.cols, values, (self.n, self.n), check_invariants=False
            )


class SyncMixer(Mixer):
    """x <- W x with the topology's mixing matrix of the round (D-PSGD)."""

    name = "sync"

    def __init__(
        self, top: Topology, generator: torch.Generator, rule: str = "metropolis", loss: float = 0.0
    ):
        super().__init__(top, generator, rule, loss)
        self._cache: dict[tuple[int, torch.dtype], _Entries] = {}

    def entries(self, t: int, dtype: torch.dtype) -> _Entries:
        key = (t % self.top.period(), dtype)
        if key not in self._cache:
            rows, cols, values = self.top.mixing_entries(t, self.rule)
            self._cache[key] = _Entries(rows, cols, values, self.n, dtype)
        return self._cache[key]

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        e = self.entries(t, x.dtype)
        if active is None and self.loss == 0.0:
            return _matmul(e.matrix, x), e.messages
        src, dst = e.cols[e.off], e.rows[e.off]
        sent = e.off.clone()
        if active is None:
            messages = e.messages
            arrived = self._kept(messages)
        else:
            sent[e.off] = active[src]
            messages = int(sent.sum())
            arrived = active[src] & active[dst] & self._kept(src.numel())
        values = e.values.clone()
        dropped = torch.zeros_like(values)
        dropped[e.off] = values[e.off] * (~arrived).to(values.dtype)
        values -= dropped
        values[e.diag] += torch.zeros(self.n, dtype=values.dtype).index_add_(0, e.rows, dropped)
        return _matmul(e.build(values), x), messages


def _matmul(w: Tensor, x: Tensor) -> Tensor:
    if w.layout == torch.sparse_csr:
        return torch.sparse.mm(w, x)
    return w @ x


class PairwiseMixer(Mixer):
    """Push-pull averaging over a random maximal matching of the round's graph (AD-PSGD-like)."""

    name = "pairwise"

    def __init__(
        self, top: Topology, generator: torch.Generator, rule: str = "metropolis", loss: float = 0.0
    ):
        super().__init__(top, generator, rule, loss)
        self._edges: dict[int, tuple[Tensor, Tensor]] = {}

    def edges(self, t: int) -> tuple[Tensor, Tensor]:
        key = t % self.top.period()
        if key not in self._edges:
            g = self.top.graph(t)
            pairs = np.array([(a, b) for a, b in g.edges if a != b], dtype=np.int64).reshape(-1, 2)
            self._edges[key] = torch.from_numpy(pairs[:, 0].copy()), torch.from_numpy(pairs[:, 1].copy())
        return self._edges[key]

    def matching(self, t: int, active: Tensor | None) -> tuple[Tensor, Tensor]:
        """(initiators, responders) of this round's exchanges."""
        if _complete(self.top):
            # Every pair is an edge: a random perfect matching of the active nodes.
            nodes = torch.arange(self.n) if active is None else torch.nonzero(active).flatten()
            nodes = nodes[torch.randperm(nodes.numel(), generator=self.gen)]
            half = nodes.numel() // 2
            return nodes[:half], nodes[half : 2 * half]
        u, v = self.edges(t)
        if active is not None:
            both = active[u] & active[v]
            u, v = u[both], v[both]
        chosen = averaging.random_matching_edges(u, v, self.n, self.gen)
        a, b = u[chosen], v[chosen]
        # Either end may have called the other.
        flip = torch.rand(a.numel(), generator=self.gen) < 0.5
        return torch.where(flip, b, a), torch.where(flip, a, b)

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        first, second = self.matching(t, active)
        y = x.clone()
        if self.loss == 0.0:
            averaging.average_pairs_(y, first, second)
            return y, 2 * int(first.numel())
        k = first.numel()
        request, answer, commit = self._kept(k), self._kept(k), self._kept(k)
        both_ways = request & answer
        averaging.average_pairs_(y, first, second, both_ways, both_ways & commit)
        return y, int(k + request.sum())


class PushSumMixer(Mixer):
    """Push-sum: x holds de-biased models, ``weights`` their push-sum weights."""

    name = "push-sum"

    def __init__(
        self, top: Topology, generator: torch.Generator, rule: str = "metropolis", loss: float = 0.0
    ):
        super().__init__(top, generator, rule, loss)
        self.weights = torch.ones(self.n, dtype=torch.float64)
        self._adjacency: tuple[Tensor, Tensor] | None = None

    def _neighbour_lists(self) -> tuple[Tensor, Tensor]:
        if self._adjacency is None:
            rows, cols, _ = self.top.mixing_entries(0, "uniform")
            off = rows != cols
            self._adjacency = torch.from_numpy(rows[off]), torch.from_numpy(cols[off])
        return self._adjacency

    def out_peers(self, t: int, active: Tensor | None) -> Tensor:
        """Each node's out-peer this round; a node with nobody to send to is its own peer."""
        n = self.n
        if self.top.time_varying:
            return torch.from_numpy(one_peer_exponential_partners(n, t))
        if _complete(self.top):
            if n < 2:
                return torch.arange(n)
            # A uniform other node; one that is inactive loses the message.
            return (torch.arange(n) + torch.randint(1, n, (n,), generator=self.gen)) % n
        rows, cols = self._neighbour_lists()
        keys = _uniform(rows.numel(), self.gen)
        if active is not None:
            keys[~active[cols]] = -1.0
        best = torch.full((n,), -1.0, dtype=torch.float64).scatter_reduce_(0, rows, keys, "amax")
        pick = (keys == best[rows]) & (keys >= 0.0)
        peers = torch.arange(n)
        peers[rows[pick]] = cols[pick]
        return peers

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        peers = self.out_peers(t, active)
        senders = peers != torch.arange(self.n)
        if active is not None:
            senders &= active
            peers = torch.where(senders, peers, torch.arange(self.n))
        y = x.clone()
        messages = int(senders.sum())
        if self.loss == 0.0 and (active is None or bool(active[peers].all())):
            averaging.push_sum_round_(y, self.weights, peers)
            return y, messages
        delivered = senders & self._kept(self.n)
        if active is not None:
            delivered &= active[peers]
        acked = delivered & self._kept(self.n)
        averaging.push_sum_round_lossy_(y, self.weights, peers, delivered, acked)
        return y, messages

    def average(self, x: Tensor, alive: Tensor | None = None) -> Tensor:
        # The conserved quantity: total mass over total weight, sum(w z) / sum(w).
        w = self.weights if alive is None else self.weights[alive]
        rows = x if alive is None else x[alive]
        return (w.to(rows.dtype) @ rows) / float(w.sum())


class ChocoMixer:
    """CHOCO-Gossip rounds on stacked rows (``gossip.core.averaging.choco_round_``): sync mixing of
    compressed changes with error feedback through every node's public copy.

    ``mix`` returns (mixed stack, bytes sent: each node's real payload once per
    neighbour); ``payloads`` holds each round's mean payload per node. Node i's
    stochastic rounding and random-k draws come from generator ``seed + i``.
    """

    def __init__(
        self, top: Topology, compressor: Compressor, gamma: float, rule: str = "metropolis", seed: int = 0
    ) -> None:
        self.top = top
        self.compressor = compressor
        self.gamma = gamma
        self.rule = rule
        self.gens = [torch.Generator().manual_seed(seed + i) for i in range(top.n)]
        self.hat: Tensor | None = None  # the public copies, zero before the first round
        self.payloads: list[float] = []

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        if active is not None:
            raise ValueError("CHOCO-Gossip on sync rounds runs without faults")
        if self.hat is None:
            self.hat = torch.zeros_like(x)
        w = torch.from_numpy(self.top.mixing_matrix(t, self.rule)).to(x.dtype)
        mixed = x.clone()
        sizes = averaging.choco_round_(mixed, self.hat, w, self.compressor, self.gens, self.gamma)
        neighbours = ((w != 0).sum(dim=1) - (w.diagonal() != 0).to(torch.int64)).tolist()
        self.payloads.append(float(np.mean(sizes)))
        return mixed, sum(size * k for size, k in zip(sizes, neighbours, strict=True))


class PairwiseChocoMixer:
    """Compressed pairwise exchanges over the pairwise mixer's matchings, node for node as real nodes
    run them (:func:`gossip.core.choco.exchange_`): per-pair public copies, at most
    :data:`~gossip.core.choco.MAX_PAIRS` neighbours remembered per node.

    ``mix`` returns (mixed stack, bytes sent: both real payloads of every exchange);
    ``payloads`` holds each round's mean payload per exchanging node. Node i's draws
    come from generator ``seed + i``.
    """

    def __init__(self, pairs: PairwiseMixer, compressor: Compressor, gamma: float, seed: int = 0) -> None:
        self.pairs = pairs
        self.compressor = compressor
        self.gamma = gamma
        self.seed = seed
        self.states: list[choco.Choco] = []  # made at the first round, once the dimension is known
        self.payloads: list[float] = []

    def mix(self, x: Tensor, t: int, active: Tensor | None = None) -> tuple[Tensor, int]:
        if not self.states:
            d = x.shape[1]
            self.states = [
                choco.Choco(self.compressor, self.gamma, d, self.seed + i) for i in range(x.shape[0])
            ]
        first, second = self.pairs.matching(t, active)
        y = x.clone()
        sent: list[int] = []
        for i, j in zip(first.tolist(), second.tolist(), strict=True):
            a, b = self.states[i], self.states[j]
            sent += choco.exchange_(a, b, str(i), str(j), y[i], y[j])
        if sent:
            self.payloads.append(float(np.mean(sent)))
        return y, sum(sent)


def make_mixer(
    strategy: str, top: Topology, generator: torch.Generator, rule: str = "metropolis", loss: float = 0.0
) -> Mixer:
    kinds: dict[str, type[Mixer]] = {"sync": SyncMixer, "pairwise": PairwiseMixer, "push-sum": PushSumMixer}
    if strategy not in kinds:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return kinds[strategy](top, generator, rule, loss)


def expected_pairwise_matrix(top: Topology, generator: torch.Generator, samples: int = 512) -> np.ndarray:
    """E[W] of one pairwise round, estimated from ``samples`` matchings (rounds 0, 1, ...).

    Averaging over a matching M is W_M = I - 1/2 sum_{(i,j) in M} (e_i - e_j)(e_i - e_j)^T,
    a projection, so E[||x_{t+1} - xbar||^2 | x_t] <= λ2(E[W]) ||x_t - xbar||^2
    (Boyd et al., Randomized gossip algorithms, 2006).
    """
    mixer = PairwiseMixer(top, generator)
    n = top.n
    counts = np.zeros((n, n))
    for t in range(samples):
        a, b = mixer.matching(t, None)
        counts[a.numpy(), b.numpy()] += 1.0
    p = (counts + counts.T) / samples
    w = 0.5 * p
    w[np.diag_indices(n)] = 1.0 - 0.5 * p.sum(axis=1)
    return w


def bytes_per_message(d: int, dtype: torch.dtype = torch.float32) -> int:
    """Payload of one model on the wire (raw codec)."""
    return d * (torch.finfo(dtype).bits // 8)
