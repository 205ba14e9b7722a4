"""``gossip launch --ray`` on Ray's own multi-node test cluster (3 Ray nodes of 2 CPUs on this machine).

One launch of 6 nodes (starting Ray nodes and importing torch in 6 actors is most of
the cost): while it trains, the test SIGKILLs one actor's process, waits for Ray to
restart it and its node to rejoin, and rebuilds the model through that node with
``gossip reconstruct``. A ``gossip simulate`` run with the same seed, started first,
is the reference for the accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gossip-sgd[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

# Ray nodes and their node processes share the machine with the other test worker.
pytestmark = [pytest.mark.xdist_group("processes")]

NODES = 6
VICTIM = 3
# Digits with the MLP: by 3 epochs 6 nodes' accuracy has settled to within a point or so.
TRAIN = ["--nodes", str(NODES), "--epochs", "3", "--seed", "3", "--publish-every", "10"]
TRAIN += ["--shard-bytes", "4096"]
# Each step takes 0.1 s at least (a slower device): the kill must land mid-run. With exchanges
# over the bulk port a node trained its 3 epochs in about a second, and the victim could be done
# before its SIGKILL, the launcher too before it noticed.
TRAIN += ["--min-step-time", "0.1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``gossip simulate`` with the same knobs, started first: it runs while the Ray nodes start."""
    out = tmp_path_factory.mktemp("simulate") / "run"
    cmd = [sys.executable, "-m", "gossip", "simulate", *TRAIN, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # simulate stops its node processes on Ctrl-C
            proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def ray_cluster(reference: tuple[subprocess.Popen[str], Path]) -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _ready(out: Path, rank: int) -> dict[str, Any] | None:
    path = out / "nodes" / f"{rank}.ready"
    return json.loads(path.read_text()) if path.exists() else None


def _wait(pred: Any, timeout: float, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            err = proc.stderr.read()[-3000:] if proc.stderr is not None else ""
            pytest.fail(f"the launcher exited ({proc.returncode}) while waiting for {what}: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def _reconstruct(address: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gossip", "reconstruct", "--peer", address, "--out", str(out), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV, check=False)


def _training(out: Path) -> bool:
    path = out / "nodes" / "0.jsonl"
    return path.exists() and any('"step": 0' not in ln for ln in path.read_text().splitlines())


@pytest.fixture(scope="module")
def launched(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The launch's output folder, its exit, and what the test did to it on the way."""
    out = tmp_path_factory.mktemp("launch") / "run"
    cmd = [sys.executable, "-m", "gossip", "launch", "--ray", ray_cluster.address, *TRAIN, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait(lambda: all(_ready(out, r) for r in range(NODES)), 120, "every node serving", proc)
        _wait(lambda: _training(out), 60, "training", proc)
        first = _ready(out, VICTIM)
        assert first is not None
        os.kill(first["pid"], signal.SIGKILL)
        _wait(lambda: (_ready(out, VICTIM) or first)["pid"] != first["pid"], 120, "the restart", proc)
        again = _ready(out, VICTIM)
        assert again is not None
        rebuilt = _reconstruct(again["address"], out.parent / "during.pt")
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the launcher stops its actors on Ctrl-C
            proc.communicate(timeout=60)
    return {
        "out": out,
        "code": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "killed": first,
        "restarted": again,
        "rebuilt": rebuilt,
    }


@pytest.fixture(scope="module")
def simulated(reference: tuple[subprocess.Popen[str], Path]) -> dict[str, Any]:
    proc, out = reference
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


@pytest.mark.timeout(420)
def test_six_nodes_on_ray_train_like_simulate_survive_a_sigkill_and_serve_reconstruct(
    launched: dict[str, Any], simulated: dict[str, Any]
) -> None:
    """One scenario on one Ray cluster: starting one takes 15-20 s here, and one at a time keeps
    the run inside its timeouts on two cores."""
    assert launched["code"] == 0, launched["stderr"][-3000:]
    out = launched["out"]
    summary = json.loads((out / "summary.json").read_text())
    merged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    again = [r for r in merged if r["rank"] == VICTIM and r.get("incarnation") == 1]
    rebuilt = launched["rebuilt"]

    # As well as gossip simulate with the same seed, spread over every Ray node.
    assert summary["mean_accuracy"] == pytest.approx(simulated["mean_accuracy"], abs=0.02)
    assert len(summary["ray"]["ray_nodes"]) == 3
    assert (out / "plot.png").stat().st_size > 0 and summary["ranks"] == list(range(NODES))
    # The SIGKILLed actor was restarted by Ray; its node rejoined from the store and averaged.
    assert summary["ray"]["restarts"] == {str(VICTIM): 1}
    assert launched["restarted"]["incarnation"] == 1
    assert again and again[0]["init_from"]["version"] >= 1
    assert again[-1]["final"] and again[-1]["exchanges"] > 0
    # gossip reconstruct through the restarted node, while the run went on.
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert json.loads(rebuilt.stdout)["version"] >= 1


def _launch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gossip", "launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=ENV, cwd=cwd, check=False)


@pytest.mark.timeout(120)
def test_an_unreachable_ray_cluster_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = _launch("--ray", "127.0.0.1:9", "--nodes", "2", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in lines[0]


def _cluster_state(address: str) -> dict[str, list[str]]:
    code = (
        "import json, logging, ray\n"
        f"ray.init(address={address!r}, logging_level=logging.ERROR)\n"
        "from ray._private.state import actors\n"
        "groups = [g['state'] for g in ray.util.placement_group_table().values()]\n"
        "print(json.dumps({'groups': groups, 'actors': [a['State'] for a in actors().values()]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    state: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return state


@pytest.fixture
def small_cluster() -> Iterator[Cluster]:
    """One Ray node of 2 CPUs."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.timeout(180)
def test_too_few_cpus_for_the_nodes_is_one_line_exit_1_and_nothing_left(
    small_cluster: Cluster, tmp_path: Path
) -> None:
    done = _launch("--ray", small_cluster.address, "--nodes", "3", "--placement-timeout", "3", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("[")]  # not progress
    assert len(lines) == 1 and "cannot place 3 nodes" in lines[0] and "2 CPUs" in lines[0]
    state = _cluster_state(small_cluster.address)
    assert set(state["groups"]) <= {"REMOVED"} and set(state["actors"]) <= {"DEAD"}
