"""A node's send pacing: everything it writes, all calls together, at most ``rate`` bytes per second.

``gossip node --max-send-rate 50mbit`` keeps gossip from saturating a shared link,
and makes slow-link runs reproducible on one machine. Each frame (a chunk of an
exchange, a push or a shard transfer, a control request or answer) waits for its
turn on a virtual link of the given rate, then goes out whole: over any window of
T seconds a node sends at most ``rate * T`` bytes plus one frame (a chunk: by default
what the rate sends in 0.2 s, :func:`gossip.config.chunk_bytes_for`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class SendPacer:
    """A virtual link of ``rate`` bytes per second that every outgoing frame queues for.

    ``clock`` and ``sleep`` are the event loop's by default (a test passes its own).
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._free_at = clock()  # when the virtual link has sent everything queued so far
        self.sent = 0  # bytes let through
        self.waited = 0.0  # seconds frames spent waiting for their turn, all together

    def status_fields(self) -> dict[str, Any]:
        """The rate and the counters as :class:`~gossip.core.status.NodeStatus` names them."""
        return {"max_send_rate": self.rate, "paced_bytes": self.sent, "paced_wait_seconds": self.waited}

    async def take(self, nbytes: int) -> None:
        """Wait for this frame's turn; the next one's turn comes ``nbytes / rate`` later."""
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        self.sent += nbytes
        if start > now:
            self.waited += start - now
            await self._sleep(start - now)
