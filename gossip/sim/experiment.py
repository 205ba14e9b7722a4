"""Experiment files: a grid of simulator runs from one flat TOML file, and its results.

Every key is a :class:`~gossip.sim.engine.SimConfig` knob (``-`` or ``_``),
plus ``name`` and ``description``. A list is an axis of the grid; the runs are
the product of all axes, in file order, every other knob fixed::

    name = "topologies"
    topology = ["ring", "torus", "hypercube"]
    nodes = [16, 64]
    rounds = 100

The output folder gets results.csv (one row per run and evaluated round,
with every knob), summary.md and plots (see :mod:`gossip.sim.report`). Runs
are seeded by their ``seed`` knob only, so a file gives the same numbers on
every run on the same machine and library versions.
"""

from __future__ import annotations

import csv
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gossip.config import ConfigError
from gossip.configfile import coerce, load_toml
from gossip.core.spectral import describe
from gossip.sim.engine import SIM_KNOBS, RoundMetrics, SimConfig, Simulator
from gossip.train.data import DataError, Dataset, load_dataset, partition
from gossip.train.models import ModelError, build_model

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = tuple(RoundMetrics.__dataclass_fields__)
COLUMNS: tuple[str, ...] = ("run", *SIM_KNOBS, "spectral_gap", *METRICS)

# (fraction of all rounds done, one line of text)
Progress = Callable[[float, str], None]


@dataclass
class Experiment:
    name: str
    description: str
    base: SimConfig
    # knob -> values, in file order; the grid is their product.
    axes: dict[str, list[Any]] = field(default_factory=dict)
    source: str = ""

    def configs(self) -> list[SimConfig]:
        keys = list(self.axes)
        return [
            replace(self.base, **dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*self.axes.values())
        ]

    def varying(self) -> list[str]:
        """Knobs with more than one value: what tells the runs apart."""
        return [k for k, v in self.axes.items() if len(v) > 1]


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file; every grid point is validated before anything runs."""
    where = str(path)
    raw = load_toml(path)
    defaults = asdict(SimConfig())
    name, description = Path(where).stem, ""
    fixed: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    for key, value in raw.items():
        if key in ("name", "description"):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            if key == "name":
                name = value
            else:
                description = value
            continue
        if key not in defaults:
            raise ConfigError(
                f"{where}: unknown key {key!r}; known keys: name, description, {', '.join(SIM_KNOBS)}"
            )
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}: {key!r} is an empty list; give at least one value")
            axes[key] = [_coerce(where, key, v, defaults[key]) for v in value]
        else:
            fixed[key] = _coerce(where, key, value, defaults[key])
    exp = Experiment(name, description.strip(), SimConfig(**fixed), axes, where)
    _check(exp)
    return exp


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(value, list | dict):
        raise ConfigError(
            f"{where}: {key!r} must be a {type(default).__name__} or a list of them, not nested"
        )
    try:
        return coerce(key, value, default)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check(exp: Experiment) -> None:
    datasets: dict[tuple[str, int], Dataset] = {}
    models: set[tuple[str, str]] = set()
    for cfg in exp.configs():
        label = describe_config(cfg, exp.varying()) or "the run"
        try:
            cfg.validate()
            cfg.build_topology()
            ds = _dataset(datasets, cfg)
            partition(ds.y_train, cfg.nodes, cfg.partition, seed=cfg.seed)
            if (cfg.model, ds.name) not in models:
                build_model(cfg.model, ds.input_shape, ds.num_classes, target_shape=ds.target_shape)
                models.add((cfg.model, ds.name))
        except (ConfigError, DataError, ModelError) as exc:
            raise ConfigError(f"{exp.source}: {label}: {exc}") from None


def _dataset(cache: dict[tuple[str, int], Dataset], cfg: SimConfig) -> Dataset:
    # The seed only shapes synthetic data; digits and .npz files are the same for every seed.
    key = (cfg.dataset, cfg.seed if cfg.dataset.startswith("synthetic") else 0)
    if key not in cache:
        cache[key] = load_dataset(cfg.dataset, seed=cfg.seed)
    return cache[key]


def describe_config(cfg: SimConfig, knobs: list[str]) -> str:
    return " ".join(f"{k}={getattr(cfg, k)}" for k in knobs)


@dataclass
class RunResult:
    index: int
    config: SimConfig
    spectral_gap: float
    history: list[RoundMetrics]
    seconds: float

    @property
    def final(self) -> RoundMetrics:
        return self.history[-1]


def run_experiment(exp: Experiment, out: str | Path, progress: Progress | None = None) -> list[RunResult]:
    """Run every grid point, writing results.csv as runs finish (``report`` writes the rest)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    configs = exp.configs()
    total = sum(c.rounds for c in configs)
    done = 0
    datasets: dict[tuple[str, int], Dataset] = {}
    gaps: dict[tuple[str, int, str, int], float] = {}
    results: list[RunResult] = []
    with (folder / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for i, cfg in enumerate(configs):
            label = describe_config(cfg, exp.varying()) or exp.name
            top = cfg.build_topology()
            gap_key = (cfg.topology, cfg.nodes, cfg.rule, cfg.graph_seed)
            if gap_key not in gaps:
                gaps[gap_key] = float(describe(top, cfg.rule)["spectral_gap"])
            sim = Simulator(cfg, dataset=_dataset(datasets, cfg), topology=top)

            def report(m: RoundMetrics, i: int = i, label: str = label, base: int = done) -> None:
                if progress is not None:
                    text = f"run {i + 1}/{len(configs)} {label}: round {m.round}, accuracy {m.accuracy:.3f}"
                    progress((base + m.round) / max(total, 1), text)

            start = time.perf_counter()
            history = sim.run(report)
            seconds = time.perf_counter() - start
            done += cfg.rounds
            result = RunResult(i, cfg, gaps[gap_key], history, seconds)
            results.append(result)
            for m in history:
                writer.writerow(_row(result, m))
            fh.flush()
            log.info(
                "run %d/%d %s: accuracy %.4f in %.1f s",
                i + 1,
                len(configs),
                label,
                result.final.accuracy,
                seconds,
            )
    return results


def _row(result: RunResult, m: RoundMetrics) -> dict[str, Any]:
    row: dict[str, Any] = {"run": result.index, **asdict(result.config), "spectral_gap": result.spectral_gap}
    for key, value in asdict(m).items():
        row[key] = "" if value is None else value
    return row


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a results.csv, as strings."""
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))
