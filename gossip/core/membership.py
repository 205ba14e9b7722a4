"""Member table: heartbeats, merge rules and failure detection, free of any I/O.

Each node bumps its own heartbeat every gossip interval and swaps tables with a
random peer. A member whose (incarnation, heartbeat) has not grown for
``suspect_after`` seconds is suspect, after ``dead_after`` dead; dead members
are not picked and not gossiped, only probed now and then (:meth:`pick_dead`),
so a member that was paused, or cut off, is found again when it answers. A
restarted node has a larger incarnation and so replaces its old record, also
when it comes back under a new id at the same address. Records never move
backwards: a tombstone of the newest version seen keeps stale gossip from
resurrecting a dead or departed member. Time this node itself could not listen
(paused, or its loop blocked) is :meth:`discount`-ed: silence it did not hear
is no one's fault but its own.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

STATES = ("alive", "suspect", "dead", "left")
# Bounds on what a peer's table may carry: memory a peer can make us spend.
MAX_ID_CHARS = 128
MAX_ADDRESS_CHARS = 270
MAX_FINGERPRINT_BYTES = 64  # a model's layout fingerprint is 16 (Layout.fingerprint)


@dataclass
class MemberRecord:
    node_id: str
    address: str
    incarnation: int
    heartbeat: int
    state: str = "alive"
    rank: int = -1
    fingerprint: bytes = b""
    meta: dict[str, float] = field(default_factory=dict)  # local only, never on the wire


def dialable(address: str) -> bool:
    """HOST:PORT with a non-empty host and a port in 1..65535 (ASCII digits only)."""
    # The length first: only short strings enter the cache, so a peer cannot fill it with long ones.
    return len(address) <= MAX_ADDRESS_CHARS and _dialable(address)


@functools.lru_cache(maxsize=4096)  # every table repeats the same addresses
def _dialable(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) <= 65535)


# A leave ends an incarnation for good: its tombstone stands above every
# heartbeat of that life, so only a restart (a newer incarnation) comes back.
_LIFE_OVER = 1 << 64


# The values of --member-protocol (every node of a cluster runs the same one).
MEMBER_PROTOCOLS = ("heartbeat", "swim")


@dataclass(frozen=True)
class MembershipConfig:
    interval: float = (
        0.5  # seconds between table swaps; 2 tables/s costs nothing and spreads news in ~log n s
    )
    suspect_after: float = 4.0  # 8 missed intervals: tolerates a busy 2-core machine with many nodes
    dead_after: float = 10.0  # suspect long enough that a GC pause or CPU burst is not a death
    left_ttl: float = 30.0  # how long a leave notice keeps travelling
    # Members kept at most: a peer's table of thousands of fake members must not make
    # this node dial (or place shards on) all of them.
    max_members: int = 1024
    # heartbeat: whole tables swapped, silence judged (this module); swim: probes and
    # piggybacked news, per-node traffic flat in N (gossip.core.swim).
    member_protocol: str = "swim"

    def validate(self) -> None:
        """ValueError naming the field that is out of range."""
        if not self.interval < self.suspect_after < self.dead_after < 1e6:
            raise ValueError(
                f"suspect_after must be above the {self.interval} s gossip interval and dead_after above "
                f"suspect_after, got {self.suspect_after} and {self.dead_after}"
            )
        if self.member_protocol not in MEMBER_PROTOCOLS:
            raise ValueError(f"member_protocol must be heartbeat or swim, got {self.member_protocol!r}")


class Membership:
    def __init__(
        self,
        me: MemberRecord,
        config: MembershipConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or MembershipConfig()
        self.clock = clock
        self.me = me
        self.members: dict[str, MemberRecord] = {}
        self._seen: dict[str, float] = {}  # node_id -> clock time its version last grew
        self._tombstones: dict[str, tuple[int, int]] = {}
        # address -> the member at it: merge() keeps one member per address, so a record's rival
        # is found without a pass over the table (kept in step by merge, moves and expiries)
        self._at_address: dict[str, str] = {}

    # --- own record ------------------------------------------------------------

    def beat(self) -> None:
        self.me.heartbeat += 1

    # --- merging ---------------------------------------------------------------

    def merge(self, records: Iterable[MemberRecord]) -> list[str]:
        """Fold gossiped records in; returns the ids of members that are new or came back."""
        now = self.clock()
        changed: list[str] = []
        for rec in records:
            if rec.node_id == self.me.node_id:
                continue
            if rec.address == self.me.address and rec.incarnation <= self.me.incarnation:
                continue  # an older life of this very process's address
            version = (rec.incarnation, rec.heartbeat)
            tomb = self._tombstones.get(rec.node_id)
            if tomb is not None and version <= tomb:
                continue
            cur = self.members.get(rec.node_id)
            if cur is not None:
                cur_version = (cur.incarnation, cur.heartbeat)
                # Only a newer version counts as a sign of life. A leave of the current life
                # wins whatever heartbeat it carries: its relay may have heard an older beat.
                ends_life = rec.state == "left" and cur.state != "left" and rec.incarnation == cur.incarnation
                if version <= cur_version and not ends_life:
                    continue
            if cur is None and len(self.members) >= self.config.max_members:
                continue
            if not self._replace_same_address(rec):
                continue
            was_alive = cur is not None and cur.state in ("alive", "suspect")
            rec = MemberRecord(
                rec.node_id, rec.address, rec.incarnation, rec.heartbeat, rec.state, rec.rank, rec.fingerprint
            )
            if rec.state == "left":
                self._tombstones[rec.node_id] = (rec.incarnation, _LIFE_OVER)
                rec.meta["left_at"] = now
            if (
                cur is not None
                and cur.address != rec.address
                and self._at_address.get(cur.address) == cur.node_id
            ):
                del self._at_address[cur.address]  # it moved: nobody is at its old address now
            self.members[rec.node_id] = rec
            self._at_address[rec.address] = rec.node_id
            self._seen[rec.node_id] = now
            if rec.state == "alive" and not was_alive:
                changed.append(rec.node_id)
        return changed

    def _drop(self, node_id: str) -> None:
        """Forget a member whose leave expired (its tombstone stays)."""
        m = self.members.pop(node_id)
        if self._at_address.get(m.address) == node_id:
            del self._at_address[m.address]

    def _replace_same_address(self, rec: MemberRecord) -> bool:
        """A newer life at an address evicts the older one; an older one is ignored."""
        other = self.members.get(self._at_address.get(rec.address, ""))
        if other is None or other.node_id == rec.node_id or other.address != rec.address:
            return True
        if other.incarnation > rec.incarnation:
            return False
        self._tombstones[other.node_id] = (other.incarnation, other.heartbeat)
        del self.members[other.node_id]
        self._seen.pop(other.node_id, None)
        return True

    def mark_left(self, node_id: str, incarnation: int) -> bool:
        m = self.members.get(node_id)
        if m is None or m.incarnation != incarnation or m.state == "left":
            return False
        m.state = "left"
        m.meta["left_at"] = self.clock()
        self._tombstones[node_id] = (m.incarnation, _LIFE_OVER)
        return True

    def discount(self, seconds: float) -> None:
        """This node could not listen for ``seconds``: nobody's silence over that time counts.

        A process that was stopped, or whose event loop was blocked, heard no
        gossip meanwhile; without this, it would declare every peer dead the moment
        it resumes, and one without seeds would then have no one left to ask.
        """
        now = self.clock()
        for node_id, seen in self._seen.items():
            self._seen[node_id] = min(now, seen + seconds)

    def sweep(self) -> list[str]:
        """Advance suspicion by the clock; returns ids newly declared dead."""
        now = self.clock()
        died = []
        for node_id, m in list(self.members.items()):
            if m.state == "left":
                if now - m.meta.get("left_at", now) > self.config.left_ttl:
                    self._drop(node_id)
                continue
            quiet = now - self._seen.get(node_id, now)
            if quiet > self.config.dead_after:
                if m.state != "dead":
                    m.state = "dead"
                    self._tombstones[node_id] = (m.incarnation, m.heartbeat)
                    died.append(node_id)
            elif quiet > self.config.suspect_after:
                m.state = "suspect"
            elif m.state == "suspect":
                m.state = "alive"
        return died

    # --- queries ---------------------------------------------------------------

    def seconds_since_heartbeat(self, node_id: str) -> float:
        return max(0.0, self.clock() - self._seen.get(node_id, self.clock()))

    def alive(self) -> list[MemberRecord]:
        """Members that may be picked: alive only (not suspect, dead or left)."""
        return [m for m in self.members.values() if m.state == "alive"]

    def gossip_records(self) -> list[MemberRecord]:
        """What travels: everyone not known dead, plus recent leave notices, plus me."""
        out = [m for m in self.members.values() if m.state in ("alive", "suspect", "left")]
        out.append(self.me)
        return out

    def by_rank(self, rank: int) -> MemberRecord | None:
        for m in self.members.values():
            if m.rank == rank and m.state == "alive":
                return m
        return None

    def pick_gossip_target(self, rng: random.Random) -> MemberRecord | None:
        candidates = [m for m in self.members.values() if m.state in ("alive", "suspect")]
        return rng.choice(candidates) if candidates else None

    def pick_dead(self, rng: random.Random) -> MemberRecord | None:
        """A member declared dead, to probe: its answer brings it back if it was only paused or cut off."""
        candidates = [m for m in self.members.values() if m.state == "dead"]
        return rng.choice(candidates) if candidates else None

    def all(self) -> list[MemberRecord]:
        return sorted(self.members.values(), key=lambda m: (m.rank, m.node_id))
