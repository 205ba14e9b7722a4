"""The rest policy after training: back off while exchanges no longer move a node, wake when they do."""

from __future__ import annotations

import random

from gossip.node.rest import RestPolicy


def policy() -> RestPolicy:
    return RestPolicy(min_pause=0.02, max_pause=10.0, tolerance=1e-6)


def test_small_changes_double_the_pause_up_to_the_slowest() -> None:
    p = policy()
    pauses = []
    for _ in range(12):
        p.moved(1e-9)
        pauses.append(p.pause)

    assert pauses[:3] == [0.04, 0.08, 0.16]
    assert pauses[-1] == 10.0 and p.resting


def test_a_large_change_wakes_at_once() -> None:
    p = policy()
    for _ in range(20):
        p.moved(1e-9)

    p.moved(1e-3)

    assert p.pause == 0.02 and not p.resting and p.last_ratio == 1e-3


def test_a_peer_whose_step_advanced_wakes_it() -> None:
    p = policy()
    assert not p.heard("a", 10)  # first word from a: nothing to compare with
    for _ in range(20):
        p.moved(1e-9)

    assert not p.heard("a", 10)  # a is done too: its step stands still
    assert p.resting
    assert p.heard("a", 11)  # a trains again
    assert p.pause == 0.02


def test_pauses_are_jittered_within_twenty_percent() -> None:
    p = policy()
    for _ in range(20):
        p.moved(0.0)
    rng = random.Random(0)

    pauses = [p.next_pause(rng) for _ in range(200)]

    assert min(pauses) >= 8.0 and max(pauses) <= 12.0 and len(set(pauses)) > 100
