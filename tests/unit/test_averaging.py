"""Averaging rules against exact means, dense matrix references and |λ2|."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.averaging import (
    apply_delta_,
    consensus_distance,
    mix_,
    pairwise_delta,
    pairwise_round_,
    push_sum_merge_,
    push_sum_round_,
    push_sum_split,
    random_matching,
)
from gossip.core.spectral import second_eigenvalue
from gossip.core.topology import Topology, one_peer_exponential_partner


def _stack(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _relative_cd(x: torch.Tensor, scale: float) -> float:
    return consensus_distance(x) / scale


def test_pairwise_exchange_preserves_sum_while_training_moves_params() -> None:
    snap_a, snap_b = _stack(2, 50, seed=1)
    cur_a = snap_a + 0.1 * _stack(1, 50, seed=2)[0]  # a trained on after cutting its snapshot
    cur_b = snap_b.clone()
    total = cur_a + cur_b

    apply_delta_(cur_a, pairwise_delta(snap_a, snap_b))
    apply_delta_(cur_b, pairwise_delta(snap_b, snap_a))

    torch.testing.assert_close(cur_a + cur_b, total, rtol=0, atol=1e-14)
    torch.testing.assert_close(cur_b, (snap_a + snap_b) / 2)


def test_pairwise_delta_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        pairwise_delta(torch.zeros(3), torch.zeros(4))


def test_push_sum_merge_is_weighted_mean() -> None:
    z, z_in = _stack(2, 20, seed=3)
    expected = (z * 0.75 + z_in * 0.25) / 1.0

    w = push_sum_merge_(z, 0.75, z_in, 0.25)

    assert w == 1.0
    torch.testing.assert_close(z, expected)


def test_push_sum_split_halves_exactly() -> None:
    kept, sent = push_sum_split(0.3)

    assert kept + sent == 0.3 and kept == pytest.approx(0.15)


def test_push_sum_merge_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        push_sum_merge_(torch.zeros(2), 0.0, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="weights"):
        push_sum_merge_(torch.zeros(2), 1.0, torch.zeros(2), float("nan"))


def test_node_merges_equal_a_simulated_push_sum_round() -> None:
    z = _stack(2, 10, seed=4)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    splits = [push_sum_split(float(w[i])) for i in range(2)]
    messages = [(z[i].clone(), splits[i][1]) for i in range(2)]  # what each node sends the other
    states = [z[i].clone() for i in range(2)]

    push_sum_round_(z, w, [1, 0])
    for i in range(2):
        new_w = push_sum_merge_(states[i], splits[i][0], *messages[1 - i])

        torch.testing.assert_close(states[i], z[i])
        assert new_w == pytest.approx(float(w[i]))


@pytest.mark.parametrize(
    "d",
    # 13: one chunk. 1 << 20: rows of 1 Mi elements, so the ~32 MiB float64 bound on
    # consensus_distance's temporary splits the 9 rows into several chunks.
    [13, 1 << 20],
)
def test_consensus_distance_matches_numpy(d: int) -> None:
    x = _stack(9, d, seed=5, dtype=torch.float32)
    ref = x.double().numpy()
    expected = np.mean(np.sum((ref - ref.mean(axis=0)) ** 2, axis=1))

    assert consensus_distance(x) == pytest.approx(expected, rel=1e-12)
    assert consensus_distance(x.reshape(9, d, 1)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["numpy", "dense", "coo", "csr"])
def test_mix_matches_numpy_product(kind: str) -> None:
    w = Topology.parse("torus", 12).mixing_matrix()
    x = torch.randn(12, 3, 4, dtype=torch.float64)
    expected = w @ x.reshape(12, -1).numpy()
    dense = torch.from_numpy(w)
    options: dict[str, torch.Tensor | np.ndarray] = {
        "numpy": w,
        "dense": dense,
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
    }
    wt = options[kind]

    out = mix_(x, wt)

    assert out is x
    np.testing.assert_allclose(x.reshape(12, -1).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_mix_keeps_half_precision_dtype() -> None:
    x = torch.ones(4, 2, dtype=torch.bfloat16)

    mix_(x, Topology.parse("ring", 4).mixing_matrix())

    assert x.dtype == torch.bfloat16 and bool((x == 1).all())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_one_peer_exponential_reaches_exact_mean_in_log2_n_rounds(k: int) -> None:
    n = 2**k
    top = Topology.parse("one-peer-exponential", n)
    x = _stack(n, 10, seed=k)
    mean = x.mean(dim=0)
    scale = float(x.square().sum(dim=1).mean())

    for t in range(k):
        mix_(x, top.mixing_matrix(t))

    assert _relative_cd(x, scale) < 1e-12
    torch.testing.assert_close(x, mean.expand_as(x), rtol=0, atol=1e-12)


def test_ring_contracts_consensus_by_lambda2_squared() -> None:
    w = Topology.parse("ring", 16).mixing_matrix()
    lam = second_eigenvalue(w)
    x = _stack(16, 8, seed=7)
    cds = []

    for _ in range(120):
        mix_(x, w)
        cds.append(consensus_distance(x))

    # Fit after the faster modes have died out (their ratio to |λ2| is ~0.85 per round).
    t = np.arange(40, 120)
    rate = float(np.exp(np.polyfit(t, np.log(cds[40:120]), 1)[0]))
    assert (1 - rate) == pytest.approx(1 - lam**2, rel=0.05)


@pytest.mark.parametrize(("spec", "n"), [("torus", 16), ("ring", 12), ("erdos-renyi:0.3", 20)])
def test_pairwise_rounds_preserve_sum_and_contract(spec: str, n: int) -> None:
    g = Topology.parse(spec, n).graph()
    rng = np.random.default_rng(0)
    x = _stack(n, 64, seed=8, dtype=torch.float32)
    total = x.double().sum(dim=0)
    cds = [consensus_distance(x)]

    for _ in range(60):
        pairwise_round_(x, random_matching(g, rng))
        cds.append(consensus_distance(x))

    drift = (x.double().sum(dim=0) - total).norm() / total.norm()
    assert float(drift) < 1e-6
    # Geometric decay: every block of 15 rounds shrinks the distance by at least 4x
    # (60 rounds stay well above the float32 floor, where the torus hits exact agreement).
    blocks = cds[::15]
    assert all(b < a / 4 for a, b in itertools.pairwise(blocks))


def test_random_matching_is_maximal_on_edges() -> None:
    g = Topology.parse("random-regular:3", 30).graph()

    pairs = random_matching(g, np.random.default_rng(1))

    ends = [v for p in pairs for v in p]
    assert len(ends) == len(set(ends))
    assert all(g.has_edge(u, v) for u, v in pairs)
    assert not any(u not in ends and v not in ends for u, v in g.edges)


def _push_sum_to_mean(x: torch.Tensor, peers_at: list[list[int]], rounds: int) -> torch.Tensor:
    n = x.shape[0]
    w = torch.ones(n, dtype=torch.float64)
    mass = x.sum(dim=0)
    for t in range(rounds):
        push_sum_round_(x, w, peers_at[t % len(peers_at)])
        torch.testing.assert_close((x * w[:, None]).sum(dim=0), mass, rtol=1e-12, atol=1e-12)
        assert float(w.sum()) == pytest.approx(n, rel=1e-14)
    return mass / n


def test_push_sum_on_one_peer_exponential_converges_for_n_not_power_of_two() -> None:
    n = 12
    peers_at = [[one_peer_exponential_partner(i, n, t) for i in range(n)] for t in range(4)]
    x = _stack(n, 6, seed=9)

    mean = _push_sum_to_mean(x, peers_at, rounds=100)

    torch.testing.assert_close(x, mean.expand_as(x), rtol=0, atol=1e-10)


def test_push_sum_on_random_directed_ring_with_chords_converges() -> None:
    n = 15
    rng = np.random.default_rng(3)
    out = {i: [(i + 1) % n, *rng.choice(n, 2, replace=False).tolist()] for i in range(n)}
    peers_at = [[int(rng.choice(out[i])) for i in range(n)] for _ in range(400)]
    x = _stack(n, 6, seed=10)

    mean = _push_sum_to_mean(x, peers_at, rounds=400)

    torch.testing.assert_close(x, mean.expand_as(x), rtol=0, atol=1e-8)


def test_push_sum_round_matches_column_stochastic_matrix() -> None:
    n = 6
    peers = [3, 0, 0, 5, 4, 2]
    x = _stack(n, 4, seed=11)
    w = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    a = 0.5 * np.eye(n)
    for i, j in enumerate(peers):
        a[j, i] += 0.5
    num = a @ (x * w[:, None]).numpy()
    new_w = a @ w.numpy()

    push_sum_round_(x, w, peers)

    np.testing.assert_allclose(w.numpy(), new_w, rtol=1e-14)
    np.testing.assert_allclose(x.numpy(), num / new_w[:, None], rtol=1e-12)


def test_push_sum_round_rejects_bad_peers() -> None:
    with pytest.raises(ValueError, match="out of range"):
        push_sum_round_(torch.zeros(3, 2), torch.ones(3), [1, 2, 3])


@st.composite
def _stack_and_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    n = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=20))
    return _stack(n, 5, seed=seed), pairs


@settings(max_examples=60, deadline=None)
@given(case=_stack_and_pairs())
def test_pairwise_round_preserves_sum_and_matches_sequential(
    case: tuple[torch.Tensor, list[tuple[int, int]]],
) -> None:
    x, pairs = case
    ref = x.clone()
    for i, j in pairs:
        ref[i], ref[j] = (ref[i] + ref[j]) / 2, (ref[i] + ref[j]) / 2
    total = x.sum(dim=0)

    pairwise_round_(x, pairs)

    torch.testing.assert_close(x.sum(dim=0), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, ref)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 15),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_push_sum_round_conserves_mass(n: int, seed: int, data: st.DataObject) -> None:
    peers = data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
    x = _stack(n, 3, seed=seed)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    mass, weight = (x * w[:, None]).sum(dim=0), float(w.sum())

    push_sum_round_(x, w, peers)

    torch.testing.assert_close((x * w[:, None]).sum(dim=0), mass, rtol=1e-12, atol=1e-12)
    assert float(w.sum()) == pytest.approx(weight, rel=1e-14)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_matching_is_a_maximal_matching_on_any_graph(n: int, p: float, seed: int) -> None:
    g = nx.gnp_random_graph(n, p, seed=seed)

    pairs = random_matching(g, np.random.default_rng(seed))

    matched = {v for pair in pairs for v in pair}
    assert len(matched) == 2 * len(pairs)
    assert all(g.has_edge(u, v) for u, v in pairs)
    assert all(u in matched or v in matched for u, v in g.edges)
