"""`python -m gossip` as a user runs it: real subprocesses, exit codes and what reaches the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

# torch's import dominates; a node that got past validation would serve and never exit.
TIMEOUT = 60


def _gossip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gossip", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(
            f"gossip {' '.join(args)} still running after {TIMEOUT} s (killed pid {proc.pid}):\n{err[-2000:]}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ring_gap(n: int) -> float:
    # Metropolis weights of a cycle: every degree is 2, so 1/3 on each edge and on the diagonal.
    w = nx.to_numpy_array(nx.cycle_graph(n)) / 3 + np.eye(n) / 3
    mags = np.sort(np.abs(np.linalg.eigvalsh(w)))
    return float(1 - mags[-2])


def test_topology_prints_the_spectral_gap(tmp_path: Path) -> None:
    done = _gossip("topology", "ring", "--nodes", "8", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("spectral gap"))
    assert float(line.split()[-1]) == pytest.approx(_ring_gap(8), abs=1e-6)


def test_topology_json_is_one_object(tmp_path: Path) -> None:
    done = _gossip("topology", "ring", "--nodes", "8", "--json", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert isinstance(info, dict)
    assert info["nodes"] == 8
    assert info["spectral_gap"] == pytest.approx(_ring_gap(8), rel=1e-9)


def test_topology_draw_writes_a_png(tmp_path: Path) -> None:
    done = _gossip("topology", "ring", "--nodes", "8", "--draw", "x.png", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD_INPUTS = {
    "epochs not an int": ["node", "--epochs", "x"],
    "hypercube of 12": ["node", "--topology", "hypercube", "--rank", "0", "--world-size", "12"],
    "unknown topology": ["simulate", "--topology", "nosuch"],
    "missing config": ["node", "--config", "missing.toml"],
    "config unknown key": ["node", "--config", "unknown.toml"],
    "config wrong type": ["node", "--config", "wrongtype.toml"],
    "listen not an address": ["node", "--listen", "nonsense"],
    "listen port not ascii": ["node", "--listen", "127.0.0.1:\u00b2"],
    "missing dataset": ["node", "--dataset", "/nonexistent.npz"],
    "unknown model module": ["node", "--model", "nosuch.module:factory"],
    "dead before suspect": ["node", "--suspect-after", "5", "--dead-after", "3"],
    "dead after nan": ["node", "--dead-after", "nan"],
    "node call rate negative": ["node", "--node-call-rate", "-1"],
}


@pytest.mark.parametrize("argv", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "unknown.toml").write_text("epochs = 3\nbogus = 1\n")
    (tmp_path / "wrongtype.toml").write_text('epochs = "ten"\n')

    done = _gossip(*argv, cwd=tmp_path)

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("gossip")


def test_status_of_an_unreachable_peer_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    done = _gossip("status", "--peer", "127.0.0.1:1", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert done.stdout == ""
