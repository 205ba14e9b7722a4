"""Node processes forked from one process that has already imported what a node needs.

A ``gossip node`` process spends about 3 s of CPU importing torch and gossip
before it does anything; ``gossip simulate --nodes N`` used to pay that N times,
which on a 2-core machine is most of a short run and made 32 nodes miss their
start timeout. The zygote (``python -m gossip.cli.zygote``, the process side; this
module is the launcher's) imports it all
once and, for each node, forks a child that runs ``gossip node``'s own entry
point with the node's command line: the same code, flags and files as a node
started on its own, minus the imports (the pages are shared copy-on-write).

It is a real process per node, with its own pid: it is signalled, killed and
stopped by pid as before. Only its parent differs: the zygote reaps each child
and reports how it ended, which :class:`ForkedProcess` (what the launcher holds,
with ``subprocess.Popen``'s ``pid``/``poll``/``wait``/``send_signal``/``kill``)
turns into the same ``returncode`` (negative: the signal that ended it).

Fork safety: the zygote starts no thread and no event loop, opens no socket and
never initialises gRPC (importing it is not initialising it); numpy's BLAS pool is
kept to one thread (its launcher sets ``OPENBLAS_NUM_THREADS=1`` before numpy
loads), so the fork copies one thread. Each child resets the signals the zygote
ignores, takes its own log file as stdout and stderr, the environment it was given,
and fresh seeds for Python's and numpy's global generators (torch's default
generator is the same in every fresh process anyway).

The zygote ends when its launcher closes the pipe to it (or dies): it sends
SIGTERM to the children still running, SIGKILL to those left after 10 s, and
reports them. Protocol: JSON lines, requests ``{"argv", "log", "env"}`` on its
stdin (and ``"cwd"``) answered by ``{"pid"}`` in order, and ``{"exit": pid, "code"}`` when a
child ends; nothing else is read from or written to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

STOP_GRACE = 10.0  # what the zygote gives its nodes after SIGTERM (gossip.cli.zygote)


class ZygoteError(RuntimeError):
    """The zygote could not be started or stopped answering."""


class Zygote:
    """A running zygote, started on first use; :meth:`spawn` forks a node from it."""

    def __init__(self, start_timeout: float = 120.0) -> None:
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._pids: queue.Queue[int | str] = queue.Queue()  # a pid, or why no child was forked
        self._spawning = threading.Lock()
        self._codes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.gone = False  # the zygote ended: no more reports will come

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "gossip.cli.zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
            self._reader.start()
        return self._proc

    def _read(self, pipe: IO[bytes]) -> None:
        try:
            for line in pipe:
                msg = json.loads(line)
                if "pid" in msg:
                    with self._lock:  # a new child may reuse the pid of one that ended
                        self._codes.pop(int(msg["pid"]), None)
                    self._pids.put(int(msg["pid"]))
                elif "error" in msg:
                    self._pids.put(str(msg["error"]))
                elif "exit" in msg:
                    with self._lock:
                        self._codes[int(msg["exit"])] = int(msg["code"])
        finally:
            self.gone = True
            self._pids.put(-1)  # the zygote is gone: wake a spawn waiting for a pid

    def spawn(self, argv: Sequence[str], log: str, env: Mapping[str, str]) -> ForkedProcess:
        """Fork ``gossip node`` with ``argv`` (after ``gossip``), its output appended to ``log``."""
        with self._spawning:  # answers come in the order of the requests
            proc = self._start()
            assert proc.stdin is not None
            try:
                req = {"argv": list(argv), "log": log, "env": dict(env), "cwd": os.getcwd()}
                proc.stdin.write((json.dumps(req) + "\n").encode())
                proc.stdin.flush()
                pid = self._pids.get(timeout=self.start_timeout)
            except (OSError, queue.Empty) as exc:
                raise ZygoteError(f"the node launcher did not answer: {exc}") from None
        if isinstance(pid, str):
            raise ZygoteError(f"the node launcher could not start the node: {pid}")
        if pid < 0:
            raise ZygoteError(f"the node launcher exited with code {proc.poll()}")
        return ForkedProcess(pid, self)

    def code(self, pid: int) -> int | None:
        """How ``pid`` ended (``Popen.returncode``), None while it runs."""
        with self._lock:
            code = self._codes.get(pid)
        if code is None and self.gone:
            # Its zygote died first (its nodes then get SIGTERM): the status is lost with it.
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return -signal.SIGTERM
        return code

    def close(self, timeout: float = STOP_GRACE + 5) -> None:
        """Stop the zygote (and any child still running: SIGTERM, then SIGKILL after 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)
        self._pids = queue.Queue()  # a later spawn starts a new zygote
        self.gone = False


class ForkedProcess:
    """A node forked by a :class:`Zygote`, handled like a ``subprocess.Popen``."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self._zygote = zygote
        self.returncode: int | None = None
        self.args = ["gossip", "node"]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # ended; the zygote reports it
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
