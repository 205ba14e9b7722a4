"""``gossip simulate --churn RATE``: SIGKILL random nodes while they train, restart them.

RATE is the expected number of kills per node per minute: kills arrive across the
cluster as one Poisson process of rate ``RATE * nodes / 60`` per second, whose
arrival times and victim draws come from the run's ``--seed`` alone, so two runs
with the same seed share a schedule. The clock starts once every node trains and
stops for good when the first node finishes its epochs: churn hits training, not
start-up or the averaging-only tail (and a node restarted late is not killed over
and over while the rest wait for it). An arrival takes a node that is up and
training, uniformly; when ``max_down`` nodes are already down (a quarter, at least
one, so the network never empties) or none is training, it is skipped and counted.

A killed node's replacement process starts at once, loads its data and model, and
waits at a gate file; after ``downtime`` seconds the launcher opens the gate and the
node joins again on the same address, rank and node id (a newer incarnation, which
replaces the old member record). With the store publishing it starts from the
newest snapshot (``--init-from-network``), otherwise from the initial weights. It
trains the epochs the cluster is expected to have left when it comes back (at the
pace of the nodes up so far, back after the downtime or, once restarts have been
seen, after the median of their actual downtimes), at least one, so the run's end
is not pushed back by the downtime.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gossip.cluster.procs import Cluster
from gossip.config import ConfigError

log = logging.getLogger(__name__)

Records = dict[int, list[dict[str, Any]]]


def check_churn(rate: float, downtime: float, nodes: int, kill: str) -> None:
    """ConfigError (exit 2) for values a run cannot use."""
    if not (math.isfinite(rate) and rate >= 0):
        raise ConfigError(f"--churn must be a finite number >= 0 (kills per node per minute), got {rate}")
    if not (math.isfinite(downtime) and downtime >= 0):
        raise ConfigError(f"--churn-downtime must be a finite number of seconds >= 0, got {downtime}")
    if rate > 0 and nodes < 2:
        raise ConfigError("--churn needs at least 2 nodes: one must stay up")
    if rate > 0 and kill:
        raise ConfigError("--churn and --kill do not go together")


def max_down(nodes: int) -> int:
    """Nodes down at once: a quarter, at least one, never all (8 nodes: 2 = replication 3 minus one)."""
    return max(1, min(nodes // 4, nodes - 1))


def remaining_epochs(epochs: int, cluster_epoch: float, pace: float, downtime: float) -> int:
    """Epochs a node restarted after ``downtime`` trains: what the cluster will have left then, >= 1.

    ``cluster_epoch`` is where the nodes up are now, ``pace`` their epochs per second so far.
    """
    ahead = math.floor(cluster_epoch + pace * downtime + 1e-9)
    return max(1, min(epochs, epochs - ahead))


class Arrivals:
    """The kill schedule: (seconds after the clock started, uniform victim draw) pairs from the seed."""

    def __init__(self, per_second: float, seed: int) -> None:
        self._rng = random.Random(f"churn-{seed}")
        self._per_second = per_second
        self._next = self._draw(0.0)

    def _draw(self, after: float) -> tuple[float, float]:
        gap = self._rng.expovariate(self._per_second)
        return after + gap, self._rng.random()

    def due(self, elapsed: float) -> list[tuple[float, float]]:
        out = []
        while self._next[0] <= elapsed:
            out.append(self._next)
            self._next = self._draw(self._next[0])
        return out


@dataclass
class _Down:
    killed_at: float  # launcher clock (monotonic)
    init: str  # "network" or "scratch"
    epochs: int
    gate_open: bool = False


def _truncate_partial_line(path: Path) -> None:
    """A SIGKILL may cut a metrics line in half; the next incarnation appends after whole lines only."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with path.open("r+b") as fh:
            fh.truncate(cut)


def _drop_partial_dump(folder: Path) -> None:
    """A SIGKILL during ``np.save`` leaves a truncated file that the consensus summary could not read."""
    files = sorted(folder.glob("eval*.npy"))
    if not files:
        return
    try:
        np.load(files[-1])
    except (ValueError, OSError, EOFError):
        files[-1].unlink()


class Churn:
    """Drives kills and restarts from the launcher's polling loop (``tick``)."""

    def __init__(
        self,
        cluster: Cluster,
        rate: float,
        downtime: float,
        seed: int,
        epochs: int,
        t_launch: float,
    ) -> None:
        self.cluster = cluster
        self.rate, self.downtime, self.epochs = rate, downtime, epochs
        self.nodes = cluster.sim.nodes
        self.limit = max_down(self.nodes)
        self.store_on = cluster.sim.store.publish_every > 0
        self.arrivals = Arrivals(rate * self.nodes / 60.0, seed)
        self.t_launch = t_launch
        self.first_training: float | None = None  # when the first node began training
        self.clock_start: float | None = None
        self.over = False
        self.down: dict[int, _Down] = {}
        self.events: list[dict[str, Any]] = []
        self.skipped = 0
        self.addresses: dict[int, str] = {}
        self.observed: list[float] = []  # actual downtimes (kill to serving again) so far

    # --- state the launcher asks about ---------------------------------------------

    @property
    def kills(self) -> int:
        return sum(1 for e in self.events if e["event"] == "killed")

    @property
    def restarts(self) -> int:
        return sum(1 for e in self.events if e["event"] == "restarted")

    def text(self) -> str:
        s = f"churn: {self.kills} killed, {self.restarts} back"
        if self.down:
            s += f", down: {', '.join(map(str, sorted(self.down)))}"
        return s

    def summary(self) -> dict[str, Any]:
        return {
            "rate_per_node_per_minute": self.rate,
            "kills_per_second": self.rate * self.nodes / 60.0,
            "downtime": self.downtime,
            "max_down": self.limit,
            "init": "network" if self.store_on else "scratch",
            "kills": self.kills,
            "restarts": self.restarts,
            "skipped": self.skipped,
            "events": self.events,
        }

    # --- the loop --------------------------------------------------------------------

    def tick(self, now: float, current: Records, run_epoch: dict[int, float]) -> None:
        """One poll: rejoins, failed restarts, gates to open, kills due.

        ``current``: each rank's records of its current incarnation; ``run_epoch``:
        each rank's latest epoch counted over the run.
        """
        self._rejoins(now)
        self._failed_restarts()
        self._open_gates(now)
        if self.first_training is None and any(current.values()):
            self.first_training = now
        if self.clock_start is None:
            if all(current.get(r) for r in range(self.nodes)):
                self.clock_start = now
                for r in range(self.nodes):
                    self._address(r)
                log.info("churn clock started %.1f s after launch", now - self.t_launch)
            return
        if self.over:
            return
        if any(recs and recs[-1].get("done") for recs in current.values()):
            self.over = True
            log.info("churn over: a node has finished training")
            return
        for _, u in self.arrivals.due(now - self.clock_start):
            up = [r for r in range(self.nodes) if r not in self.down]
            training = [r for r in up if current.get(r) and not current[r][-1].get("done")]
            if not training or len(self.down) >= self.limit:
                self.skipped += 1
                continue
            victim = sorted(training)[int(u * len(training))]
            epochs_up = [run_epoch[r] for r in up if r != victim and r in run_epoch]
            median = statistics.median(epochs_up) if epochs_up else run_epoch.get(victim, 0.0)
            assert self.first_training is not None
            pace = median / max(now - self.first_training, 1e-3)
            # A process may start slower than the downtime: expect what restarts took so far.
            back_in = max(self.downtime, statistics.median(self.observed)) if self.observed else self.downtime
            self._kill(victim, now, remaining_epochs(self.epochs, median, pace, back_in))

    # --- actions ---------------------------------------------------------------------

    def _address(self, rank: int) -> str | None:
        if rank not in self.addresses:
            path = self.cluster.out / "nodes" / f"{rank}.ready"
            try:
                self.addresses[rank] = str(json.loads(path.read_text())["address"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return None
        return self.addresses[rank]

    def _gate(self, rank: int) -> Path:
        return self.cluster.out / "nodes" / f"{rank}.gate"

    def _kill(self, rank: int, now: float, epochs: int) -> None:
        address = self._address(rank)
        assert address is not None  # a training node wrote its ready file before its first record
        proc = self.cluster.procs[rank]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        out = self.cluster.out
        (out / "nodes" / f"{rank}.ready").unlink(missing_ok=True)
        self._gate(rank).unlink(missing_ok=True)
        _truncate_partial_line(out / "nodes" / f"{rank}.jsonl")
        _drop_partial_dump(self.cluster.params(rank))
        init = "network" if self.store_on else "scratch"
        self.down[rank] = _Down(killed_at=now, init=init, epochs=epochs)
        self.cluster.new_incarnation(rank, epoch_offset=self.epochs - epochs)
        self._spawn(rank, init, epochs)
        self._event("killed", rank, now, epochs_left=epochs)
        log.warning(
            "churn: killed node %d (SIGKILL); back in %.1f s for %d epochs", rank, self.downtime, epochs
        )

    def _spawn(self, rank: int, init: str, epochs: int) -> None:
        address = self.addresses[rank]
        peers = [a for r, a in sorted(self.addresses.items()) if r != rank]
        self.cluster.restart(
            rank,
            port=int(address.rpartition(":")[2]),
            gate=str(self._gate(rank)),
            peers=peers,
            epochs=epochs,
            init_from_network=init == "network",
            join_timeout=self.downtime + self.cluster.sim.start_seconds,
        )

    def _open_gates(self, now: float) -> None:
        for rank, d in self.down.items():
            if d.gate_open or now < d.killed_at + self.downtime:
                continue
            live = [a for r, a in sorted(self.addresses.items()) if r not in self.down]
            gate = self._gate(rank)
            tmp = gate.with_suffix(".tmp")
            tmp.write_text(json.dumps({"address": live[0]}))
            os.replace(tmp, gate)
            d.gate_open = True

    def _rejoins(self, now: float) -> None:
        for rank in list(self.down):
            if (self.cluster.out / "nodes" / f"{rank}.ready").exists():
                d = self.down.pop(rank)
                self.observed.append(now - d.killed_at)
                self._event(
                    "restarted",
                    rank,
                    now,
                    downtime=round(now - d.killed_at, 2),
                    init=d.init,
                    epochs=d.epochs,
                )
                log.warning("churn: node %d back after %.1f s (%s)", rank, now - d.killed_at, d.init)

    def _failed_restarts(self) -> None:
        """A restart from the store that found no snapshot yet (too early) starts again from scratch."""
        for rank, d in self.down.items():
            code = self.cluster.procs[rank].poll()
            if code is None or d.init != "network":
                continue
            tail = self.cluster.log_tail(rank)
            if code == 1 and "--init-from-network" in tail:
                log.warning("churn: node %d found no snapshot to start from; starting it from scratch", rank)
                d.init = "scratch"
                self._spawn(rank, "scratch", d.epochs)
            # Any other exit is left to the launcher's check, which reports the log.

    def _event(self, kind: str, rank: int, now: float, **extra: Any) -> None:
        self.events.append(
            {
                "event": kind,
                "rank": rank,
                "time": round(now - self.t_launch, 3),
                "unix_time": round(time.time(), 3),
                **extra,
            }
        )
