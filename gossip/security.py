"""Transport security: TLS and mutual TLS from PEM files, a shared token, exposure checks.

One :class:`Security` holds what a node or a CLI client loaded from the files of
its :class:`~gossip.config.SecurityConfig`:

- ``--tls-cert``/``--tls-key``: the node serves TLS with this certificate, and its
  own outgoing calls present it.
- ``--tls-ca``: the CA that signs the cluster's certificates. Outgoing calls verify
  the peer's certificate against it, and the server *requires* a client
  certificate signed by it (mutual TLS). Without it, outgoing calls verify peers
  against the system's trust store (certificates from a public CA) and the server
  asks for no client certificate.
- Peers are dialled by their advertised ``HOST:PORT``; HOST must be one of the
  certificate's subject alternative names (``IP:10.0.0.1`` or ``DNS:node1.lan``),
  or the handshake fails.
- ``--token-file``: a shared secret. Every call carries ``authorization: Bearer
  <token>``; a server interceptor checks it on every RPC, before any handler runs
  or any request is read, and answers UNAUTHENTICATED when it is missing or wrong.
  The token lives only in :attr:`Security.token` (hidden from ``repr``) and in the
  metadata; it is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from gossip import rpc
from gossip.config import ConfigError, SecurityConfig

TOKEN_HEADER = "authorization"
TOKEN_SCHEME = "Bearer "
# A token is a password, not a document: long enough for 256 random bits in any
# encoding, short enough that a mistaken path (a whole key file) is caught.
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class Security:
    """Credentials and token loaded from files; the empty default is plaintext without a token."""

    server_credentials: grpc.ServerCredentials | None = None
    channel_credentials: grpc.ChannelCredentials | None = None
    token: str = field(default="", repr=False)
    # Control calls per second and burst one connection gets, and all of them together
    # (see PeerRateLimiter); a peer_call_rate of 0 = no limit at all.
    peer_call_rate: float = 0.0
    peer_call_burst: int = 1
    node_call_rate: float = 0.0
    node_call_burst: int = 1

    @property
    def tls(self) -> bool:
        return self.server_credentials is not None or self.channel_credentials is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every outgoing call carries."""
        return ((TOKEN_HEADER, TOKEN_SCHEME + self.token),) if self.token else ()

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A new rate limit outermost (it meters refused calls too), the token check, the parse guard."""
        out: list[grpc.aio.ServerInterceptor] = []
        if self.peer_call_rate > 0:
            limiter = PeerRateLimiter(
                self.peer_call_rate,
                self.peer_call_burst,
                total_rate=self.node_call_rate or math.inf,
                total_burst=self.node_call_burst if self.node_call_rate else math.inf,
            )
            out.append(limiter)
        if self.token:
            out.append(TokenInterceptor(self.token))
        out.append(MalformedRequestGuard())
        return out


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_token(path: str) -> str:
    """The token in ``path``: one line of printable ASCII, surrounding whitespace ignored."""
    raw = _read(path, "--token-file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: the token must be printable ASCII") from None
    if not token:
        raise ConfigError(f"--token-file {path} is empty")
    # gRPC metadata values are printable ASCII; a newline inside means a wrong file.
    if not all(" " <= c <= "~" for c in token):
        raise ConfigError(f"--token-file {path}: the token must be one line of printable ASCII")
    if len(token) > MAX_TOKEN_CHARS:
        raise ConfigError(f"--token-file {path}: the token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def _check_pair(cert: str, key: str) -> None:
    """Fail now, with one line, when the files are not a PEM certificate and its own key."""
    try:
        # An empty password: an encrypted key fails here instead of prompting (gRPC
        # cannot use one either).
        ssl.create_default_context().load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key ({exc.reason or exc})"
        ) from None


def _check_ca(ca: str) -> None:
    try:
        ssl.create_default_context().load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-ca {ca}: not a PEM CA certificate ({exc.reason or exc})") from None


def load(cfg: SecurityConfig, serving: bool) -> Security:
    """Read and check the files of ``cfg``; ConfigError (one line) on anything unusable.

    ``serving``: for a node, which needs a certificate to serve TLS; a CLI client
    (``gossip status``) may give only ``--tls-ca`` to verify the node it asks.
    """
    cfg.validate(serving)
    token = read_token(cfg.token_file) if cfg.token_file else ""
    ca = _read(cfg.tls_ca, "--tls-ca") if cfg.tls_ca else None
    cert = _read(cfg.tls_cert, "--tls-cert") if cfg.tls_cert else None
    key = _read(cfg.tls_key, "--tls-key") if cfg.tls_key else None
    if ca is not None:
        _check_ca(cfg.tls_ca)
    if cert is not None:
        _check_pair(cfg.tls_cert, cfg.tls_key)
    server_credentials = None
    channel_credentials = None
    if serving and cert is not None and key is not None:
        server_credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
    if cert is not None or ca is not None:
        # root_certificates=None: gRPC's default roots (the system's, or
        # GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
    return Security(
        server_credentials,
        channel_credentials,
        token,
        cfg.peer_call_rate,
        cfg.peer_call_burst,
        cfg.node_call_rate,
        cfg.node_call_burst,
    )


# --- the token check ---------------------------------------------------------------


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends any call at once, whatever its kind, without reading a request.

    Registered as stream-stream, so gRPC hands it the request stream unread instead
    of parsing a first message (its bytes may be anything).
    """

    async def refuse(_requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC must carry ``authorization: Bearer <token>``; otherwise UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = (TOKEN_SCHEME + token).encode()
        self._refusal = _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def __repr__(self) -> str:
        return "TokenInterceptor(<hidden>)"

    def authorized(self, metadata: Any) -> bool:
        values = [v for k, v in (metadata or ()) if k == TOKEN_HEADER]
        if len(values) != 1:
            return False
        got = values[0]
        got_bytes = got if isinstance(got, bytes) else str(got).encode("utf-8", "surrogateescape")
        # Constant time: a wrong guess tells nothing about how much of it was right.
        return hmac.compare_digest(got_bytes, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        # Also for unknown methods: without the token a caller learns nothing, not even
        # which methods exist.
        return self._refusal


# --- requests that do not parse ------------------------------------------------------------


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as a unary method's request get INVALID_ARGUMENT.

    grpc.aio parses unary requests itself and answers a parse failure with
    UNKNOWN and an ERROR log with a traceback, per call: any peer could fill our
    logs. Here the handler gets the raw bytes and parses them with the method's
    own deserializer, inside a ``try``.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        ser = handler.response_serializer

        async def parsed(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return parse(request)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request does not parse")

        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            uu = handler.unary_unary

            async def unary_unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await uu(await parsed(request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, ser)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            us = handler.unary_stream

            async def unary_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async for reply in us(await parsed(request, context), context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, ser)
        if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
            us_co = handler.unary_stream

            async def unary_stream_co(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await us_co(await parsed(request, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream_co, None, ser)
        return handler


# --- per-peer rate limit ----------------------------------------------------------------

# Bulk transfers are bounded by their own rules (one pairwise exchange in flight
# per node, a few pushes and shard streams at once) and must not queue behind
# chatter; every other call, refused and unknown ones included, is rate limited.
BULK_METHODS = frozenset(
    {
        "/gossip.proto.Gossip/Exchange",
        "/gossip.proto.Gossip/Push",
        "/gossip.proto.Store/PutShard",
        "/gossip.proto.Store/GetShards",
    }
)
# Calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS,
# enforced by gRPC's core before any Python runs: extra calls wait in the caller).
# A node opens one connection per peer and has at most a few shard streams, one
# exchange and one control call open on it.
MAX_STREAMS_PER_CONNECTION: int = dict(rpc.SERVER_OPTIONS)["grpc.max_concurrent_streams"]
# Calls held for their turn, all connections together: half the server's cap on open
# calls (rpc.MAX_OPEN_CALLS), so held control calls alone cannot fill it and make
# gRPC refuse everyone's calls, a neighbour's exchange included.
MAX_HELD_CALLS = 512
# A connection counts towards the shares while it called within this many seconds
# (or has calls held); the count is redone at most every _RECOUNT seconds.
ACTIVE_WINDOW = 1.0
_RECOUNT = 0.1
# A call refused for want of time is answered this long before its deadline, so its
# caller reads RESOURCE_EXHAUSTED rather than its own DEADLINE_EXCEEDED.
_REFUSE_EARLY = 0.05


class _Bucket:
    __slots__ = ("stamp", "tokens", "waiting")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.waiting = 0


class PeerRateLimiter(grpc.aio.ServerInterceptor):
    """At most ``rate`` control calls per second from one connection, ``total_rate`` from all.

    A token bucket per connection (gRPC's peer string, ``ipv4:HOST:PORT``: a node
    opens one channel per peer): ``burst`` calls pass at once, later ones are held
    until the bucket refills, so a flooding peer gets ``rate`` calls served and
    slows itself down instead of making us spend CPU on refusals.

    Many connections at once share the node's budget fairly: with n connections
    active (a call within ``ACTIVE_WINDOW`` seconds, or one held), each gets
    ``min(rate, total_rate / n)`` calls per second, ``min(burst, total_burst / n)``
    at once and ``min(max_waiting, max_held / n)`` held. A peer that calls less
    than its share, as gossip does, is never held however many others flood; the
    flooders together get ``total_rate``. A new connection's first burst comes out
    of one pool of ``total_burst`` that refills at ``total_rate``, so connections
    opened in a row, or again and again, get no more than that between them.

    A call that could not be served before its deadline is held until just before
    it and then refused with RESOURCE_EXHAUSTED; one beyond its connection's held
    calls is refused at once.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        max_waiting: int = MAX_STREAMS_PER_CONNECTION,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 4096,
        total_rate: float = math.inf,
        total_burst: float = math.inf,
        max_held: int = MAX_HELD_CALLS,
    ) -> None:
        if rate <= 0 or burst < 1 or total_rate <= 0 or total_burst < 1 or max_held < 1:
            raise ValueError("rates must be > 0, bursts and max_held >= 1")
        self.rate = rate
        self.burst = burst
        self.max_waiting = max_waiting
        self.clock = clock
        self.max_peers = max_peers
        self.total_rate = total_rate
        self.total_burst = total_burst
        self.max_held = max_held
        self._buckets: dict[str, _Bucket] = {}
        self._active = 0
        self._counted_at = -math.inf
        self._pool = total_burst
        self._pool_stamp = clock()
        self.refused = 0
        self.delayed = 0

    def share(self) -> tuple[float, float, int]:
        """What one connection gets now: calls per second, calls at once, calls held."""
        now = self.clock()
        if now - self._counted_at >= _RECOUNT:
            self._active = sum(
                1 for b in self._buckets.values() if b.waiting or now - b.stamp < ACTIVE_WINDOW
            )
            self._counted_at = now
        n = max(1, self._active)
        return (
            min(self.rate, self.total_rate / n),
            max(1.0, min(self.burst, self.total_burst / n)),
            max(1, min(self.max_waiting, self.max_held // n)),
        )

    def reserve(self, peer: str, max_wait: float) -> float | None:
        """Take a slot for one call: seconds to wait before serving it, or None to refuse it."""
        now = self.clock()
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._forget_idle(now)
            self._active += 1  # counted at once, not at the next recount
            b = self._buckets[peer] = _Bucket(self._first_burst(now), now)
        rate, burst, max_waiting = self.share()
        if now > b.stamp:
            b.tokens += (now - b.stamp) * rate
        b.tokens = min(burst, b.tokens)
        b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        wait = (1.0 - b.tokens) / rate
        if wait > max_wait or b.waiting >= max_waiting:
            self.refused += 1
            return None
        b.tokens -= 1.0  # a debt, paid back by the refill during the wait
        return wait

    def _first_burst(self, now: float) -> float:
        """A new connection's tokens, taken out of the pool all new connections share."""
        if math.isinf(self.total_burst):
            return math.inf  # clipped to the connection's burst by the caller
        if now > self._pool_stamp:
            self._pool = min(self.total_burst, self._pool + (now - self._pool_stamp) * self.total_rate)
            self._pool_stamp = now
        tokens = min(self.share()[1], self._pool)
        self._pool -= tokens
        return tokens

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that are full again (their peers went quiet); they would start full anyway."""
        rate, burst, _ = self.share()
        for peer, b in list(self._buckets.items()):
            if b.waiting == 0 and b.tokens + (now - b.stamp) * rate >= burst:
                del self._buckets[peer]

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = context.peer() or "unknown"
        remaining = context.time_remaining()
        max_wait = 5.0 if remaining is None else min(5.0, remaining)
        wait = self.reserve(peer, max_wait)
        b = self._buckets.get(peer)
        if wait is None:
            # Not in time: held until just before its deadline, then refused. Refused at
            # once, a flooder would send its next call at once, and each refusal costs
            # this node about what serving a call does; held, the call keeps one of its
            # connection's streams, and gRPC's core turns the flooder's extra calls away.
            if b is not None and b.waiting < self.share()[2]:
                await self._hold(b, max_wait - _REFUSE_EARLY)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls from this peer")
        elif wait > 0:
            self.delayed += 1
            await self._hold(b, wait)

    @staticmethod
    async def _hold(b: _Bucket | None, seconds: float) -> None:
        if b is not None:
            b.waiting += 1
        try:
            await asyncio.sleep(max(0.0, seconds))
        finally:
            if b is not None:
                b.waiting -= 1

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        admit = self.admit
        ser, de = handler.response_serializer, handler.request_deserializer
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await admit(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, de, ser)
        if handler.stream_stream is not None and inspect.iscoroutinefunction(handler.stream_stream):
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await admit(context)
                return await inner_ss(requests, context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, de, ser)
        return handler  # no such control method today; served unlimited rather than broken

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler_call_details.method in BULK_METHODS:
            return handler
        if handler is None:  # an unknown method costs a caller its turn like any other call
            handler = _refuse(grpc.StatusCode.UNIMPLEMENTED, "no such method")
        return self._wrap(handler)


# --- exposure ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: assume it resolves to something reachable


def exposure_warning(listen: str, security: Security) -> str | None:
    """The warning to give when ``listen`` is reachable from other machines with no protection."""
    host = listen.rpartition(":")[0]
    if is_loopback(host) or security.server_credentials is not None or security.token:
        return None
    return (
        f"listening on {listen} without TLS or a token: anyone who can reach this address "
        "can read this model and change it (see --tls-cert/--tls-key/--tls-ca and --token-file)"
    )
