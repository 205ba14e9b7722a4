"""``gossip dashboard``: one live web page for a whole cluster, found through one node.

:class:`Dashboard` asks the node it was given, then every member any answering
node lists (the union of their tables; members their peers hold dead or departed
are shown, not asked), every ``interval`` seconds: Status and store status, at
most ``in_flight`` calls at once over one :class:`Channels`, each with a deadline.
Each answer is checked (:mod:`gossip.observe.readings`) and the round goes to a
:class:`~gossip.observe.aggregate.ClusterState`. aiohttp serves the page
(``gossip/observe/web``: our own HTML, JS and SVG, no CDN) and ``/api/state``,
which the page fetches every poll and redraws from without reloading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gossip.observe.aggregate import HISTORY, ClusterState
from gossip.observe.readings import MalformedStatus, Reading, reading_from
from gossip.observe.status import ask_node
from gossip.transport.channels import Channels
from gossip.transport.security import Security

__all__ = ["BackgroundDashboard", "Dashboard", "serve_dashboard"]

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
IN_FLIGHT = 16  # calls at once: 32 nodes answer in two waves of a few ms each
# A node's store is asked every 5th round (nodes spread over the rounds): it changes
# once per published snapshot, and asking it every round doubled the calls.
STORE_EVERY = 5


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Dashboard:
    """Polls a cluster through ``peer`` and serves its page at ``listen`` until stopped.

    ``await start()`` asks the peer first (ConnectionError with one line if it does
    not answer like a gossip node), then binds (OSError if it cannot) and polls
    every ``interval`` seconds in the background; ``url`` is then the page's
    address (``listen`` may name port 0); ``await stop()`` ends both.
    """

    def __init__(
        self,
        peer: str,
        listen: str = "127.0.0.1:8080",
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
        security: Security | None = None,
        in_flight: int = IN_FLIGHT,
        history: int = HISTORY,
    ) -> None:
        self.peer = peer
        self.listen = listen
        self.interval = interval
        self.timeout = timeout
        self.security = security or Security()
        self.state = ClusterState(peer, history)
        self.url = ""
        self._slots = asyncio.Semaphore(in_flight)
        self._channels: Channels | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._channels = Channels(self.security.channel_credentials, self.security.metadata)
        try:
            got = await self._ask(None, self.peer)
            if not isinstance(got[2], Reading):
                raise ConnectionError(got[2])
            self.state.update(time.time(), [got], 0.0)
            await self._serve()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._poll_loop())
        self._task.add_done_callback(self._poll_ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._channels is not None:
            await self._channels.close()
            self._channels = None

    async def poll_once(self) -> None:
        """One round: every target asked at once (at most ``in_flight`` calls in flight)."""
        t0 = time.monotonic()
        n = self.state.round
        results = await asyncio.gather(
            *(
                self._ask(i, a, (n + zlib.crc32(a.encode())) % STORE_EVERY == 0)
                for i, a in self.state.targets()
            )
        )
        self.state.update(time.time(), results, time.monotonic() - t0)

    def _poll_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("polling stopped: the page no longer updates", exc_info=task.exception())

    async def _poll_loop(self) -> None:
        while True:  # start() ran the first round
            await asyncio.sleep(max(0.0, self.interval - self.state.last_round_seconds))
            await self.poll_once()

    async def _ask(
        self, node_id: str | None, address: str, store: bool = True
    ) -> tuple[str | None, str, Reading | str]:
        assert self._channels is not None
        async with self._slots:
            try:
                answer = await ask_node(address, self.timeout, self._channels, store)
            except ConnectionError as exc:
                return node_id, address, str(exc)
        try:
            return node_id, address, reading_from(answer)
        except MalformedStatus as exc:
            log.info("%s: malformed status: %s", address, exc)
            return node_id, address, f"{address} answered with a malformed status: {exc}"

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/app.js", self._file)
        app.router.add_get("/style.css", self._file)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/favicon.ico", self._no_icon)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = split_listen(self.listen)
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        bound = self._runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/"

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Bound to loopback, answer only to loopback names: a web page that rebinds its
        # own DNS name to 127.0.0.1 must not read the cluster's state.
        host = split_listen(self.listen)[0]
        asked = (request.host or "").rpartition(":")[0].strip("[]") or request.host
        if host in _LOOPBACK and asked not in _LOOPBACK:
            return web.Response(status=403, text="forbidden host\n")
        response: web.StreamResponse = await handler(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB / "index.html")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB / request.path.lstrip("/"))

    async def _no_icon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _api_state(self, request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.Response(status=400, text="since must be an integer\n")
        snap = self.state.snapshot(since)
        snap["interval"] = self.interval
        return web.Response(text=json.dumps(snap, separators=(",", ":")), content_type="application/json")


async def serve_dashboard(
    peer: str,
    listen: str = "127.0.0.1:8080",
    *,
    interval: float = 1.0,
    timeout: float = 2.0,
    security: Security | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run a dashboard until cancelled; ``on_ready(url)`` once it serves.

    Raises ConnectionError (the peer) or OSError (``listen``) with one line before serving.
    """
    async with Dashboard(peer, listen, interval=interval, timeout=timeout, security=security) as board:
        if on_ready is not None:
            on_ready(board.url)
        await asyncio.Event().wait()


class BackgroundDashboard:
    """A :class:`Dashboard` on its own event loop on a daemon thread, for synchronous callers.

    ``start()`` returns the page's URL once it serves (ConnectionError or OSError as
    :meth:`Dashboard.start`); ``stop()`` ends polling and serving and the thread.
    """

    def __init__(self, peer: str, listen: str = "127.0.0.1:0", **options: Any) -> None:
        self.board = Dashboard(peer, listen, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gossip-dashboard", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.board.start(), self._loop).result(timeout)
        except BaseException:
            self._end_loop()
            raise
        return self.board.url

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.board.stop(), self._loop).result(timeout)
            finally:
                self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
