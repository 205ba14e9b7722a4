"""The node processes of a local cluster: their command lines, logs, metrics files and signals.

Each node is the same ``gossip node`` a practitioner runs on a machine of its own;
:class:`Cluster` starts, restarts, kills and stops them by pid, and reads what
they write. :mod:`~gossip.cluster.local` runs a whole simulation with it,
:mod:`~gossip.cluster.churn` kills and restarts nodes on the way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from gossip.cluster.zygote import ForkedProcess, Zygote
from gossip.config import GossipConfig, SimulateConfig, TrainConfig

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class SimulationError(RuntimeError):
    """A node process failed; the message carries the tail of its log."""


def params_folder(out: Path, rank: int, incarnation: int = 0) -> Path:
    """Where a node dumps its parameters; a restarted node (incarnation k > 0) in ``R.k``."""
    return out / "params" / (f"{rank}.{incarnation}" if incarnation else str(rank))


def node_command(
    rank: int,
    sim: SimulateConfig,
    train: TrainConfig,
    gossip: GossipConfig,
    out: Path,
    seed: str | None,
    *,
    port: int = 0,
    peers: Sequence[str] = (),
    incarnation: int = 0,
    init_from_network: bool = False,
    join_timeout: float | None = None,
) -> list[str]:
    knobs: dict[str, Any] = {**asdict(train), **asdict(gossip)}
    cmd = [sys.executable, "-m", "gossip", "node", "--listen", f"{sim.host}:{port}"]
    if seed:
        cmd += ["--seed-file", seed]
    if peers:
        cmd += ["--peers", ",".join(peers)]
    if init_from_network:
        cmd += ["--init-from-network"]
    if join_timeout is not None:
        cmd += ["--join-timeout", str(join_timeout)]
    if sim.max_send_rate:
        cmd += ["--max-send-rate", sim.max_send_rate]
    cmd += ["--member-protocol", sim.member_protocol]
    if sim.prometheus:
        cmd += ["--prometheus", sim.metrics_address(rank)]
    cmd += ["--rank", str(rank), "--world-size", str(sim.nodes)]
    if not incarnation:  # a restarted node joins a running network and trains at once
        cmd += ["--wait-for", str(sim.nodes)]
    cmd += ["--node-id", f"node{rank}", "--threads", str(sim.threads)]
    cmd += ["--metrics", str(out / "nodes" / f"{rank}.jsonl")]
    cmd += ["--dump-params", str(params_folder(out, rank, incarnation))]
    cmd += ["--ready-file", str(out / "nodes" / f"{rank}.ready")]
    for key in (
        "dataset",
        "model",
        "partition",
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "lr_schedule",
        "seed",
        "eval_every",
        "max_steps",
        "min_step_time",
    ):
        cmd += ["--" + key.replace("_", "-"), str(knobs[key])]
    for key in (
        "topology",
        "strategy",
        "gossip_every",
        "outer",
        "compress",
        "gamma",
        "max_lag",
        "codec",
        "chunk_bytes",
        "exchange_timeout",
        "idle_pause",
        "rest_pause",
    ):
        cmd += ["--" + key.replace("_", "-"), str(knobs[key])]
    st = sim.store
    cmd += ["--replication", str(st.replication), "--publish-every", str(st.publish_every)]
    cmd += ["--shard-bytes", str(st.shard_bytes), "--keep-versions", str(st.keep_versions)]
    if st.model_id:
        cmd += ["--model-id", st.model_id]
    if st.data_dir:  # one folder per rank: a node restarted by --churn reloads its shards
        cmd += ["--data-dir", str(Path(st.data_dir) / f"node{rank}")]
    return cmd


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
    return text or "(the log is empty: the process had not finished loading)"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with path.open() as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line being written right now
    except FileNotFoundError:
        pass
    return out


class Cluster:
    def __init__(self, sim: SimulateConfig, train: TrainConfig, gossip: GossipConfig, out: Path) -> None:
        self.sim, self.train, self.gossip, self.out = sim, train, gossip, out
        self.procs: dict[int, subprocess.Popen[bytes] | ForkedProcess] = {}
        # Nodes are forked from one process that has imported torch once (gossip.cluster.zygote);
        # GOSSIP_FORK_NODES=0 starts each as a process of its own, imports and all.
        self.zygote = Zygote() if os.environ.get("GOSSIP_FORK_NODES", "1") != "0" else None
        self.logs: dict[int, Any] = {}
        self.killed: list[int] = []
        # Per rank, per incarnation (0 = the first process, then one per restart):
        # (index of its first record in the rank's metrics file, epochs it skipped).
        self.incarnations: dict[int, list[tuple[int, int]]] = {r: [(0, 0)] for r in range(sim.nodes)}

    def start(self, rank: int, seed_file: str | None) -> None:
        cmd = node_command(rank, self.sim, self.train, self.gossip, self.out, seed_file)
        self._popen(rank, cmd, "wb")

    def _popen(self, rank: int, cmd: list[str], mode: str, header: str = "") -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.sim.threads), MKL_NUM_THREADS=str(self.sim.threads))
        if rank in self.logs:
            self.logs[rank].close()
        fh = (self.out / "nodes" / f"{rank}.log").open(mode)
        fh.write(header.encode())
        fh.flush()
        self.logs[rank] = fh
        if self.zygote is not None:
            assert cmd[1:3] == ["-m", "gossip"], cmd
            self.procs[rank] = self.zygote.spawn(cmd[3:], fh.name, env)
            return
        self.procs[rank] = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def new_incarnation(self, rank: int, epoch_offset: int) -> None:
        """The next process of ``rank`` appends to its metrics file after the records there now."""
        first = len(read_jsonl(self.out / "nodes" / f"{rank}.jsonl"))
        self.incarnations[rank].append((first, epoch_offset))

    def restart(
        self,
        rank: int,
        *,
        port: int,
        gate: str,
        peers: Sequence[str],
        epochs: int,
        init_from_network: bool,
        join_timeout: float,
    ) -> None:
        """Start ``rank``'s current incarnation: it loads, then waits for ``gate`` to join on ``port``."""
        incarnation = len(self.incarnations[rank]) - 1
        train = replace(self.train, epochs=epochs)
        cmd = node_command(
            rank,
            self.sim,
            train,
            self.gossip,
            self.out,
            gate,
            port=port,
            peers=peers,
            incarnation=incarnation,
            init_from_network=init_from_network,
            join_timeout=join_timeout,
        )
        self._popen(rank, cmd, "ab", f"--- incarnation {incarnation}: {' '.join(cmd[2:])}\n")

    def current(self, rank: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``rank``'s current incarnation."""
        return records[self.incarnations[rank][-1][0] :]

    def run_records(self, rank: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` with ``incarnation`` added and step/epoch counted over the run, not since a restart."""
        starts = self.incarnations[rank]
        if len(starts) == 1:
            return records
        per_epoch = next((r["step"] / r["epoch"] for r in records if r.get("epoch")), 0.0)
        out = []
        for i, rec in enumerate(records):
            k = max(j for j, (first, _) in enumerate(starts) if first <= i)
            skipped = starts[k][1]
            if k:
                rec = {
                    **rec,
                    "step": rec["step"] + round(skipped * per_epoch),
                    "epoch": rec["epoch"] + skipped,
                }
            out.append({**rec, "incarnation": k})
        return out

    def params(self, rank: int) -> Path:
        """The parameter dump folder of ``rank``'s current incarnation."""
        return params_folder(self.out, rank, len(self.incarnations[rank]) - 1)

    def log_tail(self, rank: int) -> str:
        self.logs[rank].flush()
        return tail(self.out / "nodes" / f"{rank}.log")

    def check_alive(self) -> None:
        for rank, p in self.procs.items():
            code = p.poll()
            if code is not None and rank not in self.killed:
                raise SimulationError(
                    f"node {rank} exited with code {code}; last lines of {self.out / 'nodes' / f'{rank}.log'}:\n"
                    + tail(self.out / "nodes" / f"{rank}.log")
                )

    def ready(self) -> list[str]:
        """The addresses of the ranks serving now (a ready file written), in rank order."""
        out = []
        for rank in sorted(self.procs):
            path = self.out / "nodes" / f"{rank}.ready"
            if path.exists():
                out.append(str(json.loads(path.read_text())["address"]))
        return out

    def serving(self) -> list[dict[str, Any]]:
        """What each rank serving now wrote to its ready file (address, node_id, prometheus), by rank."""
        out = []
        for rank in sorted(self.procs):
            path = self.out / "nodes" / f"{rank}.ready"
            if path.exists():
                out.append({"rank": rank, **json.loads(path.read_text())})
        return out

    def wait_ready(self, rank: int, timeout: float) -> str:
        path = self.out / "nodes" / f"{rank}.ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return str(json.loads(path.read_text())["address"])
            self.check_alive()
            time.sleep(0.05)
        raise SimulationError(
            f"node {rank} did not start within {timeout:.0f} s:\n" + tail(self.out / "nodes" / f"{rank}.log")
        )

    def stop(self, grace: float = 10.0) -> None:
        t0 = time.monotonic()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for rank, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("node %d did not stop in time; killing it", rank)
                p.kill()
                p.wait()
        for fh in self.logs.values():
            fh.close()
        if self.zygote is not None:
            self.zygote.close()
        log.info("nodes stopped in %.1f s", time.monotonic() - t0)

    def kill(self, ranks: list[int]) -> None:
        for rank in ranks:
            self.procs[rank].send_signal(signal.SIGKILL)
            self.procs[rank].wait()
            self.killed.append(rank)
        log.warning("killed nodes %s (SIGKILL)", ranks)
