"""Checks every command runs before any work starts: paths it will write, specs it will load.

A problem is a :class:`~gossip.config.ConfigError` naming it (one line, exit 2),
raised before a folder is created, a process started or a byte fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from gossip.config import ConfigError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_folder(path: str, what: str) -> None:
    """``path`` is, or can be created as, a writable folder (nothing is created here)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a folder")
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise ConfigError(f"{what} {path}: {base} is a file, so no folder can be made under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {base} is not writable")


def output_file(path: str, what: str) -> None:
    """A file can be written at ``path``: its folder exists and is writable, and it is no folder."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {path}: not writable")
    folder = p.parent
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: folder {folder} is not writable")


def input_file(path: str, what: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} {path}: not readable")


def training_specs(dataset: str, model: str, partition: str, nodes: int, seed: int) -> None:
    """Load the dataset, build the model and cut the partition once, as every node will.

    Catches a missing or malformed dataset file, an unknown model and a partition
    that cannot be cut before any node starts (loads torch).
    """
    from gossip.train.data import DataError, load_dataset
    from gossip.train.data import partition as cut
    from gossip.train.models import ModelError, build_model

    try:
        ds = load_dataset(dataset, seed=seed)
        build_model(model, ds.input_shape, ds.num_classes, seed=seed, target_shape=ds.target_shape)
        cut(ds.y_train, max(nodes, 1), partition, seed=seed)
    except (DataError, ModelError) as exc:
        raise ConfigError(str(exc)) from None
