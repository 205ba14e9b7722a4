"""Ask one node for its view of the network (``gossip status``), without loading torch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gossip.core.errors import PeerError
from gossip.core.status import NodeStatus
from gossip.store.client import StoreClient
from gossip.store.shards import StoreInfo
from gossip.transport.channels import GOSSIP, Channels
from gossip.transport.frames import WireError
from gossip.transport.security import Security
from gossip.transport.serde import EMPTY, status_from_bytes


@dataclass(frozen=True)
class Answer:
    """One node's Status, decoded; ``store`` None when it runs no store or was not asked."""

    status: NodeStatus
    store: StoreInfo | None
    rtt_ms: float


async def ask_node(address: str, timeout: float, channels: Channels, store: bool = True) -> Answer:
    """The node's status and, if ``store``, its store's, as typed values (the dashboard's many calls).

    ConnectionError with one line when the node cannot be asked or does not answer
    like a gossip node.
    """
    t0 = time.monotonic()
    try:
        reply = await channels.unary(address, GOSSIP + "Status", EMPTY, timeout)
        rtt = time.monotonic() - t0
        status = status_from_bytes(reply)
        info = None
        if store:
            try:
                info = await StoreClient(channels).status(address, timeout)
            except PeerError as exc:
                if exc.code != "UNIMPLEMENTED":  # a node without the shard store has no store part
                    raise
    except PeerError as exc:
        raise ConnectionError(f"cannot reach {address}: {exc.code} {exc.details[:200]}".strip()) from None
    except WireError as exc:
        raise ConnectionError(
            f"{address} answered with something that is not a gossip status: {exc}"
        ) from None
    return Answer(status, info, round(rtt * 1000, 2))


async def fetch_status(address: str, timeout: float, sec: Security | None = None) -> dict[str, Any]:
    """The node's status (and its store's, if it runs one) as a plain dict.

    ConnectionError with one line when the node cannot be asked or does not answer
    like a gossip node.
    """
    sec = sec or Security()
    channels = Channels(sec.channel_credentials, sec.metadata)
    try:
        answer = await ask_node(address, timeout, channels)
    finally:
        await channels.close()
    out = answer.status.to_json()
    if answer.store is not None:
        out["store"] = answer.store.to_json()
    out["rtt_ms"] = answer.rtt_ms
    return out
