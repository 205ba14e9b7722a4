from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.train.data import DataError, Dataset, load_dataset, node_data, partition


def test_digits_has_expected_shapes_and_types() -> None:
    ds = load_dataset("digits")

    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.y_train.shape == (1438,) and ds.y_test.shape == (359,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8) and ds.num_features == 64
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()


def test_digits_test_split_is_fixed_and_stratified() -> None:
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=7)

    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # about 20 % of each ~180-sample class


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b, c = (
        load_dataset("synthetic:500", seed=3),
        load_dataset("synthetic:500", seed=3),
        load_dataset("synthetic:500", seed=4),
    )

    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert len(a.y_train) + len(a.y_test) == 500
    assert a.input_shape == (32,) and a.num_classes == 10 and a.x_train.shape[1] == 32


def test_synthetic_default_size() -> None:
    ds = load_dataset("synthetic")

    assert len(ds.y_train) + len(ds.y_test) == 4096


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist", "unknown dataset 'mnist': use digits, synthetic, text:stdlib or a path to an .npz file"),
        ("synthetic:abc", "needs an integer N"),
        ("synthetic:3", "at least"),
    ],
)
def test_bad_dataset_spec_raises(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(spec)


def test_npz_round_trip_flattens_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2, 3))
    y = np.arange(50) % 3
    path = tmp_path / "blobs.npz"
    np.savez(path, X=x, y=y)

    ds = load_dataset(str(path))

    assert ds.name == "blobs.npz" and ds.input_shape == (2, 3) and ds.num_classes == 3
    assert ds.x_train.shape[1] == 6 and len(ds.y_train) + len(ds.y_test) == 50
    assert len(ds.y_test) == 10
    # Every sample lands in exactly one split, unchanged apart from the flattening.
    all_x = torch.cat([ds.x_train, ds.x_test])
    expected = torch.from_numpy(x.reshape(50, 6).astype(np.float32))
    assert sorted(map(tuple, all_x.tolist())) == sorted(map(tuple, expected.tolist()))


def test_npz_uses_given_test_split(tmp_path: Path) -> None:
    x, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    x_test, y_test = np.ones((4, 2), dtype=np.float32), np.array([0, 1, 2, 1])
    path = tmp_path / "given.npz"
    np.savez(path, X=x, y=y, X_test=x_test, y_test=y_test)

    ds = load_dataset(str(path))

    assert torch.equal(ds.x_train, torch.from_numpy(x)) and torch.equal(ds.y_test, torch.from_numpy(y_test))
    assert ds.num_classes == 3


_GOOD_X = np.zeros((10, 3), dtype=np.float32)
_GOOD_Y = np.arange(10) % 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": _GOOD_X}, "has no array 'y'"),
        ({"y": _GOOD_Y}, "has no array 'X'"),
        ({"X": _GOOD_X, "y": _GOOD_Y[:9]}, "10 samples but 'y' has 9"),
        ({"X": np.full((10, 3), np.nan), "y": _GOOD_Y}, "NaN or infinite"),
        ({"X": np.full((10, 3), 1e300), "y": _GOOD_Y}, "NaN or infinite"),
        ({"X": _GOOD_X, "y": _GOOD_Y - 1}, "negative labels"),
        ({"X": _GOOD_X, "y": _GOOD_Y.astype(np.float64)}, "integer labels"),
        ({"X": _GOOD_X, "y": np.zeros(10, dtype=np.int64)}, "fewer than 2 classes"),
        ({"X": _GOOD_X, "y": _GOOD_Y.reshape(5, 2)}, "one label per sample"),
        ({"X": np.zeros(10), "y": _GOOD_Y}, r"shape \(N, features...\)"),
        ({"X": np.array(["a"] * 30).reshape(10, 3), "y": _GOOD_Y}, "real numbers"),
        ({"X": _GOOD_X, "y": _GOOD_Y, "X_test": _GOOD_X}, "no array 'y_test'"),
        (
            {"X": _GOOD_X, "y": _GOOD_Y, "X_test": np.zeros((4, 2)), "y_test": np.zeros(4, dtype=int)},
            "samples have shape",
        ),
        ({"X": np.array([[{}]] * 10, dtype=object), "y": _GOOD_Y}, "without pickle"),
    ],
)
def test_invalid_npz_raises(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)

    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_missing_or_corrupt_npz_raises(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")

    with pytest.raises(DataError, match=r"dataset file \S*missing\.npz not found"):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset(str(corrupt))


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_partition_covers_all_indices_in_near_equal_parts() -> None:
    labels = np.arange(103) % 7

    parts = partition(labels, 8, "iid", seed=1)

    _assert_exact_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("parts", "alpha"), [(8, 0.5), (16, 0.1), (100, 0.01)])
def test_dirichlet_partition_covers_all_indices_with_no_empty_part(parts: int, alpha: float) -> None:
    labels = load_dataset("digits").y_train

    result = partition(labels, parts, f"dirichlet:{alpha}", seed=2)

    assert len(result) == parts
    _assert_exact_cover(result, len(labels))


def _mean_majority_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_small_dirichlet_alpha_skews_labels() -> None:
    labels = load_dataset("digits").y_train.numpy()

    skewed = _mean_majority_fraction(labels, partition(labels, 8, "dirichlet:0.1", seed=0))
    mild = _mean_majority_fraction(labels, partition(labels, 8, "dirichlet:100", seed=0))

    assert skewed > 0.4 and mild < 0.2  # an IID part of 10 balanced classes is ~0.1


def test_partition_is_deterministic_per_seed() -> None:
    labels = np.arange(200) % 10

    a, b = partition(labels, 5, "dirichlet:0.3", seed=4), partition(labels, 5, "dirichlet:0.3", seed=4)
    c = partition(labels, 5, "dirichlet:0.3", seed=5)

    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("parts", "spec", "message"),
    [
        (4, "dirichlet:0", "positive"),
        (4, "dirichlet:-1", "positive"),
        (4, "dirichlet:nan", "positive"),
        (4, "dirichlet:abc", "needs a number"),
        (4, "dirichlet", "unknown partition"),
        (4, "shards", "unknown partition"),
        (11, "iid", "10 samples into 11"),
        (0, "iid", "0 parts"),
    ],
)
def test_bad_partition_raises(parts: int, spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition(np.arange(10) % 2, parts, spec)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    parts=st.integers(1, 30),
    alpha=st.floats(0.001, 1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_property(labels: list[int], parts: int, alpha: float, seed: int) -> None:
    parts = min(parts, len(labels))

    result = partition(np.array(labels), parts, f"dirichlet:{alpha}", seed=seed)

    assert len(result) == parts
    _assert_exact_cover(result, len(labels))


def _tiny_dataset() -> Dataset:
    x = torch.arange(60, dtype=torch.float32).reshape(30, 2)
    y = torch.arange(30) % 3
    return Dataset("tiny", x, y, x[:3], y[:3], num_classes=3, input_shape=(2,))


def test_node_data_slices_are_disjoint_and_cover_the_training_set() -> None:
    ds = _tiny_dataset()

    slices = [node_data(ds, rank, 4, "iid", seed=0) for rank in range(4)]

    rows = torch.cat([x for x, _ in slices])
    assert sorted(rows[:, 0].tolist()) == sorted(ds.x_train[:, 0].tolist())
    for x, y in slices:
        assert torch.equal(y, (x[:, 0] / 2).long() % 3)  # each label still matches its sample


def test_node_data_rejects_bad_rank() -> None:
    with pytest.raises(DataError, match=r"outside 0\.\.3"):
        node_data(_tiny_dataset(), 4, 4)
