"""One node's part of the shard store: its view of the ring, publishing, and what its RPCs ask.

Placement is the ring's: shard ``i`` of a snapshot lives on the first R members
clockwise from its key, over every member not known dead. Nobody coordinates.
To **publish**, the owner of a version's key cuts the snapshot, pushes every
shard to its R owners (the next members clockwise stand in for one that fails)
and, once every shard is acknowledged, sends the manifest to every member: a
manifest therefore only exists for a complete snapshot. **Repair**, scrub and
handoff are in ``store_repair``; the RPCs in ``store_server``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from gossip.config import StoreConfig
from gossip.params import FlatParams
from gossip.ring import Ring
from gossip.rpc import PeerClient, PeerError
from gossip.store import (
    Holding,
    Located,
    Manifest,
    ShardHeader,
    ShardId,
    ShardStore,
    StoreError,
    StoreInfo,
    check_model_id,
    cut,
    describe,
    snapshot_key,
)
from gossip.store_repair import Repair, hash_off_loop
from gossip.store_rpc import StoreClient, transfer_timeout

log = logging.getLogger(__name__)

# node id, address, layout fingerprint of its model, whether it is alive (not suspect)
Member = tuple[str, str, bytes, bool]
_PUSH_STREAMS = 8  # shard pushes in flight while publishing: enough to keep every owner busy


class PublishError(RuntimeError):
    """A snapshot could not be placed on R owners."""


@dataclass
class StoreStats:
    published: int = 0
    publish_failed: int = 0
    repaired: int = 0  # shards pulled to restore a copy this node owns
    handed_off: int = 0  # copies dropped once every new owner held them
    bad_replicas_seen: int = 0  # peers' copies that did not hash to their digest


class StoreService:
    """Serves the ``Store`` RPCs and runs publishing and repair for one node."""

    def __init__(
        self,
        node_id: str,
        config: StoreConfig,
        peers: PeerClient,
        *,
        fingerprint: bytes = b"",
        rpc_timeout: float = 2.0,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.model_id = config.model_id or "model"
        self.fingerprint = fingerprint
        self.rpc_timeout = rpc_timeout
        self.chunk_bytes = chunk_bytes
        self.store = ShardStore(config.keep_versions, config.capacity_bytes)
        self.client = StoreClient(peers)
        self.stats = StoreStats()
        self.under_replicated: list[str] = []
        self._view: Callable[[], list[Member]] = lambda: [(node_id, "", fingerprint, True)]
        self._spawn: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.ensure_future
        self._ring = Ring([node_id], config.vnodes)
        self._pub_ring = self._ring  # members that run this node's model: they publish it
        self._ring_key: frozenset[Member] = frozenset()
        self._addresses: dict[str, str] = {}
        self._wake: asyncio.Event | None = None
        self._reserved = 0  # bytes of shards being received
        self.publishing = False
        self._queued: tuple[FlatParams, int, int] | None = None  # the snapshot due while one is placed
        self._rng = random.Random()
        self.repair = Repair(self)

    # --- lifecycle and view ----------------------------------------------------------

    def start(
        self, view: Callable[[], list[Member]], spawn: Callable[[Coroutine[Any, Any, Any]], Any]
    ) -> None:
        """Begin repairing; ``view`` lists the members not known dead, this node included."""
        self._view, self._spawn = view, spawn
        self._wake = asyncio.Event()
        self.refresh()
        spawn(self.repair.loop())

    def refresh(self) -> Ring:
        """Rebuild the rings when the membership changed (call from the event loop).

        Shards live on every member not known dead (a suspect one keeps its shards:
        moving them for a pause would cost more than waiting). Publishers are chosen
        among the alive members that run this node's model, so a version whose
        owner went silent falls to the next one within ``suspect_after``.
        """
        members = self._view()
        key = frozenset(members)
        if key == self._ring_key:
            return self._ring
        self._ring_key = key
        addresses = {m[0]: m[1] for m in members}
        if addresses != self._addresses:
            self._addresses = addresses
            self._ring = Ring(addresses, self.config.vnodes)
            self.wake()
        publishers = sorted(m[0] for m in members if m[2] == self.fingerprint and m[3])
        if publishers != list(self._pub_ring.nodes):
            self._pub_ring = Ring(publishers, self.config.vnodes)
        return self._ring

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

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
        owner = self._pub_ring.owner(snapshot_key(self.model_id, version))
        return version if owner == self.node_id else None

    def start_publish(self, flat: FlatParams, version: int, step: int) -> None:
        """Publish a snapshot copy in the background (event loop thread).

        One publish at a time; while one runs, the newest snapshot due waits and
        an older waiting one is skipped (the store keeps the newest versions anyway).
        """
        if self.publishing:
            if self._queued is not None:
                log.info("skipping v%d: v%d is newer", self._queued[1], version)
            self._queued = (flat, version, step)
            return
        self.publishing = True

        async def run() -> None:
            job: tuple[FlatParams, int, int] | None = (flat, version, step)
            try:
                while job is not None:
                    try:
                        await self.publish(*job)
                    except PublishError as exc:
                        self.stats.publish_failed += 1
                        log.warning("snapshot v%d not published: %s", job[1], exc)
                    job, self._queued = self._queued, None
            finally:
                self.publishing = False

        self._spawn(run())

    async def publish(
        self, flat: FlatParams, version: int, step: int, model_id: str | None = None
    ) -> Manifest:
        """Cut ``flat`` into shards, place each on its R owners, then spread the manifest."""
        model_id = model_id or self.model_id
        if self.store.manifest(model_id, version) is not None or self.store.retired(model_id, version):
            raise PublishError(f"{snapshot_key(model_id, version)} exists or is older than the kept versions")
        t0 = time.monotonic()
        r = self.config.replication
        manifest, shards = await asyncio.to_thread(
            cut, flat, model_id, version, self.node_id, step, self.config.shard_bytes, r
        )
        ring = self.refresh()
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
        others = [(n, a) for n, a in self._addresses.items() if n != self.node_id]
        acks = await asyncio.gather(*(self._offer_manifest(a, manifest) for _, a in others))
        holders = {self.node_id} | {n for (n, _), ok in zip(others, acks, strict=True) if ok}
        owners = ring.preference_list(manifest.key, r)
        if len(holders & set(owners)) < min(r, len(owners)):
            log.warning("manifest of %s reached %d of its %d owners", manifest.key, len(holders), len(owners))
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
        header = ShardHeader(m.model_id, m.version, index, len(data), m.shard_digests[index])
        first = [n for n in order[:want] if n not in down]
        ok = await asyncio.gather(*(self._push(n, header, data, streams, down) for n in first))
        acked = sum(ok)
        for n in order[want:]:
            if acked >= want:
                break
            if n not in down:
                acked += await self._push(n, header, data, streams, down)
        return acked >= max(1, min(want, len(ring) - len(down)))

    async def _push(
        self, node: str, h: ShardHeader, data: memoryview, streams: asyncio.Semaphore, down: set[str]
    ) -> bool:
        if node == self.node_id:
            try:
                self.store.check_incoming(h.model_id, h.version, h.index, h.length, h.digest)
            except StoreError as exc:
                log.warning("cannot keep own shard %d: %s", h.index, exc)
                return False
            self.store.add((h.model_id, h.version, h.index, h.digest), bytearray(data))
            return True
        async with streams:
            try:
                timeout = transfer_timeout(self.rpc_timeout, len(data))
                return await self.client.put_shard(self._addresses[node], h, data, self.chunk_bytes, timeout)
            except PeerError as exc:
                if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    down.add(node)
                log.info("shard %d of v%d not placed on %s: %s", h.index, h.version, node, exc)
                return False

    async def _offer_manifest(self, address: str, m: Manifest) -> bool:
        try:
            return await self.client.put_manifest(address, m, self.rpc_timeout)
        except PeerError as exc:
            log.info("manifest of %s not taken by %s: %s", m.key, address, exc)
            return False

    # --- repair (store_repair) ------------------------------------------------------------

    def _kept(self) -> list[Manifest]:
        return [m for model in self.store.models() for m in self.store.kept(model)]

    async def repair_round(self) -> None:
        await self.repair.round()

    async def hand_off(self, timeout: float) -> int:
        """Before a graceful leave: give the shards held here to the owners that take this
        node's place (see :meth:`Repair.hand_off`)."""
        return await self.repair.hand_off(timeout)

    # --- what the Store RPCs ask (store_server turns it into messages) -----------------

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
        members = [(m[0], m[1]) for m in self._view()]
        return Located(model_id, kept, members, self.config.vnodes)

    def admit(self, h: ShardHeader) -> None:
        """Reserve room for an incoming shard (StoreError if it may not come); ``release`` frees it."""
        self.store.check_incoming(h.model_id, h.version, h.index, h.length, h.digest)
        if self.store.bytes_held + self._reserved + h.length > self.store.capacity_bytes:
            raise StoreError("full", "store is full")
        self._reserved += h.length

    def release(self, h: ShardHeader) -> None:
        self._reserved -= h.length

    def keep(self, h: ShardHeader, data: bytearray) -> None:
        """Keep a received shard whose bytes hash to ``h.digest``."""
        # The manifest may have arrived (or the version retired) while the bytes travelled.
        self.store.check_incoming(h.model_id, h.version, h.index, h.length, h.digest)
        self.store.add((h.model_id, h.version, h.index, h.digest), data)

    def take_manifest(self, m: Manifest) -> str:
        outcome = self.store.add_manifest(m)
        # Repair at once only where this node owns a shard it lacks (a stand-in took it);
        # otherwise the next round is soon enough.
        if outcome in ("new", "replaced") and any(
            self.node_id in self._ring.preference_list(m.shard_key(i), m.replication)
            and not self.store.holds(m, i)
            for i in range(m.num_shards)
        ):
            self.wake()
        return outcome

    async def recheck(self, sid: ShardId) -> bool:
        """A peer says our copy is bad: hash it now; False (and dropped) if it no longer matches."""
        held = self.store.shards.get(sid)
        ok = held is not None and self.store.verify(sid, await hash_off_loop(held.data))
        if held is not None and not ok:
            log.warning("a peer reported our copy of %s v%d shard %d corrupt: dropped", *sid[:3])
            self.wake()
        return ok

    def info(self) -> StoreInfo:
        ring = self._ring
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
            under_replicated=list(self.under_replicated),
            published=self.stats.published,
            repaired=self.stats.repaired,
            corrupt_dropped=self.store.corrupt_dropped,
        )
