"""`gossip simulate --churn`: nodes killed and restarted at random, real processes; the schedule; the CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gossip.cli.main import main
from gossip.cluster.churn import (
    Arrivals,
    _drop_partial_dump,
    _truncate_partial_line,
    check_churn,
    max_down,
    remaining_epochs,
)
from gossip.config import ConfigError
from tests.support.procs import run_simulate

NODES = 4
EPOCHS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One short run under heavy churn (40 arrivals/s, one node down at a time), shared below, with
    swim membership: restarted nodes (new incarnations) rejoin through probes and news."""
    out = tmp_path_factory.mktemp("churn") / "run"
    args = ["--nodes", str(NODES), "--epochs", str(EPOCHS), "--churn", "600", "--churn-downtime", "0.5"]
    args += ["--member-protocol", "swim"]  # the default; heartbeat's rejoins: test_faults
    return run_simulate(out, *args, timeout=200), out


def _summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(220)
def test_churn_run_completes_with_kills_and_restarts(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "churn " in proc.stdout and "mean accuracy" in proc.stdout

    churn = _summary(out)["churn"]
    assert churn["rate_per_node_per_minute"] == 600
    assert churn["kills"] >= 1
    assert churn["restarts"] == churn["kills"]  # the run waits for every node to come back
    kinds = [e["event"] for e in churn["events"]]
    assert kinds.count("killed") == churn["kills"] and kinds.count("restarted") == churn["restarts"]
    for e in churn["events"]:
        assert 0 <= e["rank"] < NODES and e["time"] > 0
    assert "churn: killed node" in proc.stderr and "churn: node" in proc.stderr  # a line per kill and return


@pytest.mark.timeout(220)
def test_restarted_nodes_rejoin_and_write_metrics(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _metrics(out)
    kills = [e for e in _summary(out)["churn"]["events"] if e["event"] == "killed"]

    for kill in kills:
        after = [
            r
            for r in records
            if r["rank"] == kill["rank"]
            and r.get("incarnation", 0) >= 1
            and r["unix_time"] > kill["unix_time"]
        ]
        assert after, f"node {kill['rank']} wrote nothing after its restart"
        assert any(r.get("done") for r in after)  # it trained again, to the end of its budget
    # Every node leaves once, with its final model: the last incarnation's.
    finals = [r for r in records if r.get("final")]
    assert sorted(r["rank"] for r in finals) == list(range(NODES))


@pytest.mark.timeout(220)
def test_churn_run_ends_with_sane_accuracies(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out)

    assert len(summary["accuracies"]) == NODES
    assert all(math.isfinite(a) and 0.5 < a <= 1.0 for a in summary["accuracies"])  # chance is 0.1
    assert summary["mean_accuracy"] > 0.8
    # Epochs are counted over the run: a restarted node ends at the run's last epoch too.
    assert max(r["epoch"] for r in _metrics(out)) == pytest.approx(EPOCHS)


def test_the_schedule_comes_from_the_seed_alone() -> None:
    a, b, c = Arrivals(2.0, seed=1), Arrivals(2.0, seed=1), Arrivals(2.0, seed=2)

    first = a.due(100.0)

    assert first == b.due(100.0)
    assert first != c.due(100.0)
    assert all(0.0 <= u < 1.0 for _, u in first)


def test_arrivals_are_poisson_at_the_given_rate() -> None:
    times = [t for t, _ in Arrivals(4.0, seed=0).due(5000.0)]

    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert len(times) / 5000.0 == pytest.approx(4.0, rel=0.03)
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert math.sqrt(var) / mean == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV 1


def test_a_restarted_node_trains_what_the_cluster_has_left() -> None:
    assert remaining_epochs(15, cluster_epoch=4.0, pace=1.0, downtime=2.0) == 9
    assert remaining_epochs(15, cluster_epoch=0.0, pace=0.0, downtime=2.0) == 15
    assert remaining_epochs(15, cluster_epoch=14.0, pace=3.0, downtime=2.0) == 1  # at least one


def test_at_most_a_quarter_of_the_nodes_is_down_and_never_all() -> None:
    assert [max_down(n) for n in (2, 3, 4, 8, 16)] == [1, 1, 1, 2, 4]


def test_what_a_sigkill_cut_in_half_is_dropped_before_the_restart(tmp_path: Path) -> None:
    metrics = tmp_path / "0.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"st')
    dumps = tmp_path / "params"
    dumps.mkdir()
    np.save(dumps / "eval0000.npy", np.zeros(100, dtype=np.float32))
    (dumps / "eval0001.npy").write_bytes((dumps / "eval0000.npy").read_bytes()[:90])

    _truncate_partial_line(metrics)
    _drop_partial_dump(dumps)

    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [f.name for f in dumps.iterdir()] == ["eval0000.npy"]


BAD_VALUES = {
    "negative rate": ["--churn", "-1"],
    "nan rate": ["--churn", "nan"],
    "infinite rate": ["--churn", "inf"],
    "negative downtime": ["--churn", "5", "--churn-downtime", "-1"],
    "one node": ["--churn", "5", "--nodes", "1"],
    "with --kill": ["--churn", "5", "--kill", "1@10"],
}


@pytest.mark.parametrize("argv", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_churn_values_are_one_line_and_exit_code_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--out", str(tmp_path / "run"), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("gossip simulate: error: --churn"), err
    assert not (tmp_path / "run").exists()


def test_a_rate_that_is_not_a_number_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--churn", "often"])

    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and "--churn" in err, err


def test_nan_in_a_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--churn"):
        check_churn(float("nan"), 2.0, 8, "")
    (tmp_path / "run.toml").write_text("churn = nan\n")

    assert main(["simulate", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "x")]) == 2
