"""``gossip launch --ray``: the nodes of a run as Ray actors, one CPU bundle each.

Ray places, restarts and reports; it never carries the averaging. A placement
group reserves one CPU per node, spread over the Ray nodes; each actor
(:class:`~gossip.cluster.ray_node.NodeHost`) runs a real gossip node whose gRPC
server listens on its Ray node's IP.
Rank 0 starts first and the others join through it, as with ``--peers``. An actor
whose process dies is restarted by Ray (``max_restarts``) in the same bundle; the
launcher sees the new incarnation and starts its node again, joining through the
ranks up, from the newest snapshot when the store publishes.

The launcher polls every actor for the metrics lines and parameter dumps its node
wrote on its own machine, mirrors them into ``OUT/nodes`` and ``OUT/params`` as
``gossip simulate`` lays them out, and writes the same summary.json,
metrics.jsonl and plot.png with :mod:`gossip.cluster.local`'s writer. Ray is
imported here only, lazily: everything else runs without it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gossip.cluster.churn import remaining_epochs
from gossip.cluster.procs import Cluster, Progress, SimulationError, params_folder, read_jsonl
from gossip.cluster.ray_node import NodeHost
from gossip.cluster.sysutil import write_atomic
from gossip.config import GossipConfig, SimulateConfig, TrainConfig

log = logging.getLogger(__name__)

EXTRA = "pip install 'gossip-sgd[ray]'"


class RayMissing(ImportError):
    """Ray is not installed (the ``ray`` extra)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing(f"gossip launch --ray needs Ray: {EXTRA}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError unless something accepts TCP connections at ``address`` (the head's GCS)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"no answer at {address} ({exc.strerror or exc})") from None


@dataclass
class _Rank:
    host: Any
    token: str = ""
    address: str = ""
    seen: int = 0  # metrics lines of the current incarnation collected so far
    poll: Any = None  # the poll in flight
    down: Any = None  # the info() call that waits for a restarted actor
    down_since: float = 0.0
    restarts: int = 0


class RayLaunch:
    """One run: connect, place, start, watch, restart, stop; :meth:`close` leaves nothing behind."""

    def __init__(
        self,
        train: TrainConfig,
        gossip: GossipConfig,
        sim: SimulateConfig,
        out: Path,
        address: str,
        max_restarts: int,
        placement_timeout: float,
    ) -> None:
        self.train, self.gossip, self.sim, self.out = train, gossip, sim, out
        self.address, self.max_restarts, self.placement_timeout = address, max_restarts, placement_timeout
        self.ray = import_ray()
        self.run = uuid.uuid4().hex[:8]
        self.pg: Any = None
        self.ranks: dict[int, _Rank] = {}
        self.connected = False
        # Bookkeeping of incarnations and their records, shared with gossip simulate.
        self.cluster = Cluster(sim, train, gossip, out)
        self.restart_events: list[dict[str, Any]] = []

    def connect(self) -> None:
        ray = self.ray
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if not log.isEnabledFor(logging.INFO):  # the CLI owns the terminal: Ray's notices only with -v
            logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            if self.address in ("", "auto"):
                try:
                    ray.init(address="auto", **kwargs)
                except ConnectionError:  # none running here: start one with a CPU per node
                    n = max(self.sim.nodes, os.cpu_count() or 1)
                    ray.init(num_cpus=n, include_dashboard=False, **kwargs)
            else:
                _check_reachable(self.address)  # ray.init retries an unreachable head for minutes
                ray.init(address=self.address, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            raise SimulationError(
                f"cannot reach the Ray cluster at {self.address or 'auto'}: {exc}"
            ) from None
        self.connected = True

    def place(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, n = self.ray, self.sim.nodes
        self.pg = placement_group([{"CPU": 1}] * n, strategy="SPREAD")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.placement_timeout)
        if not ready:
            total = ray.cluster_resources().get("CPU", 0)
            free = ray.available_resources().get("CPU", 0)
            raise SimulationError(
                f"the Ray cluster cannot place {n} nodes: {n} bundles of 1 CPU were not ready within "
                f"{self.placement_timeout:g} s (it has {total:g} CPUs, {free:g} free)"
            )
        actor = ray.remote(NodeHost)
        for rank in range(n):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank
            )
            host = actor.options(
                num_cpus=1,
                max_restarts=self.max_restarts,
                max_task_retries=0,
                max_concurrency=4,  # poll and stop answer while address() waits
                scheduling_strategy=strategy,
            ).remote(self.run, rank, self.train, self.gossip, self.sim)
            self.ranks[rank] = _Rank(host)

    def start(self, progress: Progress | None) -> None:
        ray, n, timeout = self.ray, self.sim.nodes, self.sim.start_seconds
        if progress is not None:
            progress(0.0, f"starting {n} actors")
        infos = self._get([r.host.info.remote() for r in self.ranks.values()], timeout, "start")
        for rank, info in enumerate(infos):
            self.ranks[rank].token = info["token"]
        first = self.ranks[0]
        first.host.start.remote([], self.train.epochs, n, False)
        first.address = self._get([first.host.address.remote(timeout)], timeout, "serve")[0]
        self._ready(0, infos[0])
        for rank in range(1, n):
            self.ranks[rank].host.start.remote([first.address], self.train.epochs, n, False)
        refs = {self.ranks[rank].host.address.remote(timeout): rank for rank in range(1, n)}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            done, pending = ray.wait(pending, timeout=max(0.1, deadline - time.monotonic()))
            if not done:
                raise SimulationError(f"{len(pending)} of {n} nodes did not serve within {timeout:.0f} s")
            for ref in done:
                rank = refs[ref]
                self.ranks[rank].address = self._get([ref], 1.0, "serve")[0]
                self._ready(rank, infos[rank])
            if progress is not None:
                progress(0.0, f"starting nodes, {n - len(pending)}/{n} serving")

    def _get(self, refs: list[Any], timeout: float, what: str) -> list[Any]:
        ray = self.ray
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise SimulationError(f"the nodes did not {what} within {timeout:.0f} s") from None
        except ray.exceptions.RayError as exc:  # the last line of Ray's traceback names the cause
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise SimulationError(f"a node failed to {what}: {cause}") from None

    def _ready(self, rank: int, info: dict[str, Any]) -> None:
        r = self.ranks[rank]
        ready = {"address": r.address, "node_id": f"node{rank}", "rank": rank, **info}
        ready["incarnation"] = len(self.cluster.incarnations[rank]) - 1
        write_atomic(self.out / "nodes" / f"{rank}.ready", json.dumps(ready))

    def tick(self, every: float = 0.5) -> dict[int, list[dict[str, Any]]]:
        """Collect what arrived within ``every`` seconds; restart the nodes of restarted actors."""
        ray, t0 = self.ray, time.monotonic()
        for r in self.ranks.values():
            if r.poll is None and r.down is None:
                r.poll = r.host.poll.remote(r.seen)
        waiting = {(r.poll if r.down is None else r.down): rank for rank, r in self.ranks.items()}
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=every)
        for ref in done:
            rank = waiting[ref]
            r = self.ranks[rank]
            if r.down is None:
                r.poll = None
                try:
                    self._collect(rank, ray.get(ref))
                except ray.exceptions.RayActorError:
                    log.warning("node %d: its actor died; waiting for Ray to restart it", rank)
                    r.down, r.down_since = r.host.info.remote(), time.monotonic()
            else:
                self._back(rank, ref)
        time.sleep(max(0.0, every - (time.monotonic() - t0)))  # polls answer in ms: no busy loop
        return {rank: self.cluster.current(rank, self._records(rank)) for rank in self.ranks}

    def _records(self, rank: int) -> list[dict[str, Any]]:
        return read_jsonl(self.out / "nodes" / f"{rank}.jsonl")

    def _collect(self, rank: int, got: dict[str, Any]) -> None:
        if got["error"] is not None:
            raise SimulationError(f"node {rank} failed: {got['error']}")
        r = self.ranks[rank]
        incarnation = len(self.cluster.incarnations[rank]) - 1
        folder = params_folder(self.out, rank, incarnation)
        folder.mkdir(parents=True, exist_ok=True)
        for k, flat in got["params"].items():
            np.save(folder / f"eval{k:04d}.npy", flat)
        with (self.out / "nodes" / f"{rank}.jsonl").open("a") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in got["records"])
        r.seen += len(got["records"])

    def _back(self, rank: int, ref: Any) -> None:
        """The info() call on a dead actor answered: a restarted process, or still down."""
        ray, r = self.ray, self.ranks[rank]
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if time.monotonic() - r.down_since > self.sim.start_seconds:
                raise SimulationError(f"node {rank}'s actor did not come back: {exc}") from None
            r.down = r.host.info.remote()
            return
        r.down = None
        if info["token"] == r.token:  # the same process: it was unreachable for a while
            return
        r.token, r.seen, r.restarts = info["token"], 0, r.restarts + 1
        live = [self._records(k) for k, o in self.ranks.items() if k != rank and o.down is None]
        cluster_epoch = float(np.median([recs[-1]["epoch"] for recs in live if recs] or [0.0]))
        epochs = remaining_epochs(self.train.epochs, cluster_epoch, 0.0, 0.0)
        self.cluster.new_incarnation(rank, self.train.epochs - epochs)
        peers = [o.address for k, o in self.ranks.items() if k != rank and o.down is None and o.address]
        init = self.sim.store.publish_every > 0
        r.host.start.remote(peers, epochs, 1, init)
        r.address = self._get(
            [r.host.address.remote(self.sim.start_seconds)], self.sim.start_seconds, "rejoin"
        )[0]
        self._ready(rank, info)
        self.restart_events.append({"rank": rank, "event": "restarted", "unix_time": time.time(), **info})
        log.warning("node %d restarted by Ray (pid %d) and rejoined at %s", rank, info["pid"], r.address)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node (its final evaluation is written as it leaves) and collect what is left."""
        ray = self.ray
        up = {rank: r for rank, r in self.ranks.items() if r.down is None}
        try:
            ray.get([r.host.stop.remote(grace) for r in up.values()], timeout=grace + 5)
            for rank, r in up.items():
                self._collect(rank, ray.get(r.host.poll.remote(r.seen), timeout=10))
        except (ray.exceptions.RayError, SimulationError) as exc:
            log.warning("collecting the nodes' last records failed: %s", exc)

    def close(self) -> None:
        """Kill every actor, remove the placement group, disconnect (a cluster started here stops)."""
        ray = self.ray
        if not self.connected:
            return
        up = [r for r in self.ranks.values() if r.down is None]
        try:
            ray.get([r.host.forget.remote() for r in up], timeout=10)
        except ray.exceptions.RayError as exc:
            log.warning("could not remove the nodes' files: %s", exc)
        for r in self.ranks.values():
            try:
                ray.kill(r.host, no_restart=True)
            except ray.exceptions.RayError as exc:
                log.warning("could not kill an actor: %s", exc)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
        ray.shutdown()
        self.connected = False


def run_launch(
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    address: str,
    max_restarts: int = 3,
    placement_timeout: float = 60.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole run; returns the summary (also in ``OUT/summary.json``), like ``run_simulation``."""
    from gossip.cluster.local import output_folder, write_outputs
    from gossip.cluster.rebuild import rebuild_from

    out = output_folder(sim)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    for stale in (out / "nodes").glob("*.jsonl"):
        stale.unlink()
    launch = RayLaunch(train, gossip, sim, out, address, max_restarts, placement_timeout)
    t0, launched = time.monotonic(), time.time()
    interrupted = False
    try:
        launch.connect()
        if progress is not None:
            progress(0.0, f"placing {sim.nodes} bundles of 1 CPU")
        launch.place()
        launch.start(progress)
        deadline = time.monotonic() + sim.run_timeout
        while True:
            current = launch.tick()
            finished = sum(1 for recs in current.values() if recs and recs[-1].get("done"))
            down = sum(1 for r in launch.ranks.values() if r.down is not None)
            if progress is not None:
                last = [recs[-1] for recs in current.values() if recs]
                done = sum(rec["epoch"] for rec in last) / (sim.nodes * train.epochs)
                text = f"training, {finished}/{sim.nodes} done"
                if last:
                    text += f", mean accuracy {sum(rec['accuracy'] for rec in last) / len(last):.3f}"
                restarts = sum(r.restarts for r in launch.ranks.values())
                if restarts or down:
                    text += f", {restarts} restarted, {down} down"
                progress(min(done, 1.0), text)
            if finished == sim.nodes and not down:
                break
            if time.monotonic() > deadline:
                raise SimulationError(f"the run did not finish within {sim.run_timeout:.0f} s")
        if sim.reconstruct:
            if progress is not None:
                progress(1.0, "rebuilding the model through node 0")
            result = rebuild_from(
                launch.ranks[0].address, sim.store.model_id or train.model, train, out, True
            )
            (out / "rebuild.json").write_text(json.dumps(result, indent=2))
        launch.stop()
    except KeyboardInterrupt:
        interrupted = True
        launch.stop(grace=5.0)
    finally:
        launch.close()
    records = {r: launch.cluster.run_records(r, launch._records(r)) for r in range(sim.nodes)}
    records = {r: recs for r, recs in records.items() if recs}
    if not records:
        raise KeyboardInterrupt() if interrupted else SimulationError("no node wrote any metrics")
    summary = write_outputs(out, records, train, gossip, sim, time.monotonic() - t0, launched, progress)
    summary["ray"] = {
        "address": address or "auto",
        "ray_nodes": sorted(
            {json.loads((out / "nodes" / f"{r}.ready").read_text())["ray_node"] for r in records}
        ),
        "restarts": {str(r): launch.ranks[r].restarts for r in launch.ranks if launch.ranks[r].restarts},
        "events": launch.restart_events,
    }
    if interrupted:
        summary["interrupted"] = True
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if interrupted:
        raise KeyboardInterrupt(summary)
    return summary
