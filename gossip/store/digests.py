"""The hashes that check shard bytes, by name, and a snapshot's root digest.

A manifest and every shard header name the algorithm of their digests:
``blake3`` for what this code cuts, ``sha256`` for what manifests and shards
carried before they named one (the wire's default, so those still verify). A
name outside :data:`ALGORITHMS` is refused by whoever reads it
(``manifest.check_algorithm``), never taken for another.

blake3 because it is the cheapest check that is still a cryptographic hash: on
one core here 100 MiB hashes in 24 ms against sha256's 59 ms (SHA-NI), and a
rebuild hashes every byte it receives. Its multi-threaded mode (``max_threads``)
is not used: it halves a lone 100 MiB hash, but where the store hashes, the other
core is busy already (receiving, in a rebuild; training, while publishing), and
on 1 MiB shards it gained a third at twice the CPU.

The root stays a sha256 over the shard digests in order: it hashes 32 bytes per
shard (microseconds), and the manifest's ``sha256`` field is what it says. For
any algorithm but sha256 the algorithm's name goes first, so the root pins how
the shards are checked as well as what they hold (and with it the manifest's
identity), and a node from before the field refuses such a manifest (its root
does not match) rather than read blake3 digests as sha256. A sha256 root is
what it always was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import blake3

__all__ = ["ALGORITHMS", "BLAKE3", "DEFAULT", "DIGEST_BYTES", "SHA256", "Hasher", "digest", "hasher", "root"]

SHA256 = "sha256"
BLAKE3 = "blake3"
DEFAULT = BLAKE3  # what new snapshots use
DIGEST_BYTES = 32  # both algorithms' digests (blake3's default output length)


class Hasher(Protocol):
    """An incremental hash: hashlib's objects and blake3's both fit."""

    def update(self, data: Any, /) -> object: ...

    def digest(self) -> bytes: ...


_NEW: dict[str, Callable[[], Hasher]] = {SHA256: hashlib.sha256, BLAKE3: blake3.blake3}
ALGORITHMS = tuple(_NEW)


def hasher(algorithm: str) -> Hasher:
    """A fresh incremental hash of ``algorithm`` (one of :data:`ALGORITHMS`; KeyError otherwise)."""
    return _NEW[algorithm]()


def digest(data: memoryview | bytes | bytearray, algorithm: str) -> bytes:
    """The digest of ``data`` by ``algorithm``; both let go of the GIL on large buffers."""
    h = hasher(algorithm)
    h.update(data)
    return h.digest()


def root(shard_digests: Sequence[bytes], algorithm: str) -> bytes:
    """The snapshot's digest: sha256 over its shard digests in order, after the name of
    their ``algorithm`` and a zero byte unless that is sha256.

    Every shard checked against its digest pins every byte of the buffer, so the
    root needs no second pass over the data (a hash of the whole buffer would
    cost a rebuild as much again as the shard checks), and a manifest whose
    digests disagree with each other is refused on arrival, for free.
    """
    named = b"" if algorithm == SHA256 else algorithm.encode() + b"\0"
    return hashlib.sha256(named + b"".join(shard_digests)).digest()
