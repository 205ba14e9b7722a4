"""End to end: `python -m gossip simulate` with real node processes, then its outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import run_simulate

NODES = 4
EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One run with --baseline shared by the tests below (a run costs tens of seconds).

    With ``--prometheus 0``: each node's endpoint is scraped once while the run goes on,
    into ``scraped/RANK.txt`` beside the output folder; with ``--dashboard``, the page's
    data once it lists every node, into ``scraped/dashboard.json``.
    """
    out = tmp_path_factory.mktemp("sim") / "run"
    args = ("--nodes", str(NODES), "--epochs", str(EPOCHS), "--baseline", "--prometheus", "0")
    args += ("--dashboard", "127.0.0.1:0")
    return _run_and_scrape(out, *args, timeout=280), out


def _run_and_scrape(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gossip", "simulate", *args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    scraped = out.parent / "scraped"
    scraped.mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        # A node writes its ready file once it serves, metrics endpoint included, and none
        # stops before every one has: each is scraped while it runs.
        wanted = NODES + ("--dashboard" in args)
        while proc.poll() is None and time.monotonic() < deadline and len(list(scraped.iterdir())) < wanted:
            for rank in range(NODES):
                ready = out / "nodes" / f"{rank}.ready"
                if ready.exists() and not (scraped / f"{rank}.txt").exists():
                    url = f"http://{json.loads(ready.read_text())['prometheus']}/metrics"
                    with urllib.request.urlopen(url, timeout=30) as reply:
                        (scraped / f"{rank}.txt").write_bytes(reply.read())
            board = out / "dashboard.ready"
            if board.exists() and not (scraped / "dashboard.json").exists():
                api = json.loads(board.read_text())["url"] + "api/state"
                try:  # (the run, and its dashboard with it, may end meanwhile)
                    with urllib.request.urlopen(api, timeout=30) as reply:
                        state = json.loads(reply.read())
                except OSError:
                    continue
                # Every node listed, through rank 0's member table, and some answering (a short
                # run may end before a loaded machine's dashboard polled them all).
                if len(state["nodes"]) == NODES and any(n["reachable"] for n in state["nodes"]):
                    (scraped / "dashboard.json").write_text(json.dumps(state))
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # on timeout: the launcher stops its own nodes
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
    assert {r["rank"] for r in records} == set(range(NODES))
    assert {r["node"] for r in records} == {f"node{i}" for i in range(NODES)}
    for r in records:
        for key in ("node", "rank", "step", "epoch", "loss", "accuracy", "bytes_sent", "time"):
            assert key in r, (key, r)
        assert isinstance(r["node"], str) and isinstance(r["rank"], int)
        assert math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0
    # Step 0 is each node's starting point, evaluated before any exchange could move it.
    starts = [r for r in records if r["step"] == 0]
    assert sorted(r["rank"] for r in starts) == list(range(NODES))
    assert all(r["exchanges"] == 0 and r["bytes_received"] == 0 for r in starts)
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
def test_simulate_prints_each_nodes_metrics_endpoint_and_each_answered(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    endpoints = [json.loads((out / "nodes" / f"{r}.ready").read_text())["prometheus"] for r in range(NODES)]
    lines = proc.stderr.splitlines()
    at = lines.index("Prometheus metrics:")

    assert lines[at + 1 : at + 1 + NODES] == [
        f"  node {r}: http://{e}/metrics" for r, e in enumerate(endpoints)
    ]
    assert len(set(endpoints)) == NODES and all(e.startswith("127.0.0.1:") for e in endpoints)
    for rank in range(NODES):
        text = (out.parent / "scraped" / f"{rank}.txt").read_text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert [s.labels["node_id"] for s in families["gossip_info"].samples] == [f"node{rank}"]
        assert "gossip_exchanges" in families and "gossip_store_shards_held" in families


@pytest.mark.timeout(300)
def test_simulate_learns_and_reports_the_baseline(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out)

    assert summary["mean_accuracy"] > 0.6  # chance is 0.1
    assert min(summary["accuracies"]) > 0.5
    assert 0.6 < summary["baseline_accuracy"] <= 1.0
    assert summary["mean_accuracy"] == pytest.approx(sum(summary["accuracies"]) / NODES)


@pytest.mark.timeout(300)
def test_simulate_says_what_it_does_from_the_start(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = run
    lines = proc.stderr.splitlines()
    starting = next(i for i, line in enumerate(lines) if "starting nodes" in line)
    training = next(i for i, line in enumerate(lines) if "training" in line)

    assert starting < training
    assert lines[starting].lstrip().startswith("[")  # a progress line: elapsed time, fraction, phase


@pytest.mark.timeout(300)
def test_ctrl_c_writes_the_partial_summary_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gossip", "simulate", "--nodes", "2", "--epochs", "200", "--out", str(out)]
    cmd += ["--min-step-time", "0.02"]  # they never finish, and leave the cores to other work
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # As from a terminal: Ctrl-C delivered, also when this test runs where SIGINT is ignored
    # (a background job without job control passes SIG_IGN on to everything it starts).
    launcher = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not all((out / "nodes" / f"{r}.jsonl").exists() for r in range(2)):
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the nodes did not start training"
            time.sleep(0.5)
        time.sleep(2.0)  # some training

        launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()

    assert launcher.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted" in stderr.splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["nodes"] == 2
    assert all(math.isfinite(a) for a in summary["accuracies"])
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean accuracy" in stdout  # the partial table


@pytest.mark.timeout(300)
def test_simulate_trains_the_text_workload_and_reports_bits_per_byte(tmp_path: Path) -> None:
    out = tmp_path / "text"
    proc = run_simulate(
        out,
        *("--nodes", "2", "--dataset", "text:stdlib:64", "--model", "gpt:1:16:2"),
        *("--epochs", "1", "--max-steps", "60", "--batch-size", "16", "--lr", "0.3"),
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits per byte" in proc.stdout
    s = _summary(out)
    assert len(s["bits_per_byte"]) == 2
    # Sixty steps already beat a uniform guess over 256 bytes (8 bits).
    assert all(math.isfinite(b) and b < 7.5 for b in s["bits_per_byte"])
    assert s["mean_bits_per_byte"] == pytest.approx(sum(s["bits_per_byte"]) / 2)
    assert (out / "plot.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_simulate_dashboard_shows_every_node_while_it_runs(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = json.loads((out / "dashboard.ready").read_text())["url"]
    assert f"dashboard: {url}" in proc.stderr.splitlines()
    state = json.loads((out.parent / "scraped" / "dashboard.json").read_text())
    assert sorted(n["node_id"] for n in state["nodes"]) == [f"node{r}" for r in range(NODES)]
    # Stopped with the run: nothing serves the page any more.
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
