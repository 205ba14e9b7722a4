from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossip.config import ConfigError, TrainConfig
from gossip.train.data import load_dataset
from gossip.train.models import build_model
from gossip.train.trainer import LocalTrainer, evaluate, train_baseline


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add contention (a 2-epoch
    # digits run took 5 s on 2 busy cores instead of 0.1 s on one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(n: int = 100, seed: int = 0, **cfg: Any) -> LocalTrainer:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    model = build_model("logreg", (4,), 2, seed=0)
    return LocalTrainer(model, x, y, TrainConfig(**cfg), seed=seed)


def test_step_bookkeeping() -> None:
    trainer = _trainer(n=100, batch_size=16, epochs=2)

    assert trainer.steps_per_epoch == 7 and trainer.total_steps == 14  # 6 full batches and one of 4
    losses = [trainer.step() for _ in range(10)]

    assert trainer.step_count == 10 and trainer.epoch == pytest.approx(10 / 7)
    assert all(math.isfinite(loss) for loss in losses) and not trainer.done()
    for _ in range(4):
        trainer.step()
    assert trainer.done() and trainer.epoch == 2.0
    with pytest.raises(RuntimeError, match="finished after 14 steps"):
        trainer.step()


def test_max_steps_ends_a_run_before_its_epochs() -> None:
    trainer = _trainer(n=100, batch_size=16, epochs=2, max_steps=5)
    assert trainer.total_steps == 5
    for _ in range(5):
        trainer.step()
    assert trainer.done()
    assert _trainer(n=100, batch_size=16, epochs=1, max_steps=50).total_steps == 7  # the epochs end first
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=-1)


def test_total_steps_overrides_epochs() -> None:
    gen = torch.Generator().manual_seed(0)
    model = build_model("logreg", (4,), 2)
    trainer = LocalTrainer(
        model,
        torch.randn(10, 4, generator=gen),
        torch.zeros(10, dtype=torch.long),
        TrainConfig(),
        0,
        total_steps=3,
    )

    assert trainer.total_steps == 3


def _due_steps(trainer: LocalTrainer) -> list[int]:
    due = []
    while not trainer.done():
        trainer.step()
        if trainer.evaluation_due():
            due.append(trainer.step_count)
    return due


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "eval_every", "expected"),
    [
        (100, 16, 2, 1.0, [7, 14]),  # 7 steps per epoch
        (100, 16, 2, 0.5, [4, 7, 11, 14]),  # boundaries at 3.5, 7, 10.5, 14 steps
        (64, 16, 3, 2.5, [10, 12]),  # one boundary inside, then the last step
        (160, 16, 1, 0.1, list(range(1, 11))),  # a boundary on every step, none lost to float error
        (60, 16, 3, 0.3, [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]),  # 1.2 steps apart: step 7 has none
    ],
)
def test_evaluation_due_at_boundaries(
    n: int, batch_size: int, epochs: int, eval_every: float, expected: list[int]
) -> None:
    trainer = _trainer(n=n, batch_size=batch_size, epochs=epochs, eval_every=eval_every)

    assert not trainer.evaluation_due()
    assert _due_steps(trainer) == expected


def test_every_epoch_visits_each_sample_once() -> None:
    # With lr 0 the model never changes, so the sum of per-batch summed losses
    # over an epoch equals the loss summed over the whole slice exactly when
    # each sample is visited once.
    trainer = _trainer(n=50, batch_size=16, epochs=1, lr=1e-12, momentum=0.0)
    with torch.no_grad():
        per_sample = F.cross_entropy(trainer.model(trainer.x), trainer.y, reduction="none")
    sizes = [16, 16, 16, 2]

    epoch_sum = sum(trainer.step() * size for size in sizes)

    assert epoch_sum == pytest.approx(per_sample.sum().item(), rel=1e-5)


def test_same_seed_repeats_and_different_seed_reshuffles() -> None:
    a, b, c = _trainer(seed=1), _trainer(seed=1), _trainer(seed=2)

    la = [a.step() for _ in range(5)]
    lb = [b.step() for _ in range(5)]
    lc = [c.step() for _ in range(5)]

    assert la == lb and la != lc


def test_in_place_parameter_writes_between_steps_are_trained_on() -> None:
    # What a node does with an averaging result: overwrite parameters in place.
    # Full batches and no momentum make the next step exactly -lr * grad at zero.
    trainer = _trainer(n=40, batch_size=40, lr=0.5, momentum=0.0)
    trainer.step()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.zero_()
    reference = build_model("logreg", (4,), 2)
    with torch.no_grad():
        for p in reference.parameters():
            p.zero_()
    F.cross_entropy(reference(trainer.x), trainer.y).backward()

    trainer.step()

    for p, q in zip(trainer.model.parameters(), reference.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), -0.5 * q.grad)


def test_evaluate_matches_a_full_batch_reference_and_restores_mode() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5))
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    model.train()

    loss, acc = evaluate(model, x, y, batch_size=7)

    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    model.train()
    assert evaluate(model, x, y) == pytest.approx((loss, acc), rel=1e-5) and model.training


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", math.nan),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("eval_every", 0.0),
    ],
)
def test_bad_config_raises(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_short_baseline_on_digits_beats_chance_by_far() -> None:
    ds = load_dataset("digits")

    model, loss, acc = train_baseline(ds, TrainConfig(epochs=2))

    assert acc > 0.8 and loss < 0.7
    assert isinstance(model, nn.Module)


def test_baseline_sample_visits_set_the_step_count() -> None:
    # 40 visits at batch 16 are three steps (16 + 16 + 8 samples): the same
    # three steps a LocalTrainer takes on the union from the same seeds.
    ds = load_dataset("digits")
    cfg = TrainConfig(seed=3)

    model, _, _ = train_baseline(ds, cfg, sample_visits=40)

    reference = build_model(cfg.model, ds.input_shape, ds.num_classes, seed=3)
    trainer = LocalTrainer(reference, ds.x_train, ds.y_train, cfg, seed=3)
    for _ in range(3):
        trainer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


def test_momentum_sgd_matches_torch_sgd() -> None:
    from gossip.train.trainer import MomentumSGD

    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)
    ours = torch.nn.Linear(5, 3)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_ours = MomentumSGD(list(ours.parameters()), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        x = torch.randn(4, 5)
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
