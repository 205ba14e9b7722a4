"""Protobuf at the edge of the store: ``gossip.proto.Store`` messages to and from plain values.

The only module of the store that imports the generated stubs. Everything a
peer sends is decoded and checked here before the store sees it: manifests
through :meth:`Manifest.validate` (the layout through ``Layout.from_json``),
holdings and ring descriptions against fixed bounds. A message that does not
decode, or carries what the store never allows (a digest algorithm this node does
not know among them), is a ``StoreError('invalid')``.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError, Message

from gossip.core.membership import MAX_ID_CHARS, dialable
from gossip.proto import store_pb2 as spb
from gossip.store import digests
from gossip.store.manifest import MAX_SHARDS, Manifest, StoreError
from gossip.store.shards import Holding, Located, ShardHeader, ShardId, StoreInfo
from gossip.transport.frames import MAX_HEADER_BYTES
from gossip.transport.serde import encode

log = logging.getLogger(__name__)

MAX_RING_POINTS = 1 << 20  # a peer's ring description is data: bound the hashing it can ask for
MAX_HOLDINGS = 1024  # snapshot versions one Holdings answer may list
MAX_RING_MEMBERS = 4096


# An absent field reads as DIGEST_SHA256 (0): manifests and headers from before it was named.
_ALGORITHM_PB = {digests.SHA256: spb.DIGEST_SHA256, digests.BLAKE3: spb.DIGEST_BLAKE3}
_ALGORITHM: dict[int, str] = {number: name for name, number in _ALGORITHM_PB.items()}


def _algorithm(number: int) -> str:
    # proto3 enums are open: a newer peer's value arrives as a bare number.
    name = _ALGORITHM.get(number)
    if name is None:
        raise StoreError(
            "invalid", f"unknown digest algorithm {number}: this node checks {', '.join(digests.ALGORITHMS)}"
        )
    return name


def _parse(msg: Message, data: bytes) -> Message:
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise StoreError("invalid", f"malformed {type(msg).__name__}: {exc}") from None
    return msg


# --- manifests --------------------------------------------------------------------


def _manifest_pb(m: Manifest) -> spb.Manifest:
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
        digest_algorithm=_ALGORITHM_PB[m.digest_algorithm],
        state_layout_json=m.state_layout_json,
    )


def _manifest(msg: spb.Manifest) -> Manifest:
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
        digest_algorithm=_algorithm(msg.digest_algorithm),
        sha256=bytes(msg.sha256),
        replication=msg.replication,
        fingerprint=bytes(msg.fingerprint),
        state_layout_json=msg.state_layout_json,
    )
    m.validate()
    return m


def manifest_to_bytes(m: Manifest) -> bytes:
    return encode(_manifest_pb(m))


def manifest_from_bytes(data: bytes) -> Manifest:
    msg = _parse(spb.Manifest(), data)
    assert isinstance(msg, spb.Manifest)
    return _manifest(msg)


def manifest_request_to_bytes(model_id: str, version: int) -> bytes:
    return encode(spb.ManifestRequest(model_id=model_id, version=version))


def manifest_request_from_bytes(data: bytes) -> tuple[str, int]:
    msg = _parse(spb.ManifestRequest(), data)
    assert isinstance(msg, spb.ManifestRequest)
    return msg.model_id, msg.version


# --- shards ---------------------------------------------------------------------------


def shard_header_frame(h: ShardHeader) -> bytes:
    return encode(
        spb.StoreFrame(
            header=spb.ShardHeader(
                model_id=h.model_id,
                version=h.version,
                index=h.index,
                length=h.length,
                digest=h.digest,
                digest_algorithm=_ALGORITHM_PB[h.digest_algorithm],
            )
        )
    )


def shard_header_from_frame(data: bytes) -> ShardHeader:
    if len(data) > MAX_HEADER_BYTES:
        raise StoreError("invalid", f"header frame of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    msg = _parse(spb.StoreFrame(), data)
    assert isinstance(msg, spb.StoreFrame)
    if msg.WhichOneof("body") != "header":
        raise StoreError("invalid", "expected a shard header first")
    h = msg.header
    return ShardHeader(
        h.model_id, h.version, h.index, h.length, bytes(h.digest), _algorithm(h.digest_algorithm)
    )


def shards_request_to_bytes(m: Manifest, indices: list[int]) -> bytes:
    return encode(
        spb.ShardsRequest(
            model_id=m.model_id,
            version=m.version,
            indices=indices,
            digests=[m.shard_digests[i] for i in indices],
        )
    )


def shards_request_from_bytes(data: bytes) -> list[tuple[str, int, int, bytes | None]]:
    """(model, version, index, digest or None) for each shard asked for, in order."""
    msg = _parse(spb.ShardsRequest(), data)
    assert isinstance(msg, spb.ShardsRequest)
    if len(msg.indices) > MAX_SHARDS or len(msg.digests) not in (0, len(msg.indices)):
        raise StoreError("invalid", "too many shards, or digests that do not match them")
    return [
        (msg.model_id, msg.version, index, bytes(msg.digests[k]) if msg.digests else None)
        for k, index in enumerate(msg.indices)
    ]


def shard_ref_to_bytes(m: Manifest, index: int) -> bytes:
    return encode(
        spb.ShardRef(model_id=m.model_id, version=m.version, index=index, digest=m.shard_digests[index])
    )


def shard_ref_from_bytes(data: bytes) -> ShardId:
    msg = _parse(spb.ShardRef(), data)
    assert isinstance(msg, spb.ShardRef)
    return (msg.model_id, msg.version, msg.index, bytes(msg.digest))


def ack_to_bytes(stored: bool) -> bytes:
    return encode(spb.StoreAck(stored=stored))


def ack_from_bytes(data: bytes) -> bool:
    msg = _parse(spb.StoreAck(), data)
    assert isinstance(msg, spb.StoreAck)
    return msg.stored


# --- locate, holdings, status ----------------------------------------------------------


def locate_request_to_bytes(model_id: str) -> bytes:
    return encode(spb.LocateRequest(model_id=model_id))


def locate_request_from_bytes(data: bytes) -> str:
    msg = _parse(spb.LocateRequest(), data)
    assert isinstance(msg, spb.LocateRequest)
    return msg.model_id


def located_to_bytes(loc: Located) -> bytes:
    return encode(
        spb.LocateReply(
            model_id=loc.model_id,
            manifests=[_manifest_pb(m) for m in loc.manifests],
            members=[spb.StorePeer(node_id=n, address=a) for n, a in loc.members],
            vnodes=loc.vnodes,
        )
    )


def located_from_bytes(data: bytes) -> Located:
    """A peer's answer, checked: a bad manifest or member is left out, never half-used."""
    reply = _parse(spb.LocateReply(), data)
    assert isinstance(reply, spb.LocateReply)
    manifests, refused = [], []
    for msg in reply.manifests:
        try:
            manifests.append(_manifest(msg))
        except StoreError as exc:
            log.warning("skipping a bad manifest from a peer: %s", exc)
            refused.append(f"v{msg.version}: {exc}")
    members = [
        (peer.node_id, peer.address)
        for peer in reply.members[:MAX_RING_MEMBERS]
        if 0 < len(peer.node_id) <= MAX_ID_CHARS and dialable(peer.address)
    ]
    if len(members) * reply.vnodes > MAX_RING_POINTS:
        raise StoreError("invalid", f"a ring of {len(members)} members x {reply.vnodes} points is too large")
    return Located(reply.model_id, manifests, members, max(reply.vnodes, 1), refused)


def _holding_pb(h: Holding) -> spb.VersionHoldings:
    return spb.VersionHoldings(
        model_id=h.model_id,
        version=h.version,
        manifest_digest=h.manifest_digest,
        held=h.held,
        shards=h.shards,
    )


def _holding(v: spb.VersionHoldings) -> Holding:
    if v.shards > MAX_SHARDS or len(v.held) > (v.shards + 7) // 8 or len(v.manifest_digest) > 64:
        raise StoreError("invalid", "holdings out of bounds")
    return Holding(v.model_id, v.version, bytes(v.manifest_digest), bytes(v.held), v.shards)


EMPTY_REQUEST = b""  # HoldingsRequest and StoreStatusRequest have no fields


def holdings_to_bytes(holdings: list[Holding]) -> bytes:
    return encode(spb.HoldingsReply(versions=[_holding_pb(h) for h in holdings]))


def holdings_from_bytes(data: bytes) -> list[Holding]:
    reply = _parse(spb.HoldingsReply(), data)
    assert isinstance(reply, spb.HoldingsReply)
    return [_holding(v) for v in reply.versions[:MAX_HOLDINGS]]


def info_to_bytes(i: StoreInfo) -> bytes:
    return encode(
        spb.StoreStatusReply(
            replication=i.replication,
            vnodes=i.vnodes,
            ring_share=i.ring_share,
            ring_members=i.ring_members,
            versions=[_holding_pb(h) for h in i.holdings],
            shards_held=i.shards_held,
            bytes_held=i.bytes_held,
            under_replicated=i.under_replicated,
            published=i.published,
            repaired=i.repaired,
            corrupt_dropped=i.corrupt_dropped,
            model_id=i.model_id,
            publish_every=i.publish_every,
            shards_pending=i.shards_pending,
            awaiting=[spb.AwaitedVersion(version=v, publisher=p) for v, p in i.awaiting],
            finished=i.finished,
        )
    )


def info_from_bytes(data: bytes) -> StoreInfo:
    s = _parse(spb.StoreStatusReply(), data)
    assert isinstance(s, spb.StoreStatusReply)
    return StoreInfo(
        model_id=s.model_id,
        replication=s.replication,
        publish_every=s.publish_every,
        vnodes=s.vnodes,
        ring_share=s.ring_share,
        ring_members=s.ring_members,
        holdings=[_holding(v) for v in s.versions[:MAX_HOLDINGS]],
        shards_held=s.shards_held,
        bytes_held=s.bytes_held,
        shards_pending=s.shards_pending,
        under_replicated=list(s.under_replicated),
        published=s.published,
        repaired=s.repaired,
        corrupt_dropped=s.corrupt_dropped,
        awaiting=[(a.version, a.publisher[:MAX_ID_CHARS]) for a in s.awaiting[:MAX_HOLDINGS]],
        finished=s.finished,
    )
