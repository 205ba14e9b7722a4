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
    return _gossip_python("-m", "gossip", *args, cwd=cwd)


def _gossip_python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args],
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
    "unknown member protocol": ["node", "--member-protocol", "gossipy"],
    "simulate unknown member protocol": ["simulate", "--member-protocol", "gossipy"],
    "node call rate negative": ["node", "--node-call-rate", "-1"],
    "send rate without a unit": ["node", "--max-send-rate", "50"],
    "send rate zero": ["node", "--max-send-rate", "0mbit"],
    "simulate send rate not a rate": ["simulate", "--max-send-rate", "fast"],
    "node metrics under a file": ["node", "--metrics", "afile/m.jsonl"],
    "lr not a number": ["simulate", "--lr", "abc"],
    "simulate out under a file": ["simulate", "--out", "afile/run"],
    "simulate missing dataset": ["simulate", "--dataset", "/nonexistent.npz"],
    "simulate unknown model": ["simulate", "--model", "resnet9000"],
    "simulate bad partition": ["simulate", "--partition", "dirichlet:x"],
    "simulate no nodes": ["simulate", "--nodes", "0"],
    "reconstruct into a missing folder": [
        "reconstruct",
        "--peer",
        "127.0.0.1:1",
        "--out",
        "/nonexistent/dir/m.pt",
    ],
    "reconstruct unknown suffix": ["reconstruct", "--peer", "127.0.0.1:1", "--out", "m.bin"],
    "reconstruct bad peer": ["reconstruct", "--peer", "nohost", "--out", "m.pt"],
    "topology draw into a missing folder": [
        "topology",
        "ring",
        "--nodes",
        "8",
        "--draw",
        "/nonexistent/x.png",
    ],
    "topology unknown": ["topology", "nosuch", "--nodes", "8"],
    "consensus unknown compressor": ["consensus", "--topology", "ring", "--nodes", "8", "--compress", "int9"],
    "consensus compress with pairwise": [
        "consensus",
        *("--topology", "ring", "--nodes", "8", "--strategy", "pairwise", "--compress", "int8"),
    ],
    "consensus gamma zero": [
        "consensus",
        "--topology",
        "ring",
        "--nodes",
        "8",
        "--compress",
        "int8",
        "--gamma",
        "0",
    ],
    "experiment missing file": ["experiment", "nosuch.toml"],
    "experiment out under a file": ["experiment", "exp.toml", "--out", "afile/x"],
    "status bad peer": ["status", "--peer", "nohost"],
    "outer with push-sum": ["node", "--strategy", "push-sum", "--outer", "nesterov:0.7:0.9"],
    "outer unknown": ["node", "--outer", "adam:0.1"],
    "min step time negative": ["node", "--min-step-time", "-1"],
    "simulate min step time nan": ["simulate", "--min-step-time", "nan"],
}


def _bad_input_folder(tmp_path: Path) -> list[str]:
    (tmp_path / "unknown.toml").write_text("epochs = 3\nbogus = 1\n")
    (tmp_path / "wrongtype.toml").write_text('epochs = "ten"\n')
    (tmp_path / "exp.toml").write_text("nodes = 4\nrounds = 2\n")
    (tmp_path / "afile").write_text("not a folder")
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_exit_code_2(
    tmp_path: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process, through the function `python -m gossip` runs: each case in a process
    # of its own would pay torch's import each time (about 3 s here). A sample of them runs
    # as real processes below.
    from gossip.cli.main import main

    before = _bad_input_folder(tmp_path)
    monkeypatch.chdir(tmp_path)

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err

    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"gossip {argv[0]}: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command left something behind"


IN_PROCESSES = [
    "listen not an address",
    "simulate unknown model",
    "reconstruct bad peer",
    "experiment missing file",
]


@pytest.mark.parametrize("what", IN_PROCESSES)
def test_bad_input_in_a_process_of_its_own_is_one_line_and_exit_code_2(tmp_path: Path, what: str) -> None:
    argv = BAD_INPUTS[what]
    before = _bad_input_folder(tmp_path)

    done = _gossip(*argv, cwd=tmp_path)

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"gossip {argv[0]}: error: "), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command left something behind"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["simulate", "--help"],
        ["status", "--peer", "127.0.0.1:1"],
        ["topology", "ring", "--nodes", "8"],
        ["reconstruct", "--peer", "127.0.0.1:1", "--out", "m.safetensors"],
    ],
    ids=["help", "simulate-help", "status", "topology", "reconstruct"],
)
def test_commands_that_need_no_torch_never_import_it(tmp_path: Path, argv: list[str]) -> None:
    done = _gossip_python("-X", "importtime", "-m", "gossip", *argv, cwd=tmp_path)

    imported = {
        line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    assert imported, done.stderr[-500:]
    assert not any(m == "torch" or m.startswith("torch.") for m in imported)


def test_version_is_printed(tmp_path: Path) -> None:
    from gossip import __version__

    done = _gossip("--version", cwd=tmp_path)

    assert done.returncode == 0 and done.stdout.strip() == f"gossip {__version__}"


def test_status_of_an_unreachable_peer_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    done = _gossip("status", "--peer", "127.0.0.1:1", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert done.stdout == ""
