"""``gossip simulate``: N real node processes on loopback, then a summary.

Each node is the same ``gossip node`` a practitioner runs on a machine of its
own; the launcher only assigns ranks, starts them all at once (the others join
through rank 0 once its ready file appears), watches the metrics files for progress, stops every node once
all have finished training, and turns what they wrote into metrics.jsonl,
summary.json and plot.png. With ``--churn`` it also kills and restarts nodes on
the way (``gossip.cluster.churn``); a rank's later processes are its incarnations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip.cluster.churn import Churn
from gossip.cluster.procs import Cluster, Progress, SimulationError, read_jsonl
from gossip.cluster.rebuild import node_step, parse_kill, pick_victims, rebuild_from
from gossip.cluster.summary import consensus_by_eval, is_text, plot, summarize
from gossip.config import GossipConfig, SimulateConfig, TrainConfig

log = logging.getLogger(__name__)

Serving = Callable[[list[dict[str, Any]]], None]


def run_cluster(
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    out: Path,
    progress: Progress | None = None,
    serving: Serving | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Start the nodes, wait until every one finished training, stop them; returns per-rank metrics.

    With ``sim.kill`` some nodes are SIGKILLed on the way and left out of the
    result; with it or ``sim.reconstruct`` the survivors are asked to rebuild the
    model before they stop (``out/rebuild.json``). With ``sim.churn`` nodes are
    killed and restarted (``gossip.cluster.churn``); the run ends once every node is
    back and finished (``out/churn.json``). ``serving`` is called once every node serves,
    with what each wrote to its ready file (address, node_id, prometheus endpoint), by rank.
    """
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    (out / "churn.json").unlink(missing_ok=True)
    cluster = Cluster(sim, train, gossip, out)
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
        first = _wait_started(cluster, sim, progress)
        if serving is not None:
            serving(cluster.serving())
        log.info("all %d nodes serving after %.1f s", sim.nodes, time.monotonic() - t_start)
        deadline = time.monotonic() + sim.run_timeout
        while True:
            live = [r for r in range(sim.nodes) if r not in cluster.killed]
            records = {r: read_jsonl(out / "nodes" / f"{r}.jsonl") for r in live}
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
                text = f"training, {finished}/{sim.nodes} done" if last else "waiting for every node to join"
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
            address = cluster.wait_ready(survivor, sim.start_seconds)
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
        r: cluster.run_records(r, read_jsonl(out / "nodes" / f"{r}.jsonl"))
        for r in range(sim.nodes)
        if r not in cluster.killed
    }


def _wait_started(cluster: Cluster, sim: SimulateConfig, progress: Progress | None) -> str:
    """Wait until every node serves, saying how many do; rank 0's address."""
    deadline = time.monotonic() + sim.start_seconds
    while True:
        ready = cluster.ready()
        if progress is not None:
            progress(0.0, f"starting nodes, {len(ready)}/{sim.nodes} serving")
        if len(ready) == sim.nodes:
            return ready[0]
        cluster.check_alive()
        if time.monotonic() > deadline:
            late = min(r for r in range(sim.nodes) if r not in ready)
            raise SimulationError(
                f"{sim.nodes - len(ready)} of {sim.nodes} nodes did not start within {sim.start_seconds:.0f} s "
                f"(raise --start-timeout on a busy machine); node {late}'s log:\n" + cluster.log_tail(late)
            )
        time.sleep(0.2)


def output_folder(sim: SimulateConfig) -> Path:
    """Where a run writes: ``--out``, or runs/<date-time> of now."""
    return Path(sim.out or time.strftime("runs/%Y%m%d-%H%M%S"))


def run_simulation(
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    progress: Progress | None = None,
    serving: Serving | None = None,
) -> dict[str, Any]:
    """Run the whole thing; returns the summary (also written to ``out/summary.json``)."""
    out = output_folder(sim)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    launched = time.time()
    try:
        records = run_cluster(train, gossip, sim, out, progress, serving)
    except KeyboardInterrupt:
        # The nodes were stopped (run_cluster's finally); keep what they wrote so far.
        records = {r: read_jsonl(out / "nodes" / f"{r}.jsonl") for r in range(sim.nodes)}
        records = {r: recs for r, recs in records.items() if recs}
        if not records:
            raise
        summary = write_outputs(out, records, train, gossip, sim, time.monotonic() - t0, launched, progress)
        summary["interrupted"] = True
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        raise KeyboardInterrupt(summary) from None
    summary = write_outputs(out, records, train, gossip, sim, time.monotonic() - t0, launched, progress)
    if not all(math.isfinite(a) for a in summary["accuracies"]):
        raise SimulationError("a node ended with a non-finite accuracy")
    return summary


def write_outputs(
    out: Path,
    records: dict[int, list[dict[str, Any]]],
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    wall: float,
    launched: float,
    progress: Progress | None,
) -> dict[str, Any]:
    """summary.json, metrics.jsonl and plot.png from the nodes' records; returns the summary."""
    log.info("cluster ran %.1f s", wall)
    distances = consensus_by_eval(out, sim.nodes)
    summary, merged = summarize(out, records, distances, train, gossip, sim, wall)
    summary["ranks"] = sorted(records)
    if (out / "rebuild.json").exists():
        summary.update(json.loads((out / "rebuild.json").read_text()))
    if (out / "churn.json").exists():
        summary["churn"] = json.loads((out / "churn.json").read_text())
    if sim.baseline:
        from gossip.train.data import load_dataset
        from gossip.train.trainer import train_baseline

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
    events = summary.get("churn", {}).get("events", ())
    plot(merged, sim.nodes, out / "plot.png", title, launched, events, text=is_text(train.dataset))
    return summary
