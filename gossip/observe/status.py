"""Ask one node for its view of the network (``gossip status``), without loading torch."""

from __future__ import annotations

import time
from typing import Any

from gossip.core.errors import PeerError
from gossip.store.client import StoreClient
from gossip.transport.channels import GOSSIP, Channels
from gossip.transport.frames import WireError
from gossip.transport.security import Security
from gossip.transport.serde import EMPTY, status_from_bytes


async def fetch_status(
    address: str, timeout: float, sec: Security | None = None, channels: Channels | None = None
) -> dict[str, Any]:
    """The node's status (and its store's, if it runs one) as a plain dict.

    ConnectionError with one line when the node cannot be asked or does not answer
    like a gossip node. A caller that asks many nodes, again and again (the
    dashboard), passes its own ``channels`` (secured already; ``sec`` is then
    unused), which stay open.
    """
    own = channels is None
    if channels is None:
        sec = sec or Security()
        channels = Channels(sec.channel_credentials, sec.metadata)
    t0 = time.monotonic()
    try:
        reply = await channels.unary(address, GOSSIP + "Status", EMPTY, timeout)
        rtt = time.monotonic() - t0
        out = status_from_bytes(reply).to_json()
        try:
            out["store"] = (await StoreClient(channels).status(address, timeout)).to_json()
        except PeerError as exc:
            if exc.code != "UNIMPLEMENTED":  # a node without the shard store has no store part
                raise
    except PeerError as exc:
        raise ConnectionError(f"cannot reach {address}: {exc.code} {exc.details[:200]}".strip()) from None
    except WireError as exc:
        raise ConnectionError(
            f"{address} answered with something that is not a gossip status: {exc}"
        ) from None
    finally:
        if own:
            await channels.close()
    out["rtt_ms"] = round(rtt * 1000, 2)
    return out
