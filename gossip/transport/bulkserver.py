"""The serving side of the bulk port (:mod:`gossip.transport.bulk` has the wire format).

It runs the node's own :class:`~gossip.transport.server.Method` table for the bulk
methods only, each call with the deadline its caller announced; a refusal becomes the
status frame, as on gRPC.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Sequence
from typing import cast

from gossip.core.errors import Refused
from gossip.transport.bulk import (
    CALL,
    DATA,
    DEADLINE,
    END,
    MAGIC,
    STATUS,
    BadFrame,
    Conn,
    nodelay,
    status_frame,
)
from gossip.transport.channels import BULK_METHODS, token_of
from gossip.transport.frames import WireError
from gossip.transport.pacing import SendPacer
from gossip.transport.server import Method

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
HELLO_TIMEOUT = 5.0  # seconds a new connection has to say who it is
MAX_GREETING = 64  # connections that have not said who they are yet; more are closed at once
IDLE_TIMEOUT = 120.0  # an idle connection is closed after this long
MAX_CONNECTIONS = 1024  # connections kept at once; more are closed at once
DRAIN_LIMIT = 8.0  # seconds a finished call's leftover frames are read, at most
MAX_CALL_SECONDS = 24 * 3600.0  # the longest deadline a call may announce


class _ServerCall:
    """The frames of one incoming call (the interface of the gRPC server's ``ServerStream``)."""

    def __init__(self, conn: Conn, pacer: SendPacer | None) -> None:
        self._conn = conn
        self._pacer = pacer
        self.ended = False  # the client sent its E

    async def read(self) -> bytes | None:
        if self.ended:
            return None
        kind, body = await self._conn.read_frame()
        if kind == END:
            self.ended = True
            return None
        if kind != DATA:
            raise BadFrame(f"unexpected frame kind {kind} inside a call")
        # A large frame is a view of its own buffer: read like bytes, never written to by anyone.
        return cast(bytes, body)

    async def write(self, frame: bytes) -> None:
        if self._pacer is not None:
            await self._pacer.take(len(frame))
        await self._conn.write_frame(DATA, frame)


class BulkServer:
    """Serves the bulk methods of ``services`` on a plain TCP port (see the module's wire format)."""

    def __init__(
        self,
        services: Sequence[tuple[str, dict[str, Method]]],
        bulk_methods: frozenset[str],
        token: str = "",
        pacer: SendPacer | None = None,
        node_id: str = "",
    ) -> None:
        """``token``: what a client's hello must carry, as gRPC metadata carries it (``Bearer …``); '' for none."""
        self._methods = {
            f"/{name}/{m}": method
            for name, methods in services
            for m, method in methods.items()
            if f"/{name}/{m}" in bulk_methods
        }
        self._expected = token.encode()
        self.node_id = node_id  # a hello that names another node is refused
        self._greeting = 0  # connections in their hello
        self._pacer = pacer
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._in_call: set[asyncio.Task[None]] = set()  # connections serving a call now
        self._stopping = False
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        host = host.strip("[]") or "0.0.0.0"
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        ls = socket.socket(family, kind, proto)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(addr)
            ls.listen(128)
        except OSError as exc:
            ls.close()
            raise OSError(f"cannot listen on bulk port {host}:{port}: {exc.strerror or exc}") from None
        ls.setblocking(False)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._accepting = asyncio.ensure_future(self._accept(ls))
        return self.port

    async def _accept(self, ls: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(ls)
            except OSError as exc:  # out of file descriptors, say: wait, do not spin
                log.warning("bulk port: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            nodelay(sock)
            if len(self._conns) >= MAX_CONNECTIONS or self._greeting >= MAX_GREETING:
                sock.close()  # its caller goes back to gRPC for this node
                continue
            task = asyncio.ensure_future(self._serve(Conn(sock)))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop serving, as gRPC's ``server.stop(grace)``: no new connections or calls; calls in
        flight get ``grace`` seconds to end, then they are cancelled; idle connections close now."""
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        tasks = list(self._conns)
        for t in tasks:
            if t not in self._in_call:
                t.cancel()
        busy = [t for t in tasks if not t.done() and t in self._in_call]
        try:
            if busy and grace > 0:
                await asyncio.wait(busy, timeout=grace)
        finally:  # a stop that is itself cancelled still ends every call
            for t in busy:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _hello(self, conn: Conn) -> str:
        """Why the connection's hello is refused ('' when it is fine)."""
        head = bytearray(len(MAGIC) + 2)
        await conn.recv_exact(memoryview(head))
        if bytes(head[: len(MAGIC)]) != MAGIC:
            return "not a gossip bulk connection"
        n = int.from_bytes(head[len(MAGIC) :], "little")
        if n > MAX_TOKEN_BYTES:
            return "token too long"
        token = bytearray(n + 1)  # and the length of the node id that follows
        await conn.recv_exact(memoryview(token))
        node_id = bytearray(token[-1])
        await conn.recv_exact(memoryview(node_id))
        # Constant time: a wrong guess tells nothing about how much of it was right.
        if self._expected and not hmac.compare_digest(bytes(token[:-1]), self._expected):
            return "missing or wrong token"
        if node_id and bytes(node_id) != self.node_id.encode()[:255]:
            return f"it calls node {bytes(node_id).decode('utf-8', 'replace')!r}, this is {self.node_id!r}"
        return ""

    async def _serve(self, conn: Conn) -> None:
        me = asyncio.current_task()
        assert me is not None
        try:
            self._greeting += 1
            try:
                async with asyncio.timeout(HELLO_TIMEOUT):
                    why = await self._hello(conn)
            finally:
                self._greeting -= 1
            if why:
                # Closed without a word: the caller goes back to gRPC for this node, where a
                # wrong token gets its UNAUTHENTICATED, and a port now another node's is asked anew.
                log.warning("bulk port: refused a connection: %s", why)
                return
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    kind, body = await conn.read_frame()
                if kind != CALL or len(body) < DEADLINE.size:
                    raise BadFrame("expected a call")
                (remaining,) = DEADLINE.unpack_from(body)
                path = bytes(body[DEADLINE.size :]).decode("utf-8", "replace")
                call = _ServerCall(conn, self._pacer)
                # In a call until its status is out: a stopping server gives it its grace.
                self._in_call.add(me)
                try:
                    code, message = await self._run(path, remaining, call)
                    if conn.partial:  # a frame cut by the call's deadline: the stream is out of step
                        return
                    await conn.write_frame(STATUS, status_frame(code, message))
                finally:
                    self._in_call.discard(me)
                if not await self._drain(call) or self._stopping:
                    return
        except (OSError, TimeoutError) as exc:  # a bad frame is an OSError too (BadFrame)
            log.debug("bulk connection ended: %s", exc)
        finally:
            conn.close()

    async def _drain(self, call: _ServerCall) -> bool:
        """Read the finished call's leftover frames up to the client's E; False if the connection is done."""
        try:
            async with asyncio.timeout(DRAIN_LIMIT):
                while not call.ended:
                    await call.read()
        except (OSError, TimeoutError):
            return False
        return True

    async def _run(self, path: str, remaining: float, call: _ServerCall) -> tuple[str, str]:
        method = self._methods.get(path)
        if method is None:
            return "UNIMPLEMENTED", "no such bulk method"
        level = logging.INFO if method.quiet else logging.WARNING
        try:
            # A NaN or absurd deadline from the wire is clamped, never trusted to schedule.
            limit = min(max(remaining, 0.0), MAX_CALL_SECONDS) if remaining == remaining else 0.0
            async with asyncio.timeout(limit):
                if method.kind == "bidi":
                    await method.fn(call)
                elif method.kind == "upload":
                    answer = await method.fn(call)
                    await call.write(answer)
                elif method.kind == "download":
                    request = await call.read()
                    if request is None:
                        raise Refused("INVALID_ARGUMENT", "no request")
                    await method.fn(bytes(request), call)
                else:
                    return "UNIMPLEMENTED", f"{method.kind} calls are not served on the bulk port"
        except Refused as exc:
            log.log(level, "refused a %s call: %s", path, exc.message)
            return exc.code, exc.message
        except WireError as exc:
            log.log(level, "refused a malformed %s call: %s", path, exc)
            return "INVALID_ARGUMENT", str(exc)
        except TimeoutError:
            log.log(level, "a %s call stalled", path)
            return "DEADLINE_EXCEEDED", "the call stalled"
        except (OSError, asyncio.CancelledError):
            raise  # the connection is gone, or the server stops
        except Exception:
            log.exception("a %s call failed", path)
            return "UNKNOWN", "the call failed on the server"
        return "OK", ""


async def start_bulk_server(
    services: Sequence[tuple[str, dict[str, Method]]],
    host: str,
    port: int,
    metadata: Sequence[tuple[str, str]] = (),
    pacer: SendPacer | None = None,
    node_id: str = "",
) -> BulkServer:
    """Serve the bulk methods of ``services`` on ``host``:``port`` (0: a free port); a client's
    hello must carry the token that ``metadata`` (what this node's own calls carry) holds."""
    server = BulkServer(services, BULK_METHODS, token=token_of(metadata), pacer=pacer, node_id=node_id)
    await server.start(host, port)
    return server
