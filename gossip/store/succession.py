"""Versions due from another publisher, followed until they exist: a silent publisher's successor.

Version ``v`` is published by the owner of ``snapshot_key(model, v)`` among the
members a node sees when its training reaches ``v``'s step. If that publisher
dies before its manifest has spread, nobody else would publish ``v``: during
training the next version supersedes it a few steps later, but after the last
step nothing would, and the newest complete snapshot would be an older one.

So every node notes the versions it saw due from someone else (``expect``). At
each repair round it drops those it now holds a manifest of, or a newer one
(published or superseded), and if the publisher of one that is left is no longer
its owner (declared dead, or gone) and this node is, this node finishes it: it
publishes its own model as that version (``settle`` names the newest such
version). The node only does so once it has finished training itself (a
snapshot copied outside the training thread could mix two steps); until then
the next version supersedes the missing one.

Pure bookkeeping, no network and no torch; thread-safe (training threads note
versions, the event loop settles them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Awaited:
    """Versions this node saw due from another publisher and does not hold yet."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)  # the newest this many are followed: older ones are retired anyway
        self._due: dict[int, str] = {}  # version -> the publisher it was due from
        self._lock = threading.Lock()

    def expect(self, version: int, publisher: str) -> None:
        """``version`` is due now from ``publisher`` (any thread)."""
        with self._lock:
            self._due.setdefault(version, publisher)
            for old in sorted(self._due)[: -self.limit]:
                del self._due[old]

    def settle(
        self,
        held: Callable[[int], bool],
        newest: int | None,
        owner: Callable[[int], str | None],
        me: str,
    ) -> tuple[int, str] | None:
        """Forget versions that exist (``held``) or are superseded (older than ``newest``, the
        newest complete version held); the newest version left that ``me`` owns now in place of
        the publisher it was due from, with that publisher, or None."""
        with self._lock:
            for v in list(self._due):
                if held(v) or (newest is not None and v < newest):
                    del self._due[v]
            for v in sorted(self._due, reverse=True):
                if self._due[v] != me and owner(v) == me:
                    return v, self._due[v]
        return None

    def taken(self, version: int) -> None:
        """This node publishes ``version``: it and every older one are settled."""
        with self._lock:
            for v in [v for v in self._due if v <= version]:
                del self._due[v]

    def pending(self) -> list[tuple[int, str]]:
        """(version, publisher) still awaited, newest first."""
        with self._lock:
            return sorted(self._due.items(), reverse=True)
