"""The exchange slot: at most one exchange per node, and the mailbox its result lands in.

A pairwise exchange computed from a snapshot leaves the node a weight of 1/2 on
itself; k of them from the same snapshot leave 1 - k/2, negative for k >= 3. So a
node takes part in one exchange at a time, as caller or callee, from the moment
it takes its snapshot until its result is applied: the slot is *busy*, and a busy
node declines at once. The snapshot and receive buffers belong to whoever holds
the slot.

Results are not applied by the event loop but queued in the mailbox and applied
by the training thread between two optimizer steps (or at once when nobody
trains), so no lock is held across a step. ``max_lag`` bounds how many steps the
training thread runs ahead of an exchange in flight, its own or an incoming one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

from gossip.core.params import FlatParams
from gossip.core.pipeline import Runs
from gossip.transport.frames import chunk_frame, chunk_from_frame, iter_chunks


class _InFlight:
    """An exchange of one kind (own or incoming) in flight: since which step, and its end."""

    def __init__(self) -> None:
        self.active = False
        self.since = 0
        self.done = threading.Event()

    def begin(self, step: int) -> None:
        self.active = True
        self.since = step
        self.done.clear()

    def end(self) -> None:
        self.active = False
        self.done.set()

    def overdue(self, step: int, max_lag: int) -> bool:
        return self.active and step - self.since >= max_lag


class Frames:
    """A snapshot held as the chunk frames it is sent in (the frame bytes are the snapshot: one copy).

    ``lazy``: frame ``k`` is copied from the live model when it is first needed
    (sent, or read back for the delta), so a callee's answer starts at once instead
    of after a copy of the whole model. Either way each element's snapshot value is
    what was sent, and the delta is formed from exactly that value, so the exchange
    keeps the sum of the models exact (a callee's snapshot was never atomic with the
    training thread's step either: that thread steps without the slot's lock).
    """

    def __init__(self, views: list[memoryview], lazy: bool) -> None:
        self._views = views  # the model's bytes, cut into chunks (views, no copies)
        self._frames: list[bytes | None] = [None] * len(views)
        self.lengths = [len(v) for v in views]  # each frame's chunk bytes
        if not lazy:
            for k in range(len(views)):
                self[k]

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, k: int) -> bytes:
        frame = self._frames[k]
        if frame is None:
            frame = self._frames[k] = chunk_frame(self._views[k])
        return frame

    def __iter__(self) -> Iterator[bytes]:
        for k in range(len(self._frames)):
            yield self[k]

    def chunk(self, k: int) -> memoryview:
        """Frame ``k``'s chunk bytes (taking the frame if it was not yet)."""
        return chunk_from_frame(self[k])


class ExchangeSlot:
    """Who holds the node's one exchange, the buffers it uses, and the mailbox of results.

    Every method takes the lock itself; ``lock`` is public for the few places that
    read or write the model as one step (a snapshot for the store, a load).
    """

    def __init__(self, flat: FlatParams, max_lag: int, frame_bytes: int = 0) -> None:
        self.flat = flat
        self.max_lag = max_lag
        self.lock = threading.Lock()
        # frame_bytes > 0: an own snapshot is taken as the chunk frames it is sent in
        # (one copy, which is the snapshot; none when sending); see ``claim_own``.
        self.frame_bytes = frame_bytes if frame_bytes % 8 == 0 else 0
        self.frames: Frames | None = None  # the holder's snapshot as frames, when taken so
        # The holder's snapshot of its own model when taken as a copy (allocated on first use).
        self._snap: FlatParams | None = None
        self.recv = FlatParams.zeros(flat.layout)  # the holder's receive buffer (becomes the delta)
        self.step = 0
        self.training = False
        self._busy = False
        self._own = _InFlight()
        self._incoming = _InFlight()
        self._pending: list[Callable[[], None]] = []
        self._delivered = 0  # results delivered so far
        self._delivered_at_own = 0  # ... when the own exchange in flight began

    # --- state, for status and tests ------------------------------------------------

    @property
    def snap(self) -> FlatParams:
        """The holder's snapshot, when it was taken as a copy (``framed=False``)."""
        if self._snap is None:
            self._snap = FlatParams.zeros(self.flat.layout)
        return self._snap

    def own_values(self) -> FlatParams | Runs:
        """What the holder's snapshot holds: its frames' values, or the copy."""
        if self.frames is not None:
            return Runs.of_chunks(self.flat.layout, self.frames.chunk, self.frames.lengths)
        return self.snap

    def own_runs(self) -> Runs:
        """:meth:`own_values` as runs either way (pieces per buffer)."""
        own = self.own_values()
        return own if isinstance(own, Runs) else Runs.of(own)

    def _take(self, framed: bool, lazy: bool = False) -> None:
        """Take the snapshot (the lock held): as frames ready to send (``lazy``: each as it is needed,
        see :class:`Frames`), or as a copy."""
        if framed and self.frame_bytes:
            self.frames = Frames(iter_chunks(self.flat.byte_views(), self.frame_bytes), lazy)
        else:
            self.frames = None
            self.snap.copy_(self.flat)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def own_in_flight(self) -> bool:
        return self._own.active

    @property
    def incoming_in_flight(self) -> bool:
        return self._incoming.active

    @property
    def idle(self) -> bool:
        """Nothing held, nothing in flight, nothing waiting to be applied."""
        return not (self._busy or self._own.active or self._incoming.active or self._pending)

    # --- claiming ----------------------------------------------------------------------

    def claim_own(self, running: bool) -> bool:
        """Take the slot for an exchange of our own, snapshot included (as frames when the slot
        keeps frames); False if busy, not running, or an own exchange is still in flight (backing
        off after a busy answer, the slot free meanwhile)."""
        with self.lock:
            if self._busy or self._own.active or not running:
                return False
            self._busy = True
            self._own.begin(self.step)
            self._delivered_at_own = self._delivered
            self._take(framed=True)
            return True

    def reclaim_own(self, running: bool) -> bool:
        """Take the slot again after a free back-off (the own exchange is still in flight); False
        if busy or not running, or a neighbour's exchange with this node delivered its result
        during the back-off: this step is mixed already."""
        with self.lock:
            if self._busy or not running or self._delivered != self._delivered_at_own:
                return False
            self._busy = True
            self._take(framed=True)
            return True

    def claim_incoming(self, running: bool, framed: bool) -> bool:
        """Take the slot for an exchange a peer started, snapshot included (as frames, each taken as it
        is needed, when ``framed`` and the slot keeps frames, else as a copy now); False if busy or
        not running."""
        with self.lock:
            if self._busy or not running:
                return False
            self._busy = True
            self._incoming.begin(self.step)
            self._take(framed, lazy=True)
            return True

    def release(self) -> None:
        """Give the slot back without a result (declined, failed, abandoned)."""
        with self.lock:
            self._busy = False
            self.frames = None

    def own_finished(self) -> None:
        self._own.end()

    def incoming_finished(self) -> None:
        self._incoming.end()

    async def wait_own(self, poll: float = 0.002) -> None:
        """Wait (from the event loop) until this node's own exchange in flight has ended."""
        while self._own.active:
            await asyncio.sleep(poll)

    # --- the mailbox -------------------------------------------------------------------

    def deliver(self, apply: Callable[[], None], *, at_once: bool = True) -> None:
        """Queue a result whose ``apply`` ends by releasing the slot; applied now if nobody trains.

        ``at_once=False``: only queue it; whoever delivers calls :meth:`flush` soon after
        (a callee answers OK first, so its add is not on the caller's critical path).
        """
        with self.lock:
            self._pending.append(apply)
            self._delivered += 1
            if not self.training and at_once:
                self._apply_pending_locked()

    def flush(self) -> None:
        """Apply what waits if nobody trains (otherwise the training thread does, between steps)."""
        with self.lock:
            if not self.training:
                self._apply_pending_locked()

    def apply_pending(self) -> None:
        with self.lock:
            self._apply_pending_locked()

    def release_locked(self) -> None:
        """For a result's ``apply``, which runs with the lock held."""
        self._busy = False
        self.frames = None

    def _apply_pending_locked(self) -> None:
        pending, self._pending = self._pending, []
        for apply in pending:
            apply()

    # --- the training thread's side -------------------------------------------------------

    def advance(self, n: int) -> threading.Event | None:
        """After ``n`` optimizer steps: apply results, count the steps; the event to wait for, if any.

        When an exchange has been in flight for ``max_lag`` steps the training thread
        should wait for its end (the returned event) before it goes on.
        """
        with self.lock:
            self.training = True
            self._apply_pending_locked()
            self.step += n
            if self._own.overdue(self.step, self.max_lag):
                return self._own.done
            if self._incoming.overdue(self.step, self.max_lag):
                return self._incoming.done
            return None

    def stop_training(self) -> None:
        """Training is over: results are applied as they arrive from now on."""
        with self.lock:
            self.training = False
            self._apply_pending_locked()
