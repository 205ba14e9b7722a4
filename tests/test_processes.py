"""Real `python -m gossip node` processes on loopback: crashes, signals, status, exit.

Every process is started by the ``launcher`` fixture, which kills (by pid) and
reaps whatever is still running when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from gossip.status import fetch_status

START_TIMEOUT = 120.0  # imports and the dataset on a loaded 2-core machine
STEPS_PER_EPOCH = 90  # digits: 1437 training samples in batches of 16, every node the whole set


@dataclass
class NodeProc:
    name: str
    popen: subprocess.Popen[bytes]
    workdir: Path
    logfile: IO[bytes]
    address: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"{self.name}.ready"

    @property
    def metrics_file(self) -> Path:
        return self.workdir / f"{self.name}.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def tail(self, lines: int = 25) -> str:
        self.logfile.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.name}'s log ---\n" + "\n".join(text)

    def records(self) -> list[dict[str, Any]]:
        out = []
        if self.metrics_file.exists():
            for line in self.metrics_file.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line being written right now
        return out

    def finished(self) -> bool:
        """Training is over: the node wrote its 'done' record (and 'final' once it leaves)."""
        return any(r.get("done") or r.get("final") for r in self.records())


class Launcher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[NodeProc] = []

    def start(self, name: str, *args: str, peers: str | None = None) -> NodeProc:
        cmd = [sys.executable, "-m", "gossip", "node", "--listen", "127.0.0.1:0", "--node-id", name]
        cmd += ["--dataset", "digits", "--threads", "1"]
        cmd += ["--ready-file", str(self.workdir / f"{name}.ready")]
        cmd += ["--metrics", str(self.workdir / f"{name}.jsonl")]
        if peers:
            cmd += ["--peers", peers]
        cmd += list(args)
        logfile = (self.workdir / f"{name}.log").open("wb")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        proc = NodeProc(name, popen, self.workdir, logfile)
        self.procs.append(proc)
        return proc

    def wait_ready(self, *procs: NodeProc) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for p in procs:
            while not p.ready_file.exists():
                code = p.popen.poll()
                assert code is None, f"{p.name} exited with {code} before serving\n{p.tail()}"
                assert time.monotonic() < deadline, f"{p.name} did not start in time\n{p.tail()}"
                time.sleep(0.05)
            p.address = json.loads(p.ready_file.read_text())["address"]

    def cleanup(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
        for p in self.procs:
            p.popen.wait(30)
            p.logfile.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    la = Launcher(tmp_path)
    try:
        yield la
    finally:
        la.cleanup()


def status(p: NodeProc) -> dict[str, Any]:
    return asyncio.run(fetch_status(p.address, 10.0))


def member_state(st: dict[str, Any], node_id: str) -> str | None:
    for m in st["members"]:
        if m["node_id"] == node_id:
            return str(m["state"])
    return None


def wait_for(pred: Callable[[], bool], timeout: float, what: str, *procs: NodeProc) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            code = p.popen.poll()
            assert code is None, f"{p.name} exited with {code} while waiting for {what}\n{p.tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}\n" + "\n".join(p.tail() for p in procs)
            )
        time.sleep(0.1)


def stop(p: NodeProc, timeout: float = 60.0) -> int:
    p.popen.send_signal(signal.SIGTERM)
    try:
        return p.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{p.name} did not exit within {timeout} s of SIGTERM\n{p.tail()}") from None


def start_cluster(launcher: Launcher, count: int, *args: str) -> list[NodeProc]:
    first = launcher.start("n0", "--wait-for", str(count), *args)
    launcher.wait_ready(first)
    rest = [
        launcher.start(f"n{i}", "--wait-for", str(count), *args, peers=first.address) for i in range(1, count)
    ]
    launcher.wait_ready(*rest)
    return [first, *rest]


def exchanges(st: dict[str, Any]) -> int:
    return int(st["exchanges_ok"]) + int(st["exchanges_served"])


@pytest.mark.timeout(300)
def test_survivors_of_a_sigkill_keep_training_and_declare_it_dead(launcher: Launcher) -> None:
    epochs = 12
    nodes = start_cluster(launcher, 3, "--epochs", str(epochs))
    survivors, victim = nodes[:2], nodes[2]
    wait_for(lambda: exchanges(status(victim)) >= 5, 120.0, "the victim to exchange", *nodes)
    before = {p.name: status(p) for p in survivors}
    assert all(st["step"] < epochs * STEPS_PER_EPOCH for st in before.values()), (
        "already done: no mid-run kill"
    )

    os.kill(victim.popen.pid, signal.SIGKILL)
    assert victim.popen.wait(30) == -signal.SIGKILL

    def moving() -> bool:
        now = {p.name: status(p) for p in survivors}
        return all(
            now[n]["step"] >= before[n]["step"] + 50 and exchanges(now[n]) > exchanges(before[n]) for n in now
        )

    wait_for(moving, 120.0, "the survivors to train and exchange on", *survivors)
    wait_for(
        lambda: all(member_state(status(p), "n2") == "dead" for p in survivors),
        120.0,
        "the survivors to declare n2 dead",
        *survivors,
    )
    wait_for(lambda: all(p.finished() for p in survivors), 240.0, "the survivors to finish", *survivors)
    for p in survivors:
        st = status(p)
        assert "n2" not in st["neighbours"]
        assert member_state(st, "n1" if p.name == "n0" else "n0") == "alive"
        recs = p.records()
        assert recs[-1]["step"] == epochs * STEPS_PER_EPOCH
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["accuracy"]) for r in recs), recs
        assert recs[-1]["accuracy"] > 0.8, recs[-1]
    for p in survivors:
        assert stop(p) == 0, p.tail()


@pytest.mark.timeout(240)
def test_sigterm_leaves_gracefully_and_exits_zero(launcher: Launcher) -> None:
    # Long enough that both are still training when the signals come.
    a, b = start_cluster(launcher, 2, "--epochs", "1000")
    wait_for(lambda: exchanges(status(a)) >= 5, 120.0, "exchanges", a, b)
    step_a = status(a)["step"]

    assert stop(b) == 0, b.tail()

    # b said goodbye before it exited; the wait only absorbs a slow status call.
    wait_for(lambda: member_state(status(a), "n1") == "left", 15.0, "n1 to show as left", a)
    assert status(a)["neighbours"] == []
    wait_for(lambda: status(a)["step"] > step_a + 50, 60.0, "n0 to train on alone", a)
    assert not a.finished()
    assert stop(a) == 0, a.tail()
    assert b.records() and a.records()  # both wrote their metrics before leaving


@pytest.mark.timeout(240)
def test_status_command_prints_json(launcher: Launcher) -> None:
    a, b = start_cluster(launcher, 2, "--epochs", "2")
    wait_for(lambda: a.finished() and b.finished(), 120.0, "training to end", a, b)

    out = subprocess.run(
        [sys.executable, "-m", "gossip", "status", "--peer", a.address, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["node_id"] == "n0"
    assert st["step"] == 2 * STEPS_PER_EPOCH
    assert isinstance(st["exchanges_ok"], int) and isinstance(st["exchanges_failed"], int)
    assert st["exchanges_ok"] + st["exchanges_served"] > 0
    assert [{k: m[k] for k in ("node_id", "address", "state")} for m in st["members"]] == [
        {"node_id": "n1", "address": b.address, "state": "alive"}
    ]
    for p in (a, b):
        assert stop(p) == 0, p.tail()


@pytest.mark.timeout(240)
def test_exit_when_done_exits_zero_after_training(launcher: Launcher) -> None:
    nodes = start_cluster(launcher, 2, "--epochs", "2", "--exit-when-done")

    codes = [p.popen.wait(180) for p in nodes]

    assert codes == [0, 0], "\n".join(p.tail() for p in nodes)
    for p in nodes:
        final = p.records()[-1]
        assert final["final"] and final["step"] == 2 * STEPS_PER_EPOCH
        assert final["exchanges"] > 0
        assert math.isfinite(final["loss"]) and final["accuracy"] > 0.8
