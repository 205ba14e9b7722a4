"""The vectorized simulator against a per-node reference loop (nn.Module + MomentumSGD + dense W)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gossip.config import ConfigError
from gossip.core.outer import Outer, OuterError
from gossip.sim.engine import RoundMetrics, SimConfig, Simulator
from gossip.train.data import Dataset
from gossip.train.models import build_model
from gossip.train.trainer import MomentumSGD, evaluate


def _tiny_dataset(train: int = 40, test: int = 30, features: int = 6, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        name="tiny",
        x_train=torch.randn(train, features, generator=g),
        y_train=torch.randint(classes, (train,), generator=g),
        x_test=torch.randn(test, features, generator=g),
        y_test=torch.randint(classes, (test,), generator=g),
        num_classes=classes,
        input_shape=(features,),
    )


def _sim(ds: Dataset, **knobs: object) -> Simulator:
    cfg = SimConfig(**{"nodes": 4, "topology": "ring", "model": "mlp", "rounds": 4, "eval_every": 2, **knobs})  # type: ignore[arg-type]
    return Simulator(cfg, dataset=ds)


def _record_batches(sim: Simulator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    draw = sim.batches.next

    def recording() -> tuple[torch.Tensor, torch.Tensor]:
        sample, valid = draw()
        seen.append((sample.clone(), valid.clone()))
        return sample, valid

    sim.batches.next = recording  # type: ignore[method-assign]
    return seen


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _load(model: torch.nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@pytest.mark.parametrize("local_steps", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sync_rounds_match_a_per_node_momentum_sgd_reference(local_steps: int, weight_decay: float) -> None:
    ds = _tiny_dataset()
    knobs = {
        "local_steps": local_steps,
        "weight_decay": weight_decay,
        "batch_size": 4,
        "lr": 0.1,
        "momentum": 0.5,
    }
    sim = _sim(ds, **knobs)
    batches = _record_batches(sim)
    rounds = 4  # 10 samples per node, batch 4: epochs of 3 steps, the last one short, crossed twice
    for _ in range(rounds):
        sim.step()

    w = sim.topology.mixing_matrix()
    models = [build_model("mlp", ds.input_shape, ds.num_classes, seed=0) for _ in range(4)]
    optims = [MomentumSGD(list(m.parameters()), 0.1, 0.5, weight_decay) for m in models]
    it = iter(batches)
    for _ in range(rounds):
        snapshot = torch.stack([_flat(m) for m in models]).double()
        mixed = torch.from_numpy(w) @ snapshot
        for s in range(local_steps):
            # A real node: the first step runs while its exchange is in flight (its
            # change lands on the mixed model); the others start from the mixed model.
            sample, valid = next(it)
            for i, (m, opt) in enumerate(zip(models, optims, strict=True)):
                before = _flat(m)
                idx = sample[i][valid[i]]
                loss = F.cross_entropy(m(ds.x_train[idx]), ds.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if s == 0:
                    _load(m, (mixed[i] + (_flat(m) - before).double()).float())

    expected = torch.stack([_flat(m) for m in models])
    torch.testing.assert_close(sim.params, expected, rtol=1e-5, atol=1e-5)


def test_each_node_visits_each_of_its_samples_once_per_epoch() -> None:
    ds = _tiny_dataset(train=38)
    sim = _sim(ds, batch_size=4)
    parts = [row[: int(n)] for row, n in zip(sim.batches.index, sim.batches.lengths, strict=True)]
    steps = int(sim.batches.steps_per_epoch.max())
    for _epoch in range(2):
        seen: list[list[int]] = [[] for _ in parts]
        for _ in range(steps):
            sample, valid = sim.batches.next()
            for i in range(4):
                seen[i] += sample[i][valid[i]].tolist()
        for i, part in enumerate(parts):
            assert sorted(seen[i]) == sorted(part.tolist())


def test_same_seed_same_run_and_another_seed_another_run() -> None:
    ds = _tiny_dataset()
    knobs = {"strategy": "pairwise", "message_loss": 0.2, "stragglers": 0.5, "rounds": 6}
    a, b, c = _sim(ds, **knobs), _sim(ds, **knobs), _sim(ds, seed=1, **knobs)
    ha, hb, hc = a.run(), b.run(), c.run()
    assert ha == hb
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=0)
    assert ha != hc


def test_crashed_nodes_freeze_and_leave_the_metrics() -> None:
    ds = _tiny_dataset()
    sim = _sim(ds, nodes=8, crash_fraction=0.25, crash_round=2, rounds=6)
    sim.step()
    sim.step()
    sim.step()  # round 2: the crash happens before it
    frozen = sim.params[sim.dead].clone()
    assert int(sim.dead.sum()) == 2
    history = sim.run()
    torch.testing.assert_close(sim.params[sim.dead], frozen, rtol=0, atol=0)
    assert history[-1].alive == 6


@pytest.mark.parametrize("strategy", ["sync", "pairwise", "push-sum"])
def test_without_gradients_strategies_conserve_the_average_model(strategy: str) -> None:
    # lr -> 0 leaves pure mixing: sync and pairwise keep the plain mean, push-sum its weighted mean.
    ds = _tiny_dataset()
    sim = _sim(ds, strategy=strategy, lr=1e-30, momentum=0.0, nodes=8, topology="one-peer-exponential")
    sim.params += torch.randn(sim.params.shape, generator=torch.Generator().manual_seed(1))
    before = _flat(sim.average_model())
    for _ in range(5):
        sim.step()
    torch.testing.assert_close(_flat(sim.average_model()), before, rtol=0, atol=1e-5)


def test_metrics_match_evaluate_on_the_models_themselves() -> None:
    ds = _tiny_dataset()
    sim = _sim(ds, rounds=3)
    for _ in range(3):
        sim.step()
    m = sim.evaluate()
    avg_loss, avg_acc = evaluate(sim.average_model(), ds.x_test, ds.y_test)
    node_accs = [evaluate(sim.node_model(i), ds.x_test, ds.y_test)[1] for i in range(4)]
    assert (m.test_loss, m.accuracy) == pytest.approx((avg_loss, avg_acc))
    assert m.worst_accuracy == pytest.approx(min(node_accs))
    assert m.mean_accuracy == pytest.approx(float(np.mean(node_accs)))
    centred = sim.params.double() - sim.params.double().mean(0)
    assert m.consensus_distance == pytest.approx(float(centred.square().sum(1).mean()), rel=1e-6)
    assert m.bytes_sent == 3 * 8 * sim.dim * 4  # ring of 4: 8 messages a round, float32


@pytest.mark.parametrize("budget", [7, 40, 1 << 16], ids=["sample-chunks", "node-chunks", "whole"])
def test_node_accuracies_in_bounded_chunks_match_evaluate_on_a_sequence_task(
    monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """Text-like samples (a label per position) in chunks of nodes and of samples: the same accuracies."""
    import gossip.sim.engine as engine

    g = torch.Generator().manual_seed(0)
    seq = Dataset(
        name="tiny-text",
        x_train=torch.randint(5, (40, 6), generator=g).float(),
        y_train=torch.randint(5, (40, 6), generator=g),
        x_test=torch.randint(5, (30, 6), generator=g).float(),
        y_test=torch.randint(5, (30, 6), generator=g),
        num_classes=5,
        input_shape=(6,),
        target_shape=(6,),
    )
    sim = Simulator(SimConfig(nodes=4, topology="ring", model="gpt:1:8:2", rounds=2), dataset=seq)
    sim.step()
    monkeypatch.setattr(engine, "_EVAL_ROWS", budget)
    accs = sim.node_accuracies()
    expected = [evaluate(sim.node_model(i), seq.x_test, seq.y_test)[1] for i in range(4)]
    assert accs.tolist() == pytest.approx(expected)


def test_digits_nodes_learn() -> None:
    sim = Simulator(SimConfig(nodes=8, topology="exponential", rounds=60, eval_every=60))
    final = sim.run()[-1]
    assert final.accuracy > 0.9 and final.worst_accuracy > 0.85


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"strategy": "gossip"}, "strategy"),
        ({"message_loss": 1.0}, "message_loss"),
        ({"crash_fraction": 1.0}, "alive"),
        ({"topology": "hypercube", "nodes": 6}, "power-of-two"),
        ({"nodes": 100}, "non-empty parts"),
        ({"rounds": 0}, "rounds"),
    ],
)
def test_bad_configs_raise_one_line_config_errors(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _sim(_tiny_dataset(), **knobs)
    assert "\n" not in str(info.value)


# --- compressed mixing (CHOCO-Gossip on sync rounds) ------------------------------------


def test_compressed_mixing_learns_with_far_fewer_bytes() -> None:
    def run(spec: str) -> RoundMetrics:
        cfg = SimConfig(nodes=8, topology="exponential", rounds=60, eval_every=60, compress=spec)
        return Simulator(cfg).run()[-1]

    dense, int8, sparse = run("none"), run("int8"), run("topk:0.1+int8")
    assert abs(int8.mean_accuracy - dense.mean_accuracy) < 0.01
    assert sparse.mean_accuracy > dense.mean_accuracy - 0.05
    # The payloads' real sizes: int8 is a quarter of float32 plus a scale per 256 values.
    assert 3.5 < dense.bytes_sent / int8.bytes_sent < 4.0
    assert dense.bytes_sent / sparse.bytes_sent > 15


@pytest.mark.parametrize("strategy", ["sync", "pairwise"])
def test_compressed_mixing_keeps_the_sum_of_the_models(strategy: str) -> None:
    sim = Simulator(
        SimConfig(nodes=8, topology="ring", rounds=1, compress="topk:0.05+int8", strategy=strategy)
    )
    gen = torch.Generator().manual_seed(5)
    sim.params = torch.randn(sim.params.shape, generator=gen)
    total = sim.params.sum(dim=0).clone()
    start = float(((sim.params - sim.params.mean(dim=0)) ** 2).sum())
    for _ in range(40):  # the mixing alone, no SGD
        assert sim._choco is not None
        sim.params, _ = sim._choco.mix(sim.params, sim.round)
        sim.round += 1
    assert torch.allclose(sim.params.sum(dim=0), total, atol=1e-3)
    assert float(((sim.params - sim.params.mean(dim=0)) ** 2).sum()) < start / 2


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"compress": "int9"}, "compress"),
        ({"compress": "int8", "strategy": "push-sum"}, "not push-sum"),
        ({"compress": "int8", "message_loss": 0.1}, "without message_loss"),
        ({"compress": "int8", "crash_fraction": 0.25}, "without message_loss, crash_fraction"),
        ({"compress": "int8", "gamma": 1.5}, "gamma"),
    ],
)
def test_compressed_knobs_are_checked(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**knobs).validate()  # type: ignore[arg-type]


def test_compressed_pairwise_learns_with_far_fewer_bytes_and_survives_crashes() -> None:
    def run(spec: str, **kw: Any) -> RoundMetrics:
        cfg = SimConfig(
            nodes=8,
            topology="exponential",
            strategy="pairwise",
            rounds=80,
            eval_every=80,
            compress=spec,
            **kw,
        )
        return Simulator(cfg).run()[-1]

    dense, sparse = run("none"), run("topk:0.1+int8")
    assert sparse.mean_accuracy > dense.mean_accuracy - 0.05
    assert dense.bytes_sent / sparse.bytes_sent > 15
    crashed = run("topk:0.1+int8", crash_fraction=0.25)
    assert crashed.mean_accuracy > dense.mean_accuracy - 0.1


# --- the outer optimizer (local steps, DiLoCo style) ----------------------------------------


def test_outer_nesterov_step_is_torch_sgd_nesterov_on_the_pseudo_gradient() -> None:
    """DiLoCo's reference: SGD(nesterov) on p = anchor with p.grad = anchor - averaged."""
    gen = torch.Generator().manual_seed(1)
    outer = Outer.parse("nesterov:0.7:0.9")
    anchor, buf = torch.randn(50, generator=gen), torch.zeros(50)
    p = torch.nn.Parameter(anchor.clone())
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        mixed = anchor + torch.randn(50, generator=gen)
        p.grad = p.detach() - mixed
        opt.step()
        outer.step_(mixed, anchor, buf)
        assert torch.allclose(mixed, p.detach(), atol=1e-6) and torch.equal(anchor, mixed)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("adam:1:0", "unknown outer"),
        ("nesterov:0.7", "LR and MOMENTUM"),
        ("nesterov:x:0.9", "numbers"),
        ("nesterov:0:0.9", "learning rate"),
        ("nesterov:0.7:1", "momentum"),
        ("nesterov:nan:0.5", "learning rate"),
    ],
)
def test_bad_outer_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(OuterError, match=message):
        Outer.parse(spec)
    with pytest.raises(ConfigError, match=f"outer: .*{message}"):
        SimConfig(outer=spec).validate()


def test_outer_nesterov_with_lr_one_and_no_momentum_is_plain_averaging() -> None:
    ds = _tiny_dataset()
    plain, outer = _sim(ds, local_steps=3), _sim(ds, local_steps=3, outer="nesterov:1:0")
    plain.run()
    outer.run()
    assert torch.allclose(plain.params, outer.params, atol=1e-6)


def test_with_doubly_stochastic_mixing_the_network_mean_follows_the_outer_optimizer() -> None:
    sim = _sim(_tiny_dataset(), outer="nesterov:0.7:0.9", nodes=6)
    gen = torch.Generator().manual_seed(3)
    sim.params = torch.randn(sim.params.shape, generator=gen)
    assert sim._outer is not None
    _, anchor, _ = sim._outer
    anchor.copy_(torch.randn(anchor.shape, generator=gen))
    mean = Outer.parse("nesterov:0.7:0.9")
    m_anchor, m_buf = anchor.mean(0), torch.zeros(sim.dim)
    for t in range(4):  # the mixing and the outer step alone, no SGD
        m_mixed = sim.params.mean(0)  # the ring's Metropolis weights keep the mean
        mean.step_(m_mixed, m_anchor, m_buf)
        mixed, _ = sim.mixer.mix(sim.params, t)
        sim._outer_step(mixed, None)
        sim.params = mixed
        assert torch.allclose(sim.params.mean(0), m_mixed, atol=1e-5)
        assert not torch.allclose(sim.params[0], sim.params[1])  # while the nodes still differ


def test_outer_nesterov_with_local_steps_learns_digits() -> None:
    cfg = SimConfig(
        nodes=8, topology="exponential", rounds=12, local_steps=10, eval_every=12, outer="nesterov:0.7:0.9"
    )
    final = Simulator(cfg).run()[-1]
    assert final.mean_accuracy > 0.85
