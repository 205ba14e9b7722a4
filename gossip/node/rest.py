"""After training: keep averaging while it still moves the model, then rest.

A node that has finished its epochs keeps exchanging with its neighbours (no
more SGD), so replicas that finished at different times still meet at their
average. Once the exchanges no longer move it (the applied delta's norm below
``tolerance`` times the model's), the pause between its own exchanges doubles
up to ``max_pause``: a settled cluster costs a few exchanges a minute instead
of dozens a second. It wakes, back to the shortest pause, as soon as an applied
delta is large again, a neighbour is seen still training (its step advanced
since it was last heard from), or a new member joins.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class RestPolicy:
    """The pause before a resting node's next exchange, from what its exchanges showed."""

    min_pause: float
    max_pause: float
    tolerance: float
    pause: float = field(init=False)
    last_ratio: float = field(init=False, default=math.inf)  # the latest applied delta, relative
    _peer_steps: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.pause = self.min_pause

    @property
    def resting(self) -> bool:
        """At the slowest pace: the node's exchanges no longer move it."""
        return self.pause >= self.max_pause

    def wake(self) -> None:
        self.pause = self.min_pause

    def moved(self, ratio: float) -> None:
        """An applied delta of ``ratio`` times the model's norm: back off if it was small, else wake."""
        self.last_ratio = ratio
        if ratio <= self.tolerance:
            self.pause = min(self.max_pause, self.pause * 2)
        else:
            self.wake()

    def heard(self, peer: str, step: int) -> bool:
        """A header from ``peer`` at ``step``; True (and awake) when it advanced: the peer still trains."""
        before = self._peer_steps.get(peer)
        self._peer_steps[peer] = step
        if before is not None and step > before:
            self.wake()
            return True
        return False

    def next_pause(self, rng: random.Random) -> float:
        """The pause, jittered by +-20 % so neighbours do not fall into lockstep."""
        return self.pause * rng.uniform(0.8, 1.2)
