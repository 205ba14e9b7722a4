"""The Gossip service: what each call a peer makes runs on this node.

Plain async functions over bytes and frame streams (see
:mod:`gossip.transport.server`); a refusal is a
:class:`~gossip.core.errors.Refused` whose status name the transport sends.
"""

from __future__ import annotations

from collections.abc import Callable

from gossip.core.errors import Refused
from gossip.core.status import NodeStatus
from gossip.node import pairwise, pushsum
from gossip.node.members import Members
from gossip.node.protocol import Party
from gossip.transport import serde
from gossip.transport.server import Method, ServerStream, bidi, unary, upload


def methods(
    party: Party, current_members: Callable[[], Members | None], status_now: Callable[[], NodeStatus]
) -> dict[str, Method]:
    """The Gossip service of the node whose side of exchanges is ``party``."""

    def members() -> Members:
        found = current_members()
        if found is None:
            raise Refused("UNAVAILABLE", "node is starting")
        return found

    async def exchange(stream: ServerStream) -> None:
        await pairwise.answer(party, stream)

    async def push(stream: ServerStream) -> bytes:
        return await pushsum.receive(party, stream)

    async def sync(request: bytes) -> bytes:
        return await members().on_sync(request)

    async def leave(request: bytes) -> bytes:
        return await members().on_leave(request)

    async def probe(request: bytes) -> bytes:
        return await members().on_probe(request)

    async def status(request: bytes) -> bytes:
        return serde.status_to_bytes(status_now())

    return {
        "Exchange": bidi(exchange),
        "Push": upload(push),
        "Join": unary(sync),
        "Sync": unary(sync),
        "Leave": unary(leave),
        "Probe": unary(probe),
        "Status": unary(status),
    }
