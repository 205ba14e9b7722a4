"""Member table rules, driven by a hand-moved clock."""

from __future__ import annotations

import random

import pytest

from gossip.core.membership import MemberRecord, Membership, MembershipConfig

CONFIG = MembershipConfig(interval=0.5, suspect_after=4.0, dead_after=10.0, left_ttl=30.0)


class Clock:
    """A mutable float the table reads as its clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rec(
    node_id: str, port: int, incarnation: int = 1, heartbeat: int = 0, state: str = "alive", rank: int = -1
) -> MemberRecord:
    return MemberRecord(node_id, f"127.0.0.1:{port}", incarnation, heartbeat, state=state, rank=rank)


def _table() -> tuple[Membership, Clock]:
    clock = Clock()
    me = _rec("me", 9000, incarnation=100)
    return Membership(me, CONFIG, clock=clock), clock


def _state(m: Membership, node_id: str) -> str | None:
    rec = m.members.get(node_id)
    return rec.state if rec is not None else None


# --- merging ---------------------------------------------------------------------


def test_merge_adds_new_members() -> None:
    m, _ = _table()

    changed = m.merge([_rec("a", 9001), _rec("b", 9002)])

    assert sorted(changed) == ["a", "b"]
    assert sorted(m.members) == ["a", "b"]


def test_merge_keeps_its_own_copy_of_a_record() -> None:
    m, _ = _table()
    rec = _rec("a", 9001, heartbeat=1)

    m.merge([rec])
    rec.heartbeat = 99

    assert m.members["a"].heartbeat == 1


def test_merge_ignores_its_own_id() -> None:
    m, _ = _table()

    changed = m.merge([_rec("me", 9000, incarnation=100, heartbeat=50)])

    assert changed == []
    assert m.members == {}
    assert m.me.heartbeat == 0


def test_merge_ignores_an_older_life_at_its_own_address() -> None:
    m, _ = _table()

    m.merge([_rec("old-me", 9000, incarnation=99, heartbeat=500)])

    assert "old-me" not in m.members


def test_newer_heartbeat_wins() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, heartbeat=3)])

    changed = m.merge([_rec("a", 9001, heartbeat=5)])

    assert m.members["a"].heartbeat == 5
    assert changed == []  # not new, not back: just alive


def test_older_heartbeat_is_ignored() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, heartbeat=5)])

    m.merge([_rec("a", 9001, heartbeat=3, rank=4)])

    assert m.members["a"].heartbeat == 5
    assert m.members["a"].rank == -1


def test_newer_incarnation_wins_over_a_larger_heartbeat() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=1, heartbeat=500)])

    m.merge([_rec("a", 9001, incarnation=2, heartbeat=0)])

    assert (m.members["a"].incarnation, m.members["a"].heartbeat) == (2, 0)


def test_beat_grows_own_heartbeat() -> None:
    m, _ = _table()

    m.beat()
    m.beat()

    assert m.me.heartbeat == 2


# --- failure detection ------------------------------------------------------------


def test_member_stays_alive_within_suspect_after() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])

    clock.now += CONFIG.suspect_after - 0.1
    m.sweep()

    assert _state(m, "a") == "alive"


def test_member_becomes_suspect_after_suspect_after() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])

    clock.now += CONFIG.suspect_after + 0.1
    died = m.sweep()

    assert _state(m, "a") == "suspect"
    assert died == []


def test_member_becomes_dead_after_dead_after() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])
    clock.now += CONFIG.suspect_after + 0.1
    m.sweep()

    clock.now += CONFIG.dead_after - CONFIG.suspect_after
    died = m.sweep()

    assert _state(m, "a") == "dead"
    assert died == ["a"]


def test_death_is_reported_once() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])
    clock.now += CONFIG.dead_after + 0.1
    m.sweep()

    clock.now += 1.0
    died = m.sweep()

    assert died == []
    assert _state(m, "a") == "dead"


def test_suspect_recovers_when_heartbeat_grows() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, heartbeat=1)])
    clock.now += CONFIG.suspect_after + 0.1
    m.sweep()

    m.merge([_rec("a", 9001, heartbeat=2)])
    m.sweep()

    assert _state(m, "a") == "alive"


def test_suspect_does_not_recover_on_the_same_heartbeat() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, heartbeat=1)])
    clock.now += CONFIG.suspect_after + 0.1
    m.sweep()

    m.merge([_rec("a", 9001, heartbeat=1)])
    m.sweep()

    assert _state(m, "a") == "suspect"


def test_recovered_member_restarts_its_timer() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, heartbeat=1)])
    clock.now += CONFIG.suspect_after + 0.1
    m.sweep()
    m.merge([_rec("a", 9001, heartbeat=2)])

    clock.now += CONFIG.suspect_after - 0.1
    m.sweep()

    assert _state(m, "a") == "alive"
    assert m.seconds_since_heartbeat("a") == pytest.approx(CONFIG.suspect_after - 0.1)


def test_time_this_node_could_not_listen_is_not_held_against_members() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])
    clock.now += CONFIG.dead_after + 5.0  # e.g. this process was stopped

    m.discount(CONFIG.dead_after + 5.0)
    died = m.sweep()

    assert died == []
    assert _state(m, "a") == "alive"


def test_discounted_members_are_suspected_again_once_quiet_for_long_enough() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])
    clock.now += 20.0
    m.discount(20.0)

    clock.now += CONFIG.suspect_after + 0.1
    m.sweep()

    assert _state(m, "a") == "suspect"


def test_discount_gives_no_credit_beyond_now() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001)])
    clock.now += 1.0

    m.discount(100.0)

    assert m.seconds_since_heartbeat("a") == 0.0
    clock.now += CONFIG.dead_after + 0.1
    assert m.sweep() == ["a"]


def test_pick_dead_picks_only_dead_members() -> None:
    m = _mixed_table()
    rng = random.Random(0)

    picks = {m.pick_dead(rng).node_id for _ in range(20)}  # type: ignore[union-attr]

    assert picks == {"d"}


def test_pick_dead_without_dead_members_is_none() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001)])

    assert m.pick_dead(random.Random(0)) is None


@pytest.mark.parametrize("heartbeat", [3, 2])
def test_dead_member_is_not_revived_by_stale_gossip(heartbeat: int) -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, heartbeat=3)])
    clock.now += CONFIG.dead_after + 0.1
    m.sweep()

    changed = m.merge([_rec("a", 9001, heartbeat=heartbeat)])
    m.sweep()

    assert changed == []
    assert _state(m, "a") == "dead"


def test_dead_member_is_revived_by_a_newer_incarnation() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, incarnation=1, heartbeat=3)])
    clock.now += CONFIG.dead_after + 0.1
    m.sweep()

    changed = m.merge([_rec("a", 9001, incarnation=2, heartbeat=0)])
    m.sweep()

    assert changed == ["a"]
    assert _state(m, "a") == "alive"
    assert m.members["a"].incarnation == 2


def test_restart_under_a_new_id_at_the_same_address_evicts_the_old_record() -> None:
    m, _ = _table()
    m.merge([_rec("old", 9001, incarnation=1, heartbeat=8, rank=3)])

    changed = m.merge([_rec("new", 9001, incarnation=2, heartbeat=0, rank=3)])

    assert changed == ["new"]
    assert "old" not in m.members
    assert m.by_rank(3) is not None and m.by_rank(3).node_id == "new"  # type: ignore[union-attr]


def test_evicted_old_id_is_not_brought_back_by_its_gossip() -> None:
    m, _ = _table()
    m.merge([_rec("old", 9001, incarnation=1, heartbeat=8)])
    m.merge([_rec("new", 9001, incarnation=2, heartbeat=0)])

    changed = m.merge([_rec("old", 9001, incarnation=1, heartbeat=9)])

    assert changed == []
    assert sorted(m.members) == ["new"]


def test_older_life_at_a_known_address_is_ignored() -> None:
    m, _ = _table()
    m.merge([_rec("new", 9001, incarnation=2)])

    m.merge([_rec("old", 9001, incarnation=1, heartbeat=50)])

    assert sorted(m.members) == ["new"]


def test_each_newer_life_at_an_address_evicts_the_one_before() -> None:
    m, _ = _table()
    for life, node in enumerate(["first", "second", "third"], start=1):
        m.merge([_rec(node, 9001, incarnation=life)])

    m.merge([_rec("second", 9001, incarnation=2, heartbeat=5)])  # its gossip, later

    assert sorted(m.members) == ["third"]


def test_a_member_that_moved_leaves_its_old_address_to_others() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=5)])
    m.merge([_rec("a", 9002, incarnation=6)])  # restarted on another port

    m.merge([_rec("b", 9001, incarnation=1)])  # an older incarnation, but nobody's rival there now

    assert sorted(m.members) == ["a", "b"]


# --- leaving ------------------------------------------------------------------------


def test_mark_left_sets_left() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4)])

    ok = m.mark_left("a", 4)

    assert ok
    assert _state(m, "a") == "left"


@pytest.mark.parametrize(
    ("node_id", "incarnation"), [("a", 3), ("zz", 4)], ids=["wrong incarnation", "unknown id"]
)
def test_mark_left_ignores_requests_that_do_not_match(node_id: str, incarnation: int) -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4)])

    ok = m.mark_left(node_id, incarnation)

    assert not ok
    assert _state(m, "a") == "alive"


@pytest.mark.parametrize("heartbeat", [5, 4, 6], ids=["same", "older", "newer"])
def test_mark_left_is_sticky_against_gossip_of_the_same_life(heartbeat: int) -> None:
    # A peer that heard a heartbeat after our last one must not undo the leave:
    # the leaver stopped for good in that incarnation.
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5)])
    m.mark_left("a", 4)

    changed = m.merge([_rec("a", 9001, incarnation=4, heartbeat=heartbeat)])

    assert changed == []
    assert _state(m, "a") == "left"


@pytest.mark.parametrize("heartbeat", [5, 4, 6], ids=["same", "older", "newer"])
def test_gossiped_leave_is_sticky_against_gossip_of_the_same_life(heartbeat: int) -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=3)])
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5, state="left")])

    changed = m.merge([_rec("a", 9001, incarnation=4, heartbeat=heartbeat)])

    assert changed == []
    assert _state(m, "a") == "left"


def test_gossiped_leave_of_the_same_version_is_taken() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5)])

    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5, state="left")])

    assert _state(m, "a") == "left"


def test_gossiped_leave_beats_a_fresher_heartbeat_of_the_same_life() -> None:
    # The peer that relays the leave may have last heard the leaver before we did.
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=9)])

    m.merge([_rec("a", 9001, incarnation=4, heartbeat=7, state="left")])

    assert _state(m, "a") == "left"


def test_leave_of_an_unknown_member_is_recorded() -> None:
    m, _ = _table()

    changed = m.merge([_rec("a", 9001, incarnation=4, heartbeat=5, state="left")])

    assert changed == []
    assert _state(m, "a") == "left"


def test_left_member_comes_back_with_a_newer_incarnation() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5)])
    m.mark_left("a", 4)

    changed = m.merge([_rec("a", 9001, incarnation=5, heartbeat=0)])

    assert changed == ["a"]
    assert _state(m, "a") == "alive"


def test_left_member_is_not_suspected_or_killed_by_sweep() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, incarnation=4)])
    m.mark_left("a", 4)

    clock.now += CONFIG.dead_after + 1
    died = m.sweep()

    assert died == []
    assert _state(m, "a") == "left"


def test_left_record_expires_after_left_ttl() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, incarnation=4)])
    m.mark_left("a", 4)

    clock.now += CONFIG.left_ttl + 0.1
    m.sweep()

    assert "a" not in m.members


def test_the_address_index_holds_only_members_where_they_are() -> None:
    """A peer that sends ever new ids and addresses that leave, or a member that keeps moving,
    must not grow the table's index of addresses without bound."""
    m, clock = _table()
    for i in range(50):
        m.merge([_rec(f"gone{i}", 10_000 + i, state="left")])
        m.merge([_rec("mover", 20_000 + i, incarnation=i + 1)])
    clock.now += CONFIG.left_ttl + 0.1

    m.sweep()

    assert sorted(m.members) == ["mover"]
    assert m._at_address == {m.members["mover"].address: "mover"}


def test_left_record_survives_until_left_ttl() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, incarnation=4)])
    m.mark_left("a", 4)

    clock.now += CONFIG.left_ttl - 0.1
    m.sweep()

    assert _state(m, "a") == "left"


def test_expired_leave_still_blocks_stale_gossip() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, incarnation=4, heartbeat=5)])
    m.mark_left("a", 4)
    clock.now += CONFIG.left_ttl + 0.1
    m.sweep()

    changed = m.merge([_rec("a", 9001, incarnation=4, heartbeat=5)])

    assert changed == []
    assert "a" not in m.members


# --- queries --------------------------------------------------------------------------


def _mixed_table() -> Membership:
    """a alive, s suspect, d dead, l left."""
    m, clock = _table()
    m.merge([_rec("d", 9004, heartbeat=1)])
    clock.now += CONFIG.suspect_after - 1
    m.merge([_rec("s", 9002, heartbeat=1)])
    clock.now += CONFIG.dead_after - CONFIG.suspect_after + 2
    m.merge([_rec("a", 9001, heartbeat=1), _rec("l", 9003, incarnation=2, heartbeat=1)])
    m.mark_left("l", 2)
    m.sweep()
    assert {k: v.state for k, v in m.members.items()} == {
        "a": "alive",
        "s": "suspect",
        "d": "dead",
        "l": "left",
    }
    return m


def test_gossip_records_exclude_dead_and_include_self() -> None:
    m = _mixed_table()

    ids = [r.node_id for r in m.gossip_records()]

    assert sorted(ids) == ["a", "l", "me", "s"]


def test_gossip_records_carry_own_latest_heartbeat() -> None:
    m, _ = _table()
    m.beat()

    me = [r for r in m.gossip_records() if r.node_id == "me"]

    assert [r.heartbeat for r in me] == [1]


def test_alive_excludes_suspect_dead_and_left() -> None:
    m = _mixed_table()

    ids = [r.node_id for r in m.alive()]

    assert ids == ["a"]


def test_alive_excludes_self() -> None:
    m, _ = _table()

    assert m.alive() == []


def test_by_rank_finds_an_alive_member() -> None:
    m, _ = _table()
    m.merge([_rec("a", 9001, rank=0), _rec("b", 9002, rank=1)])

    found = m.by_rank(1)

    assert found is not None and found.node_id == "b"


def test_by_rank_skips_dead_members_and_unknown_ranks() -> None:
    m, clock = _table()
    m.merge([_rec("a", 9001, rank=0)])
    clock.now += CONFIG.dead_after + 1
    m.sweep()

    assert m.by_rank(0) is None
    assert m.by_rank(5) is None


def test_pick_gossip_target_never_picks_dead_or_left() -> None:
    m = _mixed_table()
    rng = random.Random(0)

    picks = {m.pick_gossip_target(rng).node_id for _ in range(50)}  # type: ignore[union-attr]

    assert picks == {"a", "s"}


def test_pick_gossip_target_on_an_empty_table_is_none() -> None:
    m, _ = _table()

    assert m.pick_gossip_target(random.Random(0)) is None


def test_members_beyond_the_cap_are_ignored() -> None:
    me = MemberRecord("me", "127.0.0.1:1", 1, 0)
    ms = Membership(me, MembershipConfig(max_members=3), clock=lambda: 0.0)
    ms.merge([MemberRecord(f"n{i}", f"127.0.0.1:{100 + i}", 1, 1) for i in range(10)])
    assert len(ms.members) == 3
    # Known members still update.
    ms.merge([MemberRecord("n0", "127.0.0.1:100", 1, 5)])
    assert ms.members["n0"].heartbeat == 5
