"""Following versions due from another publisher (pure bookkeeping, gossip.store.succession)."""

from __future__ import annotations

from gossip.store.succession import Awaited


def test_a_version_held_or_superseded_is_forgotten() -> None:
    a = Awaited(limit=4)
    for v, p in ((1, "n1"), (2, "n2"), (3, "n1")):
        a.expect(v, p)

    # v2 arrived; v1 is older than the newest held (v2); v3 is still due, from n1 who owns it.
    due = a.settle(held=lambda v: v == 2, newest=2, owner=lambda v: "n1", me="n0")

    assert due is None and a.pending() == [(3, "n1")]


def test_the_newest_version_a_silent_publisher_left_is_this_nodes_to_finish() -> None:
    a = Awaited(limit=4)
    a.expect(5, "n1")
    a.expect(6, "n2")
    a.expect(7, "n1")
    owners = {5: "n0", 6: "n2", 7: "n0"}  # n1 is gone: n0 owns its keys now

    due = a.settle(held=lambda v: False, newest=None, owner=owners.get, me="n0")
    assert due == (7, "n1")
    a.taken(7)
    assert a.pending() == []  # the older ones are superseded by the one published


def test_a_version_due_from_this_node_or_owned_by_another_waits() -> None:
    a = Awaited(limit=4)
    a.expect(1, "n0")  # never recorded by the service, and harmless if it were
    a.expect(2, "n1")

    assert a.settle(held=lambda v: False, newest=None, owner=lambda v: "n1", me="n0") is None
    assert a.settle(held=lambda v: False, newest=None, owner=lambda v: None, me="n0") is None
    assert a.pending() == [(2, "n1"), (1, "n0")]


def test_only_the_newest_versions_are_followed_and_the_first_publisher_named_is_kept() -> None:
    a = Awaited(limit=2)
    for v in range(1, 6):
        a.expect(v, f"n{v}")
    a.expect(5, "other")

    assert a.pending() == [(5, "n5"), (4, "n4")]
