from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

from gossip.train.models import MODEL_NAMES, ModelError, build_model

DIGITS_SHAPE = (1, 8, 8)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builtin_model_maps_flat_digits_to_logits(name: str) -> None:
    model = build_model(name, DIGITS_SHAPE, 10)

    out = model(torch.randn(5, 64))

    assert out.shape == (5, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_gives_identical_parameters(name: str) -> None:
    a, b = build_model(name, DIGITS_SHAPE, 10, seed=3), build_model(name, DIGITS_SHAPE, 10, seed=3)

    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_different_seed_gives_different_parameters(name: str) -> None:
    a, b = build_model(name, DIGITS_SHAPE, 10, seed=3), build_model(name, DIGITS_SHAPE, 10, seed=4)

    assert not all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)

    build_model("mlp", DIGITS_SHAPE, 10, seed=0)

    assert torch.equal(torch.rand(3), expected)


def test_tabular_models_accept_flat_input_shape() -> None:
    for name in ("logreg", "mlp"):
        assert build_model(name, (32,), 4)(torch.randn(2, 32)).shape == (2, 4)


def test_cnn_handles_larger_images() -> None:
    model = build_model("cnn", (3, 28, 20), 7)

    assert model(torch.randn(2, 3 * 28 * 20)).shape == (2, 7)


def test_cnn_needs_an_image_shape() -> None:
    with pytest.raises(ModelError, match=r"'cnn' needs an image input_shape \(C, H, W\), got \(32,\)"):
        build_model("cnn", (32,), 10)


@pytest.mark.parametrize(
    ("spec", "shape", "classes", "message"),
    [
        ("resnet", DIGITS_SHAPE, 10, "unknown model 'resnet'"),
        ("mlp", (), 10, "input_shape"),
        ("mlp", (0, 3), 10, "input_shape"),
        ("mlp", DIGITS_SHAPE, 1, "num_classes"),
    ],
)
def test_bad_builtin_spec_raises(spec: str, shape: tuple[int, ...], classes: int, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec, shape, classes)


# Factories for "package.module:factory" specs. They are installed as a module
# of their own through sys.modules, so import_module finds them whatever way
# pytest imported this file.
def _with_kwargs(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))


def _no_args() -> nn.Module:
    return nn.Linear(64, 10)


def _var_kwargs(**kwargs: Any) -> nn.Module:
    return nn.Linear(64, kwargs["num_classes"])


def _not_a_module() -> str:
    return "a string"


def _wrong_logits() -> nn.Module:
    return nn.Linear(64, 3)


def _wrong_input() -> nn.Module:
    return nn.Linear(5, 10)


@pytest.fixture
def factories(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("gossip_test_factories")
    for fn in (_with_kwargs, _no_args, _var_kwargs, _not_a_module, _wrong_logits, _wrong_input):
        setattr(module, fn.__name__.lstrip("_"), fn)
    module.not_callable = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


@pytest.mark.parametrize("factory", ["with_kwargs", "no_args", "var_kwargs"])
def test_factory_spec_builds_the_model(factories: str, factory: str) -> None:
    model = build_model(f"{factories}:{factory}", DIGITS_SHAPE, 10)

    assert model(torch.randn(4, 64)).shape == (4, 10)


def test_factory_spec_is_seeded(factories: str) -> None:
    a = build_model(f"{factories}:with_kwargs", DIGITS_SHAPE, 10, seed=1)
    b = build_model(f"{factories}:with_kwargs", DIGITS_SHAPE, 10, seed=1)

    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


def test_factory_spec_from_an_installed_package() -> None:
    model = build_model("torch.nn:Identity", (10,), 10)

    assert isinstance(model, nn.Identity)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing", "has no attribute 'missing'"),
        ("not_callable", "'not_callable' is a int, not callable"),
        ("not_a_module", "returned str, not a torch.nn.Module"),
        ("wrong_logits", r"to \(2, 3\), expected logits \(2, 10\)"),
        ("wrong_input", r"fails on flat input of shape \(2, 64\)"),
    ],
)
def test_bad_factory_raises(factories: str, factory: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(f"{factories}:{factory}", DIGITS_SHAPE, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_xyz.models:net", "cannot import module 'no_such_package_xyz.models'"),
        (":net", "expected package.module:factory"),
        ("torch.nn:", "expected package.module:factory"),
    ],
)
def test_bad_factory_spec_raises(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec, DIGITS_SHAPE, 10)
