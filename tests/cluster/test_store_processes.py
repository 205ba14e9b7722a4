"""The model store across real `python -m gossip node` processes: SIGKILL, repair, rebuild.

Every process is started through the ``procs`` fixture (a ``tests/support/procs.py``
launcher), which kills (by pid) and reaps whatever still runs when the test ends,
pass or fail. Nodes train one epoch on 1/8 of digits (12 steps) and publish every
3 steps, in 4 KiB shards (10 per snapshot), so snapshots exist within seconds; the
store and membership run on their default settings (a death is noticed after 10 s).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.procs import Launcher, NodeProc

STORE_ARGS = ["--shard-bytes", "4096", "--publish-every", "3", "--replication", "3"]
SHARDS = 19  # the mlp on digits: 38 440 bytes of parameters and as many of momentum


class Procs(Launcher):
    def start(self, name: str, *args: str, **kwargs: Any) -> NodeProc:
        return super().start(name, "--epochs", "1", *args, **kwargs)

    def cluster(self, n: int, *args: str) -> list[NodeProc]:
        """n ranked nodes (1/n of the data each), started at once, joined through the first."""
        seed = str(self.workdir / "n0.ready")
        procs = []
        for i in range(n):
            ranked = ["--rank", str(i), "--world-size", str(n), "--wait-for", str(n), *args]
            procs.append(self.start(f"n{i}", *ranked, *([] if i == 0 else ["--seed-file", seed])))
        self.wait_ready(*procs)
        return procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    la = Procs(tmp_path)
    try:
        yield la
    finally:
        la.cleanup()


def wait_for(pred: Callable[[], bool], timeout: float, what: str, procs: list[NodeProc]) -> float:
    t0 = time.monotonic()
    while not pred():
        for p in procs:
            assert p.popen.poll() is None, f"{p.name} exited while waiting for {what}\n{p.tail()}"
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n" + procs[0].tail())
        time.sleep(0.2)
    return time.monotonic() - t0


def holders(procs: list[NodeProc], version: int) -> dict[int, set[str]]:
    """shard index -> names of the processes holding a verified copy of it."""
    out: dict[int, set[str]] = {}
    for p in procs:
        for snap in p.status()["store"]["snapshots"]:
            if snap["version"] == version:
                for i in snap["shards_held"]:
                    out.setdefault(i, set()).add(p.name)
    return out


def fully_replicated(procs: list[NodeProc], version: int, exact: bool = False) -> bool:
    """Every shard of ``version`` has R copies among ``procs`` (exactly R with ``exact``)."""
    want = min(3, len(procs))
    counts = [len(h) for h in holders(procs, version).values()]
    ok = len(counts) == SHARDS and all(c >= want for c in counts)
    return ok and (not exact or all(c == want for c in counts))


def settled(procs: list[NodeProc]) -> int | None:
    """The newest version once every node knows the same ones and each has R copies, else None."""
    versions = {tuple(p.status()["store"]["versions"]) for p in procs}
    if len(versions) != 1 or not (newest := versions.pop()):
        return None
    return newest[0] if fully_replicated(procs, newest[0]) else None


def reconstruct(peer: NodeProc, out: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    cmd = [sys.executable, "-m", "gossip", "reconstruct", "--peer", peer.address, "--out", str(out), "--json"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


def file_digest(path: Path) -> str:
    """A digest of the tensors a .pt state_dict holds, in order (the snapshot's root covers the
    momentum too, which model files leave out: reconstruct itself checks the root)."""
    state = torch.load(path, weights_only=True)
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in state.values())).hexdigest()


@pytest.mark.timeout(300)
def test_survivors_of_sigkills_rebuild_the_model_repair_it_and_fail_cleanly_without_a_shard(
    procs: Procs, tmp_path: Path
) -> None:
    nodes = procs.cluster(8, *STORE_ARGS)
    wait_for(lambda: all(p.records() and p.records()[-1].get("done") for p in nodes), 120, "training", nodes)
    wait_for(lambda: settled(nodes) is not None, 60, "the snapshots on their owners", nodes)
    newest = settled(nodes)
    code, before, err = reconstruct(nodes[0], tmp_path / "before.pt")
    assert code == 0 and before["version"] == newest, err
    assert before["digest_algorithm"] == "blake3"
    model_digest = file_digest(tmp_path / "before.pt")
    rng = random.Random(3)
    alive = list(nodes)
    repair_seconds = []

    for trial in range(2):
        victims = rng.sample(alive, 2)  # R - 1
        for p in victims:
            p.kill()
        killed_at = time.monotonic()
        alive = survivors = [p for p in alive if p not in victims]

        code, info, err = reconstruct(rng.choice(alive), tmp_path / f"after{trial}.pt")

        assert code == 0, err
        assert (info["version"], info["sha256"]) == (newest, before["sha256"])
        assert file_digest(tmp_path / f"after{trial}.pt") == model_digest
        assert not set(info["peers"]) & {p.address for p in victims}
        repaired = functools.partial(fully_replicated, survivors, newest, exact=True)
        wait_for(repaired, 90, "R copies again", survivors)
        repair_seconds.append(time.monotonic() - killed_at)
    print(f"every shard had R copies again {repair_seconds} s after the kills")

    # Now kill every holder of shard 0: the one node left cannot rebuild that version, and says why.
    gone = holders(alive, newest)[0]
    (last,) = [p for p in alive if p.name not in gone]
    for p in alive:
        if p.name in gone:
            p.kill()

    code, info, err = reconstruct(last, tmp_path / "lost.pt", "--version", str(newest))

    assert code == 1
    assert f"mlp/v{newest}/s0" in err and f"mlp/v{newest}/s0" in info["missing"][str(newest)]
    assert not (tmp_path / "lost.pt").exists()


@pytest.mark.timeout(240)
def test_a_node_started_with_init_from_network_begins_at_the_snapshots_accuracy(
    procs: Procs, tmp_path: Path
) -> None:
    nodes = procs.cluster(2, *STORE_ARGS)
    wait_for(lambda: all(p.records() and p.records()[-1].get("done") for p in nodes), 120, "training", nodes)
    wait_for(lambda: settled(nodes) is not None, 60, "the snapshots on their owners", nodes)
    newest = settled(nodes)

    joiner = procs.start("joiner", "--init-from-network", "--peers", nodes[1].address, "--publish-every", "0")
    procs.wait_ready(joiner)
    wait_for(lambda: bool(joiner.records()), 60, "the joiner's first evaluation", [joiner])

    first = joiner.records()[0]
    assert first["init_from"]["version"] == newest and first["step"] == 0
    code, _, err = reconstruct(nodes[0], tmp_path / "snap.pt", "--version", str(newest))
    assert code == 0, err
    from gossip.train.data import load_dataset
    from gossip.train.models import build_model
    from gossip.train.trainer import evaluate

    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    _, initial_accuracy = evaluate(model, ds.x_test, ds.y_test)  # the weights every node starts from
    # The snapshot carried the publisher's momentum: the joiner resumed every buffer.
    assert first["init_from"]["momentum_buffers"] == len(list(model.parameters()))
    model.load_state_dict(torch.load(tmp_path / "snap.pt", weights_only=True))
    _, snapshot_accuracy = evaluate(model, ds.x_test, ds.y_test)
    assert first["init_accuracy"] == snapshot_accuracy
    assert snapshot_accuracy > initial_accuracy + 0.3
    # Peers may have averaged into it between loading and the first evaluation: close, not chance.
    assert abs(first["accuracy"] - snapshot_accuracy) < 0.05

    done = subprocess.run(
        [sys.executable, "-m", "gossip", "status", "--peer", joiner.address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    store = json.loads(done.stdout)["store"]
    assert store["versions"][0] == newest and store["replication"] == 3
    assert 0 < store["ring_share"] < 1 and store["ring_members"] == 3
    assert isinstance(store["shards_held"], int) and isinstance(store["under_replicated"], list)


@pytest.mark.timeout(240)
def test_simulate_kills_nodes_and_rebuilds_the_model_from_the_survivors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gossip", "simulate", "--nodes", "4", "--epochs", "2", "--out", str(out)]
    cmd += ["--publish-every", "5", "--shard-bytes", "4096", "--kill", "2@10", "--reconstruct"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["killed"]) == 2 and summary["ranks"] == sorted(set(range(4)) - set(summary["killed"]))
    assert summary["rebuilt"] is True and summary["rebuilt_version"] >= 2
    assert summary["rebuilt_accuracy"] > 0.8
    assert (out / "model.pt").exists()
    assert "rebuilt from store" in done.stdout and "killed (SIGKILL)" in done.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--peer", "nohost", "--out", "m.pt"], "--peer"),
        (["--peer", "127.0.0.1:1", "--out", "m.pt", "--version", "new"], "--version"),
        (["--peer", "127.0.0.1:1", "--out", "m.pt", "--format", "onnx"], "invalid choice"),
    ],
)
def test_reconstruct_refuses_bad_arguments_with_exit_code_2(
    args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gossip.cli.main import main

    with pytest.raises(SystemExit) if "--format" in args else contextlib.nullcontext():
        assert main(["reconstruct", *args]) == 2
    assert words in capsys.readouterr().err


def test_reconstruct_through_an_unreachable_peer_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gossip.cli.main import main

    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code = main(["reconstruct", "--peer", f"127.0.0.1:{port}", "--out", str(tmp_path / "m.pt"), "--json"])

    assert code == 1
    captured = capsys.readouterr()
    assert "cannot ask" in captured.err and "error" in json.loads(captured.out)
    assert not (tmp_path / "m.pt").exists()
