"""Topologies against independent networkx graphs and numpy eigenvalues."""

from __future__ import annotations

import pickle
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.spectral import describe, draw, second_eigenvalue, spectral_gap
from gossip.core.topology import TOPOLOGY_NAMES, Topology, TopologyError, one_peer_exponential_partner
from gossip.core.weights import metropolis_hastings, uniform_weights

CASES = [
    ("ring", 3),
    ("ring", 8),
    ("ring", 13),
    ("torus", 9),
    ("torus", 12),
    ("torus", 20),
    ("hypercube", 4),
    ("hypercube", 16),
    ("exponential", 5),
    ("exponential", 8),
    ("exponential", 12),
    ("one-peer-exponential", 5),
    ("one-peer-exponential", 8),
    ("one-peer-exponential", 12),
    ("complete", 2),
    ("complete", 7),
    ("star", 3),
    ("star", 9),
    ("random-regular:3", 10),
    ("random-regular:4", 15),
    ("erdos-renyi:0.4", 12),
    ("small-world", 10),
    ("small-world:2,0.3", 10),
    ("random", 6),
]


def test_cases_cover_every_name() -> None:
    assert {Topology.parse(spec, n).name for spec, n in CASES} == set(TOPOLOGY_NAMES)


def _matrices(top: Topology) -> list[np.ndarray]:
    rules = ["metropolis"] if top.time_varying else ["metropolis", "uniform"]
    return [top.mixing_matrix(t, rule) for t in range(top.period()) for rule in rules]


@pytest.mark.parametrize(("spec", "n"), CASES)
def test_mixing_matrix_is_doubly_stochastic(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)

    for w in _matrices(top):
        assert w.shape == (n, n) and w.dtype == np.float64
        assert (w >= -1e-15).all()
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        if not top.directed:
            np.testing.assert_array_equal(w, w.T)


@pytest.mark.parametrize(("spec", "n"), CASES)
def test_spectral_gap_matches_numpy_eigenvalues(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)

    for w in _matrices(top):
        mags = np.sort(np.abs(np.linalg.eigvals(w)))
        assert second_eigenvalue(w) == pytest.approx(mags[-2], abs=1e-10)
        assert spectral_gap(w) == pytest.approx(1.0 - mags[-2], abs=1e-10)


@pytest.mark.parametrize(("spec", "n"), CASES)
def test_mixing_matrix_support_is_the_graph(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)

    for t in range(top.period()):
        w = top.mixing_matrix(t)
        off = {(i, j) for i, j in zip(*np.nonzero(w), strict=True) if i != j}
        if top.directed:
            # Row i holds the weight on its in-peer: the transpose of the edge i -> out-peer.
            assert off == {(j, i) for i, j in top.graph(t).edges}
        else:
            assert off == {(i, j) for i in range(n) for j in top.neighbors(i)}


@pytest.mark.parametrize(("spec", "n"), [c for c in CASES if not c[0].startswith("one-peer")])
def test_neighbors_match_the_graph(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)
    g = top.graph()

    assert sorted(g.nodes) == list(range(n))
    assert nx.is_connected(g)
    for rank in range(n):
        assert top.neighbors(rank) == sorted(g.adj[rank])
        assert top.out_neighbors(rank) == top.neighbors(rank)


def _reference(spec: str, n: int) -> nx.Graph:
    if spec == "ring":
        return nx.cycle_graph(n)
    if spec == "torus":
        a = max(d for d in range(3, int(n**0.5) + 1) if n % d == 0)
        grid = nx.grid_2d_graph(a, n // a, periodic=True)
        return nx.relabel_nodes(grid, {(r, c): r * (n // a) + c for r, c in grid})
    if spec == "hypercube":
        cube = nx.hypercube_graph(n.bit_length() - 1)
        return nx.relabel_nodes(cube, {v: int("".join(map(str, v)), 2) for v in cube})
    if spec in ("complete", "random"):
        return nx.complete_graph(n)
    if spec == "star":
        return nx.star_graph(n - 1)
    if spec == "random-regular:3":
        return nx.random_regular_graph(3, n, seed=0)
    if spec == "small-world":
        return nx.connected_watts_strogatz_graph(n, 4, 0.1, seed=0)
    raise AssertionError(spec)


@pytest.mark.parametrize(
    ("spec", "n"),
    [
        ("ring", 9),
        ("torus", 15),
        ("torus", 16),
        ("hypercube", 8),
        ("complete", 6),
        ("random", 6),
        ("star", 7),
        ("random-regular:3", 12),
        ("small-world", 14),
    ],
)
def test_graph_equals_networkx_generator(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)

    assert nx.utils.graphs_equal(nx.Graph(top.graph()), _reference(spec, n))


def test_exponential_graph_links_powers_of_two() -> None:
    top = Topology.parse("exponential", 12)

    assert top.neighbors(0) == [1, 2, 4, 8, 10, 11]


def test_one_peer_exponential_schedule() -> None:
    top = Topology.parse("one-peer-exponential", 12)

    assert top.time_varying and top.directed and top.period() == 4
    assert [one_peer_exponential_partner(3, 12, t) for t in range(5)] == [4, 5, 7, 11, 4]
    assert [top.out_neighbors(3, t) for t in range(4)] == [[4], [5], [7], [11]]
    assert top.neighbors(3, 3) == [7, 11]
    assert list(top.graph(2).edges) == [(i, (i + 4) % 12) for i in range(12)]
    assert top.graph(6) is top.graph(2)


def test_one_peer_exponential_matrix_is_half_identity_half_shift() -> None:
    top = Topology.parse("one-peer-exponential", 6)
    expected = np.eye(6) / 2
    for i in range(6):
        expected[i, (i - 2) % 6] = 0.5  # at t=1 node i receives from its in-peer i - 2

    w = top.mixing_matrix(1)

    np.testing.assert_array_equal(w, expected)


def test_metropolis_weights_match_definition() -> None:
    g = nx.lollipop_graph(4, 3)
    deg = dict(g.degree())

    w = metropolis_hastings(g)

    for i in g:
        for j in g:
            if i != j:
                expected = 1 / (1 + max(deg[i], deg[j])) if g.has_edge(i, j) else 0.0
                assert w[i, j] == pytest.approx(expected)
        assert w[i, i] == pytest.approx(1 - sum(w[i, j] for j in g if j != i))


def test_uniform_weights_use_max_degree_plus_one() -> None:
    g = nx.star_graph(4)

    w = uniform_weights(g)

    assert w[0, 1] == pytest.approx(1 / 5)
    assert w[1, 1] == pytest.approx(4 / 5)
    assert w[0, 0] == pytest.approx(1 / 5)


def test_uniform_weights_keep_an_even_ring_aperiodic() -> None:
    assert second_eigenvalue(uniform_weights(nx.cycle_graph(8))) < 1 - 1e-6


def test_second_eigenvalue_of_nonsymmetric_matrix_is_spectral_norm() -> None:
    rng = np.random.default_rng(0)
    w = rng.random((5, 5))
    w /= w.sum(axis=1, keepdims=True)

    expected = np.linalg.svd(w - np.full((5, 5), 0.2), compute_uv=False)[0]

    assert second_eigenvalue(w) == pytest.approx(expected)


def test_disconnected_matrix_has_zero_gap() -> None:
    g = nx.union(nx.cycle_graph(3), nx.cycle_graph(3), rename=("a", "b"))

    assert spectral_gap(metropolis_hastings(g)) == pytest.approx(0.0, abs=1e-12)


def test_describe_ring() -> None:
    info = describe(Topology.parse("ring", 8))

    assert info["nodes"] == 8 and info["edges"] == 8 and info["diameter"] == 4
    assert info["degree_min"] == info["degree_max"] == 2
    assert info["lambda2"] == pytest.approx((1 + 2 * np.cos(2 * np.pi / 8)) / 3)
    assert info["spectral_gap"] == pytest.approx(1 - float(info["lambda2"]))
    assert info["rule"] == "metropolis"


def test_describe_one_peer_exponential_on_power_of_two_averages_exactly() -> None:
    info = describe(Topology.parse("one-peer-exponential", 16))

    assert info["lambda2"] == 0.0 and info["period"] == 4
    assert info["degree_max"] == 7 and info["diameter"] == 2


@pytest.mark.parametrize("n", [3, 5, 12, 20])
def test_describe_one_peer_exponential_rate_is_period_product_norm(n: int) -> None:
    top = Topology.parse("one-peer-exponential", n)
    prod = np.eye(n)
    for t in range(top.period()):
        prod = top.mixing_matrix(t) @ prod
    expected = np.linalg.norm(prod - 1.0 / n, ord=2) ** (1.0 / top.period())

    assert describe(top)["lambda2"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["complete", "random"])
def test_complete_matrix_equals_metropolis_on_networkx_graph(name: str) -> None:
    top = Topology.parse(name, 9)

    for rule, ref in [("metropolis", metropolis_hastings), ("uniform", uniform_weights)]:
        np.testing.assert_allclose(top.mixing_matrix(rule=rule), ref(nx.complete_graph(9)), atol=1e-15)
    assert describe(top)["edges"] == 36 and describe(top)["diameter"] == 1


def test_small_sizes_are_documented_degenerate_graphs() -> None:
    assert list(Topology.parse("ring", 2).graph().edges) == [(0, 1)]
    assert Topology.parse("ring", 1).mixing_matrix().tolist() == [[1.0]]
    assert Topology.parse("one-peer-exponential", 1).mixing_matrix().tolist() == [[1.0]]


def test_random_graphs_depend_on_the_seed_only() -> None:
    a = Topology.parse("random-regular:4", 30, seed=1)
    b = Topology.parse("random-regular:4", 30, seed=1)
    c = Topology.parse("random-regular:4", 30, seed=2)

    assert set(a.graph().edges) == set(b.graph().edges) != set(c.graph().edges)


def test_topology_is_hashable_and_picklable() -> None:
    top = Topology.parse("torus", 12)
    top.mixing_matrix()

    clone = pickle.loads(pickle.dumps(top))

    assert clone == top and hash(clone) == hash(top)
    np.testing.assert_array_equal(clone.mixing_matrix(), top.mixing_matrix())


def test_cached_graph_is_frozen_and_matrix_is_a_copy() -> None:
    top = Topology.parse("ring", 5)

    with pytest.raises(nx.NetworkXError):
        top.graph().add_edge(0, 2)
    top.mixing_matrix()[0, 0] = 99.0
    assert top.mixing_matrix()[0, 0] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("hypercube", 12, "hypercube needs a power-of-two number of nodes, got 12"),
        ("torus", 10, r"torus needs n = a\*b with a, b >= 3, got 10; try 9 or 12"),
        ("torus", 4, "torus needs"),
        ("ring", 0, "at least 1"),
        ("ring", None, "needs a number of nodes"),
        ("ring:3", 5, "ring takes no parameters"),
        ("mesh", 5, "unknown topology 'mesh'"),
        ("random-regular", 8, "needs one degree"),
        ("random-regular:x", 8, "as int"),
        ("random-regular:3", 7, "n\\*D even"),
        ("random-regular:8", 8, "1 <= D < n"),
        ("erdos-renyi:1.5", 8, r"\(0, 1\]"),
        ("erdos-renyi:0.01", 50, "stayed disconnected"),
        ("small-world", 4, "even K"),
        ("small-world:3,0.1", 10, "even K"),
        ("small-world:4,2", 10, r"\[0, 1\]"),
    ],
)
def test_bad_specs_raise_topology_error(spec: str, n: int | None, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        Topology.parse(spec, n)


def test_bad_mixing_rule_and_rank() -> None:
    top = Topology.parse("ring", 5)

    with pytest.raises(TopologyError, match="unknown mixing rule"):
        top.mixing_matrix(rule="laplacian")
    with pytest.raises(TopologyError, match="rank 5 out of range"):
        top.neighbors(5)


def test_edgelist_with_host_port_labels(tmp_path: Path) -> None:
    path = tmp_path / "ring:8.edgelist"  # a name before the colon must not win over the suffix
    path.write_text(
        "# peers\nnode-10:5000 node-2:5000 1.5\nnode-2:5000 node-1:5000\nnode-1:5000 node-10:5000\n"
    )

    top = Topology.parse(str(path), None)

    assert top.name == "file" and top.n == 3
    assert top.labels == ("node-1:5000", "node-2:5000", "node-10:5000")
    assert set(top.graph().edges) == {(0, 1), (0, 2), (1, 2)}


def test_adjlist_with_numeric_labels_sorts_numerically(tmp_path: Path) -> None:
    path = tmp_path / "g.adjlist"
    path.write_text("10 2\n2 1\n")

    top = Topology.parse(str(path), 3)

    assert top.labels == ("1", "2", "10")
    assert top.neighbors(1) == [0, 2]


@pytest.mark.parametrize("suffix", [".graphml", ".gml"])
def test_graphml_and_gml_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"g{suffix}"
    g = nx.relabel_nodes(nx.cycle_graph(4), {i: f"h{i}" for i in range(4)})
    (nx.write_graphml if suffix == ".graphml" else nx.write_gml)(g, path)

    top = Topology.parse(str(path), None)

    assert top.labels == ("h0", "h1", "h2", "h3")
    assert nx.utils.graphs_equal(nx.Graph(top.graph()), nx.cycle_graph(4))


def test_graph_file_errors(tmp_path: Path) -> None:
    split = tmp_path / "split.edgelist"
    split.write_text("a b\nc d\n")
    ok = tmp_path / "ok.edgelist"
    ok.write_text("a b\nb c\n")

    with pytest.raises(TopologyError, match="not connected"):
        Topology.parse(str(split), None)
    with pytest.raises(TopologyError, match="has 3 nodes, but n=4 was given"):
        Topology.parse(str(ok), 4)
    with pytest.raises(TopologyError, match="not found"):
        Topology.parse(str(tmp_path / "missing.gml"), None)


def test_draw_writes_a_png(tmp_path: Path) -> None:
    for spec, n in [("one-peer-exponential", 8), ("torus", 9)]:
        path = tmp_path / f"{spec}.png"

        draw(Topology.parse(spec, n), str(path))

        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 25), p=st.floats(0.05, 1.0), seed=st.integers(0, 10**6))
def test_metropolis_is_symmetric_doubly_stochastic_on_any_graph(n: int, p: float, seed: int) -> None:
    g = nx.gnp_random_graph(n, p, seed=seed)

    for w in (metropolis_hastings(g), uniform_weights(g)):
        np.testing.assert_array_equal(w, w.T)
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), t=st.integers(0, 100))
def test_one_peer_partner_is_a_permutation(n: int, t: int) -> None:
    peers = [one_peer_exponential_partner(i, n, t) for i in range(n)]

    assert sorted(peers) == list(range(n))
    assert all(p != i for i, p in enumerate(peers))
