"""The frames of a bulk transfer: a header frame, then chunk frames.

A pairwise exchange, a push-sum push and a shard transfer each stream one header
and then chunks of raw little-endian bytes. Chunk frames are encoded by hand (a ``Frame`` whose ``chunk`` field is set is
just a tag, a varint length and the bytes), so a payload crosses from the
parameter buffer to the socket with one copy and back with one copy, while the
bytes stay a valid ``gossip.proto.Frame`` for any other implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gossip.proto import gossip_pb2 as pb

CODEC_TO_PB = {"raw": pb.CODEC_RAW, "fp16": pb.CODEC_FP16, "bf16": pb.CODEC_BF16}
CODEC_FROM_PB = {v: k for k, v in CODEC_TO_PB.items()}

_HEADER_TAG = 0x0A  # field 1, length-delimited
_CHUNK_TAG = 0x12  # field 2, length-delimited


# Upper bound on one frame (chunk plus framing); the channel limits are set from it.
MAX_CHUNK_BYTES = 4 << 20
MAX_FRAME_BYTES = MAX_CHUNK_BYTES + 64
# The largest message a transport accepts (a frame and room for its envelope): a peer
# cannot make us buffer a huge single message.
MESSAGE_LIMIT = MAX_FRAME_BYTES + 1024
MAX_HEADER_BYTES = 4096
MAX_PIPELINE_CHARS = 256


class WireError(ValueError):
    """A message that does not decode into what the protocol allows."""


@dataclass(frozen=True)
class Header:
    fingerprint: bytes
    sender: str
    step: int
    codec: str
    total_bytes: int
    weight: float = 1.0
    chunk_bytes: int = 0
    outcome: str = ""  # "", "accepted" or "busy"; set only in replies
    pipeline: str = ""  # the exchange pipeline's stages besides the codec (gossip.core.pipeline)
    pair_round: int = 0  # compressed exchanges: the pair's committed exchanges (gossip.core.choco)


_OUTCOME_TO_PB = {
    "": pb.OUTCOME_UNSPECIFIED,
    "accepted": pb.OUTCOME_ACCEPTED,
    "busy": pb.OUTCOME_BUSY,
    "commit": pb.OUTCOME_COMMIT,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}

# What a caller sends once it read and checked the whole answer; the callee takes its
# half only on exactly these bytes. A cancel, a timeout or a refusal never sends it
# (grpc.aio can hand the callee a clean end of stream before a cancellation, so the
# close alone cannot be the commit).
COMMIT_FRAME = pb.Frame(header=pb.Header(outcome=pb.OUTCOME_COMMIT)).SerializeToString()


def header_to_frame(h: Header) -> bytes:
    msg = pb.Frame(
        header=pb.Header(
            fingerprint=h.fingerprint,
            sender=h.sender,
            step=h.step,
            codec=CODEC_TO_PB[h.codec],
            total_bytes=h.total_bytes,
            weight=h.weight,
            chunk_bytes=h.chunk_bytes,
            outcome=_OUTCOME_TO_PB[h.outcome],
            pipeline=h.pipeline,
            pair_round=h.pair_round,
        )
    )
    return msg.SerializeToString()


def header_from_frame(data: bytes) -> Header:
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"header frame of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    msg = pb.Frame()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed frame: {exc}") from None
    if msg.WhichOneof("body") != "header":
        raise WireError("expected a header frame first")
    h = msg.header
    if h.codec not in CODEC_FROM_PB:
        raise WireError(f"unknown codec {h.codec}")
    if h.outcome not in _OUTCOME_FROM_PB:
        raise WireError(f"unknown outcome {h.outcome}")
    if not math.isfinite(h.weight) or h.weight < 0:
        raise WireError(f"push-sum weight must be finite and non-negative, got {h.weight}")
    if h.chunk_bytes > MAX_CHUNK_BYTES:
        raise WireError(f"chunk size {h.chunk_bytes} exceeds {MAX_CHUNK_BYTES}")
    if len(h.pipeline) > MAX_PIPELINE_CHARS:
        raise WireError(f"pipeline spec of {len(h.pipeline)} characters exceeds {MAX_PIPELINE_CHARS}")
    return Header(
        fingerprint=bytes(h.fingerprint),
        sender=h.sender,
        step=h.step,
        codec=CODEC_FROM_PB[h.codec],
        total_bytes=h.total_bytes,
        weight=h.weight,
        chunk_bytes=h.chunk_bytes,
        outcome=_OUTCOME_FROM_PB[h.outcome],
        pipeline=h.pipeline,
        pair_round=h.pair_round,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def chunk_frame(data: memoryview) -> bytes:
    """``Frame(chunk=data)`` serialized, with the one copy gRPC needs (it takes ``bytes``)."""
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(data)), data))


def chunk_from_frame(data: bytes) -> memoryview:
    """The chunk bytes of a chunk frame, as a view into ``data`` (no copy)."""
    if not data or data[0] != _CHUNK_TAG:
        raise WireError("expected a chunk frame")
    n = 0
    shift = 0
    i = 1
    while True:
        if i >= len(data) or i > 10:
            raise WireError("truncated chunk length")
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    if i + n != len(data):
        raise WireError(f"chunk frame announces {n} bytes but carries {len(data) - i}")
    if n > MAX_CHUNK_BYTES:
        raise WireError(f"chunk of {n} bytes exceeds {MAX_CHUNK_BYTES}")
    return memoryview(data)[i:]


def iter_chunks(views: list[memoryview], chunk_bytes: int) -> list[memoryview]:
    """Split byte views into chunks of at most ``chunk_bytes`` (views, no copies)."""
    out: list[memoryview] = []
    for v in views:
        for start in range(0, len(v), chunk_bytes):
            out.append(v[start : start + chunk_bytes])
    return out
