"""gRPC plumbing: the server's method table, channel options and the peer client.

The bulk methods (Exchange, Push) are registered with raw-bytes serializers so
chunk frames skip protobuf objects (see ``wire``); the small control methods use
the generated message classes. Every client call carries a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from gossip import wire
from gossip.proto import gossip_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "gossip.proto.Gossip"

# Frames are bounded (chunks of at most MAX_CHUNK_BYTES), so the message limit is a
# few MiB, never gigabytes: a peer cannot make us buffer a huge single message.
MESSAGE_LIMIT = wire.MAX_FRAME_BYTES + 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    # Loopback and LAN peers: do not let idle channels linger half-dead.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.so_reuseport", 0),
    # Calls one connection (one peer) may have open at once, enforced by gRPC's core
    # before any Python runs: a flooding peer's extra calls wait on its side.
    # gossip.security's rate limit relies on it.
    ("grpc.max_concurrent_streams", 32),
    # Connections at once, closed by gRPC's core beyond this: room for a full member
    # table (membership.max_members, 1024) twice over, for clients and reconnects.
    ("grpc.max_allowed_incoming_connections", 2048),
]
# Calls open at once on the whole server, all connections and methods together;
# beyond it gRPC answers RESOURCE_EXHAUSTED before any handler runs. A last resort:
# gossip.security holds at most MAX_HELD_CALLS control calls, and a node's own
# traffic keeps a few dozen open.
MAX_OPEN_CALLS = 1024


class PeerError(Exception):
    """A call to a peer failed; ``code`` is the gRPC status code."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details


class Servicer(Protocol):
    async def exchange(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None: ...
    async def push(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes: ...
    async def join(
        self, request: pb.MemberTable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemberTable: ...
    async def sync(
        self, request: pb.MemberTable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MemberTable: ...
    async def leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Empty: ...
    async def status(
        self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusReply: ...


def _ser(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())


def generic_handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    async def exchange(_requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await servicer.exchange(context)

    async def push(_requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return await servicer.push(context)

    handlers = {
        # Raw bytes in and out: the handlers read and write frames through the context.
        "Exchange": grpc.stream_stream_rpc_method_handler(exchange),
        "Push": grpc.stream_unary_rpc_method_handler(push, response_serializer=None),
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.join, request_deserializer=pb.MemberTable.FromString, response_serializer=_ser
        ),
        "Sync": grpc.unary_unary_rpc_method_handler(
            servicer.sync, request_deserializer=pb.MemberTable.FromString, response_serializer=_ser
        ),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.leave, request_deserializer=pb.LeaveRequest.FromString, response_serializer=_ser
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.status, request_deserializer=pb.Empty.FromString, response_serializer=_ser
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start_server(
    servicer: Servicer,
    listen: str,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
) -> tuple[grpc.aio.Server, int]:
    """Start a server on ``listen`` (port 0 picks a free port); returns it and the bound port.

    ``extra_handlers`` serve further services on the same port (the shard store).
    """
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=list(interceptors), maximum_concurrent_rpcs=MAX_OPEN_CALLS
    )
    server.add_generic_rpc_handlers((generic_handler(servicer), *extra_handlers))
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        raise OSError(f"cannot listen on {listen}: {_bind_error(listen)}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}: {_bind_error(listen)}")
    await server.start()
    return server, port


def _bind_error(listen: str) -> str:
    """Why ``listen`` cannot be bound, as the OS tells it (gRPC's own message does not)."""
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(addr)
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return "address in use or not available"


async def _raise_status(call: Any, address: str) -> None:
    """Raise PeerError unless the stream ended with OK."""
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise PeerError(address, code, await call.details() or "")


class PeerClient:
    """Channels to peers, one per address, and the calls the node makes on them."""

    def __init__(
        self,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._interceptors = list(interceptors)
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries (the token, when one is set)."""
        return self._metadata

    def secure(
        self, credentials: grpc.ChannelCredentials | None, metadata: Sequence[tuple[str, str]]
    ) -> None:
        """Set TLS credentials and call metadata (a node learns them in ``start``); before any call."""
        if self._channels:
            raise RuntimeError("PeerClient.secure() after channels were opened")
        self._credentials = credentials
        self._metadata = tuple(metadata)

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._credentials is None:
                ch = grpc.aio.insecure_channel(
                    address, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            else:
                ch = grpc.aio.secure_channel(
                    address, self._credentials, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            self._channels[address] = ch
        return ch

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)

    def _method(self, address: str, name: str, kind: str, req: Any = None, resp: Any = None) -> Any:
        ch = self.channel(address)
        path = f"/{SERVICE}/{name}"
        factory = {"uu": ch.unary_unary, "su": ch.stream_unary, "ss": ch.stream_stream}[kind]
        return factory(path, request_serializer=req, response_deserializer=resp)

    async def _unary(self, address: str, name: str, request: Any, resp_type: Any, timeout: float) -> Any:
        call = self._method(address, name, "uu", _ser, resp_type.FromString)
        try:
            return await call(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise PeerError(address, exc.code(), exc.details() or "") from None

    async def join(self, address: str, table: pb.MemberTable, timeout: float) -> pb.MemberTable:
        return await self._unary(address, "Join", table, pb.MemberTable, timeout)

    async def sync(self, address: str, table: pb.MemberTable, timeout: float) -> pb.MemberTable:
        return await self._unary(address, "Sync", table, pb.MemberTable, timeout)

    async def leave(self, address: str, request: pb.LeaveRequest, timeout: float) -> None:
        await self._unary(address, "Leave", request, pb.Empty, timeout)

    async def status(self, address: str, timeout: float) -> pb.StatusReply:
        return await self._unary(address, "Status", pb.Empty(), pb.StatusReply, timeout)

    async def exchange(
        self,
        address: str,
        header: bytes,
        chunks: Sequence[memoryview],
        on_reply_header: Callable[[bytes], Awaitable[bool]],
        on_reply_chunk: Callable[[bytes], bool],
        timeout: float,
    ) -> bool:
        """Push-pull: send ``header`` and ``chunks``, feed the answer to the callbacks.

        ``on_reply_header`` returns False when the peer declined (busy); then no
        chunks are expected. ``on_reply_chunk`` returns True once the answer is
        complete. Only then does it send the commit frame and close; the call
        returns True once the peer ended it with OK, which it does only after it
        took its half.
        """
        call = self._method(address, "Exchange", "ss")(timeout=timeout, metadata=self._metadata)
        sender: asyncio.Task[None] | None = None
        try:
            await call.write(header)

            async def send_chunks() -> None:
                for c in chunks:
                    await call.write(wire.chunk_frame(c))

            sender = asyncio.create_task(send_chunks())
            first = await call.read()
            if first is grpc.aio.EOF:
                await _raise_status(call, address)
                raise PeerError(
                    address, grpc.StatusCode.INTERNAL, "peer closed the exchange without a header"
                )
            if not await on_reply_header(first):
                return False
            complete = False
            while not complete:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    await _raise_status(call, address)
                    raise PeerError(address, grpc.StatusCode.DATA_LOSS, "peer ended its answer early")
                complete = on_reply_chunk(frame)
            await sender
            await call.write(wire.COMMIT_FRAME)
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise PeerError(address, grpc.StatusCode.INTERNAL, "peer sent more than it announced")
            await _raise_status(call, address)
            return True
        except grpc.aio.AioRpcError as exc:
            raise PeerError(address, exc.code(), exc.details() or "") from None
        finally:
            if sender is not None:
                # Declined or failed: the peer ended the call, so pending writes fail; collect them.
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if not call.done():
                call.cancel()  # no COMMIT_FRAME was sent: the peer takes no half

    async def push(self, address: str, header: bytes, chunks: Sequence[memoryview], timeout: float) -> bytes:
        async def frames() -> AsyncIterator[bytes]:
            yield header
            for c in chunks:
                yield wire.chunk_frame(c)

        call = self._method(address, "Push", "su")
        try:
            result: bytes = await call(frames(), timeout=timeout, metadata=self._metadata)
            return result
        except grpc.aio.AioRpcError as exc:
            raise PeerError(address, exc.code(), exc.details() or "") from None
