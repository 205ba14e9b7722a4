"""Simulator mixing against references: dense W from topology.py, exact sums, matching properties."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.averaging import (
    average_pairs_,
    pairwise_round_,
    push_sum_round_,
    push_sum_round_lossy_,
    random_matching_edges,
)
from gossip.core.topology import Topology, one_peer_exponential_partner, one_peer_exponential_partners
from gossip.sim.mixing import PairwiseMixer, PushSumMixer, SyncMixer, make_mixer


def _stack(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("spec", "n"),
    [("ring", 16), ("torus", 16), ("hypercube", 8), ("complete", 7), ("star", 9), ("random-regular:4", 20)],
)
@pytest.mark.parametrize("rule", ["metropolis", "uniform"])
def test_mixing_entries_are_the_mixing_matrix(spec: str, n: int, rule: str) -> None:
    top = Topology.parse(spec, n)
    rows, cols, values = top.mixing_entries(0, rule)
    w = np.zeros((n, n))
    w[rows, cols] = values
    np.testing.assert_allclose(w, top.mixing_matrix(0, rule), rtol=0, atol=1e-15)
    assert np.all(np.diff(rows * n + cols) > 0)  # sorted, no duplicates


@pytest.mark.parametrize("n", [1, 2, 5, 16, 24])
def test_one_peer_partners_vectorized_match_scalar(n: int) -> None:
    for t in range(7):
        expected = [one_peer_exponential_partner(i, n, t) for i in range(n)]
        assert one_peer_exponential_partners(n, t).tolist() == expected


@pytest.mark.parametrize(("spec", "n"), [("ring", 64), ("complete", 12), ("one-peer-exponential", 12)])
def test_sync_mixer_is_w_times_x(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)
    x = _stack(n, 5)
    mixer = SyncMixer(top, _gen())
    for t in range(3):
        y, messages = mixer.mix(x, t)
        np.testing.assert_allclose(y.numpy(), top.mixing_matrix(t) @ x.numpy(), rtol=0, atol=1e-12)
        assert messages == int((top.mixing_matrix(t) > 0).sum()) - n
        x = y


def test_sync_mixer_with_dead_nodes_keeps_them_and_the_alive_average() -> None:
    top = Topology.parse("ring", 10)
    x = _stack(10, 4)
    active = torch.ones(10, dtype=torch.bool)
    active[[2, 7]] = False
    y, _ = SyncMixer(top, _gen()).mix(x, 0, active)
    torch.testing.assert_close(y[~active], x[~active], rtol=0, atol=0)
    torch.testing.assert_close(y[active].sum(0), x[active].sum(0), rtol=0, atol=1e-12)


def test_sync_mixer_under_loss_keeps_rows_stochastic() -> None:
    top = Topology.parse("torus", 16)
    mixer = SyncMixer(top, _gen(), loss=0.3)
    ones = torch.ones(16, 3, dtype=torch.float64) * 2.5
    for t in range(5):
        y, _ = mixer.mix(ones, t)
        torch.testing.assert_close(y, ones, rtol=0, atol=1e-12)
    x = _stack(16, 3)
    y, _ = mixer.mix(x, 0)
    assert not torch.allclose(y, torch.from_numpy(top.mixing_matrix() @ x.numpy()))


def _assert_maximal_matching(u: torch.Tensor, v: torch.Tensor, chosen: torch.Tensor, n: int) -> None:
    ends = torch.cat([u[chosen], v[chosen]])
    assert ends.unique().numel() == ends.numel()  # disjoint
    matched = torch.zeros(n, dtype=torch.bool)
    matched[ends] = True
    free_edges = ~matched[u] & ~matched[v] & (u != v)
    assert not bool(free_edges.any())  # maximal


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), p=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_random_matching_edges_is_a_maximal_matching(n: int, p: float, seed: int) -> None:
    g = nx.gnp_random_graph(n, p, seed=seed)
    pairs = torch.tensor(list(g.edges), dtype=torch.long).reshape(-1, 2)
    u, v = pairs[:, 0], pairs[:, 1]
    chosen = random_matching_edges(u, v, n, _gen(seed))
    _assert_maximal_matching(u, v, chosen, n)


def test_average_pairs_is_pairwise_round() -> None:
    x = _stack(8, 6)
    expected = x.clone()
    pairwise_round_(expected, [(0, 5), (2, 3), (7, 1)])
    average_pairs_(x, torch.tensor([0, 2, 7]), torch.tensor([5, 3, 1]))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_average_pairs_one_sided_updates_only_the_marked_side() -> None:
    x = _stack(4, 3)
    before = x.clone()
    average_pairs_(
        x, torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([True, True]), torch.tensor([True, False])
    )
    mean01, mean23 = (before[0] + before[1]) / 2, (before[2] + before[3]) / 2
    torch.testing.assert_close(x[[0, 1, 2]], torch.stack([mean01, mean01, mean23]))
    torch.testing.assert_close(x[3], before[3])


@pytest.mark.parametrize(
    ("spec", "n"), [("ring", 12), ("torus", 16), ("complete", 9), ("one-peer-exponential", 8)]
)
def test_pairwise_mixer_averages_a_matching_of_neighbours_and_keeps_the_sum(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)
    mixer = PairwiseMixer(top, _gen(3))
    x = _stack(n, 4)
    for t in range(4):
        state = mixer.gen.get_state()
        first, second = mixer.matching(t, None)
        mixer.gen.set_state(state)  # mix() draws this very matching again
        ends = torch.cat([first, second])
        assert ends.unique().numel() == ends.numel()
        for a, b in zip(first.tolist(), second.tolist(), strict=True):
            assert b in top.neighbors(a, t)
        y, messages = mixer.mix(x, t)
        assert messages == 2 * first.numel()
        torch.testing.assert_close(y.sum(0), x.sum(0), rtol=0, atol=1e-12)
        x = y


def test_pairwise_mixer_skips_inactive_nodes() -> None:
    top = Topology.parse("ring", 10)
    active = torch.ones(10, dtype=torch.bool)
    active[[0, 4]] = False
    x = _stack(10, 2)
    y, _ = PairwiseMixer(top, _gen()).mix(x, 0, active)
    torch.testing.assert_close(y[~active], x[~active], rtol=0, atol=0)


def test_pairwise_loss_leaves_each_node_unchanged_or_at_its_pair_mean() -> None:
    top = Topology.parse("ring", 40)
    mixer = PairwiseMixer(top, _gen(), loss=0.4)
    x = _stack(40, 3)
    gen_state = mixer.gen.get_state()
    first, second = mixer.matching(0, None)
    mixer.gen.set_state(gen_state)
    y, _ = mixer.mix(x, 0)
    mean = (x[first] + x[second]) / 2
    for side in (first, second):
        moved = ~torch.isclose(y[side], x[side]).all(1)
        torch.testing.assert_close(y[side][moved], mean[moved])
    # The answer never moves the responder alone: a responder moved only if its initiator did.
    initiator_moved = ~torch.isclose(y[first], x[first]).all(1)
    responder_moved = ~torch.isclose(y[second], x[second]).all(1)
    assert bool((initiator_moved | ~responder_moved).all())


def test_lossy_push_sum_with_everything_delivered_is_push_sum() -> None:
    x, w = _stack(6, 3), torch.rand(6, dtype=torch.float64, generator=_gen()) + 0.5
    peers = torch.tensor([1, 2, 0, 4, 5, 3])
    x2, w2 = x.clone(), w.clone()
    push_sum_round_(x, w, peers)
    everything = torch.ones(6, dtype=torch.bool)
    push_sum_round_lossy_(x2, w2, peers, everything, everything)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(w2, w)


def test_lost_push_sum_messages_conserve_weight_and_mass() -> None:
    x, w = _stack(8, 3), torch.rand(8, dtype=torch.float64, generator=_gen()) + 0.5
    mass, weight = (w[:, None] * x).sum(0), w.sum()
    peers = (torch.arange(8) + 3) % 8
    delivered = torch.tensor([True, False, True, True, False, False, True, True])
    push_sum_round_lossy_(x, w, peers, delivered, delivered)
    torch.testing.assert_close(w.sum(), weight, rtol=0, atol=1e-12)
    torch.testing.assert_close((w[:, None] * x).sum(0), mass, rtol=0, atol=1e-12)


def test_lost_push_sum_acks_duplicate_but_keep_values_in_the_hull() -> None:
    x, w = _stack(8, 3), torch.ones(8, dtype=torch.float64)
    low, high = x.min(0).values, x.max(0).values
    peers = (torch.arange(8) + 1) % 8
    delivered = torch.ones(8, dtype=torch.bool)
    acked = torch.tensor([True, False] * 4)
    push_sum_round_lossy_(x, w, peers, delivered, acked)
    assert float(w.sum()) == pytest.approx(8 + 4 * 0.5)  # four unacknowledged halves duplicated
    assert bool((x >= low - 1e-12).all() and (x <= high + 1e-12).all())


def test_push_sum_mixer_sends_only_to_active_neighbours() -> None:
    top = Topology.parse("random-regular:4", 20)
    active = torch.ones(20, dtype=torch.bool)
    active[[1, 5, 9]] = False
    mixer = PushSumMixer(top, _gen())
    for t in range(5):
        peers = mixer.out_peers(t, active)
        for i in torch.nonzero(active).flatten().tolist():
            assert peers[i].item() in top.neighbors(i)
            assert bool(active[peers[i]])


def test_push_sum_mixer_under_loss_still_reaches_consensus_within_the_hull() -> None:
    top = Topology.parse("one-peer-exponential", 16)
    mixer = PushSumMixer(top, _gen(), loss=0.3)
    x = _stack(16, 3)
    low, high = x.min(0).values, x.max(0).values
    for t in range(300):
        x, _ = mixer.mix(x, t)
    assert float((x - x.mean(0)).abs().max()) < 1e-6
    assert bool((x >= low).all() and (x <= high).all())
    assert float(mixer.weights.sum()) >= 16 - 1e-9  # weight is duplicated by lost acks, never lost


def test_make_mixer_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        make_mixer("gossip-harder", Topology.parse("ring", 4), _gen())
