"""Shard store, the part without a network: snapshots, manifests, what a node holds.

A snapshot of a model is its flat parameter buffer (every dtype segment, in
order) cut into shards of ``shard_bytes``, plus an immutable manifest that names
the model, the version, the publisher, the layout, the digest of every shard
by the algorithm it names (:mod:`~gossip.store.digests`) and their root (the
sha256 of those digests). Shard ``i`` of version ``v`` lives on the R ring owners
of ``shard_key(model, v, i)``; the publisher of ``v`` is the owner of
``snapshot_key(model, v)``. :class:`ShardStore` is one node's holdings, with the
rules every node applies alike: manifests never change (a conflict between two
manifests of one version is settled by the smaller digest, the same everywhere),
a shard is kept only if its bytes match the digest it came with, and only the
newest ``keep_versions`` versions of a model are kept.

No network and no torch: the messages are ``serde``, the
calls ``client`` and ``servicer``, publishing ``service``, repair ``repair``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gossip.config import MAX_SHARD_BYTES, MAX_STORE_ID_CHARS, StoreConfig
from gossip.core.errors import Refused
from gossip.core.layout import Layout, LayoutError
from gossip.store import digests
from gossip.store.digests import DIGEST_BYTES

__all__ = ["Manifest", "ShardStore", "StoreConfig", "StoreError", "cut"]

MAX_SHARDS = 65536  # 64 GiB at the default shard size; keeps a manifest under the 4 MiB message limit
MAX_LAYOUT_JSON = 2 << 20
MAX_ID_CHARS = MAX_STORE_ID_CHARS
MAX_MODELS = 64  # models one node keeps snapshots of: bounds what peers can make it hold
MAX_REPLICATION = 16
MAX_VERSION = (1 << 63) - 1


# Why the store refuses something, and the status a refused call ends with.
STATUS_OF = {
    "invalid": "INVALID_ARGUMENT",  # malformed
    "conflict": "FAILED_PRECONDITION",  # contradicts what is held
    "retired": "FAILED_PRECONDITION",  # a version older than the kept ones
    "full": "RESOURCE_EXHAUSTED",  # over capacity
    "missing": "NOT_FOUND",  # not held
}


class StoreError(Refused, ValueError):
    """A request the store refuses; ``kind`` says why and sets the status of a refused call."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(STATUS_OF[kind], message)
        self.kind = kind


def check_model_id(model_id: str) -> None:
    if not 0 < len(model_id) <= MAX_ID_CHARS or not model_id.isprintable() or "/" in model_id:
        raise StoreError("invalid", f"model id must be 1-{MAX_ID_CHARS} printable characters without '/'")


def snapshot_key(model_id: str, version: int) -> str:
    """The ring key of a snapshot: its owner publishes it."""
    return f"{model_id}/v{version}"


def shard_key(model_id: str, version: int, index: int) -> str:
    return f"{model_id}/v{version}/s{index}"


def check_algorithm(name: str) -> None:
    """Refuse a digest algorithm this node cannot check (StoreError 'invalid')."""
    if name not in digests.ALGORITHMS:
        raise StoreError(
            "invalid",
            f"unknown digest algorithm {name[:40]!r}: this node checks {', '.join(digests.ALGORITHMS)}",
        )


@dataclass(frozen=True)
class Manifest:
    model_id: str
    version: int
    publisher: str
    step: int
    layout_json: str
    shard_bytes: int
    total_bytes: int
    shard_digests: tuple[bytes, ...]
    digest_algorithm: str  # of shard_digests, one of digests.ALGORITHMS
    sha256: bytes  # digests.root(shard_digests, digest_algorithm): a sha256 whatever the algorithm
    replication: int
    fingerprint: bytes

    @property
    def num_shards(self) -> int:
        return len(self.shard_digests)

    @property
    def key(self) -> str:
        return snapshot_key(self.model_id, self.version)

    def shard_key(self, index: int) -> str:
        return shard_key(self.model_id, self.version, index)

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_bytes
        return start, min(start + self.shard_bytes, self.total_bytes)

    def shard_length(self, index: int) -> int:
        start, stop = self.shard_range(index)
        return stop - start

    @cached_property
    def layout(self) -> Layout:
        return Layout.from_json(json.loads(self.layout_json))

    @cached_property
    def digest(self) -> bytes:
        """Identity of the manifest: equal digests, equal snapshots."""
        # The root covers the digest algorithm (see digests.root).
        canon = json.dumps(
            [
                self.model_id,
                self.version,
                self.publisher,
                self.step,
                self.layout_json,
                self.shard_bytes,
                self.total_bytes,
                [d.hex() for d in self.shard_digests],
                self.sha256.hex(),
                self.replication,
                self.fingerprint.hex(),
            ],
            separators=(",", ":"),
        )
        return hashlib.blake2b(canon.encode(), digest_size=16).digest()

    def validate(self) -> None:
        """Check a manifest that came from elsewhere; StoreError('invalid') names the first problem."""
        check_model_id(self.model_id)
        if not 0 <= self.version <= MAX_VERSION:
            raise StoreError("invalid", f"version {self.version} out of range")
        if not 0 < len(self.publisher) <= MAX_ID_CHARS:
            raise StoreError("invalid", "manifest publisher must be a node id")
        if len(self.layout_json) > MAX_LAYOUT_JSON:
            raise StoreError(
                "invalid", f"layout of {len(self.layout_json)} characters exceeds {MAX_LAYOUT_JSON}"
            )
        if not 1 <= self.shard_bytes <= MAX_SHARD_BYTES:
            raise StoreError("invalid", f"shard size {self.shard_bytes} out of range")
        if not 1 <= self.replication <= MAX_REPLICATION:
            raise StoreError("invalid", f"replication {self.replication} out of range")
        try:
            layout = self.layout
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError and LayoutError are ValueErrors
            raise StoreError("invalid", f"manifest layout: {str(exc)[:200]}") from None
        if layout.fingerprint() != self.fingerprint:
            raise StoreError("invalid", "manifest fingerprint does not match its layout")
        if layout.nbytes != self.total_bytes:
            raise StoreError(
                "invalid", f"layout holds {layout.nbytes} bytes, manifest says {self.total_bytes}"
            )
        expected = math.ceil(self.total_bytes / self.shard_bytes)
        if expected > MAX_SHARDS:
            raise StoreError("invalid", f"{expected} shards exceed {MAX_SHARDS}")
        if self.num_shards != expected:
            raise StoreError("invalid", f"manifest lists {self.num_shards} shards, its sizes make {expected}")
        check_algorithm(self.digest_algorithm)
        if any(len(d) != DIGEST_BYTES for d in (*self.shard_digests, self.sha256)):
            raise StoreError("invalid", f"manifest digests must be {DIGEST_BYTES} bytes")
        if digests.root(self.shard_digests, self.digest_algorithm) != self.sha256:
            raise StoreError("invalid", "manifest sha256 is not the root of its shard digests")


def wins(a: Manifest, b: Manifest) -> bool:
    """Whether ``a`` beats ``b`` for the same (model, version): the same answer on every node."""
    return a.digest < b.digest


def cut(
    data: memoryview,
    layout: Layout,
    model_id: str,
    version: int,
    publisher: str,
    step: int,
    shard_bytes: int,
    replication: int,
    algorithm: str = digests.DEFAULT,
) -> tuple[Manifest, list[memoryview]]:
    """A snapshot of a model's bytes ``data`` (its flat buffer, see ``FlatParams.concat_bytes``):
    its manifest and its shards (views into ``data``, no copies), digested by ``algorithm``."""
    check_algorithm(algorithm)
    if len(data) != layout.nbytes:
        raise LayoutError(f"{len(data)} bytes where the layout needs {layout.nbytes}")
    shards = [data[s : s + shard_bytes] for s in range(0, len(data), shard_bytes)]
    shard_digests = tuple(digests.digest(s, algorithm) for s in shards)
    manifest = Manifest(
        model_id=model_id,
        version=version,
        publisher=publisher,
        step=step,
        layout_json=json.dumps(layout.to_json(), separators=(",", ":")),
        shard_bytes=shard_bytes,
        total_bytes=len(data),
        shard_digests=shard_digests,
        digest_algorithm=algorithm,
        sha256=digests.root(shard_digests, algorithm),
        replication=replication,
        fingerprint=layout.fingerprint(),
    )
    return manifest, shards


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
        }


@dataclass
class StoreStats:
    published: int = 0
    publish_failed: int = 0
    repaired: int = 0  # shards pulled to restore a copy this node owns
    handed_off: int = 0  # copies dropped once every new owner held them
    bad_replicas_seen: int = 0  # peers' copies that did not hash to their digest


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
