"""Snapshots' manifests, without a network: what a snapshot is and how it is cut.

A snapshot of a model is its flat parameter buffer (every dtype segment, in
order), optionally followed by the publisher's optimizer state and model buffers
(a second layout, ``Manifest.state_layout``), cut into shards of ``shard_bytes``,
plus an immutable manifest that names the model, the version, the publisher, the
layouts, the digest of every shard by the algorithm it names
(:mod:`~gossip.store.digests`) and their root (the sha256 of those digests).
Shard ``i`` of version ``v`` lives on the R ring owners of
``shard_key(model, v, i)``; the publisher of ``v`` is the owner of
``snapshot_key(model, v)``. Manifests never change: a conflict between two
manifests of one version is settled by the smaller digest (:func:`wins`), the same
everywhere. The holdings are :mod:`~gossip.store.shards`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property

from gossip.config import MAX_SHARD_BYTES, MAX_STORE_ID_CHARS
from gossip.core.errors import Refused
from gossip.core.layout import STATE_BUFFER, STATE_PREFIXES, Layout, LayoutError
from gossip.store import digests
from gossip.store.digests import DIGEST_BYTES

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
    # The layout of what follows the parameters' bytes: the publisher's optimizer state
    # and model buffers (names under gossip.core.layout's STATE_ prefixes); "" for none.
    state_layout_json: str = ""

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
    def state_layout(self) -> Layout | None:
        """The layout of the state after the parameters, or None when the snapshot has none."""
        return Layout.from_json(json.loads(self.state_layout_json)) if self.state_layout_json else None

    @property
    def params_bytes(self) -> int:
        """Bytes of the parameters: the buffer's first part, the state follows."""
        return self.layout.nbytes

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
                # Only when present, so manifests without state keep the digest they had.
                *([self.state_layout_json] if self.state_layout_json else []),
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
        for text in (self.layout_json, self.state_layout_json):
            if len(text) > MAX_LAYOUT_JSON:
                raise StoreError("invalid", f"layout of {len(text)} characters exceeds {MAX_LAYOUT_JSON}")
        if not 1 <= self.shard_bytes <= MAX_SHARD_BYTES:
            raise StoreError("invalid", f"shard size {self.shard_bytes} out of range")
        if not 1 <= self.replication <= MAX_REPLICATION:
            raise StoreError("invalid", f"replication {self.replication} out of range")
        try:
            layout = self.layout
            state = self.state_layout
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError and LayoutError are ValueErrors
            raise StoreError("invalid", f"manifest layout: {str(exc)[:200]}") from None
        if layout.fingerprint() != self.fingerprint:
            raise StoreError("invalid", "manifest fingerprint does not match its layout")
        if state is not None and not all(e.name.startswith(STATE_PREFIXES) for e in state.entries):
            raise StoreError("invalid", f"state layout names must start with {' or '.join(STATE_PREFIXES)}")
        if state is not None:
            params = {e.name for e in layout.entries}
            if any(e.name.removeprefix(STATE_BUFFER) in params for e in state.entries):
                raise StoreError("invalid", "a buffer of the state layout has a parameter's name")
        nbytes = layout.nbytes + (state.nbytes if state is not None else 0)
        if nbytes != self.total_bytes:
            raise StoreError("invalid", f"layouts hold {nbytes} bytes, manifest says {self.total_bytes}")
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
    state: Layout | None = None,
) -> tuple[Manifest, list[memoryview]]:
    """A snapshot of a model's bytes ``data`` (its flat buffer, see ``FlatParams.concat_bytes``,
    followed by the bytes of ``state`` when given): its manifest and its shards (views into
    ``data``, no copies), digested by ``algorithm``."""
    check_algorithm(algorithm)
    need = layout.nbytes + (state.nbytes if state is not None else 0)
    if len(data) != need:
        raise LayoutError(f"{len(data)} bytes where the layouts need {need}")
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
        state_layout_json="" if state is None else json.dumps(state.to_json(), separators=(",", ":")),
    )
    return manifest, shards
