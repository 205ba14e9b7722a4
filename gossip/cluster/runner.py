"""One real node process: data, model, training thread, metrics, graceful exit.

``gossip node`` and every process of ``gossip simulate`` run this. Training
runs on its own thread and calls ``Node.step`` after each optimizer step; the
event loop serves gRPC and runs the exchanges beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gossip.cluster.sysutil import freeze_heap, raise_open_files, tune_malloc, write_atomic
from gossip.config import NodeConfig, RunOptions, TrainConfig
from gossip.core.choco import MAX_PAIRS
from gossip.core.layout import LayoutError
from gossip.node.node import JoinError, Node
from gossip.store.reconstruct import Rebuilt, SnapshotUnavailable, load_into
from gossip.train.data import Dataset, load_dataset, node_data
from gossip.train.models import build_model
from gossip.train.trainer import LocalTrainer, evaluate
from gossip.transport import security
from gossip.transport.channels import Channels

if TYPE_CHECKING:
    from gossip.observe.metrics import MetricsServer

log = logging.getLogger(__name__)


class InitError(JoinError):
    """``--init-from-network`` found no snapshot to start from."""


async def _wait_for_seed_file(path: Path, timeout: float) -> str:
    """The address in another node's ready file, once that node serves (lets a launcher start all at once)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise JoinError(f"seed file {path} did not appear within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return str(json.loads(path.read_text())["address"])


class _Metrics:
    def __init__(self, path: str | None, node_id: str, rank: int) -> None:
        self.node = node_id
        self.rank = rank if rank >= 0 else None
        self._fh = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", buffering=1)  # noqa: SIM115 - held for the run
        self.t0 = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        record = {
            "node": self.node,
            "rank": self.rank,
            **record,
            "time": round(time.monotonic() - self.t0, 4),
            "unix_time": round(time.time(), 4),
        }
        log.info("metrics %s", json.dumps(record))
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class _Recorder:
    """Evaluations: test loss and accuracy, counters, and optionally the flat parameters."""

    def __init__(
        self, node: Node, trainer: LocalTrainer, ds: Dataset, metrics: _Metrics, opts: RunOptions
    ) -> None:
        self.node, self.trainer, self.ds, self.metrics, self.opts = node, trainer, ds, metrics, opts
        self.evals = 0
        self.last_loss: float | None = None  # null in JSON until the first step
        self.extra: dict[str, Any] = {}  # fields for the next record only

    def record(self, **flags: bool) -> None:
        self.metrics.write(self.measure(**flags))

    def measure(self, **flags: bool) -> dict[str, Any]:
        """An evaluation now (parameters dumped if asked), not yet written."""
        began = time.monotonic()
        loss, acc = evaluate(self.trainer.model, self.ds.x_test, self.ds.y_test)
        eval_s = time.monotonic() - began
        self.node.report(eval_loss=loss, eval_accuracy=acc)
        stats = self.node.stats
        rec: dict[str, Any] = {
            "step": self.trainer.step_count,
            "epoch": round(self.trainer.epoch, 4),
            "eval": self.evals,
            "loss": loss,
            "train_loss": self.last_loss,
            "accuracy": acc,
            "eval_s": round(eval_s, 4),
            "bytes_sent": stats.bytes_out,
            "bytes_received": stats.bytes_in,
            "exchanges": stats.exchanges_ok + stats.exchanges_served,
            **{k: True for k, v in flags.items() if v},
            **self.extra,
        }
        self.extra = {}
        if self.opts.dump_params:
            folder = Path(self.opts.dump_params)
            folder.mkdir(parents=True, exist_ok=True)
            flat = torch.cat([s.float() for s in self.node.flat]).numpy()
            np.save(folder / f"eval{self.evals:04d}.npy", flat)
        self.evals += 1
        return rec


def _train_thread(
    trainer: LocalTrainer, rec: _Recorder, stop: threading.Event, threads: int, min_step_time: float
) -> None:
    torch.set_num_threads(max(1, threads))
    node = rec.node
    try:
        while not trainer.done() and not stop.is_set():
            started = time.monotonic()
            rec.last_loss = trainer.step()
            node.report(epoch=trainer.epoch, train_loss=rec.last_loss)
            node.step()
            if trainer.evaluation_due() and not trainer.done():
                rec.record()
            rest = min_step_time - (time.monotonic() - started)
            if rest > 0:  # a slower device: the rest of the step's time, idle
                stop.wait(rest)
        node.finish_training()
        if not stop.is_set():
            rec.record(done=True)
    except Exception:
        log.exception("training failed")
        stop.set()
        raise


async def run_node(train: TrainConfig, config: NodeConfig, opts: RunOptions) -> int:
    """Run one node until its training ends and it is stopped (or, with exit_when_done, at once)."""
    endpoint: MetricsServer | None = None
    if opts.prometheus:  # bound first: a taken port fails the command before the data loads
        from gossip.observe.metrics import MetricsServer

        endpoint = await MetricsServer.start(opts.prometheus)
    try:
        return await _run_node(train, config, opts, endpoint)
    finally:
        if endpoint is not None:
            await endpoint.stop()


async def _run_node(
    train: TrainConfig, config: NodeConfig, opts: RunOptions, endpoint: MetricsServer | None
) -> int:
    torch.set_num_threads(max(1, opts.threads))
    tune_malloc()
    raise_open_files()
    g = config.gossip
    if g.compress not in ("", "none") and g.topology == "random":
        log.warning(
            "--compress keeps reference copies for at most %d neighbours, and with topology random "
            "any member is one: pairs will often start over; prefer a fixed topology (exponential)",
            MAX_PAIRS,
        )
    ds = load_dataset(train.dataset, seed=train.seed)
    model = build_model(
        train.model, ds.input_shape, ds.num_classes, seed=train.seed, target_shape=ds.target_shape
    )
    if config.rank >= 0 and config.world_size > 0:
        x, y = node_data(ds, config.rank, config.world_size, train.partition, seed=train.seed)
    else:
        x, y = ds.x_train, ds.y_train
    # Everything slow (imports, the optimizer's first construction) happens before
    # the node serves: a blocked event loop would stall the peers' exchanges.
    trainer = LocalTrainer(model, x, y, train, seed=train.seed * 7919 + max(config.rank, 0))
    evaluate(model, ds.x_test[:1], ds.y_test[:1])
    if opts.seed_file:
        seed = await _wait_for_seed_file(Path(opts.seed_file), config.join_timeout)
        config = replace(config, peers=(*config.peers, seed))
    if not config.store.model_id:
        config = replace(config, store=replace(config.store, model_id=train.model.replace("/", "_")[:128]))
    init: dict[str, Any] = {}
    if opts.init_from_network:
        # Before the node serves: nothing can average into the model while it loads.
        rebuilt = await _init_from_network(model, config)
        m = rebuilt.manifest
        momentum = trainer.load_momentum(rebuilt.optimizer_state())
        loss, acc = evaluate(model, ds.x_test, ds.y_test)
        init = {
            "init_from": {
                "model_id": m.model_id,
                "version": m.version,
                "step": m.step,
                "publisher": m.publisher,
                "momentum_buffers": momentum,
            },
            "init_accuracy": acc,
            "init_loss": loss,
        }
        log.info(
            "starting from snapshot %s v%d (publisher %s, step %d, %d momentum buffers): "
            "test accuracy %.4f, rebuilt in %.2f s",
            m.model_id,
            m.version,
            m.publisher,
            m.step,
            momentum,
            acc,
            rebuilt.seconds,
        )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    freeze_heap()  # what is built now lives as long as the process: keep collections off it
    node = Node.around(model, config, seed=train.seed * 7919 + max(config.rank, 0))
    node.state_source = trainer.snapshot_state  # snapshots carry the momentum and model buffers
    if endpoint is not None:
        endpoint.watch(node)
    metrics = _Metrics(opts.metrics, node.node_id, config.rank)
    rec = _Recorder(node, trainer, ds, metrics, opts)
    rec.extra = init
    # The starting point, measured before the node serves (no exchange can have moved
    # it yet) and written once it does.
    start = await asyncio.to_thread(rec.measure)
    stop_training = threading.Event()
    try:
        await node.start()
        metrics.write(start)
        if opts.ready_file:
            ready = {"address": node.address, "node_id": node.node_id}
            if endpoint is not None:
                ready["prometheus"] = endpoint.address
            write_atomic(Path(opts.ready_file), json.dumps(ready))
        log.info(
            "node %s: %d training samples, %d steps, model %s with %d parameters",
            node.node_id,
            len(x),
            trainer.total_steps,
            train.model,
            node.flat.numel,
        )
        if opts.wait_for > 1:
            log.info(
                "waiting up to %.0f s for %d nodes (this one included) to join through %s",
                opts.wait_timeout,
                opts.wait_for,
                node.address,
            )
            waiter = asyncio.ensure_future(node.wait_for_members(opts.wait_for, opts.wait_timeout))
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()
            elif not waiter.result():
                log.warning(
                    "only some of the %d nodes showed up in %.0f s; training anyway",
                    opts.wait_for,
                    opts.wait_timeout,
                )
        if not stopping.is_set():
            train_task = asyncio.ensure_future(
                asyncio.to_thread(
                    _train_thread, trainer, rec, stop_training, opts.threads, train.min_step_time
                )
            )
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([train_task, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not train_task.done():
                stop_training.set()
                await train_task
            else:
                stopper.cancel()
                train_task.result()
            log.info("node %s finished training at step %d", node.node_id, trainer.step_count)
            if not opts.exit_when_done and not stopping.is_set():
                # The node keeps averaging with its neighbours, then rests (gossip.node.rest).
                await stopping.wait()
        await node.stop()
        # The model as it leaves the network: after training and any averaging since.
        await asyncio.to_thread(rec.record, final=True)
    finally:
        stop_training.set()
        await node.stop()
        metrics.close()
    return 0


async def _init_from_network(model: torch.nn.Module, config: NodeConfig) -> Rebuilt:
    """Load the newest snapshot of this model through the seeds into ``model``'s parameters."""
    if not config.peers:
        raise InitError("--init-from-network needs --peers or --seed-file to reach the network")
    deadline = time.monotonic() + config.join_timeout
    sec = security.load(config.security, serving=False)
    while True:
        channels = Channels(sec.channel_credentials, sec.metadata)
        try:
            return await load_into(
                model,
                list(config.peers),
                config.store.model_id,
                timeout=5 * config.rpc_timeout,
                channels=channels,
            )
        except ConnectionError as exc:
            if time.monotonic() >= deadline:
                raise InitError(f"--init-from-network: no seed answered: {exc}") from None
        except (SnapshotUnavailable, LayoutError) as exc:
            raise InitError(f"--init-from-network: {exc}") from None
        finally:
            await channels.close()
        await asyncio.sleep(0.5)
