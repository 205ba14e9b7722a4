"""Real ``python -m gossip node`` processes for tests: start, wait until serving, ask, end.

A :class:`Launcher` starts every process of a test and, in :meth:`Launcher.cleanup`
(the fixtures call it in a ``finally``), kills by pid and reaps whatever still runs,
pass or fail. Each node writes its log, metrics and ready file into the launcher's
folder under its own name.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from gossip.cluster.zygote import ForkedProcess, Zygote
from gossip.observe.status import fetch_status

START_TIMEOUT = 120.0  # imports and the dataset on a loaded 2-core machine
STATUS_TIMEOUT = 10.0


@dataclass
class NodeProc:
    name: str
    popen: subprocess.Popen[bytes] | ForkedProcess
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

    def log_lines(self) -> list[str]:
        self.logfile.flush()
        return self.log_path.read_text(errors="replace").splitlines()

    def tail(self, lines: int = 25) -> str:
        text = self.log_lines()[-lines:]
        return f"--- last lines of {self.name}'s log ---\n" + "\n".join(text)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.metrics_file)

    def finished(self) -> bool:
        """Training is over: the node wrote its 'done' record (and 'final' once it leaves)."""
        return any(r.get("done") or r.get("final") for r in self.records())

    def status(self, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
        return asyncio.run(fetch_status(self.address, timeout))

    def kill(self, timeout: float = 30.0) -> int:
        os.kill(self.popen.pid, signal.SIGKILL)
        return self.popen.wait(timeout)


class Launcher:
    """Starts ``gossip node`` processes as ``gossip simulate`` does: forked from a zygote that
    imported torch once (gossip.cluster.zygote), each a process of its own with its own pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[NodeProc] = []
        self.zygote = Zygote()

    def start(
        self, name: str, *args: str, peers: str | None = None, env: Mapping[str, str] | None = None
    ) -> NodeProc:
        cmd = [sys.executable, "-m", "gossip", "node", "--listen", "127.0.0.1:0", "--node-id", name]
        cmd += ["--dataset", "digits", "--threads", "1"]
        cmd += ["--ready-file", str(self.workdir / f"{name}.ready")]
        cmd += ["--metrics", str(self.workdir / f"{name}.jsonl")]
        if peers:
            cmd += ["--peers", peers]
        cmd += list(args)
        logfile = (self.workdir / f"{name}.log").open("wb")
        full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        popen = self.zygote.spawn(cmd[3:], logfile.name, full_env)
        proc = NodeProc(name, popen, self.workdir, logfile)
        self.procs.append(proc)
        return proc

    def wait_ready(self, *procs: NodeProc, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
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
        self.zygote.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """A node's metrics file so far: one JSON object per line, up to a line being written."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now
    return out


def wait_for(pred: Callable[[], bool], timeout: float, what: str, *procs: NodeProc) -> None:
    """Poll ``pred`` until it holds; fail at ``timeout`` or as soon as one of ``procs`` exits."""
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
    """SIGTERM, then the exit code; fails if the process is still there after ``timeout``."""
    p.popen.send_signal(signal.SIGTERM)
    try:
        return p.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{p.name} did not exit within {timeout} s of SIGTERM\n{p.tail()}") from None


def log_time(line: str) -> float:
    """The wall-clock time (epoch seconds) of a node's log line (``gossip``'s format, local time)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_simulate(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m gossip simulate ... --out OUT`` to its end, output captured.

    On timeout subprocess.run kills the launcher, and the launcher stops its own nodes.
    """
    cmd = [sys.executable, "-m", "gossip", "simulate", *args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
