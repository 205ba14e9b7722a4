"""The serving side: a gRPC server whose methods are plain async functions.

A service is a name and a table of :class:`Method` s. Each method's function
sees encoded bytes and a :class:`ServerStream`, never a gRPC object; it refuses a
request by raising :class:`~gossip.core.errors.Refused` with a status name, and
this module turns that (and a malformed message, and a stalled stream) into the
gRPC status. Requests arrive as raw bytes, so a request that does not parse is
the handler's INVALID_ARGUMENT, never a parse failure and traceback inside gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio

from gossip.core.errors import Refused
from gossip.transport.frames import MESSAGE_LIMIT, WireError
from gossip.transport.pacing import SendPacer

log = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.so_reuseport", 0),
    # Calls one connection (one peer) may have open at once, enforced by gRPC's core
    # before any Python runs: a flooding peer's extra calls wait on its side.
    # The rate limit (gossip.transport.ratelimit) relies on it.
    ("grpc.max_concurrent_streams", 32),
    # Connections at once, closed by gRPC's core beyond this: room for a full member
    # table (membership.max_members, 1024) twice over, for clients and reconnects.
    ("grpc.max_allowed_incoming_connections", 2048),
]
# Calls open at once on the whole server, all connections and methods together;
# beyond it gRPC answers RESOURCE_EXHAUSTED before any handler runs. A last resort:
# the rate limit holds at most MAX_HELD_CALLS control calls, and a node's own
# traffic keeps a few dozen open.
MAX_OPEN_CALLS = 1024

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Server: TypeAlias = grpc.aio.Server


class ServerStream:
    """The frames of one incoming call, seen from the serving side."""

    def __init__(self, context: Context, pacer: SendPacer | None = None) -> None:
        self._context = context
        self._pacer = pacer

    async def read(self) -> bytes | None:
        """The next frame, or None once the caller finished sending."""
        frame = await self._context.read()
        return None if frame is grpc.aio.EOF else bytes(frame)

    async def write(self, frame: bytes) -> None:
        if self._pacer is not None:
            await self._pacer.take(len(frame))
        await self._context.write(frame)


Unary = Callable[[bytes], Awaitable[bytes]]  # request -> answer
Upload = Callable[[ServerStream], Awaitable[bytes]]  # frames in -> one answer
Download = Callable[[bytes, ServerStream], Awaitable[None]]  # one request -> frames out
Bidi = Callable[[ServerStream], Awaitable[None]]


@dataclass(frozen=True)
class Method:
    kind: str  # "unary", "upload", "download" or "bidi"
    fn: Callable[..., Awaitable[Any]]
    # Refusals are logged as warnings, or as info where they are routine (the store
    # refuses a retired version or a full disk many times in a normal run).
    quiet: bool = False


def unary(fn: Unary, quiet: bool = False) -> Method:
    return Method("unary", fn, quiet)


def upload(fn: Upload, quiet: bool = False) -> Method:
    return Method("upload", fn, quiet)


def download(fn: Download, quiet: bool = False) -> Method:
    return Method("download", fn, quiet)


def bidi(fn: Bidi, quiet: bool = False) -> Method:
    return Method("bidi", fn, quiet)


async def _refuse(context: Context, code: str, message: str) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await context.abort(grpc.StatusCode[code], message)


async def _guarded(context: Context, name: str, level: int, run: Awaitable[Any]) -> Any:
    """Run a method's function; its refusals become the call's status."""
    try:
        return await run
    except Refused as exc:
        log.log(level, "refused a %s call: %s", name, exc.message)
        await _refuse(context, exc.code, exc.message)
    except WireError as exc:
        log.log(level, "refused a malformed %s call: %s", name, exc)
        await _refuse(context, "INVALID_ARGUMENT", str(exc))
    except TimeoutError:
        log.log(level, "a %s call stalled", name)
        await _refuse(context, "DEADLINE_EXCEEDED", "the call stalled")
    return None


def _handler(path: str, method: Method, pacer: SendPacer | None = None) -> grpc.RpcMethodHandler:
    fn = method.fn
    level = logging.INFO if method.quiet else logging.WARNING

    def guarded(context: Context, run: Awaitable[Any]) -> Awaitable[Any]:
        return _guarded(context, path, level, run)

    async def paced(answer: bytes | None) -> bytes | None:
        if pacer is not None and answer is not None:
            await pacer.take(len(answer))
        return answer

    if method.kind == "unary":

        async def uu(request: bytes, context: Context) -> bytes | None:
            return await paced(await guarded(context, fn(request)))

        return grpc.unary_unary_rpc_method_handler(uu)
    if method.kind == "upload":

        async def su(_requests: object, context: Context) -> bytes | None:
            return await paced(await guarded(context, fn(ServerStream(context))))

        return grpc.stream_unary_rpc_method_handler(su)
    if method.kind == "download":

        async def us(request: bytes, context: Context) -> None:
            await guarded(context, fn(request, ServerStream(context, pacer)))

        return grpc.unary_stream_rpc_method_handler(us)
    if method.kind == "bidi":

        async def ss(_requests: object, context: Context) -> None:
            await guarded(context, fn(ServerStream(context, pacer)))

        return grpc.stream_stream_rpc_method_handler(ss)
    raise ValueError(f"unknown method kind {method.kind!r}")


def refusing_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends any call at once, whatever its kind, without reading a request.

    Registered as stream-stream, so gRPC hands it the request stream unread instead
    of parsing a first message (its bytes may be anything).
    """

    async def refuse(_requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


def generic_handler(
    service: str, methods: dict[str, Method], pacer: SendPacer | None = None
) -> grpc.GenericRpcHandler:
    """gRPC's handler for ``service`` (e.g. ``gossip.proto.Gossip``) with these methods;
    ``pacer`` paces every answer (``--max-send-rate``)."""
    handlers = {n: _handler(f"{service}/{n}", m, pacer) for n, m in methods.items()}
    return grpc.method_handlers_generic_handler(service, handlers)


async def start_server(
    listen: str,
    services: Sequence[tuple[str, dict[str, Method]]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    pacer: SendPacer | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve ``services`` on ``listen`` (port 0 picks a free port); returns the server and its port."""
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=list(interceptors), maximum_concurrent_rpcs=MAX_OPEN_CALLS
    )
    server.add_generic_rpc_handlers(
        tuple(generic_handler(name, methods, pacer) for name, methods in services)
    )
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
