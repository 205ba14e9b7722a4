"""The calling side: one channel per peer, one unary helper, frame streams.

Every method is registered with raw-bytes serializers on both ends: messages are
encoded and decoded by ``serde`` and the store's ``serde`` (a malformed one is then a
:class:`~gossip.transport.frames.WireError` the caller handles, never a parse
failure inside gRPC), and bulk frames skip protobuf objects entirely. Every call
has a deadline; every gRPC failure becomes a :class:`PeerError` here and nowhere
else, so nothing above this module imports grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from gossip.core.errors import PeerError
from gossip.transport.frames import MAX_FRAME_BYTES
from gossip.transport.pacing import SendPacer

__all__ = ["CallStream", "Channels", "PeerError", "transfer_timeout"]

GOSSIP = "/gossip.proto.Gossip/"
STORE = "/gossip.proto.Store/"

# Frames are bounded (chunks of at most MAX_CHUNK_BYTES), so the message limit is a
# few MiB, never gigabytes: a peer cannot make us buffer a huge single message.
MESSAGE_LIMIT = MAX_FRAME_BYTES + 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    # Loopback and LAN peers: do not let idle channels linger half-dead.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
]

# Throughput floor a transfer's deadline assumes: a dead or stalled peer costs one
# deadline, a live link of 20 MB/s or more always finishes.
DEADLINE_BYTES_PER_S = 20e6


def transfer_timeout(base: float, nbytes: int, floor: float = DEADLINE_BYTES_PER_S) -> float:
    """The deadline of a call that moves ``nbytes``: ``base`` plus twice their time at 20 MB/s
    (the margin covers a loaded machine), or at ``floor`` bytes/s (a paced sender's rate)."""
    return base + 2 * nbytes / min(floor, DEADLINE_BYTES_PER_S)


def _peer_error(address: str, exc: BaseException) -> PeerError:
    if isinstance(exc, grpc.aio.AioRpcError):
        return PeerError(address, exc.code().name, exc.details() or "")
    # grpc.aio.BaseError (ExecuteBatchError from a write or close on a call the peer
    # already ended) and InvalidStateError (a write after the end): the call is over.
    return PeerError(address, "UNAVAILABLE", f"call ended: {exc or type(exc).__name__}")


_CALL_ERRORS = (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError)


class CallStream:
    """One call as a stream of frames, seen from the caller; every failure is a PeerError.

    Used for the bidirectional, client-streaming and server-streaming methods:
    ``read`` gives the next frame or None once the peer finished sending,
    ``finish`` waits for the final status, ``response`` for a client-streaming
    call's single answer; ``cancel`` ends the call at once (idempotent).
    """

    def __init__(self, call: Any, address: str, pacer: SendPacer | None = None) -> None:
        self._call = call
        self.address = address
        self._pacer = pacer

    async def write(self, frame: bytes) -> None:
        if self._pacer is not None:
            await self._pacer.take(len(frame))
        try:
            await self._call.write(frame)
        except _CALL_ERRORS as exc:
            raise _peer_error(self.address, exc) from None

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except _CALL_ERRORS as exc:
            raise _peer_error(self.address, exc) from None

    async def read(self) -> bytes | None:
        try:
            frame = await self._call.read()
        except _CALL_ERRORS as exc:
            raise _peer_error(self.address, exc) from None
        if frame is grpc.aio.EOF:
            return None
        return bytes(frame)

    async def finish(self) -> None:
        """Raise PeerError unless the call ended with OK."""
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            raise PeerError(self.address, code.name, await self._call.details() or "")

    async def response(self) -> bytes:
        try:
            return bytes(await self._call)
        except _CALL_ERRORS as exc:
            raise _peer_error(self.address, exc) from None

    def cancel(self) -> None:
        if not self._call.done():
            self._call.cancel()


class Channels:
    """Channels to peers, one per address, with the credentials and metadata every call carries."""

    def __init__(
        self,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        pacer: SendPacer | None = None,
    ) -> None:
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.pacer = pacer  # paces every request this side sends (``--max-send-rate``)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries (the token, when one is set)."""
        return self._metadata

    def secure(
        self, credentials: grpc.ChannelCredentials | None, metadata: Sequence[tuple[str, str]]
    ) -> None:
        """Set TLS credentials and call metadata (a node learns them in ``start``); before any call."""
        if self._channels:
            raise RuntimeError("Channels.secure() after channels were opened")
        self._credentials = credentials
        self._metadata = tuple(metadata)

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._credentials is None:
                ch = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                ch = grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)

    async def unary(self, address: str, method: str, request: bytes, timeout: float) -> bytes:
        """Call a unary method (its full path) with an encoded request; the encoded answer."""
        call = self.channel(address).unary_unary(method)
        if self.pacer is not None:
            await self.pacer.take(len(request))
        try:
            return bytes(await call(request, timeout=timeout, metadata=self._metadata))
        except _CALL_ERRORS as exc:
            raise _peer_error(address, exc) from None

    def stream(self, address: str, method: str, timeout: float) -> CallStream:
        """Open a bidirectional call: the caller writes frames and reads the answer's."""
        call = self.channel(address).stream_stream(method)(timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)

    def upload(self, address: str, method: str, timeout: float) -> CallStream:
        """Open a client-streaming call: write frames, ``done_writing``, then ``response``."""
        call = self.channel(address).stream_unary(method)(timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)

    def download(self, address: str, method: str, request: bytes, timeout: float) -> CallStream:
        """Open a server-streaming call with one encoded request; read its frames."""
        call = self.channel(address).unary_stream(method)(request, timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)
