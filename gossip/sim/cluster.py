"""``gossip simulate``: N real node processes on loopback, then a summary.

Each node is the same ``gossip node`` a practitioner runs on a machine of its
own; the launcher only assigns ranks, starts them all at once (the others join
through rank 0 once its ready file appears), watches the metrics files for progress, stops every node once
all have finished training, and turns what they wrote into metrics.jsonl,
summary.json and plot.png. With ``--churn`` it also kills and restarts nodes on
the way (``gossip.sim.churn``); a rank's later processes are its incarnations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gossip.config import GossipConfig, StoreConfig
from gossip.train import TrainConfig

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass
class SimulateConfig:
    nodes: int = 8  # 8 processes share 2 cores fairly with one torch thread each
    out: str | None = None  # default runs/<timestamp>
    baseline: bool = False
    threads: int = 1
    host: str = "127.0.0.1"
    start_timeout: float = 90.0  # slow imports on a loaded machine still start in time
    run_timeout: float = 1800.0
    store: StoreConfig = field(default_factory=StoreConfig)
    kill: str = ""  # N@STEP: SIGKILL N random nodes once rank 0 reaches STEP
    reconstruct: bool = False  # rebuild the model from the survivors, save and test it
    churn: float = 0.0  # kills per node per minute while the nodes train (gossip.sim.churn); 0 = none
    # Seconds a churned node stays down: under the membership's 4 s suspicion, so the
    # others see a crash and a reboot (failed exchanges), not a departure.
    churn_downtime: float = 2.0


class SimulationError(RuntimeError):
    """A node process failed; the message carries the tail of its log."""


def params_folder(out: Path, rank: int, incarnation: int = 0) -> Path:
    """Where a node dumps its parameters; a restarted node (incarnation k > 0) in ``R.k``."""
    return out / "params" / (f"{rank}.{incarnation}" if incarnation else str(rank))


def _node_command(
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
    ):
        cmd += ["--" + key.replace("_", "-"), str(knobs[key])]
    for key in (
        "topology",
        "strategy",
        "gossip_every",
        "max_lag",
        "codec",
        "chunk_bytes",
        "exchange_timeout",
    ):
        cmd += ["--" + key.replace("_", "-"), str(knobs[key])]
    st = sim.store
    cmd += ["--replication", str(st.replication), "--publish-every", str(st.publish_every)]
    cmd += ["--shard-bytes", str(st.shard_bytes), "--keep-versions", str(st.keep_versions)]
    if st.model_id:
        cmd += ["--model-id", st.model_id]
    return cmd


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


class _Cluster:
    def __init__(self, sim: SimulateConfig, train: TrainConfig, gossip: GossipConfig, out: Path) -> None:
        self.sim, self.train, self.gossip, self.out = sim, train, gossip, out
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Any] = {}
        self.killed: list[int] = []
        # Per rank, per incarnation (0 = the first process, then one per restart):
        # (index of its first record in the rank's metrics file, epochs it skipped).
        self.incarnations: dict[int, list[tuple[int, int]]] = {r: [(0, 0)] for r in range(sim.nodes)}

    def start(self, rank: int, seed_file: str | None) -> None:
        cmd = _node_command(rank, self.sim, self.train, self.gossip, self.out, seed_file)
        self._popen(rank, cmd, "wb")

    def _popen(self, rank: int, cmd: list[str], mode: str, header: str = "") -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.sim.threads), MKL_NUM_THREADS=str(self.sim.threads))
        if rank in self.logs:
            self.logs[rank].close()
        fh = (self.out / "nodes" / f"{rank}.log").open(mode)
        fh.write(header.encode())
        fh.flush()
        self.logs[rank] = fh
        self.procs[rank] = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def new_incarnation(self, rank: int, epoch_offset: int) -> None:
        """The next process of ``rank`` appends to its metrics file after the records there now."""
        first = len(_read_jsonl(self.out / "nodes" / f"{rank}.jsonl"))
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
        cmd = _node_command(
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
        return _tail(self.out / "nodes" / f"{rank}.log")

    def check_alive(self) -> None:
        for rank, p in self.procs.items():
            code = p.poll()
            if code is not None and rank not in self.killed:
                raise SimulationError(
                    f"node {rank} exited with code {code}; last lines of {self.out / 'nodes' / f'{rank}.log'}:\n"
                    + _tail(self.out / "nodes" / f"{rank}.log")
                )

    def wait_ready(self, rank: int, timeout: float) -> str:
        path = self.out / "nodes" / f"{rank}.ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return str(json.loads(path.read_text())["address"])
            self.check_alive()
            time.sleep(0.05)
        raise SimulationError(
            f"node {rank} did not start within {timeout:.0f} s:\n" + _tail(self.out / "nodes" / f"{rank}.log")
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
        log.info("nodes stopped in %.1f s", time.monotonic() - t0)

    def kill(self, ranks: list[int]) -> None:
        for rank in ranks:
            self.procs[rank].send_signal(signal.SIGKILL)
            self.procs[rank].wait()
            self.killed.append(rank)
        log.warning("killed nodes %s (SIGKILL)", ranks)


def run_cluster(
    train: TrainConfig, gossip: GossipConfig, sim: SimulateConfig, out: Path, progress: Progress | None = None
) -> dict[int, list[dict[str, Any]]]:
    """Start the nodes, wait until every one finished training, stop them; returns per-rank metrics.

    With ``sim.kill`` some nodes are SIGKILLed on the way and left out of the
    result; with it or ``sim.reconstruct`` the survivors are asked to rebuild the
    model before they stop (``out/rebuild.json``). With ``sim.churn`` nodes are
    killed and restarted (``gossip.sim.churn``); the run ends once every node is
    back and finished (``out/churn.json``).
    """
    from gossip.sim.churn import Churn
    from gossip.sim.rebuild import node_step, parse_kill, pick_victims, rebuild_from

    (out / "nodes").mkdir(parents=True, exist_ok=True)
    (out / "churn.json").unlink(missing_ok=True)
    cluster = _Cluster(sim, train, gossip, out)
    kill = parse_kill(sim.kill, sim.nodes)
    victims = pick_victims(sim.nodes, kill[0], train.seed) if kill else []
    churn: Churn | None = None
    try:
        # All at once: the others wait for rank 0's ready file, so their imports
        # overlap with rank 0's instead of queueing behind it.
        t_start = time.monotonic()
        if sim.churn > 0:
            churn = Churn(cluster, sim.churn, sim.churn_downtime, train.seed, train.epochs, t_start)
        seed = str(out / "nodes" / "0.ready")
        for rank in range(sim.nodes):
            cluster.start(rank, seed if rank else None)
        first = cluster.wait_ready(0, sim.start_timeout)
        log.info("rank 0 serving after %.1f s", time.monotonic() - t_start)
        deadline = time.monotonic() + sim.run_timeout
        while True:
            live = [r for r in range(sim.nodes) if r not in cluster.killed]
            records = {r: _read_jsonl(out / "nodes" / f"{r}.jsonl") for r in live}
            current = {r: cluster.current(r, recs) for r, recs in records.items()}
            last = {r: cluster.run_records(r, recs)[-1] for r, recs in records.items() if recs}
            if churn is not None:
                churn.tick(time.monotonic(), current, {r: rec["epoch"] for r, rec in last.items()})
            cluster.check_alive()
            if kill and not cluster.killed and (node_step(first) or 0) >= kill[1]:
                cluster.kill(victims)
            finished = sum(1 for r in live if current[r] and current[r][-1].get("done"))
            if progress is not None:
                done = sum(rec["epoch"] for rec in last.values()) / (sim.nodes * train.epochs)
                accs = [rec["accuracy"] for rec in last.values()]
                text = f"{finished}/{sim.nodes} done"
                if accs:
                    text += f", mean accuracy {sum(accs) / len(accs):.3f}"
                if churn is not None:
                    text += f", {churn.text()}"
                progress(min(done, 1.0), text)
            if finished == len(live) and not (churn is not None and churn.down):
                log.info(
                    "all %d nodes finished training after %.1f s", len(records), time.monotonic() - t_start
                )
                break
            if time.monotonic() > deadline:
                raise SimulationError(f"the run did not finish within {sim.run_timeout:.0f} s")
            time.sleep(0.25)
        if kill and not cluster.killed:
            log.warning("the run ended before step %d: nothing was killed", kill[1])
        if kill or sim.reconstruct:
            survivor = min(r for r in range(sim.nodes) if r not in cluster.killed)
            address = cluster.wait_ready(survivor, sim.start_timeout)
            if progress is not None:
                progress(1.0, f"rebuilding the model through node {survivor}")
            result = rebuild_from(address, sim.store.model_id or train.model, train, out, sim.reconstruct)
            result["killed"] = cluster.killed
            (out / "rebuild.json").write_text(json.dumps(result, indent=2))
    finally:
        cluster.stop()
        if churn is not None:
            (out / "churn.json").write_text(json.dumps(churn.summary(), indent=2))
    # Each node writes its final evaluation as it leaves (after the averaging it kept doing).
    return {
        r: cluster.run_records(r, _read_jsonl(out / "nodes" / f"{r}.jsonl"))
        for r in range(sim.nodes)
        if r not in cluster.killed
    }


def consensus_by_eval(out: Path, nodes: int) -> dict[int, dict[int, float]]:
    """eval index -> {rank: ||x_rank - mean||^2} over the nodes that reached that evaluation."""
    result: dict[int, dict[int, float]] = {}
    files: dict[int, dict[int, Path]] = {}
    for r in range(nodes):
        for f in sorted((out / "params" / str(r)).glob("eval*.npy")):
            files.setdefault(int(f.stem[4:]), {})[r] = f
    for k, by_rank in sorted(files.items()):
        xs = {r: np.load(f) for r, f in by_rank.items()}
        mean = np.mean(np.stack(list(xs.values())), axis=0)
        result[k] = {r: float(np.sum((x - mean) ** 2)) for r, x in xs.items()}
    return result


def final_distances(
    out: Path, ranks: list[int], incarnations: dict[int, int] | None = None
) -> dict[int, float]:
    """||x_r - mean||^2 over every node's last saved parameters (the model it left with)."""
    last = {}
    for r in ranks:
        files = sorted(params_folder(out, r, (incarnations or {}).get(r, 0)).glob("eval*.npy"))
        if files:
            last[r] = np.load(files[-1])
    if len(last) < 2:
        return {}
    mean = np.mean(np.stack(list(last.values())), axis=0)
    return {r: float(np.sum((x - mean) ** 2)) for r, x in last.items()}


def summarize(
    out: Path,
    records: dict[int, list[dict[str, Any]]],
    distances: dict[int, dict[int, float]],
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    wall: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    merged: list[dict[str, Any]] = []
    for rank, recs in records.items():
        for rec in recs:
            # Evaluation k of a restarted node is not the others' evaluation k.
            d = None if rec.get("incarnation") else distances.get(int(rec.get("eval", -1)), {}).get(rank)
            merged.append({**rec, "node": rank, "consensus_distance": d})
    # unix_time: a restarted process counts its "time" from its own start.
    merged.sort(key=lambda r: (r.get("unix_time", r["time"]), r["node"]))
    finals = {rank: recs[-1] for rank, recs in records.items() if recs}
    accs = [float(finals[r]["accuracy"]) for r in sorted(finals)]
    final_d = final_distances(
        out, sorted(finals), {r: int(rec.get("incarnation", 0)) for r, rec in finals.items()}
    )

    def total(rank: int, key: str) -> int:
        # Counters start again in a restarted process: add each incarnation's last value.
        last: dict[int, int] = {}
        for rec in records[rank]:
            last[int(rec.get("incarnation", 0))] = int(rec.get(key, 0))
        return sum(last.values())

    summary: dict[str, Any] = {
        "nodes": sim.nodes,
        "topology": gossip.topology,
        "strategy": gossip.strategy,
        "accuracies": accs,
        "mean_accuracy": float(np.mean(accs)),
        "min_accuracy": float(np.min(accs)),
        "consensus_distance": float(np.mean(list(final_d.values()))) if final_d else None,
        "bytes_sent": sum(total(r, "bytes_sent") for r in finals),
        "bytes_sent_per_node": [total(r, "bytes_sent") for r in sorted(finals)],
        "exchanges": [total(r, "exchanges") for r in sorted(finals)],
        "steps": [int(finals[r]["step"]) for r in sorted(finals)],
        "wall_seconds": round(wall, 2),
        "config": {"train": asdict(train), "gossip": asdict(gossip), "simulate": asdict(sim)},
    }
    return summary, merged


def plot(
    merged: list[dict[str, Any]],
    nodes: int,
    path: Path,
    title: str,
    start: float,
    events: Sequence[dict[str, Any]] = (),
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for r in range(nodes):
        recs = [m for m in merged if m["node"] == r]
        xs = [m.get("unix_time", start) - start for m in recs]
        ax1.plot(xs, [m["accuracy"] for m in recs], lw=1, label=f"node {r}")
        pts = [
            (x, m["consensus_distance"]) for x, m in zip(xs, recs, strict=True) if m.get("consensus_distance")
        ]
        if pts:
            ax2.plot(*zip(*pts, strict=True), lw=1, label=f"node {r}")
    for e in events:  # churn: a dotted red line per kill, green per restart
        color = "tab:red" if e["event"] == "killed" else "tab:green"
        ax1.axvline(e["unix_time"] - start, color=color, ls=":", lw=0.8)
    ax1.set_xlabel("seconds since launch")
    ax1.set_ylabel("test accuracy")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("seconds since launch")
    ax2.set_ylabel("squared distance from the average model")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if nodes <= 16:
        ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


def run_simulation(
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the whole thing; returns the summary (also written to ``out/summary.json``)."""
    out = Path(sim.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    launched = time.time()
    records = run_cluster(train, gossip, sim, out, progress)
    wall = time.monotonic() - t0
    log.info("cluster ran %.1f s", wall)
    distances = consensus_by_eval(out, sim.nodes)
    summary, merged = summarize(out, records, distances, train, gossip, sim, wall)
    summary["ranks"] = sorted(records)
    if (out / "rebuild.json").exists():
        summary.update(json.loads((out / "rebuild.json").read_text()))
    if (out / "churn.json").exists():
        summary["churn"] = json.loads((out / "churn.json").read_text())
    if sim.baseline:
        from gossip.data import load_dataset
        from gossip.train import train_baseline

        if progress is not None:
            progress(1.0, "training the centralised baseline")
        import torch

        torch.set_num_threads(max(1, sim.threads))
        t1 = time.monotonic()
        ds = load_dataset(train.dataset, seed=train.seed)
        _, _, acc = train_baseline(ds, train)
        log.info("baseline trained in %.1f s", time.monotonic() - t1)
        summary["baseline_accuracy"] = acc
        summary["gap"] = acc - summary["mean_accuracy"]
    summary["out"] = str(out)
    with (out / "metrics.jsonl").open("w") as fh:
        for rec in merged:
            fh.write(json.dumps(rec) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    title = f"{sim.nodes} nodes, {gossip.topology}, {gossip.strategy}, {train.model} on {train.dataset}"
    if sim.churn:
        title += f", churn {sim.churn:g}/node/min"
    plot(merged, sim.nodes, out / "plot.png", title, launched, summary.get("churn", {}).get("events", ()))
    if not all(math.isfinite(a) for a in summary["accuracies"]):
        raise SimulationError("a node ended with a non-finite accuracy")
    return summary
