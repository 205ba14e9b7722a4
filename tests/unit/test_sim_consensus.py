"""Gossip averaging against theory: contraction vs |λ2(W)|² (numpy), exact one-peer averaging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gossip.cli.main import main
from gossip.core.averaging import choco_round_, consensus_distance
from gossip.core.compress import Compressor
from gossip.core.topology import Topology
from gossip.sim.consensus import FLOOR, fit_rate, run_consensus
from gossip.sim.mixing import make_mixer

SIZES = [
    *[(spec, n) for spec in ("ring", "torus", "hypercube", "exponential", "complete") for n in (16, 64)],
    *[(spec, 256) for spec in ("ring", "torus", "hypercube", "exponential", "complete")],
    # Top eigenvalues that nearly coincide: 5/(1 - |λ2|²) rounds were too few here (n = 128:
    # 118 rounds gave a gap error of 0.14).
    ("small-world", 64),
    ("small-world", 128),
]


def _numpy_rate(top: Topology) -> float:
    """|λ2(W)|² straight from numpy's eigenvalues of the dense mixing matrix."""
    mags = np.sort(np.abs(np.linalg.eigvalsh(top.mixing_matrix())))
    return float(mags[-2] ** 2)


@pytest.mark.parametrize(("spec", "n"), SIZES)
def test_sync_contraction_matches_lambda2_squared_on_the_gap_scale(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)
    theory = _numpy_rate(top)
    result = run_consensus(top, None, "sync")  # rounds: until the fitted rate is stable
    assert result.theoretical_rate == pytest.approx(theory, abs=1e-12)
    gap = 1.0 - theory
    assert abs((1.0 - result.measured_rate) - gap) <= 0.01 * gap


@pytest.mark.parametrize("strategy", ["sync", "push-sum"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_one_peer_exponential_reaches_the_exact_average_in_log2_n_rounds(strategy: str, k: int) -> None:
    n = 1 << k
    top = Topology.parse("one-peer-exponential", n)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    exact = x.mean(0)
    start = consensus_distance(x)
    mixer = make_mixer(strategy, top, gen)
    for t in range(k):
        if t == k - 1 and k > 1:
            assert consensus_distance(x) / start > 1e-6  # not exact a round early
        x, _ = mixer.mix(x, t)
    assert consensus_distance(x) / start < 1e-12
    torch.testing.assert_close(x, exact.expand_as(x), rtol=0, atol=1e-12)
    assert run_consensus(top, k + 4, strategy).measured_rate == 0.0


def test_complete_graph_converges_in_one_round_with_rate_zero() -> None:
    result = run_consensus(Topology.parse("complete", 32), 10)
    assert result.distances[1] < FLOOR
    assert result.measured_rate == 0.0
    assert result.theoretical_rate == pytest.approx(0.0, abs=1e-12)
    assert result.ratio is None


def test_fit_rate_recovers_the_slowest_mode_of_a_two_mode_sequence() -> None:
    t = np.arange(400)
    d = 0.5 * 0.97**t + 0.5 * 0.6**t
    rate, first, last = fit_rate(d.tolist())
    assert rate == pytest.approx(0.97, rel=1e-9)
    assert (first, last) == (200, 399)


def test_fit_rate_stops_at_the_rounding_floor() -> None:
    d = [0.5**t for t in range(60)] + [1e-33] * 40  # 0.5^60 < 1e-18 ... floor at 1e-24 cuts the tail
    rate, _, last = fit_rate(d)
    assert rate == pytest.approx(0.5, rel=1e-9)
    assert last < 80


def test_fit_rate_of_a_collapse_is_zero() -> None:
    assert fit_rate([1.0, 0.5, 0.25, 0.1, 1e-33, 1e-33])[0] == 0.0
    assert fit_rate([1.0, 1e-33])[0] == 0.0


@pytest.mark.parametrize(("spec", "n"), [("ring", 16), ("torus", 16), ("complete", 16)])
def test_pairwise_gossip_is_at_least_as_fast_as_its_expected_matrix_bound(spec: str, n: int) -> None:
    top = Topology.parse(spec, n)
    result = run_consensus(top, 150, "pairwise")
    assert result.theoretical_rate is not None
    assert 0.0 < result.measured_rate <= result.theoretical_rate + 0.01
    assert result.distances[-1] < 1e-3


def test_push_sum_on_a_static_graph_converges_and_has_no_closed_form() -> None:
    result = run_consensus(Topology.parse("random-regular:4", 32), 200, "push-sum")
    assert result.theoretical_rate is None
    assert result.distances[-1] < 1e-6


def test_cli_consensus_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consensus", "--topology", "ring", "--nodes", "16", "--rounds", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "topology",
        "nodes",
        "strategy",
        "distances",
        "measured_rate",
        "theoretical_rate",
        "spectral_gap",
        "rule",
    ):
        assert key in out
    assert (out["topology"], out["nodes"], out["strategy"], out["rule"]) == ("ring", 16, "sync", "metropolis")
    assert len(out["distances"]) == 81 and out["distances"][0] == 1.0
    assert out["theoretical_rate"] == pytest.approx(_numpy_rate(Topology.parse("ring", 16)))
    assert out["ratio"] == pytest.approx(out["measured_rate"] / out["theoretical_rate"])
    assert math.isclose(out["spectral_gap"], 1 - math.sqrt(out["theoretical_rate"]), rel_tol=1e-9)


def test_cli_consensus_text_shows_rates_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consensus", "--topology", "torus", "--nodes", "16", "--rounds", "30"]) == 0
    out = capsys.readouterr().out
    for label in ("measured rate", "theoretical rate", "ratio", "spectral gap", "metropolis"):
        assert label in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topology", "hypercube", "--nodes", "6"], "power-of-two"),
        (["--topology", "moebius", "--nodes", "6"], "unknown topology"),
        (["--topology", "ring", "--nodes", "8", "--rounds", "0"], "--rounds"),
        (["--topology", "ring", "--nodes", "1"], "at least 2 nodes"),
    ],
)
def test_cli_consensus_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["consensus", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --- CHOCO-Gossip: compressed consensus with error feedback ------------------------------


def test_a_choco_round_preserves_the_sum_and_keeps_the_public_copies_in_step() -> None:
    top = Topology.parse("ring", 8, seed=0)
    w = torch.from_numpy(top.mixing_matrix(0, "metropolis"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=gen, dtype=torch.float64)
    total = x.sum(dim=0).clone()
    x_hat = torch.zeros_like(x)
    c = Compressor.parse("topk:0.1+int8")
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    for _ in range(50):
        sizes = choco_round_(x, x_hat, w, c, gens, 0.2)
    assert torch.allclose(x.sum(dim=0), total, atol=1e-9)  # W doubly stochastic: the mean stays
    assert all(s <= c.max_nbytes(300) for s in sizes)


@pytest.mark.parametrize("spec", ["int8", "topk:0.1+int8", "sign"])
def test_choco_gossip_converges_linearly_and_slower_than_uncompressed(spec: str) -> None:
    top = Topology.parse("ring", 16, seed=0)
    plain = run_consensus(top, 200, "sync", dim=512)
    r = run_consensus(top, 400, "sync", dim=512, compress=spec)
    assert r.compress == spec and r.distances[-1] < 1e-2
    assert plain.measured_rate - 1e-9 <= r.measured_rate < 1.0
    assert r.payload_bytes < 512 * 4  # fewer bytes than float32, let alone float64


def test_compression_slows_the_rate_monotonically() -> None:
    top = Topology.parse("ring", 16, seed=0)
    rates = [
        run_consensus(top, 200, "sync", dim=512, compress=s).measured_rate
        for s in ("int8", "topk:0.1+int8", "topk:0.01+int8")
    ]
    assert rates == sorted(rates) and rates[-1] < 1.0


def test_a_step_too_large_is_reported_as_divergence_not_a_rate() -> None:
    top = Topology.parse("ring", 16, seed=0)
    with pytest.raises(FloatingPointError, match="smaller --gamma"):
        run_consensus(top, 300, "sync", dim=512, compress="topk:0.1", gamma=1.0)
    with pytest.raises(ValueError, match="sync rounds"):
        run_consensus(top, 10, "pairwise", dim=16, compress="int8")
