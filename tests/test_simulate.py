"""End to end: `python -m gossip simulate` with real node processes, then its outputs."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from procs import run_simulate

NODES = 4
EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One run with --baseline shared by the tests below (a run costs tens of seconds)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    return run_simulate(out, "--nodes", str(NODES), "--epochs", str(EPOCHS), "--baseline", timeout=280), out


def _summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


@pytest.mark.timeout(300)
def test_simulate_exits_zero_and_prints_the_table(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean accuracy" in proc.stdout
    assert "baseline accuracy" in proc.stdout


@pytest.mark.timeout(300)
def test_simulate_writes_metrics_summary_and_plot(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert {r["node"] for r in records} == set(range(NODES))
    for r in records:
        for key in ("node", "step", "epoch", "loss", "accuracy", "bytes_sent", "time"):
            assert key in r, (key, r)
        assert math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0
    assert max(r["epoch"] for r in records) == EPOCHS
    assert sum(1 for r in records if r.get("final")) == NODES

    summary = _summary(out)
    for key in (
        "nodes",
        "topology",
        "strategy",
        "accuracies",
        "mean_accuracy",
        "consensus_distance",
        "bytes_sent",
        "wall_seconds",
        "config",
    ):
        assert key in summary, key
    assert summary["nodes"] == NODES and len(summary["accuracies"]) == NODES
    assert summary["bytes_sent"] > 0
    assert summary["consensus_distance"] is not None and math.isfinite(summary["consensus_distance"])

    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_simulate_learns_and_reports_the_baseline(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out)

    assert summary["mean_accuracy"] > 0.6  # chance is 0.1
    assert min(summary["accuracies"]) > 0.5
    assert 0.6 < summary["baseline_accuracy"] <= 1.0
    assert summary["mean_accuracy"] == pytest.approx(sum(summary["accuracies"]) / NODES)
