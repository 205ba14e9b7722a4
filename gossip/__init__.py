"""gossip: peer-to-peer gossip-based decentralized SGD over gRPC."""

__version__ = "0.1.0"
