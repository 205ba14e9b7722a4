"""A per-connection and node-wide budget for control calls (status, membership, store queries).

Bulk transfers are bounded by their own rules (one pairwise exchange in flight
per node, a few pushes and shard streams at once); every other call, refused
and unknown ones included, is metered here before any handler runs.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from gossip.transport.channels import BULK_METHODS
from gossip.transport.server import SERVER_OPTIONS, refusing_handler

# Calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS,
# enforced by gRPC's core before any Python runs: extra calls wait in the caller).
# A node opens one connection per peer and has at most a few shard streams, one
# exchange and one control call open on it.
MAX_STREAMS_PER_CONNECTION: int = dict(SERVER_OPTIONS)["grpc.max_concurrent_streams"]
# Calls held for their turn, all connections together: half the server's cap on open
# calls (server.MAX_OPEN_CALLS), so held control calls alone cannot fill it and make
# gRPC refuse everyone's calls, a neighbour's exchange included.
MAX_HELD_CALLS = 512
# A connection counts towards the shares while it called within this many seconds
# (or has calls held); the count is redone at most every _RECOUNT seconds.
ACTIVE_WINDOW = 1.0
_RECOUNT = 0.1
# A call refused for want of time is answered this long before its deadline, so its
# caller reads RESOURCE_EXHAUSTED rather than its own DEADLINE_EXCEEDED.
_REFUSE_EARLY = 0.05


UNKNOWN_METHOD = "unknown"


def method_name(path: str) -> str:
    """``/gossip.proto.Store/Holdings`` -> ``Store/Holdings``."""
    service, _, method = path.lstrip("/").partition("/")
    return f"{service.rpartition('.')[2]}/{method}"


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
        # Control calls received, by "Service/Method" (UNKNOWN for a method this server lacks,
        # so a peer cannot grow the map): refused and held ones included.
        self.received: collections.Counter[str] = collections.Counter()

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
        if wait is None:
            # Not in time: held until just before its deadline, then refused. Refused at
            # once, a flooder would send its next call at once, and each refusal costs
            # this node about what serving a call does; held, the call keeps one of its
            # connection's streams, and gRPC's core turns the flooder's extra calls away.
            if self.held(peer) < self.share()[2]:
                await self.hold(peer, max_wait - _REFUSE_EARLY)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls from this peer")
        elif wait > 0:
            self.delayed += 1
            await self.hold(peer, wait)

    def held(self, peer: str) -> int:
        """Calls of ``peer``'s connection being held for their turn now."""
        b = self._buckets.get(peer)
        return b.waiting if b is not None else 0

    def peers(self) -> list[str]:
        """The connections the limiter keeps a bucket for."""
        return sorted(self._buckets)

    async def hold(self, peer: str, seconds: float) -> None:
        """Hold one call of ``peer`` for ``seconds``, counted among its held calls meanwhile."""
        b = self._buckets.get(peer)
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
            self.received[UNKNOWN_METHOD] += 1
            handler = refusing_handler(grpc.StatusCode.UNIMPLEMENTED, "no such method")
        else:
            self.received[method_name(handler_call_details.method)] += 1
        return self._wrap(handler)
