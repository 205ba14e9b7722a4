"""CHOCO-Gossip between pairs (gossip.core.choco): the arithmetic real nodes and the simulator share."""

from __future__ import annotations

import pytest
import torch

from gossip.core import averaging
from gossip.core.choco import MAX_PAIRS, Choco, exchange_, seed_of
from gossip.core.compress import CompressError, Compressor


def pair_of(spec: str, gamma: float, d: int) -> tuple[Choco, Choco]:
    c = Compressor.parse(spec)
    return Choco(c, gamma, d, seed_of("a")), Choco(c, gamma, d, seed_of("b"))


def mirrored(a: Choco, b: Choco) -> bool:
    pa, pb = a.pair("b"), b.pair("a")
    return pa.rounds == pb.rounds and torch.equal(pa.own, pb.peer) and torch.equal(pa.peer, pb.own)


def test_the_identity_compressor_with_step_one_is_the_delta_rule() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, generator=g), torch.randn(300, generator=g)
    a, b = pair_of("randk:1", 1.0, 300)
    xa, yb = x.clone(), y.clone()
    exchange_(a, b, "a", "b", xa, yb)
    expected = x + averaging.pairwise_delta(x, y)
    assert torch.allclose(xa, expected, atol=1e-6) and torch.allclose(yb, expected, atol=1e-6)
    # From then on the copies are the snapshots: the next exchange is the delta rule again.
    x2, y2 = xa + 0.5, yb - 0.25
    exchange_(a, b, "a", "b", x2, y2)
    assert torch.allclose(x2, y2, atol=1e-6)


@pytest.mark.parametrize("spec", ["topk:0.01+int8", "randk:0.05+int4", "sign", "int8", "topk:0.1+bf16"])
def test_copies_stay_mirrored_and_the_sum_is_kept_under_any_schedule(spec: str) -> None:
    g = torch.Generator().manual_seed(1)
    d = 1000
    x = torch.randn(d, generator=g) * 2
    y = torch.randn(d, generator=g) - 3
    total = (x + y).double()
    a, b = pair_of(spec, Compressor.parse(spec).default_step(), d)
    for t in range(50):
        if t % 7 == 3:  # one side trained meanwhile: the sum moves by what it added
            step = torch.randn(d, generator=g) * 0.1
            x += step
            total += step.double()
        if t % 5 == 2:  # an exchange that did not commit: offers made, nothing settled
            a.offer("b", x)
            b.offer("a", y)
            continue
        exchange_(a, b, "a", "b", x, y)
        assert mirrored(a, b)
    assert a.rounds("b") == b.rounds("a") == 50 - 10
    assert torch.allclose((x + y).double(), total, atol=1e-4)


def test_two_nodes_reach_the_exact_mean_with_one_percent_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    d = 1000
    x, y = torch.randn(d, generator=g) * 3 + 1, torch.randn(d, generator=g) * 3 - 1
    mean = (x + y) / 2
    a, b = pair_of("topk:0.01+int8", 0.02, d)  # the default step of topk:0.01
    sizes = [exchange_(a, b, "a", "b", x, y) for _ in range(800)]
    assert float((x - mean).abs().max()) < 1e-3 and float((y - mean).abs().max()) < 1e-3
    assert max(max(s) for s in sizes) <= 4 + 2 * 10 + 4 + 10  # 10 indices, 10 int8 values, one scale


def test_a_pair_out_of_step_is_refused_and_a_forgotten_pair_starts_from_zero() -> None:
    a, _ = pair_of("int8", 0.5, 16)
    offer = a.offer("b", torch.ones(16))
    a.settle("b", offer, torch.zeros(16))
    with pytest.raises(ValueError, match="moved"):
        a.settle("b", offer, torch.zeros(16))  # an offer made before the pair's last commit
    a.forget("b")
    assert a.rounds("b") == 0 and torch.equal(a.pair("b").own, torch.zeros(16))


def test_at_most_max_pairs_neighbours_are_remembered_least_recently_committed_first_out() -> None:
    a, _ = pair_of("int8", 0.5, 4)

    def commit(peer: str) -> None:
        a.settle(peer, a.offer(peer, torch.ones(4)), torch.zeros(4))

    for i in range(MAX_PAIRS + 2):
        commit(f"p{i}")
    assert a.rounds("p0") == a.rounds("p1") == 0 and len(a._pairs) == MAX_PAIRS
    commit("p2")  # committed again: the most recent now
    kept = list(a._pairs)
    a.offer("stranger", torch.ones(4))  # an offer alone (a refused call) makes no pair, evicts none
    assert list(a._pairs) == kept
    commit("new")  # a commit pushes out the least recently committed (p3)
    assert a.rounds("p2") == 2 and a.rounds("p3") == 0 and a.rounds("new") == 1
    assert len(a._pairs) == MAX_PAIRS


def test_the_spec_names_the_compressor_and_the_step() -> None:
    assert Choco.of("none", 0.0, 10) is None
    c = Choco.of("topk:0.01+int8", 0.0, 10)
    assert c is not None and c.name == "choco[topk:0.01+int8;0.02]" and c.scale == 0.01
    with pytest.raises(ValueError, match="step"):
        Choco(Compressor.parse("int8"), 1.5, 10)


def test_a_payload_that_would_take_a_copy_past_float32_is_refused() -> None:
    a, b = pair_of("int8", 1.0, 256)
    big = torch.full((256,), 3e38)
    assert torch.isfinite(a.settle("b", a.offer("b", torch.zeros(256)), big)).all()  # a's copy of b: 3e38
    payload, _ = b.compressor.compress(big, b.gen)
    with pytest.raises(CompressError, match="range"):
        a.decode(payload, "b")  # 3e38 + 3e38 overflows the copy a keeps of b
    assert a.decode(payload) is not None  # without a pair to add to, the values alone are fine
