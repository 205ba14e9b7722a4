"""gossip: peer-to-peer gossip-based decentralized SGD over gRPC.

``Node`` (async) and ``BackgroundNode`` (sync) put an existing model on the
network; ``NodeConfig`` and ``GossipConfig`` configure them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BackgroundNode", "GossipConfig", "Node", "NodeConfig"]

if TYPE_CHECKING:
    from gossip.api import BackgroundNode
    from gossip.config import GossipConfig, NodeConfig
    from gossip.node.node import Node


def __getattr__(name: str) -> Any:
    # Lazy: `import gossip` stays cheap; torch and grpc load on first use.
    if name == "BackgroundNode":
        from gossip.api import BackgroundNode

        return BackgroundNode
    if name in ("GossipConfig", "NodeConfig"):
        from gossip import config

        return getattr(config, name)
    if name == "Node":
        from gossip.node.node import Node

        return Node
    raise AttributeError(f"module 'gossip' has no attribute {name!r}")
