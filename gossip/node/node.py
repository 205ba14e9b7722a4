"""A gossip node: lifecycle, the training thread's ``step``, and neighbour choice.

The node owns no training loop. Whoever trains calls :meth:`Node.step` after
each optimizer step, from any thread; ``step`` applies the averaging results
that arrived since (the slot's mailbox) and, every ``gossip_every`` steps, takes
a snapshot and hands it to the event loop, which runs the exchange beside the
training. The pieces: :mod:`~gossip.node.slot` (one exchange at a time, the
mailbox), :mod:`~gossip.node.pairwise` and :mod:`~gossip.node.pushsum` (the
protocols), :mod:`~gossip.node.members` (membership I/O),
:mod:`~gossip.node.servicer` (the calls peers make), :mod:`~gossip.node.rest`
(averaging after training), and the shard store (:mod:`gossip.store`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, replace
from typing import Any

import torch

from gossip.config import ConfigError, NodeConfig, chunk_bytes_for
from gossip.core.choco import Choco, seed_of
from gossip.core.membership import MemberRecord
from gossip.core.outer import Outer
from gossip.core.params import FlatParams
from gossip.core.pipeline import Pipeline
from gossip.core.status import MemberView, NodeStatus, TrainingReport, sample_coordinates
from gossip.core.topology import Topology, TopologyError
from gossip.node import pairwise, pushsum, servicer
from gossip.node.members import JoinError, Members
from gossip.node.protocol import CallerStream, Party, Stats
from gossip.node.rest import RestPolicy
from gossip.node.slot import ExchangeSlot
from gossip.store import servicer as store_servicer
from gossip.store.disk import remembered_node_id
from gossip.store.service import StoreService
from gossip.transport import security
from gossip.transport.bulkserver import BulkServer, start_bulk_server
from gossip.transport.channels import DEADLINE_BYTES_PER_S, GOSSIP, Channels
from gossip.transport.pacing import SendPacer
from gossip.transport.ratelimit import PeerRateLimiter
from gossip.transport.server import Server, start_server

__all__ = ["JoinError", "Node", "Stats"]

log = logging.getLogger(__name__)


def _node_id(config: NodeConfig) -> str:
    node_id = config.node_id or uuid.uuid4().hex[:12]
    if not config.node_id and config.store.data_dir:  # restarted on its folder: the same id
        try:
            return remembered_node_id(config.store.data_dir, node_id)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data_dir: {exc}") from None
    return node_id


def _topology(config: NodeConfig) -> Topology | None:
    """The node's topology (None for 'random'), checked against its rank."""
    g = config.gossip
    if g.topology == "random":
        return None
    try:
        topology = Topology.parse(g.topology, config.world_size or None, seed=0)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    if config.rank < 0 and topology.labels is None:
        raise ConfigError(f"topology {g.topology} needs --rank and --world-size (or use 'random')")
    if config.rank >= topology.n:
        raise ConfigError(f"rank {config.rank} is outside the {topology.n}-node topology")
    return topology


class Node:
    """One participant. Build with :meth:`create` (or ``async with Node.around(model)``), end with :meth:`stop`."""

    def __init__(self, flat: FlatParams, config: NodeConfig | None = None, seed: int | None = None) -> None:
        config = config or NodeConfig()
        config.validate()
        if not config.gossip.chunk_bytes:  # automatic: resolved once, here
            chunk = chunk_bytes_for(0, config.send_rate, bulk=config.bulk)
            config = replace(config, gossip=replace(config.gossip, chunk_bytes=chunk))
        g = config.gossip
        self.flat = flat
        self.node_id = _node_id(config)
        self.topology = _topology(config)
        self.config = config  # as given; the rank a graph file assigns is resolved in start()
        self.phase = "created"
        self.started_at = time.monotonic()
        self.address = ""
        choco = Choco.of(g.compress, g.gamma, flat.numel, seed_of(self.node_id))
        pipeline = Pipeline(flat.layout, g.codec, choco=choco)  # --compress: CHOCO, per neighbour
        # On the raw, stage-free path the snapshot is the frames it is sent in.
        frames = g.chunk_bytes if pipeline.streams(g.codec) else 0
        self.slot = ExchangeSlot(flat, g.max_lag, frame_bytes=frames)
        self.rest = RestPolicy(g.idle_pause, g.rest_pause, g.rest_tolerance)
        rate = config.send_rate
        self.pacer = SendPacer(rate) if rate else None  # --max-send-rate: every call, both ways
        floor = rate or DEADLINE_BYTES_PER_S  # the throughput our transfers' deadlines assume
        self.party = Party(
            self.node_id,
            flat,
            self.slot,
            pipeline,
            g,
            running=lambda: self.phase == "running",
            on_wake=self._wake_rest,
            send_floor=floor,
            outer=Outer.parse(g.outer),
        )
        self._rng = random.Random(seed)
        self._round = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rest_wake = asyncio.Event()
        self.channels = Channels(pacer=self.pacer, bulk=config.bulk)
        self._bulk: BulkServer | None = None  # the plain-TCP port of bulk calls, when served
        self.members: Members | None = None
        self.training_report = TrainingReport()  # what the trainer last said (Node.report)
        self._limiter: PeerRateLimiter | None = None
        self._sampled = sample_coordinates(flat.fingerprint, flat.numel)  # for the spread estimate
        self.store = StoreService(
            self.node_id,
            config.store,
            self.channels,
            fingerprint=flat.fingerprint,
            rpc_timeout=config.rpc_timeout,
            chunk_bytes=g.chunk_bytes,
            send_floor=floor,
        )
        # What snapshots carry next to the parameters (the trainer's optimizer state and
        # model buffers, as named tensors), read on the training thread at publish time.
        self.state_source: Callable[[], list[tuple[str, torch.Tensor]]] | None = None
        # A silent publisher's version is finished here only once this node's training is over.
        self.store.snapshot_source = lambda: None if self.slot.training else self._snapshot()

    # --- lifecycle -----------------------------------------------------------------

    @classmethod
    async def create(
        cls, model: torch.nn.Module | FlatParams, config: NodeConfig | None = None, seed: int | None = None
    ) -> Node:
        flat = model if isinstance(model, FlatParams) else FlatParams.bind(model)
        node = cls(flat, config, seed)
        await node.start()
        return node

    @classmethod
    def around(
        cls, model: torch.nn.Module, config: NodeConfig | None = None, seed: int | None = None
    ) -> Node:
        """An unstarted node around ``model``; ``async with`` starts and stops it."""
        return cls(FlatParams.bind(model), config, seed)

    async def __aenter__(self) -> Node:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def stats(self) -> Stats:
        return self.party.stats

    @property
    def weight(self) -> float:
        """The push-sum weight (1 under pairwise); the model holds the de-biased values."""
        return self.party.weight

    @property
    def step_count(self) -> int:
        return self.slot.step

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sec = security.load(self.config.security, serving=True)
        self.channels.secure(sec.channel_credentials, sec.metadata)
        interceptors = sec.server_interceptors()
        self._limiter = next((i for i in interceptors if isinstance(i, PeerRateLimiter)), None)
        services = [
            ("gossip.proto.Gossip", servicer.methods(self.party, lambda: self.members, self.status)),
            ("gossip.proto.Store", store_servicer.methods(self.store)),
        ]
        self._server, port = await start_server(
            self.config.listen,
            services,
            interceptors=interceptors,
            credentials=sec.server_credentials,
            pacer=self.pacer,
        )
        host = self.config.listen.rpartition(":")[0]
        if self.config.bulk:  # with TLS every call stays on gRPC
            try:
                self._bulk = await start_bulk_server(
                    services, host, self.config.bulk_port, sec.metadata, self.pacer, self.node_id
                )
            except OSError:
                await self._stop_serving(0)
                raise
        if warning := security.exposure_warning(self.config.listen, sec):
            log.warning("%s", warning)
        self.address = self.config.advertise or f"{host}:{port}"
        if warning := security.loopback_warning(self.address, self.config.peers):
            log.warning("%s", warning)
        if self.config.rank < 0 and self.topology is not None and self.topology.labels is not None:
            if self.address not in self.topology.labels:
                await self._stop_serving(0)
                raise ConfigError(f"address {self.address} is not a node of the graph file")
            self.config = replace(self.config, rank=self.topology.labels.index(self.address))
        me = MemberRecord(
            self.node_id, self.address, time.time_ns(), 0, rank=self.rank, fingerprint=self.flat.fingerprint
        )
        self.members = Members(me, self.config, self.channels, self._rng, on_join=self._joined)
        self.phase = "joining"
        try:
            if self.config.peers:
                await self.members.join()
        except BaseException:
            await self._stop_serving(0)
            raise
        self.phase = "running"
        self._spawn(self.members.loop(self._spawn, on_round=self.store.refresh))
        self.store.start(self._store_view, self._spawn)
        log.info("node %s listening on %s (rank %d)", self.node_id, self.address, self.rank)

    async def stop(self, leave: bool = True) -> None:
        """Leave gracefully: let an exchange in flight end or abandon it, hand shards off, tell peers."""
        if self.phase in ("stopped", "leaving"):
            return
        if self._server is None:  # never started
            self.phase = "stopped"
            return
        self.phase = "leaving"
        deadline = time.monotonic() + min(2.0, self.config.gossip.exchange_timeout)
        while self.slot.busy and time.monotonic() < deadline:
            if not self.slot.training:
                self.slot.apply_pending()
            await asyncio.sleep(0.01)
        while self._tasks:  # a task may have spawned another meanwhile
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.slot.apply_pending()
        if leave and self.members is not None:
            await self.store.hand_off(timeout=5.0)
            await self.members.leave()
        await self._stop_serving(0.5)
        log.info("node %s stopped", self.node_id)

    async def _stop_serving(self, grace: float) -> None:
        """Both ports at once: calls in flight on either get the same ``grace``."""
        stopping = [self._server.stop(grace)] if self._server is not None else []
        if self._bulk is not None:
            stopping.append(self._bulk.stop(grace))
        await asyncio.gather(*stopping)
        await self.channels.close()
        self.phase = "stopped"

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- the training thread's side ------------------------------------------------

    def step(self, n: int = 1) -> None:
        """Call after each optimizer step: applies arrived averaging, maybe starts an exchange.

        When an exchange this node takes part in (its own, or one a neighbour
        started with it) has been in flight for ``max_lag`` steps, ``step`` waits
        for it (at most its deadline): a node whose compute is much faster than its
        link still mixes at least once every ``max_lag`` steps.
        """
        self.party.start_outer()
        overdue = self.slot.advance(n)
        if overdue is not None:
            overdue.wait(self.party.deadline + 1.0)
            self.slot.apply_pending()
        if self.slot.step % self.config.gossip.gossip_every == 0 and self.slot.claim_own(
            self.phase == "running"
        ):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._launch_exchange)
        self._maybe_publish(final=False)

    def report(self, **figures: float | None) -> None:
        """Tell the node how training goes, for its status: ``epoch``, ``train_loss``, ``eval_loss``,
        ``eval_accuracy`` (any thread; see :meth:`~gossip.core.status.TrainingReport.update`)."""
        self.training_report.update(**figures)

    def gossip_now(self) -> bool:
        """Start an averaging-only exchange now (from the event loop, when nobody trains)."""
        if self.slot.training or not self.slot.claim_own(self.phase == "running"):
            return False
        self._launch_exchange()
        return True

    def finish_training(self) -> None:
        """No more steps will come: publish, apply results from now on, keep averaging until settled."""
        self._maybe_publish(final=True)
        self.party.rest = self.rest  # from now on, exchanges tell the rest policy how much they moved it
        self.slot.stop_training()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn_rest)

    def _spawn_rest(self) -> None:
        if self.phase == "running" and self.config.gossip.idle_pause > 0:
            self._spawn(self._rest_loop())

    async def _rest_loop(self) -> None:
        """Average with neighbours after training, backing off once it no longer moves this node."""
        while self.phase == "running":
            self._rest_wake.clear()
            if self.gossip_now():
                await self.slot.wait_own()
            # Not wait_for: on Python 3.11 a cancel that meets its timeout becomes a
            # TimeoutError, and with pauses of 20 ms this loop would then outlive stop().
            waiter = asyncio.ensure_future(self._rest_wake.wait())
            try:
                await asyncio.wait([waiter], timeout=self.rest.next_pause(self._rng))
            finally:
                waiter.cancel()

    def _wake_rest(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._rest_wake.set)

    def _joined(self, member: MemberRecord) -> None:
        self.rest.wake()
        self._wake_rest()

    def _maybe_publish(self, final: bool) -> None:
        """Hand a snapshot to the store when this node publishes the version due now (copied
        here, between two optimizer steps, so it is one step's model and not a mix of two)."""
        version = self.store.publish_due(self.slot.step, final=final)
        if version is None or self._loop is None or self.phase != "running":
            return
        snap, step, state = self._snapshot()
        self._loop.call_soon_threadsafe(self.store.start_publish, snap, version, step, state)

    def _snapshot(self) -> tuple[FlatParams, int, FlatParams | None]:
        """The model, its step and the optimizer state, copied together: on the training thread
        between two steps (the only thread that changes the state), or once training is over.
        Into the buffer of an earlier snapshot the store is done with, when there is one (warm
        pages: a fraction of a fresh clone's cost)."""
        named = self.state_source() if self.state_source is not None else []
        state = FlatParams.copy_of(named) if named else None
        with self.slot.lock:
            snap, self.store.spare = self.store.spare, None
            if snap is None:
                snap = self.flat.clone()
            else:
                snap.copy_(self.flat)
            return snap, self.slot.step, state

    async def wait_for_members(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` nodes (this one included) are alive; False on timeout."""
        assert self.members is not None
        return await self.members.wait_for(count, timeout)

    # --- exchanges ---------------------------------------------------------------------

    def _connect(self, method: str) -> Callable[[str], CallerStream]:
        def connect(address: str) -> CallerStream:
            if method == "Exchange":
                return self.channels.stream(address, GOSSIP + method, self.party.deadline)
            return self.channels.upload(address, GOSSIP + method, self.party.deadline)

        return connect

    def _launch_exchange(self) -> None:
        if self.phase != "running":
            self.slot.release()
            self.slot.own_finished()
            return
        self._round += 1
        if self.config.gossip.strategy == "pairwise":
            self._spawn(pairwise.run_own(self.party, self._pick, self._connect("Exchange"), self._rng))
        else:
            self._spawn(pushsum.run_own(self.party, self._pick(set()), self._connect("Push")))

    def neighbours(self) -> list[MemberRecord]:
        """Alive members that the topology lets this node talk to now (same model layout only)."""
        assert self.members is not None
        now = time.monotonic()
        alive = [
            m
            for m in self.members.table.alive()
            if m.fingerprint == self.flat.fingerprint and self.party.avoid.get(m.node_id, 0.0) <= now
        ]
        if self.topology is None:
            return alive
        t = self._round - 1
        if self.config.gossip.strategy == "push-sum":
            ranks = set(self.topology.out_neighbors(self.rank, t))
        else:
            ranks = set(self.topology.neighbors(self.rank, t))
        return [m for m in alive if m.rank in ranks]

    def _pick(self, exclude: set[str]) -> MemberRecord | None:
        cands = [m for m in self.neighbours() if m.node_id not in exclude]
        return self._rng.choice(cands) if cands else None

    def _store_view(self) -> list[tuple[str, str, bytes, bool]]:
        """The store's members: every one not known dead, this node included, and whether it is alive."""
        assert self.members is not None
        live = [m for m in self.members.table.members.values() if m.state in ("alive", "suspect")]
        return [(self.node_id, self.address, self.flat.fingerprint, True)] + [
            (m.node_id, m.address, m.fingerprint, m.state == "alive") for m in live
        ]

    # --- status --------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        members: tuple[MemberView, ...] = ()
        neighbours: tuple[str, ...] = ()
        if self.members is not None:
            table = self.members.table
            members = tuple(
                MemberView(
                    m.node_id,
                    m.address,
                    m.state,
                    m.rank,
                    m.heartbeat,
                    table.seconds_since_heartbeat(m.node_id),
                )
                for m in table.all()
            )
            neighbours = tuple(m.node_id for m in self.neighbours())
            # Counts per peer only for members the table still holds (it forgets the long gone).
            for gone in self.stats.exchanged_with.keys() - table.members.keys():
                del self.stats.exchanged_with[gone]
        return NodeStatus(
            node_id=self.node_id,
            address=self.address,
            phase=self.phase,
            step=self.slot.step,
            rank=self.rank,
            topology=self.config.gossip.topology,
            strategy=self.config.gossip.strategy,
            pipeline=self.party.pipeline.spec,
            parameters=self.flat.numel,
            fingerprint=self.flat.fingerprint,
            weight=self.weight,
            uptime_seconds=time.monotonic() - self.started_at,
            members=members,
            neighbours=neighbours,
            training=self.slot.training,
            resting=self.party.rest is not None and not self.slot.training and self.rest.resting,
            **self.stats.status_fields(),
            **asdict(self.training_report),
            calls_refused=self._limiter.refused if self._limiter is not None else 0,
            calls_delayed=self._limiter.delayed if self._limiter is not None else 0,
            control_calls=dict(self._limiter.received) if self._limiter is not None else {},
            sample=tuple(self.flat.gather(self._sampled)),
            **(self.pacer.status_fields() if self.pacer is not None else {}),
            bulk_port=self._bulk.port if self._bulk is not None else 0,
        )
