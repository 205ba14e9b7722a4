"""The Ray side of ``gossip launch --ray``: one gossip node inside one Ray actor.

:class:`NodeHost` runs the same ``run_node`` that ``gossip node`` runs, on a
thread of its own with its own event loop, its gRPC server on the IP of the Ray
node it was placed on. Its metrics lines and parameter dumps stay on that
machine until the launcher (:mod:`gossip.cluster.ray_launch`) polls them. Ray
runs ``__init__`` again after a restart: a new process, a new token, a node the
launcher starts again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gossip.cluster.procs import SimulationError, read_jsonl
from gossip.config import (
    GossipConfig,
    NodeConfig,
    RunOptions,
    SimulateConfig,
    StoreConfig,
    TrainConfig,
    join_host_port,
)
from gossip.core.membership import MembershipConfig

log = logging.getLogger(__name__)


class _ActorLoop(asyncio.SelectorEventLoop):
    """An event loop off the main thread that keeps ``run_node``'s SIGINT/SIGTERM handlers.

    Signals reach the main thread only; :meth:`stop_node` calls the handlers as a
    signal would, so the node leaves the way ``gossip node`` does on Ctrl-C.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stop_handlers: list[Callable[[], object]] = []

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        self._stop_handlers.append(lambda: callback(*args))

    def stop_node(self) -> None:
        for handler in self._stop_handlers:
            handler()


class NodeHost:
    """One gossip node inside a Ray actor; Ray runs ``__init__`` again after a restart."""

    def __init__(
        self, run: str, rank: int, train: TrainConfig, gossip: GossipConfig, sim: SimulateConfig
    ) -> None:
        import ray

        from gossip.cluster import runner  # noqa: F401 - torch and gRPC load while the others' do

        self.rank, self.train, self.gossip, self.sim = rank, train, gossip, sim
        self.ip = ray.util.get_node_ip_address()
        self.ray_node = ray.get_runtime_context().get_node_id()
        self.token = uuid.uuid4().hex  # a new one per process: how the launcher sees a restart
        # On this Ray node's disk; forget() removes it, and those of this rank's earlier processes.
        self._prefix = f"gossip-{run}-rank{rank}-"
        self.dir = Path(tempfile.mkdtemp(prefix=self._prefix))
        self._loop: _ActorLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "ip": self.ip, "ray_node": self.ray_node, "token": self.token}

    def start(self, peers: list[str], epochs: int, wait_for: int, init_from_network: bool) -> None:
        config = NodeConfig(
            listen=join_host_port(self.ip, 0),
            peers=tuple(peers),
            node_id=f"node{self.rank}",
            rank=self.rank,
            world_size=self.sim.nodes,
            max_send_rate=self.sim.max_send_rate,
            membership=MembershipConfig(member_protocol=self.sim.member_protocol),
            gossip=self.gossip,
            store=self._store(),
        )
        opts = RunOptions(
            metrics=str(self.dir / "metrics.jsonl"),
            dump_params=str(self.dir / "params"),
            ready_file=str(self.dir / "ready"),
            wait_for=wait_for,
            threads=self.sim.threads,
            init_from_network=init_from_network,
        )
        train = replace(self.train, epochs=epochs)
        self._thread = threading.Thread(target=self._run, args=(train, config, opts), daemon=True)
        self._thread.start()

    def _store(self) -> StoreConfig:
        """The store's config; ``--data-dir`` is a folder on every Ray node: rank R keeps DIR/nodeR."""
        st = self.sim.store
        return replace(st, data_dir=str(Path(st.data_dir) / f"node{self.rank}")) if st.data_dir else st

    def _run(self, train: TrainConfig, config: NodeConfig, opts: RunOptions) -> None:
        from gossip.cluster.runner import run_node

        loop = self._loop = _ActorLoop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run_node(train, config, opts))
        except BaseException as exc:  # reported to the launcher by poll(), which fails the run
            log.exception("node %d failed", self.rank)
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def address(self, timeout: float) -> str:
        """The node's address once it serves."""
        path = self.dir / "ready"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self._error is not None or time.monotonic() > deadline:
                raise SimulationError(
                    f"node {self.rank} on {self.ip} did not start: {self._error or f'not within {timeout:.0f} s'}"
                )
            time.sleep(0.05)
        return str(json.loads(path.read_text())["address"])

    def poll(self, seen: int) -> dict[str, Any]:
        """The metrics lines after the first ``seen``, the parameters of their evaluations, the state."""
        records = read_jsonl(self.dir / "metrics.jsonl")[seen:]
        params = {}
        for rec in records:  # a record is written after its dump is complete
            path = self.dir / "params" / f"eval{int(rec.get('eval', -1)):04d}.npy"
            if path.exists():
                params[int(rec["eval"])] = np.load(path)
        running = self._thread is not None and self._thread.is_alive()
        return {"records": records, "params": params, "running": running, "error": self._error}

    def stop(self, timeout: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop_node)
        if thread is not None:
            thread.join(timeout)

    def forget(self) -> None:
        for folder in self.dir.parent.glob(self._prefix + "*"):
            shutil.rmtree(folder, ignore_errors=True)
