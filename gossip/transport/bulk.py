"""Bulk calls over plain TCP: exchanges, pushes and shard transfers without gRPC in the way.

This module is the wire format and the calling side; :mod:`gossip.transport.bulkserver`
the serving side.

gRPC in Python copies every byte of a message three times and hands each message
between its I/O thread and the event loop; on loopback a bare grpc.aio stream that
only moves ready frames reaches 0.6-0.86 of raw TCP here, less than the node logic
needs. This channel carries the *same frames* for the same methods (the ones in
:data:`~gossip.transport.ratelimit.BULK_METHODS`), on the event loop, each frame read
straight into its own buffer: one copy from the kernel, none in between. The
protocols do not see the difference: a :class:`BulkCall` is a caller stream like
gRPC's, and the server runs the node's own :class:`~gossip.transport.server.Method`
table.

A node serves it on a second port of its listening host (``--bulk-port``) and names
that port in its status; :class:`~gossip.transport.channels.Channels` asks a peer once
and sends its bulk calls there from then on, over gRPC until it knows. Plaintext
only: a node with TLS keeps every call on gRPC (its TLS), and so does a client with
credentials.

Wire format. A connection opens with the client's hello: ``GSPB``, version 1, the
token's length (2 bytes) and the token (``Bearer …`` as in gRPC metadata, or empty).
Then calls, one at a time. Every frame is a kind byte and a 4-byte length (little
endian), then that many bytes:

- ``C`` (client) a call: its deadline (8-byte float, seconds from now), the method's path;
- ``D`` (either side) a frame of the call, exactly as over gRPC;
- ``E`` (client) done sending (empty);
- ``S`` (server) the status: the code's name, a newline, the message. The call is over.

After ``S`` the server reads, and drops, the client's frames up to its ``E``; then the
connection serves the next call. A frame longer than the gRPC message limit, an
unknown kind or a wrong hello closes the connection; nothing of it reaches a method.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from gossip.core.errors import PeerError
from gossip.transport.frames import MESSAGE_LIMIT
from gossip.transport.pacing import SendPacer

log = logging.getLogger(__name__)

MAGIC = b"GSPB\x01"
CALL, DATA, END, STATUS = b"C"[0], b"D"[0], b"E"[0], b"S"[0]
_KINDS = frozenset({CALL, DATA, END, STATUS})
_FRAME = struct.Struct("<BI")
DEADLINE = struct.Struct("<d")
YIELD_BYTES = 16 << 20
SMALL_FRAME = 64 << 10  # frames up to this are copied into bytes; larger ones are read in place
POOL_IDLE = 60.0  # an idle connection is not reused after this long (its server closes it at 120 s)
MAX_IDLE_PER_PEER = 4


class _Closed(ConnectionError):
    pass


class BadFrame(ConnectionError):
    """A frame the wire format does not allow: the connection is closed, never answered."""


def nodelay(sock: socket.socket) -> None:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Conn:
    """Framed reads and writes on one non-blocking socket, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._head = bytearray(_FRAME.size)
        self._write = asyncio.Lock()  # one frame at a time, whole
        self.idle_since = time.monotonic()
        self.closed = False
        self.partial = False  # a frame is half read or half written
        self._moved = 0  # bytes read and sent since this connection last yielded

    async def recv_exact(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            k = await self.loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise _Closed("connection closed by the peer")
            got += k

    async def read_frame(self) -> tuple[int, bytes | memoryview]:
        await self.recv_exact(memoryview(self._head))
        kind, n = _FRAME.unpack(self._head)
        if kind not in _KINDS:
            raise BadFrame(f"unknown frame kind {kind}")
        if n > MESSAGE_LIMIT:
            raise BadFrame(f"frame of {n} bytes exceeds {MESSAGE_LIMIT}")
        self.partial = True  # until the body is in: a cancel now leaves the stream out of step
        if n <= SMALL_FRAME:
            small = bytearray(n)
            await self.recv_exact(memoryview(small))
            self.partial = False
            return kind, bytes(small)
        big = np.empty(n, dtype=np.uint8).data  # not zeroed: every byte is read into
        await self.recv_exact(big)
        self.partial = False
        await self._fair(n)
        return kind, big

    async def write_frame(self, kind: int, body: bytes | memoryview = b"") -> None:
        head = _FRAME.pack(kind, len(body))
        async with self._write:
            self.partial = True
            if len(body) <= SMALL_FRAME:
                await self.loop.sock_sendall(self.sock, head + bytes(body))
                self.partial = False
            else:
                await self.loop.sock_sendall(self.sock, head)
                await self.loop.sock_sendall(self.sock, body)
                self.partial = False
                await self._fair(len(body))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()

    async def _fair(self, nbytes: int) -> None:
        """Yield to the loop's other tasks once per YIELD_BYTES moved: reads and sends that never
        have to wait never yield (a yield per frame cost a 100 MiB exchange a sixth of its speed)."""
        self._moved += nbytes
        if self._moved >= YIELD_BYTES:
            self._moved = 0
            await asyncio.sleep(0)

    def readable(self) -> bool:
        """Whether the peer sent something not read yet (or closed), without waiting."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True  # the read will tell what went wrong
        return True

    def alive(self) -> bool:
        """Whether an idle connection still stands (nothing unread, not closed by the server)."""
        return not self.closed and not self.readable()


def status_frame(code: str, message: str) -> bytes:
    return f"{code}\n{message}".encode("utf-8", "replace")[:MESSAGE_LIMIT]


def _parse_status(body: bytes | memoryview) -> tuple[str, str]:
    code, _, message = bytes(body).decode("utf-8", "replace").partition("\n")
    return code, message


# --- the client side ------------------------------------------------------------------


def hello(token: str, node_id: str) -> bytes:
    """A connection's first bytes: who may call (the token) and whom it calls (a node id, or '')."""
    t, n = token.encode(), node_id.encode()[:255]
    return MAGIC + len(t).to_bytes(2, "little") + t + bytes((len(n),)) + n


Where = tuple[str, int, str]  # a bulk port: host, port, and the node id that named it


class BulkPool:
    """Idle connections to peers' bulk ports, reused call after call (no handshake per call)."""

    def __init__(self, token: str = "") -> None:
        self.token = token
        self._idle: dict[Where, list[Conn]] = {}
        self._swept = time.monotonic()

    async def acquire(self, where: Where) -> Conn:
        self._sweep()
        idle = self._idle.get(where, [])
        while idle:
            conn = idle.pop()
            if time.monotonic() - conn.idle_since < POOL_IDLE and conn.alive():
                return conn
            conn.close()
        host, port, node_id = where
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        nodelay(sock)
        try:
            await loop.sock_connect(sock, addr)
            conn = Conn(sock)
            await loop.sock_sendall(sock, hello(self.token, node_id))
        except BaseException:
            sock.close()
            raise
        return conn

    def release(self, where: Where, conn: Conn) -> None:
        idle = self._idle.setdefault(where, [])
        if len(idle) < MAX_IDLE_PER_PEER and not conn.closed:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def _sweep(self) -> None:
        """Close connections idle too long (peers that left, too), at most once a second."""
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        for where, idle in list(self._idle.items()):
            keep = [c for c in idle if now - c.idle_since < POOL_IDLE and not c.closed]
            for c in idle:
                if c not in keep:
                    c.close()
            if keep:
                self._idle[where] = keep
            else:
                del self._idle[where]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class BulkCall:
    """One call over a peer's bulk port, seen from the caller (the interface of gRPC's ``CallStream``).

    ``request`` (a download's) is its first frame; ``upload``: the server answers only at
    the end, so any frame it sends while we write is its refusal, read at once (as gRPC
    fails the next write), not after the whole payload. Every failure is a
    :class:`~gossip.core.errors.PeerError`; the whole call has one deadline. A call that
    fails before the server said anything (no connection, a closed one, a deadline)
    calls ``lost``: the caller goes back to gRPC for that peer until it is asked again;
    the server's first frame calls ``heard`` (the port works). Both get the address and
    the port the call went to.
    """

    def __init__(
        self,
        pool: BulkPool,
        address: str,
        where: Where,
        method: str,
        timeout: float,
        pacer: SendPacer | None = None,
        request: bytes | None = None,
        lost: Callable[[str, Where], None] = lambda address, where: None,
        upload: bool = False,
        heard: Callable[[str, Where], None] = lambda address, where: None,
    ) -> None:
        self.address = address
        self._lost = lost
        self._on_heard = heard
        self._pool = pool
        self._where = where
        self._method = method
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._pacer = pacer
        self._request = request
        self._upload = upload
        self._conn: Conn | None = None
        self._opening: asyncio.Future[Conn] | None = None
        self._sent_end = False
        self._status: tuple[str, str] | None = None
        self._heard = False  # the server sent a frame of this call
        self._broken = False
        self._cancelled = False
        self._busy = 0  # operations in flight

    async def _open(self) -> Conn:
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._opening)

    async def _connect(self) -> Conn:
        conn = await self._pool.acquire(self._where)
        self._conn = conn
        remaining = max(0.0, self._deadline - asyncio.get_running_loop().time())
        await conn.write_frame(CALL, DEADLINE.pack(remaining) + self._method.encode())
        if self._request is not None:
            await self._send(conn, self._request)
        return conn

    async def _send(self, conn: Conn, frame: bytes | memoryview) -> None:
        if self._pacer is not None:
            await self._pacer.take(len(frame))
        await conn.write_frame(DATA, frame)

    async def _op(self, what: str, run: Any) -> Any:
        if self._status is not None and self._status[0] != "OK":
            raise PeerError(self.address, *self._status)  # as the read that saw it raised
        if self._broken:
            raise PeerError(self.address, "CANCELLED", "call ended")
        self._busy += 1
        try:
            async with asyncio.timeout_at(self._deadline):
                return await run()
        except TimeoutError:
            self._fail()
            raise PeerError(self.address, "DEADLINE_EXCEEDED", "deadline exceeded") from None
        except OSError as exc:
            self._fail()
            raise PeerError(
                self.address, "UNAVAILABLE", f"bulk connection lost while {what}: {exc}"
            ) from None
        except BaseException:
            self._break()
            raise
        finally:
            self._busy -= 1
            if self._broken and self._busy == 0 and self._conn is not None:
                self._conn.close()
                self._conn = None

    def _fail(self) -> None:
        self._break()
        if not self._heard:
            self._lost(self.address, self._where)

    def _break(self) -> None:
        self._broken = True
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)  # wakes any other operation in flight

    async def write(self, frame: bytes) -> None:
        async def run() -> None:
            conn = await self._open()
            if self._sent_end or self._status is not None:
                raise PeerError(self.address, "UNAVAILABLE", "call ended: no more frames may be sent")
            if self._upload and conn.readable():
                await self._next(conn)  # the server's early answer: its refusal, raised here
                raise PeerError(self.address, "INTERNAL", "the server answered before the upload ended")
            await self._send(conn, frame)

        await self._op("sending", run)

    async def done_writing(self) -> None:
        async def run() -> None:
            conn = await self._open()
            if not self._sent_end:
                self._sent_end = True
                await conn.write_frame(END)

        await self._op("sending", run)

    async def _next(self, conn: Conn) -> bytes | memoryview | None:
        """The next data frame, or None at the status (raising PeerError unless it is OK)."""
        if self._status is not None:
            return None
        kind, body = await conn.read_frame()
        if not self._heard:
            self._heard = True
            self._on_heard(self.address, self._where)
        if kind == DATA:
            return body
        if kind != STATUS:
            raise BadFrame(f"unexpected frame kind {kind} from the server")
        self._status = _parse_status(body)
        code, message = self._status
        if code != "OK":
            raise PeerError(self.address, code, message)
        if not self._sent_end:  # the call is over: end our side too, and the connection serves again
            self._sent_end = True
            await conn.write_frame(END)
        return None

    async def read(self) -> bytes | None:
        async def run() -> bytes | memoryview | None:
            return await self._next(await self._open())

        return cast("bytes | None", await self._op("reading", run))  # a large frame: a view, as above

    async def _until_status(self) -> bytes | memoryview | None:
        conn = await self._open()
        if not self._sent_end:
            self._sent_end = True
            await conn.write_frame(END)
        last = None
        while self._status is None:
            frame = await self._next(conn)
            if frame is not None:
                last = frame
        return last

    async def finish(self) -> None:
        """Raise PeerError unless the call ended with OK (frames not read yet are dropped)."""
        await self._op("finishing", self._until_status)

    async def response(self) -> bytes:
        answer = await self._op("waiting for the answer", self._until_status)
        if answer is None:
            raise PeerError(self.address, "INTERNAL", "the server sent no answer")
        return bytes(answer)

    def cancel(self) -> None:
        """End the call now (idempotent); a call that ended cleanly gives its connection back."""
        if self._cancelled:
            return
        self._cancelled = True
        conn = self._conn
        if conn is None:
            if self._opening is not None and not self._opening.done():
                self._opening.cancel()
            self._broken = True
            return
        clean = not self._broken and self._status is not None and self._sent_end and self._busy == 0
        self._broken = True
        if clean:
            self._conn = None
            self._pool.release(self._where, conn)
        elif self._busy == 0:
            self._conn = None
            conn.close()
        else:
            self._break()  # the operation in flight ends, and closes the connection
