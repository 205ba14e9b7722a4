"""The text workload: byte-level language modelling on the local standard library's source."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gossip.config import ConfigError, TrainConfig
from gossip.sim.engine import SimConfig, Simulator
from gossip.train import text
from gossip.train.data import load_dataset, node_data, partition
from gossip.train.models import ModelError, build_model
from gossip.train.trainer import LocalTrainer, cross_entropy, evaluate


@pytest.fixture(scope="module")
def ds() -> object:
    return load_dataset("text:stdlib")


def test_the_corpus_is_sorted_source_without_tests_and_split_by_file() -> None:
    files = text.stdlib_files()
    rel = [str(p) for p in files]
    assert rel == sorted(rel, key=lambda s: s)  # one fixed order everywhere
    for p in files:
        assert p.suffix == ".py" and not p.name.startswith("test_")
        assert not {"test", "tests", "site-packages", "__pycache__"}.intersection(p.parts)
    train, valid, used = text.corpus()
    assert (len(train), len(valid)) == (text.TRAIN_BYTES, text.VALID_BYTES)
    assert 0 < used < len(files)
    again = text.corpus()
    assert again == (train, valid, used)  # the same bytes on every call (and every node)
    # By file: a validation file is never in training.
    assert text.is_validation("os.py") != text.is_validation("posixpath.py") or True
    chosen = [text.is_validation(f"m{i}.py") for i in range(1000)]
    assert 50 < sum(chosen) < 150  # about one file in ten


def test_windows_predict_the_next_byte() -> None:
    x, y = text.windows(b"abcdefghij", 3)
    assert x.shape == y.shape == (3, 3)
    assert bytes(x[0].astype("uint8")) == b"abc" and bytes(y[0].astype("uint8")) == b"bcd"
    assert bytes(y[-1].astype("uint8")) == b"hij"


def test_the_dataset_has_a_label_per_byte(ds: object) -> None:
    assert ds.input_shape == ds.target_shape == (text.DEFAULT_CONTEXT,)  # type: ignore[attr-defined]
    assert ds.num_classes == 256  # type: ignore[attr-defined]
    assert torch.equal(ds.x_train[:, 1:].long(), ds.y_train[:, :-1])  # type: ignore[attr-defined]
    assert load_dataset("text:stdlib:128").input_shape == (128,)


@pytest.mark.parametrize(
    "spec",
    ["text:", "text:linux", "text:stdlib:8", "text:stdlib:2048", "text:stdlib:x", "text:stdlib:64:1"],
)
def test_bad_text_specs_say_what_is_allowed(spec: str) -> None:
    with pytest.raises(ConfigError, match="text"):
        load_dataset(spec)


def test_label_skew_is_refused_for_a_label_per_token(ds: object) -> None:
    with pytest.raises(ConfigError, match="use iid"):
        partition(ds.y_train, 4, "dirichlet:0.5")  # type: ignore[attr-defined]
    parts = partition(ds.y_train, 4, "iid")  # type: ignore[attr-defined]
    assert sum(len(p) for p in parts) == len(ds.y_train)  # type: ignore[attr-defined]


def test_the_gpt_is_causal_seeded_and_has_no_buffers() -> None:
    shape = (32,)
    m = build_model("gpt:2:32:4", shape, 256, seed=1, target_shape=shape)
    assert not list(m.buffers())
    x = torch.randint(0, 256, (3, 32)).float()
    out = m(x)
    assert out.shape == (3, 32, 256)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 7) % 256  # change the future only
    out2 = m(x2)
    assert torch.allclose(out[:, :20], out2[:, :20], atol=1e-6)
    assert not torch.allclose(out[:, 20:], out2[:, 20:])
    same = build_model("gpt:2:32:4", shape, 256, seed=1, target_shape=shape)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), same.parameters(), strict=True))


@pytest.mark.parametrize(
    ("spec", "shape", "target", "message"),
    [
        ("gpt:2:32", (32,), (32,), "three whole numbers"),
        ("gpt:0:32:4", (32,), (32,), "1-48 layers"),
        ("gpt:2:30:4", (32,), (32,), "multiple of HEADS"),
        ("gpt:1:16:2", (64,), (), "label per byte"),
    ],
)
def test_bad_gpt_specs_are_one_clear_error(
    spec: str, shape: tuple[int, ...], target: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec, shape, 256, target_shape=target)


def test_cross_entropy_is_per_token_and_evaluate_reports_bits_and_next_byte_accuracy() -> None:
    logits = torch.randn(4, 5, 7)
    y = torch.randint(0, 7, (4, 5))
    flat = torch.nn.functional.cross_entropy(logits.reshape(20, 7), y.reshape(20))
    assert torch.allclose(cross_entropy(logits, y), flat)
    assert torch.allclose(cross_entropy(logits, y, reduction="sum"), flat * 4)
    assert cross_entropy(logits, y, reduction="none").shape == (4,)


def test_a_few_steps_on_one_slice_lower_the_validation_bits_per_byte(ds: object) -> None:
    cfg = TrainConfig(dataset="text:stdlib", model="gpt:1:32:2", lr=0.3, momentum=0.5, batch_size=32)
    model = build_model(cfg.model, ds.input_shape, 256, seed=0, target_shape=ds.target_shape)  # type: ignore[attr-defined]
    x, y = node_data(ds, 0, 8)  # type: ignore[arg-type]
    trainer = LocalTrainer(model, x, y, cfg, seed=0, total_steps=60)
    before, acc0 = evaluate(model, ds.x_test[:256], ds.y_test[:256])  # type: ignore[attr-defined]
    while not trainer.done():
        trainer.step()
    after, acc1 = evaluate(model, ds.x_test[:256], ds.y_test[:256])  # type: ignore[attr-defined]
    assert before / math.log(2) > 7.5  # uniform over 256 bytes is 8 bits
    assert after < before - 1.0 and acc1 > acc0 + 0.1


def test_the_simulator_runs_the_same_workload() -> None:
    full = load_dataset("text:stdlib:64")
    small = dataclasses.replace(
        full,
        x_train=full.x_train[:512],
        y_train=full.y_train[:512],
        x_test=full.x_test[:64],
        y_test=full.y_test[:64],
    )
    cfg = SimConfig(
        nodes=4, topology="ring", dataset="text:stdlib:64", model="gpt:1:16:2", rounds=4, eval_every=4
    )
    history = Simulator(cfg, dataset=small).run()
    last = history[-1]
    assert 0.0 <= last.mean_accuracy <= 1.0 and math.isfinite(last.test_loss)
