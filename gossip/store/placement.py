"""Where a node's store puts things: the rings that publishing and repair both read.

Shards live on every member not known dead (a suspect one keeps its shards:
moving them for a pause would cost more than waiting). Publishers are chosen
among the alive members that run this node's model, so a version whose owner
went silent falls to the next one within ``suspect_after``. Every node computes
the same rings from the same member ids, so nobody coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

from gossip.core.ring import Ring
from gossip.store.manifest import snapshot_key

# node id, address, layout fingerprint of its model, whether it is alive (not suspect)
Member = tuple[str, str, bytes, bool]


class Placement:
    """This node's current rings, rebuilt from the member view when it changes."""

    def __init__(self, node_id: str, fingerprint: bytes, vnodes: int) -> None:
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.vnodes = vnodes
        self.ring = Ring([node_id], vnodes)  # every member not known dead: who holds shards
        self.publishers = self.ring  # alive members running this node's model: who publishes
        self._addresses: dict[str, str] = {node_id: ""}
        self._seen: frozenset[Member] = frozenset()
        self.view: Callable[[], list[Member]] = lambda: [(node_id, "", fingerprint, True)]

    def refresh(self) -> bool:
        """Rebuild the rings if the members changed; True when the shard ring did."""
        members = self.view()
        key = frozenset(members)
        if key == self._seen:
            return False
        self._seen = key
        moved = False
        addresses = {m[0]: m[1] for m in members}
        if addresses != self._addresses:
            self._addresses = addresses
            self.ring = self.ring.rebuilt(addresses)
            moved = True
        publishers = {m[0] for m in members if m[2] == self.fingerprint and m[3]}
        if publishers == set(addresses):  # the usual case: every member runs this model, alive
            self.publishers = self.ring  # rings are immutable: one ring, built once
        else:  # the same ring back when its members did not change
            self.publishers = self.publishers.rebuilt(publishers)
        return moved

    def address(self, node: str) -> str | None:
        """A member's address, or None once it is no longer in the view (declared dead meanwhile)."""
        return self._addresses.get(node)

    def peers(self) -> list[tuple[str, str]]:
        """(id, address) of every other member in the view."""
        return [(n, a) for n, a in self._addresses.items() if n != self.node_id]

    def members(self) -> list[tuple[str, str]]:
        """(id, address) of every member in the view, this node included."""
        return list(self._addresses.items())

    def publisher(self, model_id: str, version: int) -> str | None:
        return self.publishers.owner(snapshot_key(model_id, version))
