"""SWIM-style membership (gossip.core.swim): the pure rules, on a fake clock.

The last tests run whole clusters of tables in memory, every message delivered by
hand: the bounds SWIM promises (bounded messages, news everywhere in O(log N)
rounds, a dead member found by everyone) checked at sizes no machine here can run
as processes.
"""

from __future__ import annotations

import math
import random

import pytest

from gossip.core.membership import MemberRecord, MembershipConfig
from gossip.core.swim import INDIRECT_PROBES, MAX_NEWS, RETRANSMIT, Swim

CONFIG = MembershipConfig(interval=0.5, suspect_after=4.0, dead_after=10.0, member_protocol="swim")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def rec(i: int, heartbeat: int = 0, state: str = "alive") -> MemberRecord:
    return MemberRecord(f"n{i}", f"10.0.0.{i}:7000", 1, heartbeat, state)


def table(i: int, clock: Clock) -> Swim:
    return Swim(rec(i), CONFIG, clock)


def copy(r: MemberRecord) -> MemberRecord:
    return MemberRecord(r.node_id, r.address, r.incarnation, r.heartbeat, r.state, r.rank, r.fingerprint)


def test_news_are_bounded_per_message_and_each_is_sent_a_log_n_number_of_times() -> None:
    clock = Clock()
    t = table(0, clock)
    t.merge([rec(i) for i in range(1, 101)])
    limit = RETRANSMIT * math.ceil(math.log2(100 + 2))

    sent: dict[str, int] = {}
    while batch := t.news():
        assert len(batch) <= MAX_NEWS
        for r in batch:
            sent[r.node_id] = sent.get(r.node_id, 0) + 1

    assert set(sent) == {f"n{i}" for i in range(1, 101)}
    assert set(sent.values()) == {limit}


def test_a_suspicion_reaches_the_suspect_which_refutes_it_with_a_newer_version() -> None:
    clock = Clock()
    a, b = table(0, clock), table(1, clock)
    a.merge([copy(b.me)])
    b.merge([copy(a.me)])

    a.probe_failed("n1")
    assert a.members["n1"].state == "suspect"
    b.merge([copy(r) for r in a.claims_about("n1")])  # a's next probe of b carries its claim

    assert b.me.heartbeat == 1  # refuted
    assert "n1" in {r.node_id for r in b.news()}
    a.merge([copy(b.me)])
    assert a.members["n1"].state == "alive" and a.members["n1"].heartbeat == 1
    clock.t += 60
    assert a.sweep() == []


def test_a_suspect_that_does_not_refute_is_declared_dead_once_and_stays_dead_to_old_news() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(1)])
    a.probe_failed("n1")

    clock.t += a.suspicion_timeout() - 0.1
    assert a.sweep() == []
    clock.t += 0.2
    assert a.sweep() == ["n1"]
    assert a.sweep() == []
    assert a.members["n1"].state == "dead"

    a.merge([rec(1)])  # the version it died at: stale
    assert a.members["n1"].state == "dead"
    assert a.merge([rec(1, heartbeat=1)]) == ["n1"]  # it refuted: back
    assert a.members["n1"].state == "alive"


def test_a_death_heard_as_news_whose_member_a_new_life_replaced_is_not_reported_by_the_sweep() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(1), rec(2)])
    a.merge([rec(1, state="dead")])  # n1's death as news ...
    newer = MemberRecord("n1-again", rec(1).address, 2, 0, "alive")
    a.merge([newer])  # ... and a newer life at its address, under another id, before the sweep
    assert "n1" not in a.members and a.members["n1-again"].state == "alive"
    assert a.sweep() == []


def test_at_one_version_a_stronger_claim_wins_and_a_weaker_one_does_not() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(1, 3)])
    a.merge([rec(1, 3, "suspect")])
    assert a.members["n1"].state == "suspect"
    a.merge([rec(1, 3, "alive")])
    assert a.members["n1"].state == "suspect"  # only the member itself can beat the claim
    a.merge([rec(1, 3, "dead")])
    assert a.members["n1"].state == "dead"
    assert a.sweep() == ["n1"]  # a death learned from news is reported like one found here


def test_a_claim_about_an_older_version_of_this_node_is_not_refuted_again() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([MemberRecord("n0", a.me.address, 1, 0, "suspect")])
    assert a.me.heartbeat == 1
    a.merge([MemberRecord("n0", a.me.address, 1, 0, "dead")])
    assert a.me.heartbeat == 1


def test_the_probe_order_takes_every_member_not_known_dead_once_per_pass() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(i) for i in range(1, 9)])
    a.probe_failed("n3")
    a.merge([rec(5, 0, "dead")])
    rng = random.Random(0)

    first = [a.next_probe(rng) for _ in range(7)]
    second = [a.next_probe(rng) for _ in range(7)]

    for one_pass in (first, second):
        assert sorted(m.node_id for m in one_pass if m is not None) == [
            f"n{i}" for i in (1, 2, 3, 4, 6, 7, 8)
        ]


def test_indirect_probes_go_through_up_to_three_alive_members_other_than_the_target() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(i) for i in range(1, 7)])
    a.probe_failed("n2")  # suspect: not asked to help
    a.merge([rec(5, 0, "dead")])
    rng = random.Random(1)

    for _ in range(20):
        helpers = [m.node_id for m in a.helpers("n3", rng)]
        assert len(helpers) == INDIRECT_PROBES == len(set(helpers))
        assert set(helpers) <= {"n1", "n4", "n6"}
    b = table(0, clock)
    b.merge([rec(1), rec(2)])
    assert [m.node_id for m in b.helpers("n1", rng)] == ["n2"]  # fewer members, fewer helpers
    assert table(0, clock).helpers("n1", rng) == []


def test_a_paused_node_discounts_the_suspicions_it_could_not_hear_refuted() -> None:
    clock = Clock()
    a = table(0, clock)
    a.merge([rec(1)])
    a.probe_failed("n1")
    clock.t += 30
    a.discount(30)
    assert a.sweep() == []


# --- whole clusters in memory ---------------------------------------------------------------


class Cluster:
    """N tables; each round every live node probes its next member, the probe and the answer
    carrying news as the node layer sends them (gossip.node.members)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.nodes = {f"n{i}": table(i, self.clock) for i in range(n)}
        self.down: set[str] = set()
        self.largest = 0  # records in the largest message sent
        seed_node = self.nodes["n0"]
        for t in self.nodes.values():  # each joins through n0: a whole table each way
            if t is not seed_node:
                seed_node.merge([copy(t.me)])
                t.merge([copy(r) for r in seed_node.gossip_records()])

    def round(self) -> None:
        self.clock.t += CONFIG.interval
        for node_id, t in self.nodes.items():
            if node_id in self.down:
                continue
            t.sweep()
            full = t.full_sync_due()
            target = t.next_probe(self.rng)
            if target is None:
                continue
            request = self.message(t, target.node_id, full)
            if target.node_id in self.down:
                t.probe_failed(target.node_id)
                continue
            other = self.nodes[target.node_id]
            other.merge(request)
            t.merge(self.message(other, node_id, full))
            t.answered(target.node_id)

    def message(self, t: Swim, to: str, full: bool) -> list[MemberRecord]:
        if full:  # anti-entropy: the whole table, not counted as a news message
            t.sent_whole_table()
            return [copy(t.me), *map(copy, t.gossip_records())]
        records = [copy(t.me), *map(copy, t.news()), *map(copy, t.claims_about(to))]
        self.largest = max(self.largest, len(records))
        return records

    def settle(self) -> int:
        """Rounds until every node knows every other and has no news left to send."""
        rounds = 0
        while any(len(t.members) < len(self.nodes) - 1 or t._sent for t in self.nodes.values()):
            self.round()
            rounds += 1
            assert rounds < 1000
        return rounds

    def state_of(self, node_id: str) -> set[str]:
        return {
            t.members[node_id].state for k, t in self.nodes.items() if k not in self.down and k != node_id
        }


@pytest.mark.parametrize("n", [16, 128])
def test_a_crashed_member_is_declared_dead_everywhere_and_no_live_one_is(n: int) -> None:
    c = Cluster(n)
    c.settle()
    c.down.add("n7")

    rounds = 0
    while c.state_of("n7") != {"dead"}:
        c.round()
        rounds += 1
        assert rounds < 200, c.state_of("n7")

    # Found within the suspicion timeout plus the O(log N) rounds its news takes to spread.
    timeout_rounds = c.nodes["n0"].suspicion_timeout() / CONFIG.interval
    assert rounds <= timeout_rounds + 4 * math.log2(n) + 10
    assert all(c.state_of(k) == {"alive"} for k in c.nodes if k != "n7")
    assert c.largest <= 1 + MAX_NEWS + 1  # bounded, whatever N


def test_a_newcomer_is_known_to_all_of_128_within_a_log_n_number_of_rounds() -> None:
    c = Cluster(128)
    c.settle()
    newcomer = table(999, c.clock)
    c.nodes["n999"] = newcomer
    c.nodes["n3"].merge([copy(newcomer.me)])  # it joins through n3
    newcomer.merge([copy(r) for r in c.nodes["n3"].gossip_records()])

    rounds = 0
    while any("n999" not in t.members for k, t in c.nodes.items() if k != "n999"):
        c.round()
        rounds += 1
        assert rounds < 60
    assert rounds <= 4 * math.log2(128)


def test_a_wrongly_suspected_member_refutes_before_anyone_declares_it_dead() -> None:
    c = Cluster(64)
    c.settle()
    c.nodes["n1"].probe_failed("n9")  # one lost probe

    for _ in range(100):
        c.round()

    assert c.state_of("n9") == {"alive"}
    assert c.nodes["n9"].me.heartbeat >= 1


@pytest.mark.parametrize(("n", "per_round"), [(64, 8), (256, 8), (256, 50)])
def test_members_started_together_all_know_each_other_within_a_log_n_number_of_rounds(
    n: int, per_round: int
) -> None:
    """A launcher starts nodes in batches, each joining through the same seed: the joins pile
    up as news faster than MAX_NEWS records a message carry, and whole-table syncs while the
    backlog fills most of a table spread them in O(log N) rounds (after the last join: 1 round
    at 64, 3 at 256 with 8 joins a round, 2 with 50 a round as bench/control_plane.py starts 256
    on two cores; with a whole table only every 4th probe, 4 and 6; with news alone, 53 at 256)."""
    c = Cluster(1)
    joined = 1
    while joined < n:
        for _ in range(min(per_round, n - joined)):
            t = table(joined, c.clock)
            c.nodes[t.me.node_id] = t
            c.nodes["n0"].merge([copy(t.me)])
            t.merge([copy(r) for r in c.nodes["n0"].gossip_records()])
            joined += 1
        c.round()

    rounds = 0
    while any(len(t.members) < n - 1 for t in c.nodes.values()):
        c.round()
        rounds += 1
        assert rounds < 200

    assert rounds <= math.log2(n) / 2
    assert c.largest <= 1 + MAX_NEWS + 1  # news messages stay bounded meanwhile
    drained = 0
    while any(t._sent for t in c.nodes.values()):  # and the backlog, with its whole-table syncs, ends
        c.round()
        drained += 1
        assert drained < 200
    assert drained <= 2 * RETRANSMIT * math.log2(n)  # 20-30 (every 4th probe: 36 at 64, 75 at 256)


class CountingCluster(Cluster):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.messages = self.whole_tables = 0

    def message(self, t: Swim, to: str, full: bool) -> list[MemberRecord]:
        self.messages += 1
        self.whole_tables += full
        return super().message(t, to, full)


def test_under_churn_whole_tables_stay_a_small_share_of_the_messages() -> None:
    """Churn that outpaces the news (2 members change a round in 128: each change is sent
    3 log2 N times, 16 records a message) keeps a backlog queued: whole tables then go every
    4th probe, about 1 message in 6, not on every probe (3 in 10, and 4 in 5 at 4 a round)."""
    n = 128
    c = CountingCluster(n)
    c.settle()
    c.messages = c.whole_tables = 0
    rng = random.Random(1)
    for _ in range(120):
        for _ in range(2):
            t = c.nodes[f"n{rng.randrange(n)}"]
            t.me.heartbeat += 1  # a refutation: news to spread
            t.spread(t.me.node_id)
        c.round()
    assert c.whole_tables / c.messages < 0.25


def test_a_whole_table_sent_counts_as_one_sending_of_every_record_queued_as_news() -> None:
    t = table(0, Clock())
    t.merge([rec(i) for i in range(1, 41)])  # 40 joins queued as news
    limit = RETRANSMIT * math.ceil(math.log2(40 + 2))

    for _ in range(limit - 1):
        t.sent_whole_table()
    assert len(t.news()) == MAX_NEWS  # each sent limit - 1 times: one more, and the first 16 are done
    for _ in range(2):
        t.sent_whole_table()
    assert t.news() == []
