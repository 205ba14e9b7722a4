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
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from gossip.core.errors import PeerError
from gossip.transport import serde
from gossip.transport.bulk import BulkCall, BulkPool, Where
from gossip.transport.frames import MESSAGE_LIMIT
from gossip.transport.pacing import SendPacer

__all__ = ["CallStream", "Channels", "PeerError", "transfer_timeout"]

log = logging.getLogger(__name__)

GOSSIP = "/gossip.proto.Gossip/"
STORE = "/gossip.proto.Store/"

# Bulk transfers are bounded by their own rules (one pairwise exchange in flight per
# node, a few pushes and shard streams at once): they are not rate limited
# (gossip.transport.ratelimit), and they go over a peer's bulk port once it is known
# (gossip.transport.bulk).
BULK_METHODS = frozenset(
    {
        "/gossip.proto.Gossip/Exchange",
        "/gossip.proto.Gossip/Push",
        "/gossip.proto.Store/PutShard",
        "/gossip.proto.Store/GetShards",
    }
)
TOKEN_HEADER = "authorization"  # the metadata key of the token (gossip.transport.security)
TOKEN_SCHEME = "Bearer "


def token_of(metadata: Sequence[tuple[str, str]]) -> str:
    """The token value ``metadata`` carries (``Bearer …``), '' for none."""
    return next((v for k, v in metadata if k == TOKEN_HEADER), "")


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    # Loopback and LAN peers: do not let idle channels linger half-dead.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
]

# How often a peer is asked for its bulk port again after it named none, or named one that
# cannot be reached from here. A peer that could not be asked at all (down, restarting) is
# asked again sooner: after 1 s, then twice as long each time, up to this.
BULK_ASK_AGAIN = 30.0
BULK_ASK_FIRST_RETRY = 1.0
BULK_ASK_TIMEOUT = 5.0
BULK_LEARN_WAIT = 2.0  # seconds a rebuild waits for its owners' bulk ports, at most

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


Stream = CallStream | BulkCall


class Channels:
    """Channels to peers, one per address, with the credentials and metadata every call carries.

    With ``bulk`` (the default) and no TLS, a bulk call (:data:`BULK_METHODS`) goes to
    the peer's bulk port (:mod:`gossip.transport.bulk`) once the peer named it in its
    status; the first call to a peer goes over gRPC while it is asked.
    """

    def __init__(
        self,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        pacer: SendPacer | None = None,
        bulk: bool = True,
    ) -> None:
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.pacer = pacer  # paces every request this side sends (``--max-send-rate``)
        self.bulk = bulk
        self._bulk_ports: dict[str, Where] = {}  # address -> its bulk port (port 0: none)
        self._bulk_next: dict[str, float] = {}  # address -> when it may be asked again
        self._bulk_retry: dict[str, float] = {}  # address -> the wait after its next failed ask
        self.ask_again = BULK_ASK_AGAIN
        self._asking: dict[str, asyncio.Task[None]] = {}  # address -> its ask in flight
        self._pool = BulkPool(token_of(self._metadata))

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
        self._pool.token = token_of(self._metadata)

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
        asking = list(self._asking.values())
        for task in asking:
            task.cancel()
        await asyncio.gather(*asking, return_exceptions=True)
        self._pool.close()
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

    def bulk_port(self, address: str) -> int | None:
        """The bulk port ``address`` named (0: none), None while it is not known."""
        known = self._bulk_ports.get(address)
        return known[1] if known is not None else None

    @property
    def _plain(self) -> bool:
        """Whether bulk calls may go over plain TCP at all (bulk on, no TLS)."""
        return self.bulk and self._credentials is None

    def _bulk_call(
        self, address: str, method: str, timeout: float, request: bytes | None = None, upload: bool = False
    ) -> BulkCall | None:
        """A ``method`` call to ``address`` over its bulk port, or None (it goes over gRPC)."""
        if not self._plain or method not in BULK_METHODS:
            return None
        known = self._bulk_ports.get(address)
        if known is None or not known[1]:
            self._ask(address)  # unless it was asked lately
            return None
        return BulkCall(
            self._pool,
            address,
            known,
            method,
            timeout,
            self.pacer,
            request,
            lost=self.bulk_lost,
            upload=upload,
            heard=self._bulk_heard,
        )

    def _ask(self, address: str, now: bool = False) -> asyncio.Task[None] | None:
        """Ask ``address`` for its bulk port in the background, unless it was asked lately
        (``now``: even so); an ask already in flight is the one returned."""
        if (task := self._asking.get(address)) is not None:
            return task
        t = time.monotonic()
        if not now and t < self._bulk_next.get(address, t):
            return None
        self._bulk_next[address] = t + self.ask_again  # until the answer says otherwise
        task = asyncio.ensure_future(self._learn(address))
        self._asking[address] = task
        task.add_done_callback(lambda _: self._asking.pop(address, None))
        return task

    async def _learn(self, address: str) -> None:
        try:
            reply = await self.unary(address, GOSSIP + "Status", b"", BULK_ASK_TIMEOUT)
            status = serde.status_from_bytes(reply)
        except (PeerError, ValueError) as exc:
            # Down or restarting: asked again soon, then less and less often.
            wait = self._put_off(address)
            log.debug("could not ask %s for its bulk port (again in %.0f s): %s", address, wait, exc)
            return
        host, port = address.rpartition(":")[0].strip("[]"), status.bulk_port
        if port:
            # The port must be reachable from here too (a relay or a firewall may pass only the
            # gRPC port): one connection, kept for the first call. Its hello names the node
            # whose port it is, so a port another process took meanwhile refuses us.
            try:
                async with asyncio.timeout(BULK_ASK_TIMEOUT):
                    conn = await self._pool.acquire((host, port, status.node_id))
            except (OSError, TimeoutError) as exc:
                log.info(
                    "bulk port %d of %s cannot be reached (%s): its calls stay on gRPC", port, address, exc
                )
                port = 0
            else:
                self._pool.release((host, port, status.node_id), conn)
        self._bulk_ports[address] = (host, port, status.node_id)

    async def learn_bulk(self, addresses: Iterable[str], timeout: float = BULK_ASK_TIMEOUT) -> None:
        """Ask the peers at ``addresses`` for their bulk ports now, together (a rebuild, which
        calls each owner once, would otherwise make every call before it knows)."""
        if not self._plain:
            return
        asked = [self._ask(a, now=True) for a in set(addresses) if a not in self._bulk_ports]
        tasks = [t for t in asked if t is not None]
        if tasks:  # not long: a peer that does not answer soon is called over gRPC
            await asyncio.wait(tasks, timeout=min(timeout, BULK_LEARN_WAIT))

    def bulk_lost(self, address: str, where: Where) -> None:
        """A call to bulk port ``where`` failed before a word: back to gRPC for ``address`` until it
        is asked again, soon (a peer that restarts on the same ports is called there again
        within seconds). Calls failing together put the next ask off once; a late failure on
        a port since replaced changes nothing."""
        if self._bulk_ports.get(address) == where:
            del self._bulk_ports[address]
            self._put_off(address)

    def _bulk_heard(self, address: str, where: Where) -> None:
        """A bulk call was answered: the port works, so a later loss is put off by 1 s again."""
        self._bulk_retry.pop(address, None)

    def _put_off(self, address: str) -> float:
        """The next ask of ``address`` after 1 s, then twice as long each time, up to
        ``ask_again``, until a bulk call to it is answered (an answered ask is not enough:
        a port that takes connections but fails every call would be asked every second)."""
        wait = self._bulk_retry.get(address, min(BULK_ASK_FIRST_RETRY, self.ask_again))
        self._bulk_retry[address] = min(2 * wait, self.ask_again)
        self._bulk_next[address] = time.monotonic() + wait
        return wait

    def stream(self, address: str, method: str, timeout: float) -> Stream:
        """Open a bidirectional call: the caller writes frames and reads the answer's."""
        if (bulk := self._bulk_call(address, method, timeout)) is not None:
            return bulk
        call = self.channel(address).stream_stream(method)(timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)

    def upload(self, address: str, method: str, timeout: float) -> Stream:
        """Open a client-streaming call: write frames, ``done_writing``, then ``response``."""
        if (bulk := self._bulk_call(address, method, timeout, upload=True)) is not None:
            return bulk
        call = self.channel(address).stream_unary(method)(timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)

    def download(self, address: str, method: str, request: bytes, timeout: float) -> Stream:
        """Open a server-streaming call with one encoded request; read its frames."""
        if (bulk := self._bulk_call(address, method, timeout, request=request)) is not None:
            return bulk
        call = self.channel(address).unary_stream(method)(request, timeout=timeout, metadata=self._metadata)
        return CallStream(call, address, self.pacer)
