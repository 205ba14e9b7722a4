"""SWIM-style membership: probes, piggybacked news, suspicion and refutation, free of any I/O.

The heartbeat protocol of :class:`~gossip.core.membership.Membership` swaps whole
tables and judges a member by how long its heartbeat has not grown: every node
must hear every other node's heartbeat, so each one's traffic grows with N. This
variant follows SWIM (Das, Gupta, Motivala, DSN 2002) as memberlist runs it
(hashicorp/memberlist, with Lifeguard's suspicion timeout that grows with log N):

- **Failure detection by probes.** Each round a node probes one member, taking
  them in a shuffled round-robin order, so every member is probed by someone about
  once a round and by each node within N rounds. An answer is a sign of life. A
  probe that fails is tried again through ``INDIRECT_PROBES`` other members (SWIM's
  ping-req: a path between two nodes may fail while the member is fine); when none of
  them reaches it either, the member is *suspect* (this node's claim, spread like any
  news). A suspect member is declared *dead* when it has not refuted the claim
  within the suspicion timeout.
- **Refutation.** A node that hears a claim that it is suspect or dead answers it
  by raising its own version (the ``heartbeat`` field, here a refutation counter
  that only grows when needed) and spreading its record: a newer version beats any
  claim about an older one.
- **Piggybacked news.** What changed (a join, a suspicion, a refutation, a death, a
  leave) rides on the probes and their answers, at most ``MAX_NEWS`` records per
  message, each sent ``RETRANSMIT * ceil(log2(N + 2))`` times, least sent first
  (the newest first among those sent as often):
  news reaches every node in O(log N) rounds with messages of bounded size.
- **Anti-entropy.** A newcomer's first probes, and every node's probe every
  ``max(60, 2 N)`` rounds (growing with N so the cost per node stays flat), carry
  the whole table and the answer does too, which heals any news that was dropped.
  So does every 4th probe while more than ``BACKLOG_NEWS`` records wait to be sent,
  and every probe while they would fill most of a whole table (hundreds of members
  started at once): news alone would take rounds in proportion to N to carry N
  joins, 16 records a message.

The records and merge rules are the heartbeat protocol's (versions never move
backwards, tombstones, leaves, restarts), with one addition: at an equal version a
record's state claim orders as alive < suspect < dead, so a suspicion of a version
overrides that version's "alive" and only the member itself can beat it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

from gossip.core.membership import MemberRecord, Membership, MembershipConfig

# News records per probe or answer: the bound on a message's size.
MAX_NEWS = 16
# Each piece of news is sent this many times log2(N + 2) (memberlist's RetransmitMult is 4).
RETRANSMIT = 3
# Suspicion lasts at least this many rounds times log2(N + 1): time for the claim to reach the
# member and its refutation to come back, which grows with the number of hops (Lifeguard).
SUSPICION_ROUNDS = 4
# Rounds between whole-table syncs: at least FULL_SYNC_ROUNDS, and FULL_SYNC_ROUNDS_PER_MEMBER
# per member beyond, so a node's share of the anti-entropy stays about 2 * 70 bytes per member
# over 2 N rounds: under 150 bytes/s at any N with 0.5 s rounds.
FULL_SYNC_ROUNDS = 60
FULL_SYNC_ROUNDS_PER_MEMBER = 2
FIRST_FULL_SYNCS = 3
# While more news wait than BACKLOG_NEWS (many members joined or changed at once), every
# BACKLOG_SYNC_ROUNDS-th probe carries the whole table instead: a push-pull of whole tables
# spreads N joins in O(log N) rounds, where MAX_NEWS records a message need O(N) rounds. While
# the news waiting would fill more than BACKLOG_WHOLE_SHARE of a whole table (a launch of
# hundreds of nodes), every probe does: a whole table then costs little more than the news it
# carries, and the last joins reach everyone in 2-3 rounds instead of 4-6 (the unit model at
# 256). Below that share (churn), every probe would carry whole tables for as long as the churn
# outpaced the news, several times the records of every 4th probe.
BACKLOG_NEWS = 2 * MAX_NEWS
BACKLOG_SYNC_ROUNDS = 4
BACKLOG_WHOLE_SHARE = 0.75
# Members asked to probe a member that did not answer this node's own probe, before it is
# suspected (SWIM's ping-req; memberlist's IndirectChecks is 3).
INDIRECT_PROBES = 3

_RANK = {"alive": 0, "suspect": 1, "dead": 2, "left": 3}


class Swim(Membership):
    """A member table kept by probes and piggybacked news (see the module docstring)."""

    def __init__(
        self,
        me: MemberRecord,
        config: MembershipConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(me, config, clock)
        self._sent: dict[str, int] = {}  # node id -> times its record went out as news
        self._queued: dict[str, int] = {}  # node id -> when it became news (a counter): newest first
        self._queue_count = 0
        self._order: list[str] = []  # the probe order left of this pass
        self._deaths: list[str] = []  # declared dead by news since the last sweep
        self._rounds = 0

    # --- news ------------------------------------------------------------------------------

    def spread(self, node_id: str) -> None:
        """Send ``node_id``'s record (as it is when it goes) as news, its count started over."""
        self._sent[node_id] = 0
        self._queue_count += 1
        self._queued[node_id] = self._queue_count

    def news(self) -> list[MemberRecord]:
        """The records to piggyback on the next message: least sent first, at most MAX_NEWS."""
        out: list[MemberRecord] = []
        for node_id in sorted(self._sent, key=lambda k: (self._sent[k], -self._queued[k])):
            rec = self.me if node_id == self.me.node_id else self.members.get(node_id)
            if rec is None:
                self._forget(node_id)
                continue
            if len(out) == MAX_NEWS:
                break
            out.append(rec)
            self._count_sent(node_id)
        return out

    def sent_whole_table(self) -> None:
        """The whole table went out (anti-entropy): one more sending of every record queued as
        news, which it carries. Without this, the whole-table syncs of a backlog would delay the
        news they stand in for, and the backlog would outlast them."""
        for node_id in list(self._sent):
            self._count_sent(node_id)

    def _count_sent(self, node_id: str) -> None:
        """One more sending of ``node_id``'s news; done after ``RETRANSMIT * log2(N + 2)``."""
        self._sent[node_id] += 1
        if self._sent[node_id] >= RETRANSMIT * math.ceil(math.log2(len(self.members) + 2)):
            self._forget(node_id)

    def _forget(self, node_id: str) -> None:
        del self._sent[node_id], self._queued[node_id]

    def full_sync_due(self) -> bool:
        """Whether this round's probe should carry the whole table (anti-entropy)."""
        self._rounds += 1
        every = max(FULL_SYNC_ROUNDS, FULL_SYNC_ROUNDS_PER_MEMBER * len(self.members))
        # A newcomer's first probes carry the table it joined with: the members it meets learn
        # everyone at once, not one news record at a time.
        queued = len(self._sent)
        backlog = queued > BACKLOG_NEWS and (
            self._rounds % BACKLOG_SYNC_ROUNDS == 0 or queued > BACKLOG_WHOLE_SHARE * len(self.members)
        )
        return self._rounds <= FIRST_FULL_SYNCS or self._rounds % every == 0 or backlog

    def claims_about(self, node_id: str) -> list[MemberRecord]:
        """This node's record of ``node_id`` when it holds it suspect or dead: sent to that member
        so it can refute (a probe of it, or an answer to it)."""
        rec = self.members.get(node_id)
        return [rec] if rec is not None and rec.state in ("suspect", "dead") else []

    # --- merging -------------------------------------------------------------------------------

    def merge(self, records: Iterable[MemberRecord]) -> list[str]:
        """Fold news in: newer versions win, at an equal one the stronger claim; claims about this
        node are refuted. Returns the ids of members that are new or came back."""
        changed: list[str] = []
        for rec in records:
            if rec.node_id == self.me.node_id:
                self._refute(rec)
                continue
            cur = self.members.get(rec.node_id)
            if cur is not None and (rec.incarnation, rec.heartbeat) == (cur.incarnation, cur.heartbeat):
                if _RANK.get(rec.state, 0) > _RANK.get(cur.state, 0) and rec.state in ("suspect", "dead"):
                    self._claim(cur, rec.state)
                continue
            before = None if cur is None else (cur.incarnation, cur.heartbeat, cur.state)
            changed += super().merge([rec])
            new = self.members.get(rec.node_id)
            if new is None or before == (new.incarnation, new.heartbeat, new.state):
                continue  # not taken
            self._entered(new)
        return changed

    def _refute(self, rec: MemberRecord) -> None:
        me = self.me
        if (
            rec.incarnation == me.incarnation
            and rec.state in ("suspect", "dead")
            and rec.heartbeat >= me.heartbeat
        ):
            me.heartbeat = rec.heartbeat + 1
            self.spread(me.node_id)

    def _claim(self, m: MemberRecord, state: str) -> None:
        """This node now holds ``m`` ``state`` (suspect or dead) at its current version."""
        if m.state != state:
            m.state = state
            self._entered(m)

    def _entered(self, m: MemberRecord) -> None:
        """``m`` took a new version or state here: news, and a suspicion's clock or a death."""
        self.spread(m.node_id)
        if m.state == "suspect":
            m.meta["suspect_at"] = self.clock()
        elif m.state == "dead":
            self._tombstones[m.node_id] = (m.incarnation, m.heartbeat)
            self._deaths.append(m.node_id)

    # --- probes --------------------------------------------------------------------------------

    def next_probe(self, rng: random.Random) -> MemberRecord | None:
        """The next member to probe: each member not known dead once per pass, in a fresh
        random order every pass."""
        for _ in range(2):
            while self._order:
                m = self.members.get(self._order.pop())
                if m is not None and m.state in ("alive", "suspect"):
                    return m
            self._order = [n for n, m in self.members.items() if m.state in ("alive", "suspect")]
            rng.shuffle(self._order)
        return None

    def helpers(self, node_id: str, rng: random.Random, k: int = INDIRECT_PROBES) -> list[MemberRecord]:
        """Up to ``k`` alive members other than ``node_id``, drawn at random: whom to ask to probe
        it when it did not answer this node (a path between two nodes can fail while the
        member is fine)."""
        alive = [m for n, m in self.members.items() if n != node_id and m.state == "alive"]
        return rng.sample(alive, min(k, len(alive)))

    def answered(self, node_id: str) -> None:
        """A direct sign of life from ``node_id`` (it answered a probe, or probed this node)."""
        if node_id in self.members:
            self._seen[node_id] = self.clock()

    def probe_failed(self, node_id: str) -> None:
        """A probe of ``node_id`` got no answer: suspect it (a claim it can refute)."""
        m = self.members.get(node_id)
        if m is not None and m.state == "alive":
            self._claim(m, "suspect")

    # --- the clock -------------------------------------------------------------------------------

    def suspicion_timeout(self) -> float:
        floor = self.config.dead_after - self.config.suspect_after
        return max(floor, SUSPICION_ROUNDS * math.log2(len(self.members) + 1) * self.config.interval)

    def discount(self, seconds: float) -> None:
        super().discount(seconds)
        for m in self.members.values():
            if "suspect_at" in m.meta:
                m.meta["suspect_at"] = min(self.clock(), m.meta["suspect_at"] + seconds)

    def sweep(self) -> list[str]:
        """Suspects that did not refute in time are dead; leaves expire. Silence alone is no
        claim here (members are heard from only when probed). Returns ids newly dead."""
        now = self.clock()
        timeout = self.suspicion_timeout()
        for node_id, m in list(self.members.items()):
            if m.state == "left":
                if now - m.meta.get("left_at", now) > self.config.left_ttl:
                    self._drop(node_id)
            elif m.state == "suspect" and now - m.meta.get("suspect_at", now) > timeout:
                self._claim(m, "dead")
        died, self._deaths = self._deaths, []
        # Only those still in the table: a newer life at the same address may have replaced one.
        return [n for n in died if n in self.members and self.members[n].state == "dead"]
