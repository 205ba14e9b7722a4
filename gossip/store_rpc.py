"""The shard store's RPC edge: message conversions and the client (the server is ``store_server``).

Shard bytes travel like parameters do (see ``wire``): a header frame, then hand-
encoded chunk frames (``StoreFrame.chunk`` is field 2, like ``Frame.chunk``), on
methods registered with raw-bytes serializers. A received shard lands straight
in its destination buffer and is hashed there before anyone uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np
from google.protobuf.message import DecodeError

from gossip import wire
from gossip.proto import store_pb2 as spb
from gossip.rpc import PeerClient, PeerError
from gossip.store import MAX_SHARDS, Holding, Located, Manifest, ShardHeader, StoreError, StoreInfo

log = logging.getLogger(__name__)

SERVICE = "gossip.proto.Store"
_MAX_RING_POINTS = 1 << 20  # a peer's ring description is data: bound the hashing it can ask for
MAX_HOLDINGS = 1024  # snapshot versions one Holdings answer may list

STATUS_OF = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "retired": grpc.StatusCode.FAILED_PRECONDITION,
    "full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "missing": grpc.StatusCode.NOT_FOUND,
}


@dataclass
class Fetched:
    """What one GetShards call brought: shards checked good, shards that did not hash, and why it ended."""

    ok: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    error: PeerError | None = None


# --- conversions --------------------------------------------------------------------


def manifest_to_pb(m: Manifest) -> spb.Manifest:
    return spb.Manifest(
        model_id=m.model_id,
        version=m.version,
        publisher=m.publisher,
        step=m.step,
        layout_json=m.layout_json,
        shard_bytes=m.shard_bytes,
        total_bytes=m.total_bytes,
        shard_digests=list(m.shard_digests),
        sha256=m.sha256,
        replication=m.replication,
        fingerprint=m.fingerprint,
    )


def manifest_from_pb(msg: spb.Manifest) -> Manifest:
    """A checked manifest; StoreError('invalid') for anything a manifest may not be."""
    m = Manifest(
        model_id=msg.model_id,
        version=msg.version,
        publisher=msg.publisher,
        step=msg.step,
        layout_json=msg.layout_json,
        shard_bytes=msg.shard_bytes,
        total_bytes=msg.total_bytes,
        shard_digests=tuple(bytes(d) for d in msg.shard_digests),
        sha256=bytes(msg.sha256),
        replication=msg.replication,
        fingerprint=bytes(msg.fingerprint),
    )
    m.validate()
    return m


def header_frame(h: ShardHeader) -> bytes:
    msg = spb.StoreFrame(
        header=spb.ShardHeader(
            model_id=h.model_id, version=h.version, index=h.index, length=h.length, digest=h.digest
        )
    )
    return bytes(msg.SerializeToString())


def header_from_frame(data: bytes) -> ShardHeader:
    if len(data) > wire.MAX_HEADER_BYTES:
        raise StoreError("invalid", f"header frame of {len(data)} bytes exceeds {wire.MAX_HEADER_BYTES}")
    msg = spb.StoreFrame()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise StoreError("invalid", f"malformed frame: {exc}") from None
    if msg.WhichOneof("body") != "header":
        raise StoreError("invalid", "expected a shard header first")
    h = msg.header
    return ShardHeader(h.model_id, h.version, h.index, h.length, bytes(h.digest))


def holding_to_pb(h: Holding) -> spb.VersionHoldings:
    return spb.VersionHoldings(
        model_id=h.model_id,
        version=h.version,
        manifest_digest=h.manifest_digest,
        held=h.held,
        shards=h.shards,
    )


def holding_from_pb(v: spb.VersionHoldings) -> Holding:
    if v.shards > MAX_SHARDS or len(v.held) > (v.shards + 7) // 8 or len(v.manifest_digest) > 64:
        raise StoreError("invalid", "holdings out of bounds")
    return Holding(v.model_id, v.version, bytes(v.manifest_digest), bytes(v.held), v.shards)


def located_to_pb(loc: Located) -> spb.LocateReply:
    return spb.LocateReply(
        model_id=loc.model_id,
        manifests=[manifest_to_pb(m) for m in loc.manifests],
        members=[spb.StorePeer(node_id=n, address=a) for n, a in loc.members],
        vnodes=loc.vnodes,
    )


def located_from_pb(reply: spb.LocateReply) -> Located:
    """A peer's answer, checked: a bad manifest or member is left out, never half-used."""
    manifests = []
    for msg in reply.manifests:
        try:
            manifests.append(manifest_from_pb(msg))
        except StoreError as exc:
            log.warning("skipping a bad manifest from a peer: %s", exc)
    members = []
    for peer in reply.members[: wire.MAX_MEMBERS]:
        host, sep, port = peer.address.rpartition(":")
        dialable = bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) <= 65535)
        if (
            0 < len(peer.node_id) <= wire.MAX_ID_CHARS
            and len(peer.address) <= wire.MAX_ADDRESS_CHARS
            and dialable
        ):
            members.append((peer.node_id, peer.address))
    if len(members) * reply.vnodes > _MAX_RING_POINTS:
        raise StoreError("invalid", f"a ring of {len(members)} members x {reply.vnodes} points is too large")
    return Located(reply.model_id, manifests, members, max(reply.vnodes, 1))


def info_to_pb(i: StoreInfo) -> spb.StoreStatusReply:
    return spb.StoreStatusReply(
        replication=i.replication,
        vnodes=i.vnodes,
        ring_share=i.ring_share,
        ring_members=i.ring_members,
        versions=[holding_to_pb(h) for h in i.holdings],
        shards_held=i.shards_held,
        bytes_held=i.bytes_held,
        under_replicated=i.under_replicated,
        published=i.published,
        repaired=i.repaired,
        corrupt_dropped=i.corrupt_dropped,
        model_id=i.model_id,
        publish_every=i.publish_every,
        shards_pending=i.shards_pending,
    )


def _ser(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())


# --- client ----------------------------------------------------------------------------


class StoreClient:
    """Store calls over a :class:`PeerClient`'s channels; every call has a deadline."""

    def __init__(self, peers: PeerClient) -> None:
        self.peers = peers

    def _call(self, address: str, name: str, kind: str, resp: Any = None) -> Any:
        ch = self.peers.channel(address)
        factory = {"uu": ch.unary_unary, "su": ch.stream_unary, "us": ch.unary_stream}[kind]
        req = None if kind == "su" else _ser
        return factory(f"/{SERVICE}/{name}", request_serializer=req, response_deserializer=resp)

    async def _unary(self, address: str, name: str, request: Any, resp_type: Any, timeout: float) -> Any:
        try:
            return await self._call(address, name, "uu", resp_type.FromString)(
                request, timeout=timeout, metadata=self.peers.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerError(address, exc.code(), exc.details() or "") from None

    async def put_shard(
        self, address: str, header: ShardHeader, data: memoryview, chunk_bytes: int, timeout: float
    ) -> bool:
        async def frames() -> AsyncIterator[bytes]:
            yield header_frame(header)
            for start in range(0, len(data), chunk_bytes):
                yield wire.chunk_frame(data[start : start + chunk_bytes])

        try:
            reply = await self._call(address, "PutShard", "su")(
                frames(), timeout=timeout, metadata=self.peers.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerError(address, exc.code(), exc.details() or "") from None
        try:
            return spb.StoreAck.FromString(reply).stored
        except DecodeError:
            raise PeerError(address, grpc.StatusCode.INTERNAL, "malformed acknowledgement") from None

    async def get_shards(
        self,
        address: str,
        m: Manifest,
        indices: list[int],
        place: Callable[[int], memoryview],
        timeout: float,
        on_ok: Callable[[int], None] | None = None,
    ) -> Fetched:
        """Stream shards ``indices`` of ``m`` from one peer, each into ``place(i)``, each checked.

        One call for them all. A shard that arrives and hashes to its digest is
        ``ok`` (and ``on_ok(i)`` is called at once), one that does not is
        ``corrupt``; one the peer does not hold is in neither. A failed call ends
        the fetch with ``error`` set; the shards checked until then still count.
        """
        req = spb.ShardsRequest(
            model_id=m.model_id,
            version=m.version,
            indices=indices,
            digests=[m.shard_digests[i] for i in indices],
        )
        out = Fetched()
        wanted = set(indices)
        checks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        # Each chunk is copied into place and hashed by one worker thread, in arrival order,
        # while the event loop reads the next frames: numpy's copy and hashlib let go of
        # the GIL, so on two cores receiving and checking overlap, and the chunk is hashed
        # from the frame gRPC just wrote (warm) rather than from the buffer later.
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-in")

        def take(dest: np.ndarray, hasher: Any, chunk: bytes | memoryview) -> None:
            src = np.frombuffer(chunk, dtype=np.uint8)
            dest[:] = src
            hasher.update(src)

        async def check(i: int, digest: asyncio.Future[bytes]) -> None:
            if await digest == m.shard_digests[i]:
                out.ok.append(i)
                if on_ok is not None:
                    on_ok(i)
            else:
                out.corrupt.append(i)

        call = self._call(address, "GetShards", "us")(req, timeout=timeout, metadata=self.peers.metadata)
        index, view, got = -1, memoryview(b""), 0
        dest = np.empty(0, dtype=np.uint8)
        hasher = hashlib.sha256()
        try:
            while (frame := await call.read()) is not grpc.aio.EOF:
                if index < 0:
                    h = header_from_frame(frame)
                    if h.index not in wanted or (h.model_id, h.version, h.digest, h.length) != (
                        m.model_id,
                        m.version,
                        m.shard_digests[h.index],
                        m.shard_length(h.index),
                    ):
                        raise StoreError("invalid", f"unasked or mislabelled shard {h.index} from {address}")
                    wanted.discard(h.index)
                    index, view, got = h.index, place(h.index), 0
                    dest, hasher = np.frombuffer(view, dtype=np.uint8), hashlib.sha256()
                    continue
                chunk = wire.chunk_from_frame(frame)
                if got + len(chunk) > len(view):
                    raise StoreError("invalid", f"{address} sent more than shard {index}'s {len(view)} bytes")
                loop.run_in_executor(worker, take, dest[got : got + len(chunk)], hasher, chunk)
                got += len(chunk)
                if got == len(view):
                    checks.append(
                        asyncio.ensure_future(check(index, loop.run_in_executor(worker, hasher.digest)))
                    )
                    index = -1
            code = await call.code()
            if code != grpc.StatusCode.OK:
                out.error = PeerError(address, code, await call.details() or "")
            elif index >= 0:
                out.error = PeerError(address, grpc.StatusCode.DATA_LOSS, f"shard {index} ended early")
        except grpc.aio.AioRpcError as exc:
            out.error = PeerError(address, exc.code(), exc.details() or "")
        except (StoreError, wire.WireError) as exc:
            call.cancel()
            out.error = PeerError(address, grpc.StatusCode.INTERNAL, str(exc))
        finally:
            # Every copy queued has landed before the caller may refetch a shard elsewhere.
            await loop.run_in_executor(worker, _nothing)
            worker.shutdown(wait=False)
        await asyncio.gather(*checks)
        return out

    async def put_manifest(self, address: str, m: Manifest, timeout: float) -> bool:
        ack = await self._unary(address, "PutManifest", manifest_to_pb(m), spb.StoreAck, timeout)
        return bool(ack.stored)

    async def get_manifest(self, address: str, model_id: str, version: int, timeout: float) -> Manifest:
        req = spb.ManifestRequest(model_id=model_id, version=version)
        msg = await self._unary(address, "GetManifest", req, spb.Manifest, timeout)
        try:
            return manifest_from_pb(msg)
        except StoreError as exc:
            raise PeerError(address, grpc.StatusCode.INTERNAL, f"bad manifest: {exc}") from None

    async def locate(self, address: str, model_id: str, timeout: float) -> Located:
        reply = await self._unary(
            address, "Locate", spb.LocateRequest(model_id=model_id), spb.LocateReply, timeout
        )
        try:
            return located_from_pb(reply)
        except StoreError as exc:
            raise PeerError(address, grpc.StatusCode.INTERNAL, str(exc)) from None

    async def holdings(self, address: str, timeout: float) -> list[Holding]:
        reply = await self._unary(address, "Holdings", spb.HoldingsRequest(), spb.HoldingsReply, timeout)
        try:
            return [holding_from_pb(v) for v in reply.versions[:MAX_HOLDINGS]]
        except StoreError as exc:
            raise PeerError(address, grpc.StatusCode.INTERNAL, str(exc)) from None

    async def report(self, address: str, m: Manifest, index: int, timeout: float) -> None:
        ref = spb.ShardRef(model_id=m.model_id, version=m.version, index=index, digest=m.shard_digests[index])
        await self._unary(address, "Report", ref, spb.StoreAck, timeout)

    async def status(self, address: str, timeout: float) -> spb.StoreStatusReply:
        reply: spb.StoreStatusReply = await self._unary(
            address, "Status", spb.StoreStatusRequest(), spb.StoreStatusReply, timeout
        )
        return reply


def store_status_to_dict(s: spb.StoreStatusReply) -> dict[str, Any]:
    own = sorted((v.version for v in s.versions if v.model_id == s.model_id), reverse=True)
    return {
        "model_id": s.model_id,
        "versions": own,
        "snapshots": [
            {
                "model_id": v.model_id,
                "version": v.version,
                "shards": v.shards,
                "shards_held": [
                    i for i in range(min(v.shards, len(v.held) * 8)) if v.held[i // 8] >> (i % 8) & 1
                ],
            }
            for v in s.versions
        ],
        "shards_held": s.shards_held,
        "bytes_held": s.bytes_held,
        "shards_pending": s.shards_pending,
        "under_replicated": list(s.under_replicated),
        "replication": s.replication,
        "publish_every": s.publish_every,
        "ring_share": round(s.ring_share, 6),
        "ring_members": s.ring_members,
        "vnodes": s.vnodes,
        "published": s.published,
        "repaired": s.repaired,
        "corrupt_dropped": s.corrupt_dropped,
    }


def _nothing() -> None:
    """A no-op job: once it ran, every job queued before it on that worker has."""


def transfer_timeout(base: float, nbytes: int) -> float:
    """A deadline that grows with the bytes: ``base`` plus 20 MB/s, a floor any link beats."""
    return base + 2 * nbytes / 20e6
