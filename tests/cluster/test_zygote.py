"""Node processes forked from the zygote: each its own process, ended and reported like a Popen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gossip.cluster.zygote import Zygote


def node_argv(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "node", "--listen", "127.0.0.1:0", "--node-id", name, "--dataset", "digits", "--threads", "1",
        "--epochs", "400", "--min-step-time", "0.05", "--ready-file", str(tmp_path / f"{name}.ready"), *extra,
    ]  # fmt: skip


def wait_ready(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return str(json.loads(path.read_text())["address"])


@pytest.mark.timeout(150)
def test_forked_nodes_are_processes_of_their_own_ended_and_reported_like_popen(tmp_path: Path) -> None:
    zygote = Zygote()
    try:
        env = dict(os.environ)
        a = zygote.spawn(node_argv(tmp_path, "a"), str(tmp_path / "a.log"), env)
        b = zygote.spawn(node_argv(tmp_path, "b"), str(tmp_path / "b.log"), env)
        running = zygote.spawn(node_argv(tmp_path, "r"), str(tmp_path / "r.log"), env)
        # Bad input, as a process of its own says it: one line, exit 2; its own environment
        # (a failpoint that does not exist) is read, not the zygote's.
        bad = zygote.spawn(["node", "--replication", "0"], str(tmp_path / "bad.log"), env)
        failpoint = zygote.spawn(
            node_argv(tmp_path, "f"), str(tmp_path / "f.log"), dict(env, GOSSIP_FAILPOINTS="nope=kill")
        )
        assert bad.wait(60) == 2 and failpoint.wait(60) == 2
        for name in ("bad", "f"):
            lines = (tmp_path / f"{name}.log").read_text().splitlines()
            assert len(lines) == 1 and lines[0].startswith("gossip node: "), lines
        assert "unknown failpoint 'nope'" in (tmp_path / "f.log").read_text()
        for name in ("a", "b", "r"):
            wait_ready(tmp_path / f"{name}.ready")

        assert len({a.pid, b.pid, running.pid}) == 3 and a.poll() is None and b.poll() is None
        # Its own output, not the zygote's.
        assert (
            os.readlink(f"/proc/{a.pid}/fd/2")
            == os.readlink(f"/proc/{a.pid}/fd/1")
            == str(tmp_path / "a.log")
        )
        a.kill()
        assert a.wait(30) == -signal.SIGKILL
        b.send_signal(signal.SIGTERM)  # a node leaves gracefully on SIGTERM, as when started on its own
        assert b.wait(60) == 0
        with pytest.raises(subprocess.TimeoutExpired):
            running.wait(0.2)
    finally:
        zygote.close()
    assert running.poll() == 0  # SIGTERM from the zygote once its launcher let go: a graceful leave
