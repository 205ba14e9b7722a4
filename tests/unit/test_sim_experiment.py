"""Experiment files: strict loading, the grid, results.csv / summary.md / plots, reproducibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.cli.main import main
from gossip.config import ConfigError
from gossip.sim.engine import SIM_KNOBS
from gossip.sim.experiment import COLUMNS, load_experiment, read_results, run_experiment
from gossip.sim.report import write_report

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"

TINY = """
name = "tiny"
description = "two topologies"
topology = ["ring", "complete"]
nodes = 8
rounds = 6
eval_every = 3
model = "logreg"
"""


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_is_the_product_of_the_lists_in_file_order(tmp_path: Path) -> None:
    exp = load_experiment(
        _write(tmp_path, 'topology = ["ring", "torus"]\nnodes = [9, 16]\nseed = [0, 1]\nrounds = 5\n')
    )
    got = [(c.topology, c.nodes, c.seed) for c in exp.configs()]
    assert got == [(t, n, s) for t in ("ring", "torus") for n in (9, 16) for s in (0, 1)]
    assert all(c.rounds == 5 for c in exp.configs())
    assert exp.varying() == ["topology", "nodes", "seed"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodez = 8\n", "unknown key 'nodez'"),
        ('nodes = "eight"\n', "'nodes' must be int"),
        ('nodes = [8, "x"]\n', "'nodes' must be int"),
        ("nodes = []\n", "empty list"),
        ("nodes = [[8]]\n", "not nested"),
        (
            'topology = ["ring", "hypercube"]\nnodes = 12\n',
            "topology=hypercube: hypercube needs a power-of-two",
        ),
        ("[grid]\nnodes = [8]\n", "section [grid] not supported"),
        ("message_loss = 1.5\n", "message_loss must be in"),
        ('partition = "dirichlet:x"\n', "dirichlet:ALPHA needs a number"),
        ("name = 3\n", "'name' must be a string"),
        ('model = "resnet9000"\n', "unknown model 'resnet9000'"),
        ('dataset = "mnist"\n', "unknown dataset 'mnist'"),
        ("nodes = 8\nnodes = 9\n", "not valid TOML"),
    ],
)
def test_bad_files_raise_one_line_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(_write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_run_writes_results_summary_and_plots(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, TINY))
    progress: list[float] = []
    results = run_experiment(exp, tmp_path / "out", progress=lambda f, _text: progress.append(f))
    write_report(exp, results, tmp_path / "out")

    rows = read_results(tmp_path / "out" / "results.csv")
    assert list(rows[0]) == list(COLUMNS) and set(SIM_KNOBS) <= set(rows[0])
    assert [(r["topology"], r["round"]) for r in rows] == [
        (t, str(k)) for t in ("ring", "complete") for k in (0, 3, 6)
    ]
    assert rows[0]["loss"] == "" and float(rows[1]["loss"]) > 0
    assert float(rows[2]["accuracy"]) == pytest.approx(results[0].final.accuracy)
    assert float(rows[-1]["spectral_gap"]) == pytest.approx(1.0)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| ring |" in summary and "| complete |" in summary
    for png in ("accuracy.png", "consensus.png", "gap.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert progress[-1] == pytest.approx(1.0)


def test_same_file_same_results(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        TINY.replace('["ring", "complete"]', '"ring"') + 'strategy = "pairwise"\nmessage_loss = 0.2\n',
    )
    run_experiment(load_experiment(path), tmp_path / "a")
    run_experiment(load_experiment(path), tmp_path / "b")
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_cli_experiment_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, TINY.replace('["ring", "complete"]', '"ring"'))
    assert main(["experiment", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "# Experiment tiny" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.csv").is_file()


def test_cli_experiment_bad_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", str(_write(tmp_path, "nodez = 3\n"))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nodez'" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["topologies", "noniid", "faults", "compress"])
def test_shipped_experiment_files_are_valid(name: str) -> None:
    exp = load_experiment(SIMULATIONS / f"{name}.toml")
    assert exp.name == name and exp.description
    assert len(exp.configs()) > 1
