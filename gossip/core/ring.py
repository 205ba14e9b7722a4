"""Consistent-hash ring: virtual points per node, preference lists of R distinct nodes.

Pure code, no network. Every node computes the same ring from the same member
ids, so who stores a shard, and who publishes a snapshot version, is decided
without a coordinator. A join or a leave moves only the keys whose arcs the
changed node's points cover: about R/N of the replica sets.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

# 160 points per node, from measured balance (R=3, 40 seeds, max/mean replica load):
# 8 nodes x 256 shards: 1.20 at V=32, 1.16 at V=64, 1.14 at V=160 (p95 1.21), 1.13 at
# V=512; 8 x 1024 shards: 1.17 / 1.12 / 1.09 / 1.07. Beyond ~160 the gain is small
# and the ring (V*N points) grows. With many nodes and few shards the randomness of
# the keys themselves dominates (64 nodes x 256 shards: ~1.75 at every V).
DEFAULT_VNODES = 160


def key_hash(key: str | bytes) -> int:
    """A stable 64-bit position on the ring (blake2b: the same on every machine and Python)."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """An immutable ring over a set of node ids."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        points = sorted((key_hash(f"{node}#{i}"), node) for node in self.nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def with_node(self, node: str) -> Ring:
        return Ring((*self.nodes, node), self.vnodes)

    def without_node(self, node: str) -> Ring:
        return Ring((n for n in self.nodes if n != node), self.vnodes)

    def preference_list(self, key: str | bytes, replicas: int) -> list[str]:
        """The first ``replicas`` distinct nodes clockwise from the key (fewer if the ring is smaller)."""
        if not self.nodes:
            return []
        want = min(replicas, len(self.nodes))
        start = bisect.bisect_right(self._hashes, key_hash(key))
        out: list[str] = []
        n = len(self._owners)
        for i in range(n):
            node = self._owners[(start + i) % n]
            if node not in out:
                out.append(node)
                if len(out) == want:
                    break
        return out

    def owner(self, key: str | bytes) -> str | None:
        pref = self.preference_list(key, 1)
        return pref[0] if pref else None

    def share(self, node: str) -> float:
        """Fraction of the key space whose first owner is ``node``."""
        if node not in self.nodes:
            return 0.0
        total = 1 << 64
        owned = 0
        for i, (h, n) in enumerate(zip(self._hashes, self._owners, strict=True)):
            if n == node:
                prev = self._hashes[i - 1] if i > 0 else self._hashes[-1] - total
                owned += h - prev
        return owned / total
