"""The ``gossip.proto.Store`` service of one node: each call a peer makes, as a plain function.

Every request is checked before it reaches the store: manifests through
``serde`` (the layout through ``Layout.from_json``), shard headers against the
manifest and the capacity before a byte is buffered, shard bytes against their
digest, by the algorithm the header names, before they are kept. A refused request ends with the status of its
:class:`StoreError` (INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
NOT_FOUND) or DEADLINE_EXCEEDED, and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

from gossip.store import serde
from gossip.store.manifest import MAX_MODELS, StoreError
from gossip.store.repair import hash_off_loop
from gossip.store.service import StoreService
from gossip.store.shards import ShardHeader
from gossip.transport.channels import transfer_timeout
from gossip.transport.frames import WireError, chunk_frame, chunk_from_frame
from gossip.transport.server import Method, ServerStream, download, unary, upload

log = logging.getLogger(__name__)


def methods(svc: StoreService) -> dict[str, Method]:
    """The Store service of the node whose store is ``svc``."""

    async def put_shard(stream: ServerStream) -> bytes:
        first = await asyncio.wait_for(stream.read(), svc.rpc_timeout)
        if first is None:
            raise StoreError("invalid", "empty shard stream")
        h = serde.shard_header_from_frame(first)
        svc.admit(h)
        try:
            data = await asyncio.wait_for(
                receive_shard(stream, h), transfer_timeout(svc.rpc_timeout, h.length)
            )
            svc.keep(h, data)
        finally:
            svc.release(h)
        return serde.ack_to_bytes(True)

    async def get_shards(request: bytes, stream: ServerStream) -> None:
        step = svc.chunk_bytes
        for model_id, version, index, digest in serde.shards_request_from_bytes(request):
            held = svc.store.get(model_id, version, index, digest)
            if held is None:
                continue  # the caller asks another owner for it
            data = memoryview(held.data)
            await stream.write(
                serde.shard_header_frame(
                    ShardHeader(model_id, version, index, len(data), held.digest, held.algorithm)
                )
            )
            for start in range(0, len(data), step):
                await stream.write(chunk_frame(data[start : start + step]))

    async def put_manifest(request: bytes) -> bytes:
        m = serde.manifest_from_bytes(request)
        outcome = svc.take_manifest(m)
        if outcome == "lost":
            raise StoreError("conflict", f"{m.key}: another manifest of this version wins")
        if outcome == "retired":
            raise StoreError("retired", f"{m.key} is older than the versions kept")
        if outcome == "full":
            raise StoreError("full", f"this node keeps snapshots of {MAX_MODELS} models at most")
        return serde.ack_to_bytes(True)

    async def get_manifest(request: bytes) -> bytes:
        model_id, version = serde.manifest_request_from_bytes(request)
        m = svc.store.manifest(model_id, version)
        if m is None:
            raise StoreError("missing", f"no manifest of v{version} here")
        return serde.manifest_to_bytes(m)

    async def locate(request: bytes) -> bytes:
        return serde.located_to_bytes(svc.locate(serde.locate_request_from_bytes(request)))

    async def holdings(request: bytes) -> bytes:
        return serde.holdings_to_bytes(svc.holdings())

    async def report(request: bytes) -> bytes:
        return serde.ack_to_bytes(await svc.recheck(serde.shard_ref_from_bytes(request)))

    async def status(request: bytes) -> bytes:
        return serde.info_to_bytes(svc.info())

    return {
        "PutShard": upload(put_shard, quiet=True),
        "GetShards": download(get_shards, quiet=True),
        "PutManifest": unary(put_manifest, quiet=True),
        "GetManifest": unary(get_manifest, quiet=True),
        "Locate": unary(locate, quiet=True),
        "Holdings": unary(holdings, quiet=True),
        "Report": unary(report, quiet=True),
        "Status": unary(status, quiet=True),
    }


async def receive_shard(stream: ServerStream, header: ShardHeader) -> bytearray:
    """The chunks after ``header``: exactly ``header.length`` bytes, hashing to its digest
    by its algorithm (checked known by ``admit``)."""
    buf = bytearray(header.length)
    view = memoryview(buf)
    got = 0
    while (frame := await stream.read()) is not None:
        try:
            chunk = chunk_from_frame(frame)
        except WireError as exc:
            raise StoreError("invalid", str(exc)) from None
        if got + len(chunk) > len(buf):
            raise StoreError("invalid", f"shard longer than the {len(buf)} bytes announced")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    if got != len(buf):
        raise StoreError("invalid", f"shard has {got} bytes, {len(buf)} announced")
    if await hash_off_loop(buf, header.digest_algorithm) != header.digest:
        raise StoreError("invalid", "shard bytes do not match the announced digest")
    return buf
