"""Real `python -m gossip node` processes on loopback: crashes, signals, status, exit.

Every process is started by the ``launcher`` fixture (``tests/support/procs.py``), which
kills (by pid) and reaps whatever is still running when the test ends, pass or fail.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.procs import Launcher, NodeProc, stop, wait_for

STEPS_PER_EPOCH = 90  # digits: 1437 training samples in batches of 16, every node the whole set


def status(p: NodeProc) -> dict[str, Any]:
    return p.status()


def member_state(st: dict[str, Any], node_id: str) -> str | None:
    for m in st["members"]:
        if m["node_id"] == node_id:
            return str(m["state"])
    return None


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
    epochs = 6
    nodes = start_cluster(launcher, 3, "--epochs", str(epochs))
    survivors, victim = nodes[:2], nodes[2]
    # The cluster formed (each knows the others: one that never heard of the victim would wait
    # for its third member until --wait-timeout), and the victim took part in it.
    wait_for(
        lambda: all(member_state(status(p), q.name) == "alive" for p in nodes for q in nodes if q is not p),
        60.0,
        "every node to know the others",
        *nodes,
    )
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
    # Long enough that both are still training when the signals come; paced (a slower
    # device), so that they never finish and leave the cores to other work.
    step_time = 0.02
    a, b = start_cluster(launcher, 2, "--epochs", "1000", "--min-step-time", str(step_time))
    wait_for(lambda: exchanges(status(a)) >= 5, 120.0, "exchanges", a, b)
    step_a = status(a)["step"]

    assert stop(b) == 0, b.tail()

    # b said goodbye before it exited; the wait only absorbs a slow status call.
    wait_for(lambda: member_state(status(a), "n1") == "left", 15.0, "n1 to show as left", a)
    assert status(a)["neighbours"] == []
    t0, from_step = time.monotonic(), status(a)["step"]
    wait_for(lambda: status(a)["step"] > step_a + 50, 60.0, "n0 to train on alone", a)
    # Never faster than one step per --min-step-time.
    assert status(a)["step"] - from_step <= (time.monotonic() - t0) / step_time + 1
    assert not a.finished()
    assert stop(a) == 0, a.tail()
    assert b.records() and a.records()  # both wrote their metrics before leaving


@pytest.mark.timeout(240)
def test_exit_when_done_exits_zero_and_status_prints_the_json_of_the_one_left(launcher: Launcher) -> None:
    a = launcher.start("n0", "--wait-for", "2", "--epochs", "2")
    launcher.wait_ready(a)
    b = launcher.start("n1", "--wait-for", "2", "--epochs", "2", "--exit-when-done", peers=a.address)
    launcher.wait_ready(b)

    assert b.popen.wait(180) == 0, b.tail()
    final = b.records()[-1]
    assert final["final"] and final["step"] == 2 * STEPS_PER_EPOCH
    assert final["exchanges"] > 0
    assert math.isfinite(final["loss"]) and final["accuracy"] > 0.8

    # n0 trains to its end and stays; n1 said goodbye as it exited.
    wait_for(lambda: a.finished() and member_state(status(a), "n1") == "left", 120.0, "n0 to finish", a)
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
        {"node_id": "n1", "address": b.address, "state": "left"}
    ]
    assert stop(a) == 0, a.tail()
