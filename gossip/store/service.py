"""One node's part of the shard store: publishing, and what the store's calls ask of it.

Placement is the ring's (:mod:`~gossip.store.placement`): shard ``i`` of a
snapshot lives on the first R members clockwise from its key, over every member
not known dead. Nobody coordinates. To **publish**, the owner of a version's key
cuts the snapshot, pushes every shard to its R owners (the next members
clockwise stand in for one that fails) and, once every shard is acknowledged,
sends the manifest to every member: a manifest therefore only exists for a
complete snapshot. **Repair**, scrub and handoff are :mod:`~gossip.store.repair`;
the calls peers make, :mod:`~gossip.store.servicer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gossip.config import StoreConfig
from gossip.core.errors import PeerError
from gossip.core.params import FlatParams
from gossip.core.ring import Ring
from gossip.store import digests
from gossip.store.client import StoreClient
from gossip.store.durable import DurableStore
from gossip.store.manifest import Manifest, StoreError, check_model_id, cut, snapshot_key
from gossip.store.placement import Member, Placement
from gossip.store.repair import Repair, hash_off_loop
from gossip.store.shards import (
    Holding,
    Located,
    ShardHeader,
    ShardId,
    ShardStore,
    StoreInfo,
    StoreStats,
    describe,
)
from gossip.store.succession import Awaited
from gossip.transport.channels import DEADLINE_BYTES_PER_S, Channels, transfer_timeout

log = logging.getLogger(__name__)

_PUSH_STREAMS = 8  # shard pushes in flight while publishing: enough to keep every owner busy


class PublishError(RuntimeError):
    """A snapshot could not be placed on R owners."""


@dataclass
class _Job:
    """A snapshot waiting to be published."""

    flat: FlatParams
    version: int
    step: int
    state: FlatParams | None
    finishing: bool = False  # in place of a silent publisher (gossip.store.succession)


def snapshot_bytes(flat: FlatParams, state: FlatParams | None) -> memoryview:
    """The bytes a snapshot is cut from: the parameters, then the state (one copy when there is state)."""
    if state is None:
        return flat.concat_bytes()
    return memoryview(b"".join([*flat.byte_views(), *state.byte_views()]))


class StoreService:
    """Publishing and the store calls' answers for one node; its :attr:`repair` keeps copies whole."""

    def __init__(
        self,
        node_id: str,
        config: StoreConfig,
        channels: Channels,
        *,
        fingerprint: bytes = b"",
        rpc_timeout: float = 2.0,
        chunk_bytes: int = 1 << 20,
        send_floor: float = DEADLINE_BYTES_PER_S,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.model_id = config.model_id or "model"
        self.fingerprint = fingerprint
        self.rpc_timeout = rpc_timeout
        self.chunk_bytes = chunk_bytes
        self.send_floor = send_floor  # the throughput the deadlines of our pushes assume
        self.store = (
            DurableStore(config.data_dir, config.keep_versions, config.capacity_bytes)
            if config.data_dir
            else ShardStore(config.keep_versions, config.capacity_bytes)
        )
        self.client = StoreClient(channels)
        self.stats = StoreStats()
        self.placement = Placement(node_id, fingerprint, config.vnodes)
        self.reserved = 0  # bytes of shards being received
        self.publishing = False
        self._queued: _Job | None = None  # the snapshot due while one is placed
        # A snapshot buffer the store is done with: the node copies its next snapshot into
        # it instead of allocating (and page-faulting) a new one on the training thread.
        self.spare: FlatParams | None = None
        # Versions due from another publisher, and how to take this node's own snapshot
        # (model, step, optimizer state; None while it trains) to finish one whose publisher
        # went silent (gossip.store.succession).
        self.awaited = Awaited(config.keep_versions)
        self.snapshot_source: Callable[[], tuple[FlatParams, int, FlatParams | None] | None] | None = None
        self._spawn: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.ensure_future
        self.repair = Repair(
            node_id,
            config,
            self.store,
            self.placement,
            self.client,
            self.stats,
            rpc_timeout,
            reserved=lambda: self.reserved,
            push=self.push_shard,
        )
        self.repair.after_round = self.finish_abandoned

    # --- lifecycle and view ----------------------------------------------------------

    def start(
        self, view: Callable[[], list[Member]], spawn: Callable[[Coroutine[Any, Any, Any]], Any]
    ) -> None:
        """Load the data folder if there is one, then begin repairing; ``view`` lists the members not known dead, this node included."""
        self.placement.view, self._spawn = view, spawn
        self.refresh()
        spawn(self._run())

    async def _run(self) -> None:
        # The data folder first: a repair round before it would pull what the disk holds.
        store = self.store
        try:
            if isinstance(store, DurableStore):
                await store.load()
            await self.repair.loop()
        finally:
            if isinstance(store, DurableStore):
                await asyncio.to_thread(store.close, 5.0)  # the node is stopping: write what is queued

    def refresh(self) -> None:
        """Follow the membership (call from the event loop): a changed ring starts a repair round."""
        if self.placement.refresh():
            self.repair.wake()

    # --- publishing ------------------------------------------------------------------

    def publish_due(self, step: int, final: bool = False) -> int | None:
        """The version this node should publish after ``step`` (any thread), or None.

        Version v is the publish round ``step // publish_every`` (at the end of
        training, the round in progress). Its publisher is the owner of the
        version's key among the members running this model, so exactly one node
        publishes it while their views agree.
        """
        every = self.config.publish_every
        if every <= 0 or step <= 0:
            return None
        if final:
            if step % every == 0:
                return None  # published at that step already
            version = step // every + 1
        elif step % every:
            return None
        else:
            version = step // every
        publisher = self.placement.publisher(self.model_id, version)
        if publisher is not None and publisher != self.node_id:
            self.awaited.expect(version, publisher)
        return version if publisher == self.node_id else None

    async def finish_abandoned(self) -> None:
        """Publish the newest awaited version whose publisher went silent, when this node owns it
        now and has finished training (event loop; see gossip.store.succession). The model is
        copied on a worker thread, not on the event loop."""
        kept = self.store.kept(self.model_id)
        due = self.awaited.settle(
            lambda v: self.store.manifest(self.model_id, v) is not None,
            kept[0].version if kept else None,
            lambda v: self.placement.publisher(self.model_id, v),
            self.node_id,
        )
        if due is None or self.snapshot_source is None:
            return
        version, silent = due

        def moot() -> bool:
            # A publish runs, or the owner changed because a member joined: the publisher is still there.
            return self.publishing or any(m[0] == silent for m in self.placement.view())

        if moot():
            return
        taken = await asyncio.to_thread(self.snapshot_source)
        if taken is None:
            return  # still training: the next version supersedes the missing one
        flat, step, state = taken
        if moot() or self.store.manifest(self.model_id, version) is not None:
            self.spare = flat  # things moved, or the version arrived, while the model was copied
            return
        self.awaited.taken(version)
        log.warning(
            "publishing v%d (step %d) in place of %s, which went silent before it did", version, step, silent
        )
        self.start_publish(flat, version, step, state, finishing=True)

    def start_publish(
        self,
        flat: FlatParams,
        version: int,
        step: int,
        state: FlatParams | None = None,
        finishing: bool = False,
    ) -> None:
        """Publish a snapshot copy (and the optimizer ``state`` copied with it) in the
        background (event loop thread).

        One publish at a time; while one runs, the newest snapshot due waits and
        an older waiting one is skipped (the store keeps the newest versions anyway).
        """
        due = _Job(flat, version, step, state, finishing)
        if self.publishing:
            if self._queued is not None:
                log.info("skipping v%d: v%d is newer", self._queued.version, version)
                self.spare = self._queued.flat
            self._queued = due
            return
        self.publishing = True

        async def run() -> None:
            job: _Job | None = due
            try:
                while job is not None:
                    try:
                        await self.publish(job.flat, job.version, job.step, state=job.state)
                        self.stats.finished += job.finishing  # for a silent publisher, and placed
                    except PublishError as exc:
                        self.stats.publish_failed += 1
                        log.warning("snapshot v%d not published: %s", job.version, exc)
                    self.spare = job.flat  # placed (local copies are copies): free for the next one
                    job, self._queued = self._queued, None
            finally:
                self.publishing = False

        self._spawn(run())

    async def publish(
        self,
        flat: FlatParams,
        version: int,
        step: int,
        model_id: str | None = None,
        algorithm: str = digests.DEFAULT,
        state: FlatParams | None = None,
    ) -> Manifest:
        """Cut ``flat`` (followed by ``state``, the optimizer state, when given) into shards
        digested by ``algorithm``, place each on its R owners, then spread the manifest."""
        model_id = model_id or self.model_id
        if self.store.manifest(model_id, version) is not None or self.store.retired(model_id, version):
            raise PublishError(f"{snapshot_key(model_id, version)} exists or is older than the kept versions")
        t0 = time.monotonic()
        r = self.config.replication

        def cut_off_loop() -> tuple[Manifest, list[memoryview]]:
            return cut(
                snapshot_bytes(flat, state),  # a copy when there is state: off the event loop
                flat.layout,
                model_id,
                version,
                self.node_id,
                step,
                self.config.shard_bytes,
                r,
                algorithm,
                None if state is None else state.layout,
            )

        manifest, shards = await asyncio.to_thread(cut_off_loop)
        self.refresh()
        ring = self.placement.ring
        want = min(r, len(ring))
        streams = asyncio.Semaphore(_PUSH_STREAMS)
        down: set[str] = set()
        placed = await asyncio.gather(
            *(self._place(manifest, i, s, ring, want, streams, down) for i, s in enumerate(shards))
        )
        short = [manifest.shard_key(i) for i, ok in enumerate(placed) if not ok]
        if short:
            raise PublishError(f"{describe(short)} could not be placed on {want} members")
        self.store.add_manifest(manifest)
        others = self.placement.peers()
        acks = await asyncio.gather(*(self._offer_manifest(a, manifest) for _, a in others))
        holders = {self.node_id} | {n for (n, _), ok in zip(others, acks, strict=True) if ok}
        owners = ring.preference_list(manifest.key, r)
        reached = len(holders & set(owners))
        if reached < len(owners):
            log.warning("manifest of %s reached %d of its %d owners", manifest.key, reached, len(owners))
        self.stats.published += 1
        log.info(
            "published %s (step %d, %d shards, %d bytes) in %.3f s",
            manifest.key,
            step,
            manifest.num_shards,
            manifest.total_bytes,
            time.monotonic() - t0,
        )
        return manifest

    async def _place(
        self,
        m: Manifest,
        index: int,
        data: memoryview,
        ring: Ring,
        want: int,
        streams: asyncio.Semaphore,
        down: set[str],
    ) -> bool:
        """Push one shard to its owners; the next members clockwise stand in for failures.

        Placed once ``want`` members hold it, or, when members do not answer at all
        (``down``: crashed, not yet declared dead), every member that does: repair
        adds the missing copies once the membership has caught up.
        """
        order = ring.preference_list(m.shard_key(index), len(ring))
        header = ShardHeader(
            m.model_id, m.version, index, len(data), m.shard_digests[index], m.digest_algorithm
        )
        first = [n for n in order[:want] if n not in down]
        ok = await asyncio.gather(*(self.push_shard(n, header, data, streams, down) for n in first))
        acked = sum(ok)
        for n in order[want:]:
            if acked >= want:
                break
            if n not in down:
                acked += await self.push_shard(n, header, data, streams, down)
        return acked >= max(1, min(want, len(ring) - len(down)))

    async def push_shard(
        self, node: str, h: ShardHeader, data: memoryview, streams: asyncio.Semaphore, down: set[str]
    ) -> bool:
        """Give one copy of a shard to ``node`` (this node: keep it); False if it was not taken."""
        if node == self.node_id:
            try:
                self.store.check_incoming(h)
            except StoreError as exc:
                log.warning("cannot keep own shard %d: %s", h.index, exc)
                return False
            self.store.add((h.model_id, h.version, h.index, h.digest), bytearray(data), h.digest_algorithm)
            return True
        address = self.placement.address(node)
        if address is None:  # declared dead since the ring was read
            down.add(node)
            return False
        async with streams:
            try:
                timeout = transfer_timeout(self.rpc_timeout, len(data), self.send_floor)
                return await self.client.put_shard(address, h, data, self.chunk_bytes, timeout)
            except PeerError as exc:
                if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    down.add(node)
                log.info("shard %d of v%d not placed on %s: %s", h.index, h.version, node, exc)
                return False

    async def _offer_manifest(self, address: str, m: Manifest) -> bool:
        try:
            return await self.client.put_manifest(address, m, self.rpc_timeout)
        except PeerError as exc:
            log.info("manifest of %s not taken by %s: %s", m.key, address, exc)
            return False

    async def hand_off(self, timeout: float) -> int:
        """Before a graceful leave: give the shards held here to the owners that take this
        node's place (see :meth:`Repair.hand_off`)."""
        return await self.repair.hand_off(timeout)

    # --- what the store's calls ask (the servicer turns it into messages) -----------------

    def _kept(self) -> list[Manifest]:
        return [m for model in self.store.models() for m in self.store.kept(model)]

    def holdings(self) -> list[Holding]:
        return [
            Holding(m.model_id, m.version, m.digest, self.store.bitmap(m), m.num_shards) for m in self._kept()
        ]

    def locate(self, model_id: str) -> Located:
        """The complete snapshots of ``model_id`` (empty: this node's own, or the only one known)."""
        models = self.store.models()
        if not model_id:
            model_id = self.model_id if self.model_id in models or len(models) != 1 else models[0]
        check_model_id(model_id)
        kept = self.store.kept(model_id)
        if not kept:
            others = f"; it knows {', '.join(models)}" if models else ""
            raise StoreError("missing", f"{self.node_id} knows no complete snapshot of {model_id}{others}")
        return Located(model_id, kept, self.placement.members(), self.config.vnodes)

    def admit(self, h: ShardHeader) -> None:
        """Reserve room for an incoming shard (StoreError if it may not come); ``release`` frees it."""
        self.store.check_incoming(h)
        if self.store.bytes_held + self.reserved + h.length > self.store.capacity_bytes:
            raise StoreError("full", "store is full")
        self.reserved += h.length

    def release(self, h: ShardHeader) -> None:
        self.reserved -= h.length

    def keep(self, h: ShardHeader, data: bytearray) -> None:
        """Keep a received shard whose bytes hash to ``h.digest``."""
        # The manifest may have arrived (or the version retired) while the bytes travelled.
        self.store.check_incoming(h)
        self.store.add((h.model_id, h.version, h.index, h.digest), data, h.digest_algorithm)

    def take_manifest(self, m: Manifest) -> str:
        outcome = self.store.add_manifest(m)
        # Repair at once only where this node owns a shard it lacks (a stand-in took it);
        # otherwise the next round is soon enough.
        ring = self.placement.ring
        if outcome in ("new", "replaced") and any(
            self.node_id in ring.preference_list(m.shard_key(i), m.replication) and not self.store.holds(m, i)
            for i in range(m.num_shards)
        ):
            self.repair.wake()
        return outcome

    async def recheck(self, sid: ShardId) -> bool:
        """A peer says our copy is bad: hash it now; False (and dropped) if it no longer matches."""
        held = self.store.shards.get(sid)
        ok = held is not None and self.store.verify(sid, await hash_off_loop(held.data, held.algorithm))
        if held is not None and not ok:
            log.warning("a peer reported our copy of %s v%d shard %d corrupt: dropped", *sid[:3])
            self.repair.wake()
        return ok

    def info(self) -> StoreInfo:
        ring = self.placement.ring
        return StoreInfo(
            model_id=self.model_id,
            replication=self.config.replication,
            publish_every=self.config.publish_every,
            vnodes=self.config.vnodes,
            ring_share=ring.share(self.node_id),
            ring_members=len(ring),
            holdings=self.holdings(),
            shards_held=len(self.store.shards),
            bytes_held=self.store.bytes_held,
            shards_pending=len(self.store.pending()),
            under_replicated=list(self.repair.under_replicated),
            published=self.stats.published,
            repaired=self.stats.repaired,
            corrupt_dropped=self.store.corrupt_dropped,
            awaiting=self.awaited.pending(),
            finished=self.stats.finished,
        )
