"""Generated protobuf and gRPC stubs; regenerate with ``python -m gossip.proto.regen``."""
