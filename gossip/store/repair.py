"""Repair, scrub and handoff of one node's shards (the other half of ``service``).

Every ``repair_interval`` seconds, and at once when the membership changes, a
node asks a bounded set of members which versions and shards they hold (one
small Holdings call each): for every shard it owns or holds, that shard's
R owners and the next member on the ring (the owner before this node took the
range over), plus ``ANTI_ENTROPY_PEERS`` members drawn at random. The set
depends on the shards a node has, not on N: a node of a large cluster owns
fewer of them, so it asks fewer. Then it:

- takes the manifests it lacks, or one that wins a conflict (anti-entropy,
  epidemic through the random draws: every member holds every kept manifest,
  so one round finds a missed one);
- pulls every shard it owns but lacks from a holder, other owners first;
- drops a copy it holds but no longer owns once all the owners hold it: with
  the pulls of the new owners, that is the handoff after a membership change;
- pushes a copy it holds but no longer owns to the owners when none of them
  holds it (after many members changed at once, the holders may be no owner's
  neighbour): the owners then have it within one round of the holder's;
- re-hashes the shards it has not checked for ``scrub_interval`` seconds and
  drops a copy that no longer matches its digest, so the next round pulls a
  good one;
- records the shards with fewer than R copies among their owners, for status.

Before a graceful leave, :meth:`Repair.hand_off` pushes every shard held here
to the owners that take this node's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from gossip.config import StoreConfig
from gossip.core.errors import PeerError
from gossip.core.ring import Ring
from gossip.store import digests
from gossip.store.client import StoreClient
from gossip.store.manifest import Manifest
from gossip.store.placement import Placement
from gossip.store.shards import Holding, ShardHeader, ShardStore, StoreStats, bitmap_has
from gossip.transport.channels import transfer_timeout

log = logging.getLogger(__name__)

# Push one shard copy to a node: (node, header, bytes, stream limit, nodes found down) -> placed.
PushShard = Callable[[str, ShardHeader, memoryview, asyncio.Semaphore, set[str]], Awaitable[bool]]

_PULL_STREAMS = 4  # repair pulls in flight: repair yields to training and exchanges
_PUSH_STREAMS = 8  # handoff pushes in flight before a leave
_HASH_INLINE = 1 << 20  # hash larger buffers on a worker thread, off the event loop
# Members asked at random each round besides the ones that share a shard with this node:
# manifests travel by them, and a stray copy is found by them too.
ANTI_ENTROPY_PEERS = 3


async def hash_off_loop(data: bytearray | memoryview, algorithm: str) -> bytes:
    if len(data) <= _HASH_INLINE:
        return digests.digest(data, algorithm)
    return await asyncio.to_thread(digests.digest, data, algorithm)


class Repair:
    """Scrub, anti-entropy, pulls and handoff for one node's :class:`ShardStore`."""

    def __init__(
        self,
        node_id: str,
        config: StoreConfig,
        store: ShardStore,
        placement: Placement,
        client: StoreClient,
        stats: StoreStats,
        rpc_timeout: float,
        reserved: Callable[[], int],
        push: PushShard,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.store = store
        self.placement = placement
        self.client = client
        self.stats = stats
        self.rpc_timeout = rpc_timeout
        self.reserved = reserved  # bytes of shards being received
        self.push = push
        self.under_replicated: list[str] = []
        self.after_round: Callable[[], Awaitable[None]] | None = None  # what the store does after each round
        self._wake = asyncio.Event()
        self._rng = random.Random()

    def wake(self) -> None:
        """Start a round now (a membership change, a manifest naming a shard this node lacks)."""
        self._wake.set()

    async def loop(self) -> None:
        while True:
            interval = self.config.repair_interval * self._rng.uniform(0.8, 1.2)
            # Not wait_for: on Python 3.11 a cancel that meets its timeout becomes a
            # TimeoutError, and this loop would outlive the node's stop.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([waiter], timeout=interval)
            finally:
                waiter.cancel()
            self._wake.clear()
            await self.round()
            try:
                if self.after_round is not None:
                    await self.after_round()
            except Exception:  # the repair loop must outlive any one round's follow-up
                log.exception("after a repair round")

    async def round(self) -> None:
        """One round of scrub, anti-entropy, pulls and handoff (see the module docstring)."""
        self.store.expire_orphans(self.config.orphan_ttl)
        await self._scrub()
        self.placement.refresh()
        ring = self.placement.ring
        around = self._around(ring, {})
        peers = self._to_ask(around)
        replies = await asyncio.gather(*(self._holdings(a) for _, a in peers))
        # (model, version, manifest digest) -> node -> bitmap of the shards it holds
        held: dict[tuple[str, int, bytes], dict[str, bytes]] = {}
        for (node, address), reply in zip(peers, replies, strict=True):
            for vh in reply or ():
                held.setdefault((vh.model_id, vh.version, vh.manifest_digest), {})[node] = vh.held
                await self._learn_manifest(address, vh)
        moves: list[Awaitable[bool]] = []
        placement: list[tuple[Manifest, int, list[str], set[str]]] = []
        streams = asyncio.Semaphore(_PULL_STREAMS)
        # Again, with the manifests learned above: the ring's answers are reused.
        known = {m.shard_key(i): nodes for m, i, nodes in around}
        for m, i, near in self._around(ring, known):
            bitmaps = held.get((m.model_id, m.version, m.digest), {})
            owners = near[: m.replication]
            others = {n for n, bits in bitmaps.items() if bitmap_has(bits, i)}
            mine = self.store.holds(m, i)
            if self.node_id in owners and not mine and others:
                moves.append(self._pull(m, i, owners, others, streams))
            elif mine and self.node_id not in owners:
                if all(o in others for o in owners):
                    self.store.drop((m.model_id, m.version, i, m.shard_digests[i]))
                    self.stats.handed_off += 1
                elif not any(o in others for o in owners):
                    moves.extend(self._give(m, i, owners, streams))
            placement.append((m, i, owners, others))
        await asyncio.gather(*moves)
        # Copies among the owners, this node's as it is now, the others' as they answered.
        self.under_replicated = [
            m.shard_key(i)
            for m, i, owners, others in placement
            if sum(1 for o in owners if o in others or (o == self.node_id and self.store.holds(m, i)))
            < len(owners)
        ]

    async def hand_off(self, timeout: float) -> int:
        """Before a graceful leave: give every shard held here to the owner that takes this
        node's place, so the leave costs no copy. Returns the shard copies pushed."""
        if not self.store.shards or len(self.placement.members()) < 2:
            return 0
        try:
            pushed = await asyncio.wait_for(self._hand_off(), timeout)
        except TimeoutError:
            log.warning("handing shards off before leaving took over %.0f s; repair does the rest", timeout)
            return 0
        log.info("handed %d shard copies to their next owners before leaving", pushed)
        return pushed

    async def _hand_off(self) -> int:
        others = dict(self.placement.peers())
        ring = Ring(others, self.config.vnodes)
        # Only the owners that take this node's place are asked what they hold.
        takers = {
            owner
            for m in self._kept()
            for i in range(m.num_shards)
            if self.store.holds(m, i)
            for owner in ring.preference_list(m.shard_key(i), m.replication)
        }
        names = [n for n in others if n in takers]
        replies = await asyncio.gather(*(self._holdings(others[n]) for n in names))
        bits = {
            (n, h.model_id, h.version, h.manifest_digest): h.held
            for n, reply in zip(names, replies, strict=True)
            for h in reply or ()
        }
        streams = asyncio.Semaphore(_PUSH_STREAMS)
        pushes = []
        for m in self._kept():
            for i in range(m.num_shards):
                held = self.store.get(m.model_id, m.version, i)
                if held is None:
                    continue
                header = ShardHeader(m.model_id, m.version, i, len(held.data), held.digest, held.algorithm)
                for owner in ring.preference_list(m.shard_key(i), m.replication):
                    if not bitmap_has(bits.get((owner, m.model_id, m.version, m.digest), b""), i):
                        pushes.append(self.push(owner, header, memoryview(held.data), streams, set()))
        return sum(await asyncio.gather(*pushes))

    def _kept(self) -> list[Manifest]:
        return [m for model in self.store.models() for m in self.store.kept(model)]

    def _around(self, ring: Ring, known: dict[str, list[str]]) -> list[tuple[Manifest, int, list[str]]]:
        """Each kept shard with its owners and the member after them (``known``: already read)."""
        return [
            (m, i, known.get(m.shard_key(i)) or ring.preference_list(m.shard_key(i), m.replication + 1))
            for m in self._kept()
            for i in range(m.num_shards)
        ]

    def _to_ask(self, around: list[tuple[Manifest, int, list[str]]]) -> list[tuple[str, str]]:
        """The members this round asks: each shard's owners and the member after them
        (``around``), for every shard this node owns or holds; and a few others at random (see
        the module docstring). Bounded by the shards held here, not by the size of the cluster."""
        near: set[str] = set()
        for m, i, nodes in around:
            if self.node_id in nodes[: m.replication] or self.store.holds(m, i):
                near.update(nodes)
        peers = self.placement.peers()
        rest = [p for p in peers if p[0] not in near]
        drawn = {n for n, _ in self._rng.sample(rest, min(ANTI_ENTROPY_PEERS, len(rest)))}
        return [p for p in peers if p[0] in near or p[0] in drawn]

    def _give(
        self, m: Manifest, index: int, owners: list[str], streams: asyncio.Semaphore
    ) -> list[Awaitable[bool]]:
        """Pushes of a copy no owner holds to each of its owners (stray copies: see the docstring)."""
        held = self.store.get(m.model_id, m.version, index)
        if held is None:
            return []
        header = ShardHeader(m.model_id, m.version, index, len(held.data), held.digest, held.algorithm)
        log.info("no owner of %s holds it; giving them this node's copy", m.shard_key(index))
        return [self.push(o, header, memoryview(held.data), streams, set()) for o in owners]

    async def _holdings(self, address: str) -> list[Holding] | None:
        try:
            return await self.client.holdings(address, self.rpc_timeout)
        except PeerError as exc:
            log.debug("holdings of %s unavailable: %s", address, exc.code)
            return None

    async def _learn_manifest(self, address: str, vh: Holding) -> None:
        """Anti-entropy: take a peer's manifest that this node lacks or that wins a conflict."""
        cur = self.store.manifest(vh.model_id, vh.version)
        if cur is not None and (cur.digest == vh.manifest_digest or cur.digest < vh.manifest_digest):
            return
        if cur is None and self.store.retired(vh.model_id, vh.version):
            return
        try:
            m = await self.client.get_manifest(address, vh.model_id, vh.version, self.rpc_timeout)
        except PeerError as exc:
            log.debug("manifest from %s unavailable: %s", address, exc)
            return
        if self.store.add_manifest(m) in ("new", "replaced"):
            log.info("learned manifest %s from %s", m.key, address)

    async def _pull(
        self, m: Manifest, index: int, owners: list[str], holders: set[str], streams: asyncio.Semaphore
    ) -> bool:
        """Fetch a shard this node owns from a holder (other owners first), checked on arrival."""
        order = [n for n in owners if n in holders] + [n for n in holders if n not in owners]
        length = m.shard_length(index)
        if self.store.bytes_held + self.reserved() + length > self.store.capacity_bytes:
            log.warning("store full: not pulling %s", m.shard_key(index))
            return False
        buf = bytearray(length)
        view = memoryview(buf)

        def dest(_: int) -> memoryview:
            return view

        async with streams:
            for node in order:
                address = self.placement.address(node)
                if address is None or node == self.node_id:
                    continue
                got = await self.client.get_shards(
                    address, m, [index], dest, transfer_timeout(self.rpc_timeout, length)
                )
                if got.corrupt:
                    self.stats.bad_replicas_seen += 1
                    await self._report(address, m, index)
                if not got.ok:
                    log.debug("pull of %s from %s failed: %s", m.shard_key(index), address, got.error)
                    continue
                if self.store.manifest(m.model_id, m.version) is not m:
                    return False  # retired or replaced while it travelled
                sid = (m.model_id, m.version, index, m.shard_digests[index])
                if self.store.add(sid, buf, m.digest_algorithm):
                    self.stats.repaired += 1
                    log.info("restored %s from %s", m.shard_key(index), node)
                return True
        return False

    async def _report(self, address: str, m: Manifest, index: int) -> None:
        with contextlib.suppress(PeerError):  # a hint only: the holder's own scrub finds it too
            await self.client.report(address, m, index, self.rpc_timeout)

    async def _scrub(self) -> None:
        for sid in self.store.due_for_scrub(self.config.scrub_interval):
            held = self.store.shards.get(sid)
            if held is not None and not self.store.verify(
                sid, await hash_off_loop(held.data, held.algorithm)
            ):
                log.warning("held copy of %s v%d shard %d was corrupt; dropped", sid[0], sid[1], sid[2])
                self.wake()
