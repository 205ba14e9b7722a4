"""The ``gossip.proto.Store`` service of one node: turns RPCs into :class:`StoreService` calls.

Every request is checked before it reaches the store: manifests through
``manifest_from_pb`` (the layout through ``Layout.from_json``), shard headers
against the manifest and the capacity before a byte is buffered, shard bytes
against their digest before they are kept. A refused request ends with a status
(INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, NOT_FOUND,
DEADLINE_EXCEEDED) and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn, TypeAlias

import grpc
import grpc.aio

from gossip import wire
from gossip.proto import store_pb2 as spb
from gossip.store import MAX_MODELS, MAX_SHARDS, Manifest, ShardHeader, ShardId, StoreError, sha256
from gossip.store_rpc import (
    SERVICE,
    STATUS_OF,
    header_frame,
    header_from_frame,
    holding_to_pb,
    info_to_pb,
    located_to_pb,
    manifest_from_pb,
    manifest_to_pb,
    transfer_timeout,
)
from gossip.store_service import StoreService

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


async def _refuse(context: Context, exc: StoreError) -> NoReturn:
    await context.abort(STATUS_OF[exc.kind], str(exc))
    raise AssertionError("unreachable")


class StoreServer:
    def __init__(self, service: StoreService) -> None:
        self.service = service

    async def put_shard(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        svc = self.service
        try:
            first = await asyncio.wait_for(context.read(), svc.rpc_timeout)
            if first is grpc.aio.EOF:
                raise StoreError("invalid", "empty shard stream")
            h = header_from_frame(first)
            svc.admit(h)
        except StoreError as exc:
            log.info("refused a shard: %s", exc)
            await _refuse(context, exc)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no shard header")
        try:
            data = await asyncio.wait_for(
                receive_shard(context, h), transfer_timeout(svc.rpc_timeout, h.length)
            )
            svc.keep(h, data)
        except StoreError as exc:
            log.info("refused a shard: %s", exc)
            await _refuse(context, exc)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "shard transfer stalled")
        finally:
            svc.release(h)
        return bytes(spb.StoreAck(stored=True).SerializeToString())

    async def get_shards(
        self, request: spb.ShardsRequest, context: grpc.aio.ServicerContext[Any, bytes]
    ) -> None:
        if len(request.indices) > MAX_SHARDS or len(request.digests) not in (0, len(request.indices)):
            await _refuse(
                context, StoreError("invalid", "too many shards, or digests that do not match them")
            )
        store, step = self.service.store, self.service.chunk_bytes
        for k, index in enumerate(request.indices):
            digest = bytes(request.digests[k]) if request.digests else None
            held = store.get(request.model_id, request.version, index, digest)
            if held is None:
                continue  # the caller asks another owner for it
            data = memoryview(held.data)
            await context.write(
                header_frame(ShardHeader(request.model_id, request.version, index, len(data), held.digest))
            )
            for start in range(0, len(data), step):
                await context.write(wire.chunk_frame(data[start : start + step]))

    async def put_manifest(self, request: spb.Manifest, context: Context) -> spb.StoreAck:
        try:
            m: Manifest = manifest_from_pb(request)
        except StoreError as exc:
            await _refuse(context, exc)
        outcome = self.service.take_manifest(m)
        if outcome == "lost":
            await _refuse(context, StoreError("conflict", f"{m.key}: another manifest of this version wins"))
        if outcome == "retired":
            await _refuse(context, StoreError("retired", f"{m.key} is older than the versions kept"))
        if outcome == "full":
            await _refuse(
                context, StoreError("full", f"this node keeps snapshots of {MAX_MODELS} models at most")
            )
        return spb.StoreAck(stored=True)

    async def get_manifest(self, request: spb.ManifestRequest, context: Context) -> spb.Manifest:
        m = self.service.store.manifest(request.model_id, request.version)
        if m is None:
            await _refuse(context, StoreError("missing", f"no manifest of v{request.version} here"))
        return manifest_to_pb(m)

    async def locate(self, request: spb.LocateRequest, context: Context) -> spb.LocateReply:
        try:
            return located_to_pb(self.service.locate(request.model_id))
        except StoreError as exc:
            await _refuse(context, exc)

    async def holdings(self, request: spb.HoldingsRequest, context: Context) -> spb.HoldingsReply:
        return spb.HoldingsReply(versions=[holding_to_pb(h) for h in self.service.holdings()])

    async def report(self, request: spb.ShardRef, context: Context) -> spb.StoreAck:
        sid: ShardId = (request.model_id, request.version, request.index, bytes(request.digest))
        return spb.StoreAck(stored=await self.service.recheck(sid))

    async def status(
        self, request: spb.StoreStatusRequest | None, context: Context | None
    ) -> spb.StoreStatusReply:
        return info_to_pb(self.service.info())


async def receive_shard(context: grpc.aio.ServicerContext[bytes, bytes], header: ShardHeader) -> bytearray:
    """The chunks after ``header``: exactly ``header.length`` bytes, hashing to its digest."""
    buf = bytearray(header.length)
    view = memoryview(buf)
    got = 0
    while True:
        frame = await context.read()
        if frame is grpc.aio.EOF:
            break
        try:
            chunk = wire.chunk_from_frame(frame)
        except wire.WireError as exc:
            raise StoreError("invalid", str(exc)) from None
        if got + len(chunk) > len(buf):
            raise StoreError("invalid", f"shard longer than the {len(buf)} bytes announced")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    if got != len(buf):
        raise StoreError("invalid", f"shard has {got} bytes, {len(buf)} announced")
    digest = sha256(buf) if len(buf) <= 1 << 20 else await asyncio.to_thread(sha256, buf)
    if digest != header.digest:
        raise StoreError("invalid", "shard bytes do not match the announced digest")
    return buf


def generic_handler(server: StoreServer) -> grpc.GenericRpcHandler:
    async def put_shard(_requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return await server.put_shard(context)

    def unary(method: Any, request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request_type.FromString, response_serializer=_ser
        )

    handlers = {
        # Raw bytes for the shard streams: the handlers read and write frames themselves.
        "PutShard": grpc.stream_unary_rpc_method_handler(put_shard, response_serializer=None),
        "GetShards": grpc.unary_stream_rpc_method_handler(
            server.get_shards, request_deserializer=spb.ShardsRequest.FromString, response_serializer=None
        ),
        "PutManifest": unary(server.put_manifest, spb.Manifest),
        "GetManifest": unary(server.get_manifest, spb.ManifestRequest),
        "Locate": unary(server.locate, spb.LocateRequest),
        "Holdings": unary(server.holdings, spb.HoldingsRequest),
        "Report": unary(server.report, spb.ShardRef),
        "Status": unary(server.status, spb.StoreStatusRequest),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _ser(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())
