"""Compressed pairwise exchanges with error feedback: CHOCO-Gossip between two nodes at a time.

CHOCO-Gossip (Koloskova, Stich, Jaggi 2019, Algorithm 1) keeps, for every node i,
a *public copy* x̂_i that its neighbours know bit for bit; a round sends only
``q_i = Q(x_i - x̂_i)`` (Q any compressor), everyone adds ``q_i`` to its copy of
x̂_i, and node i moves by ``γ Σ_j w_ij (x̂_j - x̂_i)``. What Q dropped stays in
``x_i - x̂_i`` and is sent later: that is the error feedback.

Between two gossip nodes the public copies are kept *per pair*, since each pair
exchanges on its own schedule. Node i keeps, for neighbour j, a :class:`Pair`:
``own`` (x̂_i as j knows it), ``peer`` (x̂_j as i knows it) and ``rounds`` (the
exchanges of the pair that committed). One exchange, on each side:

1. ``offer``: q_own = Q(snapshot - own), its payload and the decoded values;
2. the peer's payload arrives and is decoded (checked: :mod:`gossip.core.compress`);
3. on commit, ``settle``: own += q_own, peer += q_peer, rounds += 1, and the change
   to add to the current model is ``γ/2 (peer - own)``.

Both sides do the same additions on the same decoded values, so i's pair of copies
equals j's mirrored one bit for bit, and their changes are exact negatives: the
sum of the models is preserved, as with the uncompressed delta rule (which is
this with the identity compressor and γ = 1, up to rounding). An exchange that
does not commit changes nothing. If one side committed and the other did not (a
crash or a lost status after the commit frame) their ``rounds`` differ; the
exchange that notices refuses and both sides :meth:`forget` the pair, which
starts over from zero copies, as CHOCO itself starts.

Memory: two float32 model copies per remembered neighbour, at most
:data:`MAX_PAIRS` of them (the least recently committed is forgotten first; its pair
starts over at the next exchange). Only a commit makes a pair: a refused call makes
none and evicts none.

Pure: torch only; shared by real nodes (:mod:`gossip.core.pipeline`) and the
simulator (:mod:`gossip.sim.mixing`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from gossip.core.compress import CompressError, Compressor, densify

MAX_PAIRS = 16  # neighbours whose copies a node keeps (2 model copies each)


@dataclass
class Pair:
    """What a node keeps for one neighbour: the two public copies both know, and the pair's count."""

    own: Tensor
    peer: Tensor
    rounds: int = 0


@dataclass(frozen=True)
class Offer:
    """One side's half of an exchange before it commits: what it sends and what the peer decodes."""

    payload: bytes
    values: Tensor  # the peer's decoding of ``payload``, bit for bit
    rounds: int  # the pair's committed exchanges when it was made


def seed_of(node_id: str) -> int:
    """A node's generator seed for stochastic rounding and random-k, from its id."""
    return int.from_bytes(hashlib.blake2b(node_id.encode(), digest_size=8).digest(), "little") >> 1


class Choco:
    """One node's side of compressed pairwise gossip: its compressor, step and per-neighbour pairs."""

    def __init__(self, compressor: Compressor, gamma: float, dim: int, seed: int = 0) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"the consensus step must be in (0, 1], got {gamma}")
        self.compressor = compressor
        self.gamma = gamma
        self.dim = dim
        self.gen = torch.Generator().manual_seed(seed)
        self._pairs: OrderedDict[str, Pair] = OrderedDict()

    @classmethod
    def of(cls, spec: str, gamma: float, dim: int, seed: int = 0) -> Choco | None:
        """None for ``none``; ``gamma`` 0 is the compressor's default step."""
        compressor = Compressor.parse(spec)
        if compressor.spec == "none":
            return None
        return cls(compressor, gamma or compressor.default_step(), dim, seed)

    @property
    def name(self) -> str:
        """The spec both sides must share (it travels in every header)."""
        return f"choco[{self.compressor.spec};{self.gamma:g}]"

    @property
    def scale(self) -> float:
        """What the settled difference ``peer - own`` is multiplied by: γ times the pairwise 1/2."""
        return self.gamma / 2

    def max_nbytes(self) -> int:
        return self.compressor.max_nbytes(self.dim)

    def rounds(self, peer: str) -> int:
        pair = self._pairs.get(peer)
        return pair.rounds if pair is not None else 0

    def pair(self, peer: str) -> Pair:
        """The pair with ``peer``, made (zero copies) if new and now the most recently used; the least
        recently used beyond MAX_PAIRS go (called when an exchange commits)."""
        pair = self._pairs.get(peer)
        if pair is None:
            z = torch.zeros(self.dim, dtype=torch.float32)
            pair = self._pairs[peer] = Pair(z, z.clone())
            while len(self._pairs) > MAX_PAIRS:
                self._pairs.popitem(last=False)
        self._pairs.move_to_end(peer)
        return pair

    def forget(self, peer: str) -> None:
        """Drop the pair with ``peer`` (out of step): the next exchange starts from zero copies."""
        self._pairs.pop(peer, None)

    def offer(self, peer: str, snapshot: Tensor) -> Offer:
        """Q(snapshot - own): the payload for ``peer`` and the values it will decode.

        Nothing changes: a pair is made (and the least recently used one dropped) only
        when an exchange commits, so a call that is refused, from anyone, costs no
        neighbour its pair.
        """
        pair = self._pairs.get(peer)
        residual = snapshot - pair.own if pair is not None else snapshot  # no pair: own = 0
        payload, values = self.compressor.compress(residual, self.gen)
        return Offer(payload, values, pair.rounds if pair is not None else 0)

    def decode(self, payload: bytes | memoryview, peer: str | None = None) -> Tensor:
        """The peer's q from its payload; :class:`~gossip.core.compress.CompressError` unless well formed
        and, given the ``peer``, unless its copy stays finite with it (a peer cannot push it to inf
        over several exchanges)."""
        idx, values = self.compressor.decompress_parts(payload, self.dim)
        pair = self._pairs.get(peer) if peer is not None else None
        if pair is not None:
            moved = pair.peer if idx is None else pair.peer[idx]  # only these entries change
            if not bool(torch.isfinite(moved + values).all()):
                raise CompressError("the payload would take the peer's reference copy past float32's range")
        return densify(idx, values, self.dim)

    def settle(self, peer: str, offer: Offer, received: Tensor) -> Tensor:
        """The exchange committed: move both copies, count it; the difference ``peer - own`` (new tensor)."""
        pair = self.pair(peer)
        if pair.rounds != offer.rounds:
            raise ValueError("the pair moved while its exchange was in flight")
        pair.own += offer.values
        pair.peer += received
        pair.rounds += 1
        return pair.peer - pair.own


def exchange_(a: Choco, b: Choco, i: str, j: str, x_i: Tensor, x_j: Tensor) -> tuple[int, int]:
    """One committed exchange between node ``i`` (state ``a``) and node ``j`` (``b``), in place on
    their rows ``x_i``, ``x_j``, as real nodes do it over the wire; the two payloads' sizes."""
    offer_i, offer_j = a.offer(j, x_i), b.offer(i, x_j)
    # What each decodes of the other's payload is the offer's values, bit for bit.
    d_i = a.settle(j, offer_i, offer_j.values)
    d_j = b.settle(i, offer_j, offer_i.values)
    x_i.add_(d_i, alpha=a.scale)
    x_j.add_(d_j, alpha=b.scale)
    return len(offer_i.payload), len(offer_j.payload)
