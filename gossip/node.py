"""A gossip node: a gRPC server, a member table and the averaging protocols.

The node owns no training loop. Whoever trains calls :meth:`Node.step` after
each optimizer step, from any thread; ``step`` applies the averaging results
that arrived since (the mailbox) and, every ``gossip_every`` steps, takes a
snapshot and hands it to the event loop, which runs the exchange beside the
training. Only short critical sections take the lock (apply a delta, copy a
snapshot); nothing holds it across a training step.

Pairwise push-pull keeps at most one exchange per node in flight, as caller or
callee, until its delta is applied: a busy node declines at once, so two nodes
that pick each other cannot deadlock and no node ever weights itself below 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import torch

from gossip import averaging, faults, rpc, security, store_server, wire
from gossip.config import ConfigError, NodeConfig
from gossip.membership import Membership
from gossip.params import FlatParams, LayoutError, PayloadReceiver, encode, payload_nbytes
from gossip.proto import gossip_pb2 as pb
from gossip.store_service import StoreService
from gossip.topology import Topology, TopologyError

log = logging.getLogger(__name__)

# Throughput floor used to stretch the exchange deadline with the payload size.
_DEADLINE_BYTES_PER_S = 20e6
# Concurrent push-sum receives one node accepts; more get RESOURCE_EXHAUSTED.
_MAX_CONCURRENT_PUSHES = 4
# Member syncs of this node's own in flight at once: a peer that takes the call and
# never answers (paused, overloaded) holds one until its deadline, the others go on.
_MAX_SYNCS_IN_FLIGHT = 3
# Chance per round that the sync goes to a member declared dead: a probe every
# ~10 rounds (5 s) finds a paused or cut-off member again, at the cost of one call.
_PROBE_DEAD = 0.1


class JoinError(RuntimeError):
    """None of the seeds could be reached in time."""


@dataclass
class Stats:
    exchanges_ok: int = 0
    exchanges_failed: int = 0
    exchanges_declined: int = 0  # incoming exchanges we declined because we were busy
    exchanges_served: int = 0  # incoming exchanges completed
    busy_replies: int = 0  # our attempts a peer declined
    bytes_in: int = 0
    bytes_out: int = 0


class Node:
    """One participant. Build with :meth:`create` (or ``await node.start()``), end with :meth:`stop`."""

    def __init__(self, flat: FlatParams, config: NodeConfig | None = None, seed: int | None = None) -> None:
        self.config = config or NodeConfig()
        self.config.validate()
        g = self.config.gossip
        self.flat = flat
        self.node_id = self.config.node_id or uuid.uuid4().hex[:12]
        self.topology: Topology | None = None
        if g.topology != "random":
            try:
                self.topology = Topology.parse(g.topology, self.config.world_size or None, seed=0)
            except TopologyError as exc:
                raise ConfigError(str(exc)) from None
            if self.config.rank < 0 and self.topology.labels is None:
                raise ConfigError(f"topology {g.topology} needs --rank and --world-size (or use 'random')")
            if self.config.rank >= self.topology.n:
                raise ConfigError(f"rank {self.config.rank} is outside the {self.topology.n}-node topology")
        self.stats = Stats()
        self.phase = "created"
        self.started_at = time.monotonic()
        self.address = ""
        self.weight = 1.0  # push-sum weight; the model holds the de-biased values x / w
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._busy = False
        self._pending: list[Callable[[], None]] = []
        self._training = False
        self._own_inflight = False  # this node's own exchange (as caller) is running
        self._own_done = threading.Event()
        self._launched_step = 0
        # An exchange another node started with this one: max_lag bounds the steps run
        # ahead of it too, or a node kept busy answering others would hardly mix.
        self._incoming_inflight = False
        self._incoming_done = threading.Event()
        self._incoming_step = 0
        self._step = 0
        self._round = 0
        self._snap = FlatParams.zeros(flat.layout)
        self._recv = FlatParams.zeros(flat.layout)
        self._avoid: dict[str, float] = {}
        self._push_slots = asyncio.Semaphore(_MAX_CONCURRENT_PUSHES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._client = rpc.PeerClient()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.membership: Membership | None = None
        # The shard store: serves its RPCs on this node's port, publishes and repairs.
        self.store = StoreService(
            self.node_id,
            self.config.store,
            self._client,
            fingerprint=flat.fingerprint,
            rpc_timeout=self.config.rpc_timeout,
            chunk_bytes=g.chunk_bytes,
        )

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

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sec = security.load(self.config.security, serving=True)
        self._client.secure(sec.channel_credentials, sec.metadata)
        self._server, port = await rpc.start_server(
            self,
            self.config.listen,
            interceptors=sec.server_interceptors(),
            credentials=sec.server_credentials,
            extra_handlers=[store_server.generic_handler(store_server.StoreServer(self.store))],
        )
        if warning := security.exposure_warning(self.config.listen, sec):
            log.warning("%s", warning)
        host = self.config.listen.rpartition(":")[0]
        self.address = self.config.advertise or f"{host}:{port}"
        rank = self.config.rank
        if rank < 0 and self.topology is not None and self.topology.labels is not None:
            if self.address not in self.topology.labels:
                raise ConfigError(f"address {self.address} is not a node of the graph file")
            rank = self.topology.labels.index(self.address)
            self.config.rank = rank
        me = wire.MemberRecord(
            node_id=self.node_id,
            address=self.address,
            incarnation=time.time_ns(),
            heartbeat=0,
            rank=rank,
            fingerprint=self.flat.fingerprint,
        )
        self.membership = Membership(me, self.config.membership)
        self.phase = "joining"
        try:
            if self.config.peers:
                await self._join()
        except BaseException:
            await self._server.stop(0)
            raise
        self.phase = "running"
        self._spawn(self._membership_loop())
        self.store.start(self._store_view, self._spawn)
        log.info("node %s listening on %s (rank %d)", self.node_id, self.address, rank)

    async def stop(self, leave: bool = True) -> None:
        """Leave gracefully: tell peers, let an exchange in flight end or abandon it, stop serving."""
        if self.phase in ("stopped", "leaving"):
            return
        self.phase = "leaving"
        deadline = time.monotonic() + min(2.0, self.config.gossip.exchange_timeout)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy:
                    break
                if not self._training:
                    self._apply_pending_locked()
            await asyncio.sleep(0.01)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with self._lock:
            self._apply_pending_locked()
        if leave and self.membership is not None:
            await self.store.hand_off(timeout=5.0)
            req = pb.LeaveRequest(node_id=self.node_id, incarnation=self.membership.me.incarnation)
            targets = [m.address for m in self.membership.members.values() if m.state in ("alive", "suspect")]
            await asyncio.gather(
                *(self._client.leave(a, req, self.config.rpc_timeout / 2) for a in targets),
                return_exceptions=True,
            )
        if self._server is not None:
            await self._server.stop(0.5)
        await self._client.close()
        self.phase = "stopped"
        log.info("node %s stopped", self.node_id)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
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
        g = self.config.gossip
        self._training = True
        with self._lock:
            self._apply_pending_locked()
            self._step += n
            wait_own = self._own_inflight and self._step - self._launched_step >= g.max_lag
            wait_in = self._incoming_inflight and self._step - self._incoming_step >= g.max_lag
        if wait_own or wait_in:
            (self._own_done if wait_own else self._incoming_done).wait(self._deadline() + 1.0)
            with self._lock:
                self._apply_pending_locked()
        launch = False
        with self._lock:
            if self.phase == "running" and not self._busy and self._step % g.gossip_every == 0:
                self._claim_own_exchange_locked()
                launch = True
        if launch and self._loop is not None:
            self._loop.call_soon_threadsafe(self._launch_exchange)
        self._maybe_publish(final=False)

    def gossip_now(self) -> bool:
        """Start an averaging-only exchange now (from the event loop, when nobody trains)."""
        with self._lock:
            if self.phase != "running" or self._busy or self._training:
                return False
            self._claim_own_exchange_locked()
        self._launch_exchange()
        return True

    def _claim_own_exchange_locked(self) -> None:
        """Hold the busy flag for an exchange of our own, from a snapshot taken now."""
        self._busy = True
        self._own_inflight = True
        self._own_done.clear()
        self._launched_step = self._step
        self._snap.copy_(self.flat)

    async def wait_own_exchange(self) -> None:
        """Wait (from the event loop) until this node's own exchange in flight has ended."""
        while self._own_inflight:
            await asyncio.sleep(0.002)

    def finish_training(self) -> None:
        """Training is over: averaging results are applied by the node itself from now on."""
        self._maybe_publish(final=True)
        with self._lock:
            self._training = False
            self._apply_pending_locked()

    def _maybe_publish(self, final: bool) -> None:
        """Hand a snapshot to the store when this node publishes the version due now.

        Copied here, between two optimizer steps, so the snapshot is one step's
        model and not a mix of two.
        """
        version = self.store.publish_due(self._step, final=final)
        if version is None or self._loop is None or self.phase != "running":
            return
        with self._lock:
            snap, step = self.flat.clone(), self._step
        self._loop.call_soon_threadsafe(self.store.start_publish, snap, version, step)

    def load_params(self, flat: FlatParams) -> None:
        """Replace the model's values by ``flat``'s (same layout), e.g. a snapshot from the store."""
        if flat.fingerprint != self.flat.fingerprint:
            raise LayoutError("the snapshot is of another model: its layout fingerprint differs")
        with self._lock:
            self.flat.copy_(flat)

    def _store_view(self) -> list[tuple[str, str, bytes, bool]]:
        """The store's members: every one not known dead, this node included, and whether it is alive."""
        assert self.membership is not None
        live = [m for m in self.membership.members.values() if m.state in ("alive", "suspect")]
        return [(self.node_id, self.address, self.flat.fingerprint, True)] + [
            (m.node_id, m.address, m.fingerprint, m.state == "alive") for m in live
        ]

    @property
    def step_count(self) -> int:
        return self._step

    def _apply_pending_locked(self) -> None:
        pending, self._pending = self._pending, []
        for apply in pending:
            apply()

    def _deliver(self, apply: Callable[[], None]) -> None:
        """Queue an averaging result for the training thread, or apply it now when nobody trains."""
        with self._lock:
            self._pending.append(apply)
            if not self._training:
                self._apply_pending_locked()

    def _own_finished(self) -> None:
        self._own_inflight = False
        self._own_done.set()

    def _launch_exchange(self) -> None:
        if self.phase != "running":
            with self._lock:
                self._busy = False
            self._own_finished()
            return
        if self.config.gossip.strategy == "pairwise":
            self._spawn(self._initiate_pairwise())
        else:
            self._spawn(self._initiate_push())

    # --- neighbour choice --------------------------------------------------------------

    def neighbours(self) -> list[wire.MemberRecord]:
        """Alive members that the topology lets this node talk to now (same model layout only)."""
        assert self.membership is not None
        now = time.monotonic()
        alive = [
            m
            for m in self.membership.alive()
            if m.fingerprint == self.flat.fingerprint and self._avoid.get(m.node_id, 0.0) <= now
        ]
        if self.topology is None:
            return alive
        if self.config.gossip.strategy == "push-sum":
            ranks = set(self.topology.out_neighbors(self.config.rank, self._round))
        else:
            ranks = set(self.topology.neighbors(self.config.rank, self._round))
        return [m for m in alive if m.rank in ranks]

    def _pick(self, exclude: set[str]) -> wire.MemberRecord | None:
        cands = [m for m in self.neighbours() if m.node_id not in exclude]
        return self._rng.choice(cands) if cands else None

    def _deadline(self) -> float:
        return self.config.gossip.exchange_timeout + 2 * self.flat.nbytes / _DEADLINE_BYTES_PER_S

    def _failed(self, peer: wire.MemberRecord, exc: Exception) -> None:
        self.stats.exchanges_failed += 1
        self._avoid[peer.node_id] = time.monotonic() + self.config.gossip.avoid_after_failure
        log.warning("exchange with %s (%s) failed: %s", peer.node_id, peer.address, exc)

    # --- pairwise push-pull: caller -------------------------------------------------

    async def _initiate_pairwise(self) -> None:
        """Find a free neighbour; between tries stay free for others, so collisions still mix."""
        g = self.config.gossip
        tried: set[str] = set()
        holding = True  # this attempt holds the busy flag and owns _snap
        try:
            for _ in range(g.busy_retries):
                peer = self._pick(tried)
                if peer is None:
                    tried.clear()
                    peer = self._pick(tried)
                    if peer is None:
                        break
                tried.add(peer.node_id)
                outcome = await self._exchange_with(peer)
                if outcome == "ok":
                    holding = False  # the busy flag now belongs to the delivered delta
                    return
                if outcome == "busy":
                    # Back off *free*: a neighbour that picked us meanwhile gets its exchange.
                    with self._lock:
                        self._busy = False
                    holding = False
                    await asyncio.sleep(self._rng.uniform(0, g.backoff))
                    with self._lock:
                        if self._busy or self.phase != "running":
                            return  # someone exchanged with us: this step is mixed already
                        self._busy = True
                        self._snap.copy_(self.flat)
                    holding = True
        finally:
            self._round += 1
            if holding:
                with self._lock:
                    self._busy = False
            self._own_finished()

    async def _exchange_with(self, peer: wire.MemberRecord) -> str:
        g = self.config.gossip
        codec = g.codec
        header = wire.Header(
            fingerprint=self.flat.fingerprint,
            sender=self.node_id,
            step=self._step,
            codec=codec,
            total_bytes=payload_nbytes(self.flat.layout, codec),
            chunk_bytes=g.chunk_bytes,
        )

        def detail() -> dict[str, Any]:
            return self._fault_detail(peer.node_id)

        chunks = faults.tap(
            wire.iter_chunks(encode(self._snap, codec), g.chunk_bytes),
            "pairwise.caller.mid_stream",
            detail=detail,
        )
        snap, recv = list(self._snap), list(self._recv)

        def to_delta(i: int, start: int, stop: int, other: torch.Tensor) -> None:
            # (other - own) / 2 straight from the received chunk into _recv, while it is
            # in cache: exactly averaging.pairwise_delta, without a copy or a later pass.
            torch.sub(other, snap[i][start:stop], out=recv[i][start:stop]).mul_(0.5)

        # Every element is checked (length, finiteness) as it arrives, so the commit
        # frame is sent only for an answer known to be good.
        receiver = PayloadReceiver(
            self.flat.layout,
            codec,
            out=self._recv,
            check_finite=True,
            consume=to_delta if codec == "raw" else None,
        )

        async def on_header(data: bytes) -> bool:
            reply = wire.header_from_frame(data)
            if reply.outcome == "busy":
                return False
            self._check_header(reply, codec)
            return True

        def on_chunk(data: bytes) -> bool:
            first = receiver.received == 0
            receiver.write(wire.chunk_from_frame(data))
            if first:
                faults.failpoint("pairwise.caller.reply_mid", detail)
            if receiver.received < receiver.expected:
                return False
            receiver.finish()
            faults.failpoint("pairwise.caller.before_commit", detail)
            return True

        faults.failpoint("pairwise.caller.before_send", detail)
        try:
            ok = await self._client.exchange(
                peer.address, wire.header_to_frame(header), chunks, on_header, on_chunk, self._deadline()
            )
        except (rpc.PeerError, wire.WireError, LayoutError) as exc:
            self._failed(peer, exc)
            return "failed"
        if not ok:
            self.stats.busy_replies += 1
            return "busy"
        faults.failpoint("pairwise.caller.after_commit", detail)
        self.stats.bytes_out += header.total_bytes
        self.stats.bytes_in += receiver.received
        self.stats.exchanges_ok += 1
        self._delta_ready = codec == "raw"
        self._commit_pairwise(codec)
        return "ok"

    def _commit_pairwise(self, codec: str) -> None:
        """Turn the received snapshot into the delta (other - own) / 2 and deliver it.

        A raw receive already wrote the delta into ``_recv`` chunk by chunk (and set
        ``_delta_ready``); otherwise it is computed here, in place.
        """
        if not getattr(self, "_delta_ready", False):
            if codec != "raw":
                _round_trip_codec_(self._snap, codec)
            for own, other in zip(self._snap, self._recv, strict=True):
                torch.sub(other, own, out=other).mul_(0.5)  # averaging.pairwise_delta, in place
        self._delta_ready = False

        def apply() -> None:
            for x, d in zip(self.flat, self._recv, strict=True):
                averaging.apply_delta_(x, d)
            self._busy = False

        self._deliver(apply)

    def _fault_detail(self, peer: str, **extra: float) -> dict[str, Any]:
        """What a failpoint logs of this node as it dies: the survivor's books are checked against it."""
        s = self.stats
        return {
            "node": self.node_id,
            "peer": peer,
            "step": self._step,
            "weight": self.weight,
            "ok": s.exchanges_ok,
            "served": s.exchanges_served,
            "failed": s.exchanges_failed,
            "busy_replies": s.busy_replies,
            **extra,
        }

    def _check_header(self, h: wire.Header, codec: str | None = None) -> None:
        if h.fingerprint != self.flat.fingerprint:
            raise _Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                "parameter layout fingerprint differs: not the same model",
            )
        if codec is not None and h.codec != codec:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"codec {h.codec} where {codec} was expected")
        expected = payload_nbytes(self.flat.layout, h.codec)
        if h.total_bytes != expected:
            raise _Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"payload of {h.total_bytes} bytes where the layout needs {expected}",
            )

    # --- pairwise push-pull: callee -------------------------------------------------

    async def exchange(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        timeout = self._deadline()
        try:
            first = await asyncio.wait_for(context.read(), timeout)
            if first is grpc.aio.EOF:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "empty exchange")
            header = _header_or_reject(first)
            if header.outcome:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "requests carry no outcome")
            self._check_header(header)
            if self.config.gossip.strategy != "pairwise":
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION, "this node runs push-sum, not pairwise")
        except _Reject as rej:
            await rej.abort(context, self.node_id)
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no header in time")
            return
        codec = header.codec
        with self._lock:
            declined = self._busy or self.phase != "running"
            if not declined:
                self._busy = True
                self._incoming_inflight = True
                self._incoming_done.clear()
                self._incoming_step = self._step
                if codec != "raw":
                    self._snap.copy_(self.flat)
        reply = wire.Header(
            fingerprint=self.flat.fingerprint,
            sender=self.node_id,
            step=self._step,
            codec=codec,
            total_bytes=header.total_bytes,
            chunk_bytes=self.config.gossip.chunk_bytes,
            outcome="busy" if declined else "accepted",
        )
        if declined:
            self.stats.exchanges_declined += 1
            await context.write(wire.header_to_frame(reply))
            return
        flat, snap, recv = list(self.flat), list(self._snap), list(self._recv)

        def to_delta(i: int, start: int, stop: int, other: torch.Tensor) -> None:
            # Raw: our snapshot is cut range by range as the caller's payload arrives,
            # off the path of the reply header and while the chunk is in cache. It need
            # not be one instant's copy: each element we send is the one our delta uses,
            # which is all that keeps the sum of the models exact.
            own = snap[i][start:stop]
            own.copy_(flat[i][start:stop])
            torch.sub(other, own, out=recv[i][start:stop]).mul_(0.5)  # averaging.pairwise_delta

        receiver = PayloadReceiver(
            self.flat.layout,
            codec,
            out=self._recv,
            check_finite=True,
            consume=to_delta if codec == "raw" else None,
        )

        def detail() -> dict[str, Any]:
            return self._fault_detail(header.sender)

        async def serve() -> None:
            faults.failpoint("pairwise.callee.before_send", detail)
            await context.write(wire.header_to_frame(reply))
            # The caller's whole payload first, checked chunk by chunk, then our answer:
            # one direction at a time costs less CPU than both at once on a small
            # machine, and a bad payload is refused before we send anything.
            while receiver.received < receiver.expected:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "payload ended early")
                first = receiver.received == 0
                try:
                    receiver.write(wire.chunk_from_frame(frame))
                except (wire.WireError, LayoutError) as exc:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                if first:
                    faults.failpoint("pairwise.callee.mid_stream", detail)
            try:
                receiver.finish()
            except LayoutError as exc:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            chunks = wire.iter_chunks(encode(self._snap, codec), self.config.gossip.chunk_bytes)
            for c in faults.tap(chunks, "pairwise.callee.answering", "pairwise.callee.answered", detail):
                await context.write(wire.chunk_frame(c))
            # The caller commits only after it read and checked our whole answer.
            last = await context.read()
            if last is grpc.aio.EOF:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "the caller closed without committing")
            if last != wire.COMMIT_FRAME:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "expected the commit frame after the payload")

        committed = False
        try:
            # One deadline for the whole exchange (the caller's, scaled to the payload).
            await asyncio.wait_for(serve(), timeout)
            self.stats.bytes_in += receiver.received
            self.stats.bytes_out += header.total_bytes
            self.stats.exchanges_served += 1
            committed = True
            self._delta_ready = codec == "raw"
            self._commit_pairwise(codec)
            faults.failpoint("pairwise.callee.applied", detail)
        except _Reject as rej:
            await rej.abort(context, self.node_id)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "exchange stalled")
        finally:
            if not committed:
                with self._lock:
                    self._busy = False
                # Refused, timed out, or the caller vanished (its call was cancelled).
                log.warning("exchange from %s ended without a commit; nothing applied", header.sender)
            self._incoming_inflight = False
            self._incoming_done.set()

    # --- push-sum ------------------------------------------------------------------

    async def _initiate_push(self) -> None:
        g = self.config.gossip
        peer = self._pick(set())
        delivered = False
        try:
            if peer is None:
                return
            _, w_send = averaging.push_sum_split(self.weight)
            header = wire.Header(
                fingerprint=self.flat.fingerprint,
                sender=self.node_id,
                step=self._step,
                codec=g.codec,
                total_bytes=payload_nbytes(self.flat.layout, g.codec),
                weight=w_send,
                chunk_bytes=g.chunk_bytes,
            )

            def detail() -> dict[str, Any]:
                return self._fault_detail(peer.node_id, w_send=w_send)

            chunks = faults.tap(
                wire.iter_chunks(encode(self._snap, g.codec), g.chunk_bytes),
                "push.caller.mid_stream",
                "push.caller.sent",
                detail,
            )
            faults.failpoint("push.caller.before_send", detail)
            try:
                ack = await self._client.push(
                    peer.address, wire.header_to_frame(header), chunks, self._deadline()
                )
                accepted = pb.PushAck.FromString(ack).accepted
            except (rpc.PeerError, wire.WireError) as exc:
                self._failed(peer, exc)
                return
            if not accepted:
                self.stats.busy_replies += 1
                return
            faults.failpoint("push.caller.acked", detail)

            # Keep half only now that the peer holds the other half: mass is never lost.
            # Merges (and SGD) may have moved z since the snapshot was sent, so remove
            # exactly the numerator that left, snap * w_send, from z * w. Applied between
            # steps like every result, and holding the busy flag (so _snap stays put).
            def apply() -> None:
                keep = self.weight - w_send
                for z, s in zip(self.flat, self._snap, strict=True):
                    z.mul_(self.weight / keep).sub_(s, alpha=w_send / keep)
                self.weight = keep
                self._busy = False

            self.stats.exchanges_ok += 1
            self.stats.bytes_out += header.total_bytes
            delivered = True
            self._deliver(apply)
        finally:
            self._round += 1
            if not delivered:
                with self._lock:
                    self._busy = False
            self._own_finished()

    async def push(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        timeout = self._deadline()
        if self._push_slots.locked():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many pushes in flight")
        sender, whole = "an unknown sender", False
        async with self._push_slots:
            try:
                first = await asyncio.wait_for(context.read(), timeout)
                if first is grpc.aio.EOF:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "empty push")
                header = _header_or_reject(first)
                sender = header.sender
                self._check_header(header)
                if self.config.gossip.strategy != "push-sum":
                    raise _Reject(
                        grpc.StatusCode.FAILED_PRECONDITION, "this node runs pairwise, not push-sum"
                    )
                if not header.weight > 0:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "push-sum weight must be positive")

                def detail() -> dict[str, Any]:
                    return self._fault_detail(header.sender, w_in=header.weight)

                faults.failpoint("push.callee.header", detail)
                receiver = PayloadReceiver(self.flat.layout, header.codec)
                while True:
                    frame = await asyncio.wait_for(context.read(), timeout)
                    if frame is grpc.aio.EOF:
                        break
                    first_chunk = receiver.received == 0
                    try:
                        receiver.write(wire.chunk_from_frame(frame))
                    except (wire.WireError, LayoutError) as exc:
                        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                    if first_chunk:
                        faults.failpoint("push.callee.mid_stream", detail)
                try:
                    z_in = receiver.finish()
                except LayoutError as exc:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                if not z_in.is_finite():
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "payload holds NaN or Inf")
                whole = True
            except _Reject as rej:
                await rej.abort(context, self.node_id)
                raise AssertionError("unreachable") from None
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "push stalled")
                raise AssertionError("unreachable") from None
            finally:
                if not whole:
                    # Refused, timed out, or the sender vanished (its call was cancelled).
                    log.warning("push from %s ended before it was whole and checked; nothing merged", sender)
        w_in = header.weight

        def apply() -> None:
            w_new = self.weight
            for z, zi in zip(self.flat, z_in, strict=True):
                w_new = averaging.push_sum_merge_(z, self.weight, zi, w_in)
            self.weight = w_new

        self._deliver(apply)
        faults.failpoint("push.callee.applied", detail)
        self.stats.bytes_in += receiver.received
        self.stats.exchanges_served += 1
        return bytes(pb.PushAck(accepted=True).SerializeToString())

    # --- membership --------------------------------------------------------------------

    def _table(self) -> pb.MemberTable:
        assert self.membership is not None
        return wire.table_to_pb(self.membership.me, self.membership.gossip_records())

    def _merge(self, msg: pb.MemberTable) -> None:
        assert self.membership is not None
        sender, members = wire.table_from_pb(msg)
        for node_id in self.membership.merge([sender, *members]):
            m = self.membership.members[node_id]
            if m.fingerprint and m.fingerprint != self.flat.fingerprint:
                log.warning(
                    "member %s (%s) runs a different model; it will not be picked", node_id, m.address
                )
            else:
                log.info("member %s (%s, rank %d) is alive", node_id, m.address, m.rank)

    async def _join(self) -> None:
        deadline = time.monotonic() + self.config.join_timeout
        errors: dict[str, str] = {}
        while True:
            for seed in self.config.peers:
                if seed == self.address:
                    continue
                try:
                    reply = await self._client.join(seed, self._table(), self.config.rpc_timeout)
                    self._merge(reply)
                    log.info("joined through %s", seed)
                    return
                except rpc.PeerError as exc:
                    errors[seed] = exc.code.name
                except wire.WireError as exc:
                    errors[seed] = str(exc)
            if time.monotonic() >= deadline:
                detail = ", ".join(f"{k} ({v})" for k, v in errors.items()) or "none given"
                raise JoinError(f"could not reach any seed within {self.config.join_timeout:.0f} s: {detail}")
            await asyncio.sleep(0.2)

    async def wait_for_members(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` nodes (this one included) are alive; False on timeout."""
        assert self.membership is not None
        deadline = time.monotonic() + timeout
        while len(self.membership.alive()) + 1 < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _membership_loop(self) -> None:
        """Beat, sweep and start a sync every round, on time whatever the peers do.

        A sync runs as its own task (its deadline is ``rpc_timeout``): a peer that
        accepts the call and never answers holds one of the few sync slots, not
        the heartbeat.
        """
        assert self.membership is not None
        ms = self.membership
        interval = self.config.membership.interval
        loop = asyncio.get_running_loop()
        syncing: set[str] = set()
        while True:
            pause = interval * self._rng.uniform(0.8, 1.2)
            woke = loop.time() + pause
            await asyncio.sleep(pause)
            late = loop.time() - woke
            if late > interval:
                # Paused (SIGSTOP), starved or blocked: no gossip was heard meanwhile.
                ms.discount(late)
                level = logging.WARNING if late > ms.config.suspect_after / 2 else logging.DEBUG
                log.log(level, "membership loop %.1f s late; that silence is not held against peers", late)
            ms.beat()
            for node_id in ms.sweep():
                m = ms.members[node_id]
                log.warning("member %s (%s) declared dead", node_id, m.address)
            self.store.refresh()
            if len(syncing) >= _MAX_SYNCS_IN_FLIGHT:
                continue
            address = self._sync_target()
            if address is None or address in syncing:
                continue
            syncing.add(address)
            self._spawn(self._sync_with(address, syncing))

    def _sync_target(self) -> str | None:
        """A random member to swap tables with: alive or suspect, now and then a dead one, else a seed."""
        assert self.membership is not None
        target = None
        if self._rng.random() < _PROBE_DEAD:
            target = self.membership.pick_dead(self._rng)
        if target is None:
            target = self.membership.pick_gossip_target(self._rng)
        address = target.address if target is not None else None
        if address is None and self.config.peers:
            address = self._rng.choice(self.config.peers)
        return None if address == self.address else address

    async def _sync_with(self, address: str, syncing: set[str]) -> None:
        """Swap tables with ``address``, which stays in ``syncing`` until the call ended."""
        try:
            reply = await self._client.sync(address, self._table(), self.config.rpc_timeout)
            self._merge(reply)
        except rpc.PeerError as exc:
            log.debug("member sync with %s failed: %s", address, exc.code.name)
        except wire.WireError as exc:
            log.warning("bad member table from %s: %s", address, exc)
        finally:
            syncing.discard(address)

    async def join(
        self, request: pb.MemberTable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemberTable:
        return await self.sync(request, context)

    async def sync(
        self, request: pb.MemberTable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemberTable:
        if self.membership is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is starting")
        try:
            self._merge(request)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._table()

    async def leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Empty:
        if self.membership is not None and self.membership.mark_left(request.node_id, request.incarnation):
            log.info("member %s left", request.node_id)
        return pb.Empty()

    async def status(self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]) -> pb.StatusReply:
        assert self.membership is not None
        ms = self.membership
        members = [
            pb.MemberView(
                node_id=m.node_id,
                address=m.address,
                state=wire.STATE_TO_PB[m.state],
                heartbeat=m.heartbeat,
                seconds_since_heartbeat=ms.seconds_since_heartbeat(m.node_id),
                rank=m.rank,
            )
            for m in ms.all()
        ]
        s = self.stats
        return pb.StatusReply(
            node_id=self.node_id,
            address=self.address,
            step=self._step,
            rank=self.config.rank,
            topology=self.config.gossip.topology,
            strategy=self.config.gossip.strategy,
            members=members,
            neighbours=[m.node_id for m in self.neighbours()],
            exchanges_ok=s.exchanges_ok,
            exchanges_failed=s.exchanges_failed,
            exchanges_declined=s.exchanges_declined,
            exchanges_served=s.exchanges_served,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            weight=self.weight,
            phase=self.phase,
            parameters=self.flat.numel,
            fingerprint=self.flat.fingerprint,
            uptime_seconds=time.monotonic() - self.started_at,
        )


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any], node_id: str) -> None:
        log.warning("node %s rejected a message: %s", node_id, self.message)
        with contextlib.suppress(asyncio.CancelledError):
            await context.abort(self.code, self.message)


def _header_or_reject(frame: bytes) -> wire.Header:
    try:
        return wire.header_from_frame(frame)
    except wire.WireError as exc:
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _round_trip_codec_(flat: FlatParams, codec: str) -> None:
    """Replace values by what the codec makes of them, so both sides use the same numbers."""
    wire_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[codec]
    for s in flat:
        s.copy_(s.to(wire_dtype))
