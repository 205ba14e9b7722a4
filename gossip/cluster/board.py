"""``gossip simulate --dashboard``: a ``gossip dashboard`` process beside the local cluster.

Its own process, so polling and serving the page never take the launcher's time
(on two cores the nodes have the CPU to themselves otherwise); it is found
through rank 0 and stopped with the run. Its log goes to ``out/dashboard.log``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from gossip.cluster.procs import SimulationError, tail

log = logging.getLogger(__name__)


class DashboardProcess:
    """Start with :meth:`start` (returns the page's URL), end with :meth:`stop`."""

    def __init__(self, peer: str, listen: str, out: Path, interval: float = 1.0) -> None:
        self.peer, self.listen, self.out, self.interval = peer, listen, out, interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        ready = self.out / "dashboard.ready"
        logfile = self.out / "dashboard.log"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gossip", "dashboard", "--peer", self.peer, "--listen", self.listen]
        cmd += ["--interval", str(self.interval), "--ready-file", str(ready)]
        with open(logfile, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise SimulationError(
                    f"the dashboard exited with code {self.proc.returncode}: {tail(logfile, 1)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SimulationError(f"the dashboard did not serve within {timeout:.0f} s")
            time.sleep(0.05)
        self.url = str(json.loads(ready.read_text())["url"])
        log.info("dashboard at %s", self.url)
        return self.url

    def stop(self) -> None:
        """SIGTERM (the command stops cleanly on it), then SIGKILL after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
