"""Calls in memory: the exchange protocols without gRPC, for tests and experiments.

:func:`memory_call` runs a serving function (``pairwise.answer``, a push-sum
``receive`` ...) on a task and hands back the caller's side of the call. Frames
travel through queues; a :class:`~gossip.core.errors.Refused` raised by the
serving side ends the call with its status, which the caller sees as a
:class:`~gossip.core.errors.PeerError` from ``finish`` or ``response``, as over
gRPC. Cancelling the call cancels the serving task, as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from gossip.core.errors import PeerError, Refused
from gossip.node.protocol import FrameStream


class _ServerSide:
    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]) -> None:
        self._inbox, self._outbox = inbox, outbox

    async def read(self) -> bytes | None:
        return await self._inbox.get()

    async def write(self, frame: bytes) -> None:
        await self._outbox.put(frame)


class MemoryCall:
    """The caller's side of one call served in memory (see :class:`~gossip.node.protocol.CallerStream`)."""

    def __init__(self, serve: Callable[[FrameStream], Awaitable[Any]], address: str) -> None:
        self.address = address
        self._to_server: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._to_client: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = False

        async def run() -> Any:
            try:
                return await serve(_ServerSide(self._to_server, self._to_client))
            finally:
                await self._to_client.put(None)  # the end of the answer, however the call ended

        self._task = asyncio.ensure_future(run())

    async def write(self, frame: bytes) -> None:
        if self._task.done() or self._closed:
            raise PeerError(self.address, "UNAVAILABLE", "call ended: write after the end")
        await self._to_server.put(frame)

    async def done_writing(self) -> None:
        if not self._closed:
            self._closed = True
            await self._to_server.put(None)

    async def read(self) -> bytes | None:
        return await self._to_client.get()

    async def finish(self) -> None:
        await self.response()

    async def response(self) -> bytes:
        try:
            result = await asyncio.shield(self._task)
        except Refused as exc:
            raise PeerError(self.address, exc.code, exc.message) from None
        except TimeoutError:
            raise PeerError(self.address, "DEADLINE_EXCEEDED", "the call stalled") from None
        except asyncio.CancelledError:
            if self._task.cancelled():
                raise PeerError(self.address, "CANCELLED", "call cancelled") from None
            raise
        return result if isinstance(result, bytes) else b""

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()

    @property
    def served(self) -> asyncio.Future[Any]:
        """The serving side's task: its result, or how it ended."""
        return self._task


def memory_call(serve: Callable[[FrameStream], Awaitable[Any]], address: str = "memory:1") -> MemoryCall:
    """Start a call that ``serve`` answers in memory; returns the caller's stream."""
    return MemoryCall(serve, address)
