"""The outer optimizer of local-steps training (DiLoCo, NoLoCo), on gossip-averaged models.

A node keeps an *anchor* (its model after its last outer step) and a momentum
buffer; both stay local and are never sent. Every round it trains ``H`` local
steps and averages its model with neighbours through the ordinary exchange. Its
averaged pseudo-gradient is then ``g = anchor - mixed``, where ``mixed`` is what
the averaging made of the node's round-start snapshot, and the outer step is
Nesterov momentum on it::

    m      <- mu * m + g
    anchor <- anchor - lr * (g + mu * m)

and the node carries on from the new anchor (plus whatever it trained since the
snapshot, the same delta rule as a plain exchange). What is averaged is the
models, so the averaging itself keeps the sum of the models exact; when every
node starts a round from the same anchor (all-reduce, as DiLoCo), averaging the
models is averaging the pseudo-gradients. ``outer = none`` is today's rule, and
``nesterov:1:0`` reproduces it exactly (the anchor becomes ``mixed``). With
momentum or ``lr != 1`` the sum of the models is no longer kept by the outer
step: the network mean follows the outer optimizer instead, which is the point
(DiLoCo's lr 0.7, momentum 0.9 overshoot the average on purpose).

Pure tensor arithmetic, shared by the simulator (rows of one stacked tensor) and
real nodes (the flat parameter buffers): no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only tensor methods run here: parsing a spec (the CLI, configs) loads no torch
    from torch import Tensor

    from gossip.core.pipeline import Runs

__all__ = ["Outer", "OuterError"]


class OuterError(ValueError):
    """A malformed outer-optimizer spec; the message is one line naming the problem."""


@dataclass(frozen=True)
class Outer:
    """An outer optimizer: ``none`` or ``nesterov:LR:MOMENTUM``."""

    spec: str = "none"
    lr: float = 1.0
    momentum: float = 0.0

    @property
    def active(self) -> bool:
        return self.spec != "none"

    @classmethod
    def parse(cls, spec: str) -> Outer:
        text = spec.strip().lower()
        if text in ("", "none"):
            return cls()
        name, _, rest = text.partition(":")
        if name != "nesterov":
            raise OuterError(f"unknown outer optimizer {spec!r}: use none or nesterov:LR:MOMENTUM")
        parts = rest.split(":")
        if len(parts) != 2:
            raise OuterError(f"nesterov takes LR and MOMENTUM (nesterov:0.7:0.9), got {spec!r}")
        try:
            lr, mu = float(parts[0]), float(parts[1])
        except ValueError:
            raise OuterError(f"nesterov's LR and MOMENTUM must be numbers, got {spec!r}") from None
        if not (math.isfinite(lr) and 0 < lr <= 10):
            raise OuterError(f"the outer learning rate must be in (0, 10], got {parts[0]}")
        if not (math.isfinite(mu) and 0 <= mu < 1):
            raise OuterError(f"the outer momentum must be in [0, 1), got {parts[1]}")
        return cls(f"nesterov:{lr:g}:{mu:g}", lr, mu)

    def step_(self, mixed: Tensor, anchor: Tensor, buf: Tensor) -> None:
        """One outer step: ``mixed`` becomes the new anchor's value, in place, as do ``anchor`` and ``buf``.

        ``mixed``: what averaging made of the round's snapshot; ``anchor``: the last
        outer step's result; ``buf``: the momentum. All three the same shape (a
        node's buffer, or every node's rows at once).
        """
        g = anchor.sub(mixed)
        buf.mul_(self.momentum).add_(g)
        g.add_(buf, alpha=self.momentum)  # the Nesterov direction, g + mu * buf
        mixed.copy_(anchor).add_(g, alpha=-self.lr)
        anchor.copy_(mixed)

    def steps_(self, mixed: Sequence[Tensor], anchor: Sequence[Tensor], buf: Sequence[Tensor]) -> None:
        """:meth:`step_` over matching buffers (a node's segments)."""
        for m, a, b in zip(mixed, anchor, buf, strict=True):
            self.step_(m, a, b)

    def exchange_(
        self,
        x: Sequence[Tensor],
        own: Runs,
        delta: Sequence[Tensor],
        scale: float,
        anchor: Sequence[Tensor],
        buf: Sequence[Tensor],
    ) -> None:
        """A node's own pairwise exchange with the outer step, per buffer, in place.

        ``own``: the round's snapshot s (as sent); ``delta``: other - own, so the
        averaging made ``mixed = s + scale * delta`` of it. The model, which trained
        on since the snapshot, moves by what the outer step makes of that:
        ``x += outer(mixed) - s`` (the delta rule, with the outer step in it).
        ``delta`` is used up.
        """
        for i, (xi, d, a, b) in enumerate(zip(x, delta, anchor, buf, strict=True)):
            d.mul_(scale)
            for first, s in own.pieces(i):
                d[first : first + s.numel()].add_(s)
            self.step_(d, a, b)  # d is the new anchor now
            xi.add_(d)
            for first, s in own.pieces(i):
                xi[first : first + s.numel()].sub_(s)
