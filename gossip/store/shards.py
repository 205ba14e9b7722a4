"""Shard store, the part without a network: snapshots, manifests, what a node holds.

What a snapshot and its manifest are is :mod:`~gossip.store.manifest`.
:class:`ShardStore` is one node's holdings, with the rules every node applies
alike: manifests never change (a conflict between two manifests of one version is
settled by the smaller digest, the same everywhere), a shard is kept only if its
bytes match the digest it came with, and only the newest ``keep_versions``
versions of a model are kept.

No network and no torch: the messages are ``serde``, the
calls ``client`` and ``servicer``, publishing ``service``, repair ``repair``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gossip.config import MAX_SHARD_BYTES
from gossip.store import digests
from gossip.store.digests import DIGEST_BYTES
from gossip.store.manifest import (
    MAX_MODELS,
    MAX_SHARDS,
    MAX_VERSION,
    Manifest,
    StoreError,
    check_algorithm,
    check_model_id,
    wins,
)

ShardId = tuple[str, int, int, bytes]  # model, version, index, digest


@dataclass(frozen=True)
class ShardHeader:
    """What precedes a shard's bytes on the wire."""

    model_id: str
    version: int
    index: int
    length: int
    digest: bytes
    digest_algorithm: str


@dataclass(frozen=True)
class Holding:
    """One snapshot version as a node holds it: bit i of ``held`` set for each shard it holds."""

    model_id: str
    version: int
    manifest_digest: bytes
    held: bytes
    shards: int


@dataclass(frozen=True)
class Located:
    """What a rebuild needs from one peer: the complete snapshots it knows (newest first) and its ring."""

    model_id: str
    manifests: list[Manifest]
    members: list[tuple[str, str]]  # (node id, address), the peer itself included
    vnodes: int
    refused: list[str] = field(default_factory=list)  # why each manifest left out was refused


@dataclass(frozen=True)
class StoreInfo:
    model_id: str
    replication: int
    publish_every: int
    vnodes: int
    ring_share: float
    ring_members: int
    holdings: list[Holding]
    shards_held: int
    bytes_held: int
    shards_pending: int
    under_replicated: list[str]
    published: int
    repaired: int
    corrupt_dropped: int
    awaiting: list[tuple[int, str]] = field(default_factory=list)  # (version, publisher) due, not yet held
    finished: int = 0  # versions published in place of a publisher that went silent

    def to_json(self) -> dict[str, Any]:
        """The ``store`` part of ``gossip status --json``."""
        return {
            "model_id": self.model_id,
            "versions": sorted(
                (h.version for h in self.holdings if h.model_id == self.model_id), reverse=True
            ),
            "snapshots": [
                {
                    "model_id": h.model_id,
                    "version": h.version,
                    "shards": h.shards,
                    "shards_held": [i for i in range(h.shards) if bitmap_has(h.held, i)],
                }
                for h in self.holdings
            ],
            "shards_held": self.shards_held,
            "bytes_held": self.bytes_held,
            "shards_pending": self.shards_pending,
            "under_replicated": list(self.under_replicated),
            "replication": self.replication,
            "publish_every": self.publish_every,
            "ring_share": round(self.ring_share, 6),
            "ring_members": self.ring_members,
            "vnodes": self.vnodes,
            "published": self.published,
            "repaired": self.repaired,
            "corrupt_dropped": self.corrupt_dropped,
            "awaiting": [{"version": v, "publisher": p} for v, p in self.awaiting],
            "finished": self.finished,
        }


@dataclass
class StoreStats:
    published: int = 0
    publish_failed: int = 0
    repaired: int = 0  # shards pulled to restore a copy this node owns
    handed_off: int = 0  # copies dropped once every new owner held them
    bad_replicas_seen: int = 0  # peers' copies that did not hash to their digest
    finished: int = 0  # versions published here in place of a publisher that went silent


@dataclass
class Held:
    data: bytearray
    digest: bytes
    algorithm: str  # of digest
    received: float
    checked: float  # when the bytes last hashed to the digest


class ShardStore:
    """One node's manifests and shards. Used from one thread (the node's event loop)."""

    def __init__(
        self,
        keep_versions: int = 2,
        capacity_bytes: int = 4 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_versions = keep_versions
        self.capacity_bytes = capacity_bytes
        self.clock = clock
        self.manifests: dict[tuple[str, int], Manifest] = {}
        self.shards: dict[ShardId, Held] = {}
        self.bytes_held = 0
        self.corrupt_dropped = 0

    # --- manifests -------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted({m for m, _ in self.manifests})

    def kept(self, model_id: str) -> list[Manifest]:
        """Manifests of ``model_id``, newest first."""
        return sorted(
            (m for (mid, _), m in self.manifests.items() if mid == model_id),
            key=lambda m: m.version,
            reverse=True,
        )

    def manifest(self, model_id: str, version: int) -> Manifest | None:
        return self.manifests.get((model_id, version))

    def retired(self, model_id: str, version: int) -> bool:
        kept = self.kept(model_id)
        return len(kept) >= self.keep_versions and version < kept[-1].version

    def add_manifest(self, m: Manifest) -> str:
        """Fold a (validated) manifest in: 'new', 'same', 'replaced', 'lost', 'retired' or 'full'."""
        cur = self.manifests.get((m.model_id, m.version))
        if cur is not None:
            if cur.digest == m.digest:
                return "same"
            if not wins(m, cur):
                return "lost"
            # The shards of the manifest that lost stay until orphan_ttl: a node that saw
            # the loser first may hold the only copies of the winner's shards.
            self.manifests[(m.model_id, m.version)] = m
            return "replaced"
        if self.retired(m.model_id, m.version):
            return "retired"
        if m.model_id not in self.models() and len(self.models()) >= MAX_MODELS:
            return "full"
        self.manifests[(m.model_id, m.version)] = m
        for old in self.kept(m.model_id)[self.keep_versions :]:
            self.forget_version(old.model_id, old.version)
        return "new"

    def forget_version(self, model_id: str, version: int) -> None:
        self.manifests.pop((model_id, version), None)
        for sid in [s for s in self.shards if s[0] == model_id and s[1] == version]:
            self.drop(sid)

    # --- shards ----------------------------------------------------------------

    def check_incoming(self, h: ShardHeader) -> None:
        """Whether a shard announced by a peer may be received; raises StoreError if not."""
        model_id, version, index, length, digest = h.model_id, h.version, h.index, h.length, h.digest
        check_model_id(model_id)
        if not 0 <= version <= MAX_VERSION or not 0 <= index < MAX_SHARDS:
            raise StoreError("invalid", "version or shard index out of range")
        check_algorithm(h.digest_algorithm)
        if len(digest) != DIGEST_BYTES:
            raise StoreError("invalid", f"shard digest must be {DIGEST_BYTES} bytes")
        if not 0 < length <= MAX_SHARD_BYTES:
            raise StoreError("invalid", f"shard of {length} bytes: must be 1..{MAX_SHARD_BYTES}")
        m = self.manifests.get((model_id, version))
        if m is not None:
            if (
                index >= m.num_shards
                or m.shard_digests[index] != digest
                or m.digest_algorithm != h.digest_algorithm
                or m.shard_length(index) != length
            ):
                raise StoreError("conflict", f"shard {index} does not match the manifest of v{version}")
        elif self.retired(model_id, version):
            raise StoreError("retired", f"version {version} of {model_id} is older than the kept ones")
        if self.bytes_held + length > self.capacity_bytes:
            raise StoreError("full", f"store holds {self.bytes_held} of {self.capacity_bytes} bytes")

    def add(self, sid: ShardId, data: bytearray, algorithm: str) -> bool:
        """Keep a shard whose bytes were checked against ``sid``'s digest (by ``algorithm``);
        False if already held."""
        if sid in self.shards:
            return False
        now = self.clock()
        self.shards[sid] = Held(data, sid[3], algorithm, now, now)
        self.bytes_held += len(data)
        return True

    def drop(self, sid: ShardId) -> None:
        held = self.shards.pop(sid, None)
        if held is not None:
            self.bytes_held -= len(held.data)

    def get(self, model_id: str, version: int, index: int, digest: bytes | None = None) -> Held | None:
        """The held copy of a shard, of the kept manifest's content unless ``digest`` says otherwise."""
        if digest is None:
            m = self.manifests.get((model_id, version))
            if m is None or index >= m.num_shards:
                return None
            digest = m.shard_digests[index]
        return self.shards.get((model_id, version, index, digest))

    def holds(self, m: Manifest, index: int) -> bool:
        return (m.model_id, m.version, index, m.shard_digests[index]) in self.shards

    def bitmap(self, m: Manifest) -> bytes:
        """Bit i set when shard i of ``m`` is held (and was valid at its last check)."""
        bits = bytearray((m.num_shards + 7) // 8)
        for i in range(m.num_shards):
            if self.holds(m, i):
                bits[i // 8] |= 1 << (i % 8)
        return bytes(bits)

    def pending(self) -> list[ShardId]:
        """Shards no kept manifest refers to: a publish in progress, an abandoned one, or
        the content of a manifest that lost a conflict."""
        out = []
        for s in self.shards:
            m = self.manifests.get((s[0], s[1]))
            if m is None or s[2] >= m.num_shards or m.shard_digests[s[2]] != s[3]:
                out.append(s)
        return out

    def expire_orphans(self, ttl: float) -> int:
        now = self.clock()
        old = [s for s in self.pending() if now - self.shards[s].received > ttl]
        for s in old:
            self.drop(s)
        return len(old)

    def verify(self, sid: ShardId, digest: bytes | None = None) -> bool:
        """Check a held shard again (``digest``: its bytes' digest by its algorithm, if already
        computed); a copy that no longer matches is dropped (False)."""
        held = self.shards.get(sid)
        if held is None:
            return False
        if (digest if digest is not None else digests.digest(held.data, held.algorithm)) != sid[3]:
            self.drop(sid)
            self.corrupt_dropped += 1
            return False
        held.checked = self.clock()
        return True

    def due_for_scrub(self, max_age: float) -> list[ShardId]:
        now = self.clock()
        return [s for s, h in self.shards.items() if now - h.checked > max_age]


def bitmap_has(bits: bytes, index: int) -> bool:
    return index // 8 < len(bits) and bool(bits[index // 8] >> (index % 8) & 1)


def describe(keys: Iterable[str], limit: int = 12) -> str:
    items = list(keys)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")
