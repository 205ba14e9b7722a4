"""Built-in datasets and the partitions that hand each node its slice.

Everything here is computed locally and deterministically from a seed, so
every node of a run derives the same dataset and the same partition on its
own, with nothing sent over the network and nothing downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gossip.config import ConfigError
from gossip.train import text

log = logging.getLogger(__name__)

# The held-out split of fixed datasets (digits, .npz files without a test set)
# is drawn with this seed, not the run seed, so every node, every baseline and
# every seed of a sweep is scored on the same test samples.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SYNTHETIC_DEFAULT_SIZE = 4096
DIGITS_STD_FLOOR = 0.1
SYNTHETIC_FEATURES = 32
SYNTHETIC_CLASSES = 10


class DataError(ConfigError):
    """A dataset or partition spec that cannot be honoured; the message is one line for the user."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with flat float32 features and int64 labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    # Shape of one sample before flattening, e.g. (1, 8, 8) for digits, so a
    # model such as a CNN can restore it.
    input_shape: tuple[int, ...]
    # Targets per sample: () for one class label, (T,) for a label per token (text).
    target_shape: tuple[int, ...] = ()

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load ``digits``, ``synthetic[:N]`` or an ``.npz`` file.

    ``seed`` only shapes the synthetic problem; the test split of digits and of
    ``.npz`` files is fixed (see ``SPLIT_SEED``). Digits and synthetic features
    are standardised; ``.npz`` features are used as given, so scale them first.
    """
    if spec == "digits":
        return _load_digits()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _load_synthetic(spec, seed)
    if spec.lower().endswith(".npz"):
        return _load_npz(Path(spec))
    if spec.startswith("text:"):
        return _load_text(spec)
    raise DataError(f"unknown dataset {spec!r}: use digits, synthetic, text:stdlib or a path to an .npz file")


def _load_text(spec: str) -> Dataset:
    """Byte-level language modelling on the local standard library's source (``gossip.train.text``)."""
    context = text.parse_spec(spec)
    train, valid, files = text.corpus()
    x_train, y_train = text.windows(train, context)
    x_test, y_test = text.windows(valid, context)
    log.debug("text:stdlib: %d files, %d + %d bytes, context %d", files, len(train), len(valid), context)
    return Dataset(
        name=spec,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=256,
        input_shape=(context,),
        target_shape=(context,),
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits that ship inside scikit-learn: no download.

    Read straight from the package's CSV when it is where sklearn keeps it:
    importing sklearn costs about a second per process, and ``gossip simulate``
    starts many processes.
    """
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return np.asarray(x), np.asarray(y)


def _load_digits() -> Dataset:
    x, y = _digits_arrays()
    x = x.astype(np.float32) / 16.0
    train, test = _stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    # Per-pixel standardisation with the (fixed) training split's statistics:
    # with it the default MLP reaches its ~97.5 % test ceiling in 10 epochs and
    # tolerates the larger learning rate that averaged nodes need, where [0, 1]
    # pixels lose 1-2 points. The floor stops pixels that are almost always
    # blank from being blown up into outliers.
    x = _standardise(x, train, DIGITS_STD_FLOOR)
    return _make_dataset("digits", x[train], y[train], x[test], y[test], (1, 8, 8))


def _load_synthetic(spec: str, seed: int) -> Dataset:
    from sklearn.datasets import make_classification

    size = SYNTHETIC_DEFAULT_SIZE
    if spec != "synthetic":
        size_text = spec.split(":", 1)[1]
        try:
            size = int(size_text)
        except ValueError:
            raise DataError(f"bad dataset spec {spec!r}: synthetic:N needs an integer N") from None
        # Below this a stratified 80/20 split cannot give every class a test sample.
        if size < 5 * SYNTHETIC_CLASSES:
            raise DataError(f"bad dataset spec {spec!r}: N must be at least {5 * SYNTHETIC_CLASSES}")
    x, y = make_classification(
        n_samples=size,
        n_features=SYNTHETIC_FEATURES,
        n_informative=16,
        n_redundant=8,
        n_classes=SYNTHETIC_CLASSES,
        # One Gaussian cluster per class with a wide separation: learnable by
        # every built-in model, yet a linear model does not reach 100 %.
        n_clusters_per_class=1,
        class_sep=2.0,
        flip_y=0.01,
        random_state=seed,
    )
    train, test = _stratified_split(y, TEST_FRACTION, seed)
    # Redundant features are sums of informative ones with a spread of ~4;
    # standardised, the defaults tuned on digits train them without diverging.
    x = _standardise(x.astype(np.float32), train, 1e-6)
    return _make_dataset(spec, x[train], y[train], x[test], y[test], (SYNTHETIC_FEATURES,))


def _load_npz(path: Path) -> Dataset:
    name = path.name
    try:
        # allow_pickle=False: a dataset file is data, never code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataError(f"dataset file {path} not found") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"dataset file {name} cannot be read as .npz without pickle: {e}") from None

    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"dataset file {name} has no array {key!r}")
    x, y = _check_arrays(name, "X", "y", arrays["X"], arrays["y"])
    if len(np.unique(y)) < 2:
        raise DataError(f"dataset file {name} has fewer than 2 classes in 'y'")

    has_x_test, has_y_test = "X_test" in arrays, "y_test" in arrays
    if has_x_test != has_y_test:
        missing = "y_test" if has_x_test else "X_test"
        raise DataError(f"dataset file {name} has no array {missing!r} (X_test and y_test go together)")
    if has_x_test:
        x_test, y_test = _check_arrays(name, "X_test", "y_test", arrays["X_test"], arrays["y_test"])
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"dataset file {name}: 'X_test' samples have shape {x_test.shape[1:]}, 'X' samples {x.shape[1:]}"
            )
        x_train, y_train = x, y
    else:
        if len(y) < 2:
            raise DataError(f"dataset file {name} needs at least 2 samples to split off a test set")
        train, test = _stratified_split(y, TEST_FRACTION, SPLIT_SEED)
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    return _make_dataset(name, x_train, y_train, x_test, y_test, tuple(int(d) for d in x.shape[1:]))


def _check_arrays(
    name: str, xkey: str, ykey: str, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise DataError(f"dataset file {name}: {xkey!r} must have shape (N, features...), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(
        x.dtype, np.complexfloating
    ):
        raise DataError(f"dataset file {name}: {xkey!r} must hold real numbers, got dtype {x.dtype}")
    if y.ndim != 1:
        raise DataError(f"dataset file {name}: {ykey!r} must be one label per sample, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"dataset file {name}: {ykey!r} must hold integer labels, got dtype {y.dtype}")
    if len(x) != len(y):
        raise DataError(
            f"dataset file {name}: {xkey!r} has {len(x)} samples but {ykey!r} has {len(y)} labels"
        )
    if len(y) == 0:
        raise DataError(f"dataset file {name}: {xkey!r} is empty")
    if y.min() < 0:
        raise DataError(f"dataset file {name}: {ykey!r} has negative labels; use 0..C-1")
    with np.errstate(over="ignore"):  # overflow becomes inf, rejected just below
        x = x.astype(np.float32)
    # Checked after the cast: float64 values beyond float32's range become inf.
    if not np.isfinite(x).all():
        raise DataError(f"dataset file {name}: {xkey!r} has NaN or infinite values (as float32)")
    return x, y.astype(np.int64)


def _standardise(x: np.ndarray, train: np.ndarray, std_floor: float) -> np.ndarray:
    """Per-feature zero mean, unit variance, with statistics from the training rows only."""
    mean = x[train].mean(axis=0)
    std = np.maximum(x[train].std(axis=0), std_floor)
    return ((x - mean) / std).astype(np.float32)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices: ``round(N * test_fraction)`` in test, each class in proportion."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # Largest-remainder rounding gives the exact total; a class never gives up
    # its last sample, which must stay in train to be learnt.
    quota = counts * test_fraction
    n_test = np.minimum(np.floor(quota).astype(np.int64), counts - 1)
    wanted = max(1, round(len(y) * test_fraction))
    for c in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if n_test.sum() >= wanted:
            break
        if n_test[c] < counts[c] - 1:
            n_test[c] += 1
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label, k in zip(classes, n_test, strict=True):
        idx = rng.permutation(np.flatnonzero(y == label))
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(test_idx) == 0:
        # Only single-sample classes: move one over so there is something to score.
        test_idx, train_idx = train_idx[-1:], train_idx[:-1]
    return train_idx, test_idx


def _make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    input_shape: tuple[int, ...],
) -> Dataset:
    num_classes = int(max(y_train.max(), y_test.max())) + 1

    def features(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32))

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    ds = Dataset(
        name=name,
        x_train=features(x_train),
        y_train=labels(y_train),
        x_test=features(x_test),
        y_test=labels(y_test),
        num_classes=num_classes,
        input_shape=input_shape,
    )
    log.debug(
        "dataset %s: %d train, %d test, %d classes, input %s",
        name,
        len(ds.y_train),
        len(ds.y_test),
        num_classes,
        input_shape,
    )
    return ds


def partition(labels: np.ndarray | Tensor, parts: int, spec: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Split sample indices into ``parts`` disjoint, non-empty, sorted index arrays.

    ``iid`` shuffles and cuts into near-equal parts. ``dirichlet:ALPHA`` is the
    label-skew scheme of Hsu et al. (2019) as commonly implemented: each class
    is divided among the parts in proportions drawn from Dirichlet(ALPHA); small
    ALPHA gives each part few classes, large ALPHA approaches IID.
    """
    y = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim < 1:
        raise DataError(f"partition needs labels per sample, got shape {y.shape}")
    n = len(y)
    if parts < 1:
        raise DataError(f"cannot partition into {parts} parts")
    if parts > n:
        raise DataError(f"cannot partition {n} samples into {parts} non-empty parts")
    rng = np.random.default_rng(seed)

    if spec == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), parts)]
    if spec.startswith("dirichlet:"):
        if y.ndim != 1:
            raise DataError(
                f"partition {spec!r} skews class labels; this dataset has a label per token: use iid"
            )
        alpha_text = spec.split(":", 1)[1]
        try:
            alpha = float(alpha_text)
        except ValueError:
            raise DataError(f"bad partition spec {spec!r}: dirichlet:ALPHA needs a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise DataError(f"bad partition spec {spec!r}: ALPHA must be a positive finite number")
        return _dirichlet(y, parts, alpha, rng)
    raise DataError(f"unknown partition {spec!r}: use iid or dirichlet:ALPHA (e.g. dirichlet:0.5)")


# Redraws before the top-up fallback: with small ALPHA and many parts a draw
# often leaves some part empty, and redrawing keeps the partition a true
# Dirichlet sample where that succeeds quickly.
_DIRICHLET_TRIES = 20


def _dirichlet(y: np.ndarray, parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for idx in classes:
            share = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for bucket, piece in zip(buckets, np.split(idx, cuts), strict=True):
                bucket.append(piece)
        result = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in result) > 0:
            return [np.sort(p) for p in result]
    # Top-up: each empty part takes one random sample from the largest part.
    # Terminates because parts <= n, and changes the skew by one sample per part.
    log.debug("dirichlet alpha=%g: %d parts empty after %d draws, topping up", alpha, parts, _DIRICHLET_TRIES)
    for i in range(parts):
        if len(result[i]) == 0:
            big = max(range(parts), key=lambda j: len(result[j]))
            k = int(rng.integers(len(result[big])))
            result[i] = result[big][k : k + 1]
            result[big] = np.delete(result[big], k)
    return [np.sort(p) for p in result]


def node_data(
    ds: Dataset, rank: int, world_size: int, partition_spec: str = "iid", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The training slice of node ``rank`` of ``world_size``.

    Every node computes the whole partition from the same seed and keeps its
    own part, so the parts are disjoint without any coordination.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
    idx = torch.from_numpy(partition(ds.y_train, world_size, partition_spec, seed)[rank])
    return ds.x_train[idx], ds.y_train[idx]
