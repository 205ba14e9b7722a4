"""The bulk port: the same frames and methods as gRPC over plain TCP (gossip.transport.bulk).

Real sockets on port 0 and real nodes; every test has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
import torch

from gossip.cli.output import status_text
from gossip.config import ConfigError, GossipConfig, NodeConfig, SecurityConfig, chunk_bytes_for
from gossip.core.errors import PeerError, Refused
from gossip.core.params import FlatParams, Layout
from gossip.node.node import Node
from gossip.observe.status import fetch_status
from gossip.transport import bulk
from gossip.transport.bulk import BulkCall, BulkPool
from gossip.transport.bulkserver import BulkServer
from gossip.transport.channels import BULK_METHODS, GOSSIP, Channels
from gossip.transport.server import ServerStream, bidi, download, upload

T = TypeVar("T")
EXCHANGE = GOSSIP + "Exchange"
PUSH = GOSSIP + "Push"
GET = "/gossip.proto.Store/GetShards"
HELLO = bulk.hello("", "")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Calls:
    """A service whose methods record what they saw."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.entered = 0

    def methods(self) -> dict[str, Any]:
        async def echo(stream: ServerStream) -> None:  # Exchange: every frame back, reversed
            self.entered += 1
            while (frame := await stream.read()) is not None:
                self.seen.append(bytes(frame))
                if bytes(frame) == b"refuse":
                    raise Refused("FAILED_PRECONDITION", "told to refuse")
                if bytes(frame) == b"stall":
                    await asyncio.sleep(60)
                if bytes(frame) == b"slow":
                    await asyncio.sleep(1.0)
                await stream.write(bytes(frame)[::-1])

        async def total(stream: ServerStream) -> bytes:  # Push: the bytes' count
            self.entered += 1
            n = 0
            while (frame := await stream.read()) is not None:
                n += len(frame)
            return str(n).encode()

        return {"Exchange": bidi(echo), "Push": upload(total), "Sync": bidi(echo)}

    def store(self) -> dict[str, Any]:
        async def shards(request: bytes, stream: ServerStream) -> None:  # GetShards: the request, 3 times
            self.entered += 1
            for _ in range(3):
                await stream.write(request)

        return {"GetShards": download(shards)}


@contextlib.asynccontextmanager
async def served(
    token: str = "", gossip: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Calls, BulkServer, BulkPool]]:
    """A bulk server of a :class:`Calls` service (or of ``gossip``'s methods) on port 0, and a
    client pool; both closed at the end."""
    calls = Calls()
    services = (
        [("gossip.proto.Gossip", gossip)]
        if gossip is not None
        else [("gossip.proto.Gossip", calls.methods()), ("gossip.proto.Store", calls.store())]
    )
    server = BulkServer(services, BULK_METHODS, token=token)
    await server.start("127.0.0.1", 0)
    pool = BulkPool()
    try:
        yield calls, server, pool
    finally:
        pool.close()
        await server.stop()


def _call(pool: BulkPool, server: BulkServer, method: str, timeout: float = 5.0, **kw: Any) -> BulkCall:
    return BulkCall(pool, "peer:1", ("127.0.0.1", server.port, kw.pop("node_id", "")), method, timeout, **kw)


def test_frames_go_both_ways_and_the_connection_is_reused() -> None:
    async def main() -> None:
        async with served() as (_, server, pool):
            big = bytes(range(256)) * 4096 * 2  # 2 MiB: a frame read in place
            for _ in range(3):
                call = _call(pool, server, EXCHANGE)
                await call.write(b"abc")
                assert await call.read() == b"cba"
                await call.write(big)
                back = await call.read()
                assert back is not None and bytes(back) == big[::-1]
                await call.finish()
                call.cancel()
            assert len(server._conns) == 1  # one connection served all three calls
            up = _call(pool, server, PUSH)
            for chunk in (b"x" * 10, b"y" * 5):
                await up.write(chunk)
            assert await up.response() == b"15"
            up.cancel()
            down = _call(pool, server, GET, request=b"want")
            assert [await down.read() for _ in range(4)] == [b"want", b"want", b"want", None]
            await down.finish()
            down.cancel()
            assert len(server._conns) == 1

    run(main())


def test_a_refusal_reaches_the_caller_with_its_code_and_the_next_call_works() -> None:
    async def main() -> None:
        async with served() as (_, server, pool):
            call = _call(pool, server, EXCHANGE)
            await call.write(b"refuse")
            with pytest.raises(PeerError) as info:
                await call.read()
            assert (info.value.code, info.value.details) == ("FAILED_PRECONDITION", "told to refuse")
            call.cancel()
            again = _call(pool, server, EXCHANGE)
            await again.write(b"ok")
            assert await again.read() == b"ko"
            await again.finish()
            again.cancel()

    run(main())


def test_unknown_and_control_methods_are_not_served() -> None:
    async def main() -> None:
        async with served() as (calls, server, pool):
            for method in (GOSSIP + "Sync", GOSSIP + "Nope"):  # Sync is a control call: gRPC only
                call = _call(pool, server, method)
                await call.write(b"hi")
                with pytest.raises(PeerError) as info:
                    await call.finish()
                assert info.value.code == "UNIMPLEMENTED"
                call.cancel()
            assert calls.entered == 0

    run(main())


def test_deadlines_end_a_stalled_call_on_both_sides() -> None:
    async def main() -> None:
        async with served() as (_, server, pool):
            call = _call(pool, server, EXCHANGE, timeout=0.5)
            await call.write(b"stall")
            with pytest.raises(PeerError) as info:
                await call.read()
            assert info.value.code == "DEADLINE_EXCEEDED"
            call.cancel()
            # The server's own deadline (the one the call announced) ended the method too.
            for _ in range(50):
                if not server._conns:
                    break
                await asyncio.sleep(0.1)
            assert not server._conns

    run(main())


def test_a_stopping_server_lets_calls_in_flight_end_within_its_grace() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with served() as (calls, server, pool):
            first = [_call(pool, server, EXCHANGE) for _ in range(2)]  # two connections at once
            for c in first:
                await c.write(b"ab")
                assert await c.read() == b"ba"
            for c in first:
                await c.finish()
                c.cancel()
            call = _call(pool, server, EXCHANGE)  # on one of them; the other stays idle
            await call.write(b"slow")  # answered 1 s later
            while calls.entered < 3:
                await asyncio.sleep(0.01)
            assert len(server._conns) == 2 and len(server._in_call) == 1
            t0 = loop.time()
            stopping = asyncio.ensure_future(server.stop(grace=5.0))
            while len(server._conns) > 1:  # the idle connection closes at once...
                await asyncio.sleep(0.01)
            assert len(server._in_call) == 1  # ...while the call is still in flight
            assert await call.read() == b"wols"  # the call in flight is answered...
            await call.finish()  # ...and ends with OK
            call.cancel()
            await stopping  # once it ended, not after the whole grace
            assert loop.time() - t0 < 3.0 and not server._conns
            with pytest.raises(PeerError):  # no new connections
                late = _call(pool, server, EXCHANGE)
                await late.write(b"x")
                await late.read()

        async with served() as (calls, server, pool):
            call = _call(pool, server, EXCHANGE)
            await call.write(b"stall")
            while calls.entered < 1:
                await asyncio.sleep(0.01)
            t0 = loop.time()
            await server.stop(grace=0.3)  # a call that does not end is cancelled after the grace
            assert 0.25 < loop.time() - t0 < 3.0 and not server._conns
            with pytest.raises(PeerError):
                await call.read()
            call.cancel()

    run(main())


def test_a_wrong_or_missing_token_reaches_no_method() -> None:
    async def main() -> None:
        async with served(token="Bearer s3cret") as (calls, server, _):
            for token in ("", "Bearer wrong", "Bearer s3cre"):
                pool = BulkPool(token)
                call = _call(pool, server, EXCHANGE)
                with pytest.raises(PeerError) as info:
                    await call.write(b"hi")
                    await call.read()
                assert info.value.code in ("UNAUTHENTICATED", "UNAVAILABLE")
                call.cancel()
                pool.close()
            assert calls.entered == 0 and calls.seen == []
            good = BulkPool("Bearer s3cret")
            call = _call(good, server, EXCHANGE)
            await call.write(b"hi")
            assert await call.read() == b"ih"
            call.cancel()
            good.close()

    run(main())


def test_a_refused_upload_stops_sending_and_gets_the_refusal() -> None:
    async def main() -> None:
        refused = 0

        async def busy(stream: ServerStream) -> bytes:
            nonlocal refused
            refused += 1
            raise Refused("RESOURCE_EXHAUSTED", "too many pushes")

        async with served(gossip={"Push": upload(busy)}) as (_, server, pool):
            call = _call(pool, server, PUSH, upload=True)
            sent = 0
            with pytest.raises(PeerError) as info:
                for _ in range(2000):  # 2 GB if nothing stopped it
                    await call.write(bytes(1 << 20))
                    sent += 1
                    await asyncio.sleep(0.001)
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert refused == 1 and sent < 200
            call.cancel()
            call.cancel()  # idempotent

    run(main())


def test_a_port_that_closes_before_answering_is_given_up_and_cancel_is_idempotent() -> None:
    async def main() -> None:
        async with served() as (calls, server, pool):
            lost: list[str] = []
            # A hello naming another node: closed without a word, and the caller gives the port up.
            call = _call(
                pool,
                server,
                EXCHANGE,
                node_id="someone-else",
                lost=lambda address, where: lost.append(address),
            )
            with pytest.raises(PeerError) as info:
                await call.write(b"hi")
                await call.read()
            assert info.value.code == "UNAVAILABLE" and lost == ["peer:1"]
            call.cancel()
            assert calls.entered == 0
            # The right node: served; a second cancel of a clean call leaves its pooled connection alone.
            server.node_id = "me"
            first = _call(pool, server, EXCHANGE, node_id="me")
            await first.write(b"ab")
            assert await first.read() == b"ba"
            await first.finish()
            first.cancel()
            second = _call(pool, server, EXCHANGE, node_id="me")
            await second.write(b"cd")
            first.cancel()
            assert await second.read() == b"dc"
            await second.finish()
            second.cancel()
            assert len(server._conns) == 1

    run(main())


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what came back before the server closed it."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                got += chunk
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the server closed first (a bad hello is closed at once): what came back stands
    return got


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # not a hello
        bulk.MAGIC + (5000).to_bytes(2, "little"),  # a token longer than allowed
        HELLO[:-1] + b"\x05abc",  # a node id cut short
        HELLO + b"X" + struct.pack("<I", 0),  # an unknown frame kind
        HELLO + b"C" + struct.pack("<I", 1 << 30),  # a frame over the limit
        HELLO + b"D" + struct.pack("<I", 2) + b"hi",  # data before any call
        HELLO + b"C" + struct.pack("<I", 3) + b"abc",  # a call without its deadline
    ],
)
def test_malformed_connections_are_closed_and_reach_no_method(data: bytes) -> None:
    async def main() -> None:
        async with served() as (calls, server, _):
            await asyncio.to_thread(_raw, server.port, data)
            assert calls.entered == 0

    run(main())


def test_a_nan_deadline_or_a_truncated_call_does_not_hang_the_server() -> None:
    async def main() -> None:
        async with served() as (calls, server, _):
            call = (
                b"C"
                + struct.pack("<I", 8 + len(EXCHANGE))
                + struct.pack("<d", float("nan"))
                + EXCHANGE.encode()
            )
            back = await asyncio.to_thread(_raw, server.port, HELLO + call + b"E\x00\x00\x00\x00")
            kind, n = struct.unpack_from("<BI", back)
            # A deadline of 0: the call ends at once, whichever way (an empty echo is done first).
            assert kind == bulk.STATUS and back[5 : 5 + n].split(b"\n")[0] in (b"OK", b"DEADLINE_EXCEEDED")
            before = calls.entered
            await asyncio.to_thread(_raw, server.port, HELLO + b"D" + struct.pack("<I", 100))
            assert calls.entered == before

    run(main())


# --- nodes ---------------------------------------------------------------------------


def _flat(value: float, n: int = 300_000) -> FlatParams:
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(n))]))
    flat.segments["float32"].fill_(value)
    return flat


def test_nodes_exchange_over_the_bulk_port_once_they_know_it() -> None:
    async def main() -> None:
        g = GossipConfig(idle_pause=0.0)
        b = await Node.create(_flat(3.0), NodeConfig(node_id="b", gossip=g))
        a = await Node.create(_flat(1.0), NodeConfig(node_id="a", peers=(b.address,), gossip=g))
        try:
            status = await fetch_status(b.address, timeout=5.0)
            assert status["bulk_port"] == b._bulk.port != 0  # type: ignore[union-attr]
            assert f"at {b.address}, bulk port {status['bulk_port']} (" in status_text(status)
            assert await a.wait_for_members(2, 10.0)
            peer = next(m for m in a.neighbours() if m.node_id == "b")
            for _ in range(100):  # the first call asks b for its port
                if a.channels.bulk_port(b.address):
                    break
                a.channels._ask(b.address)
                await asyncio.sleep(0.05)
            assert isinstance(a.channels.stream(b.address, EXCHANGE, 5.0), BulkCall)
            for _ in range(3):
                assert a.slot.claim_own(running=True)
                from gossip.node import pairwise

                def connect(address: str) -> Any:
                    return a.channels.stream(address, EXCHANGE, a.party.deadline)

                try:
                    assert await pairwise.call(a.party, peer, connect) == "ok"
                finally:
                    a.slot.own_finished()
            for flat in (a.flat, b.flat):
                lo, hi = torch.aminmax(flat.segments["float32"])
                assert float(lo) == float(hi) == 2.0
            assert b.stats.exchanges_served == 3 and len(b._bulk._conns) == 1  # type: ignore[union-attr]
        finally:
            await a.stop(leave=False)
            await b.stop(leave=False)

    run(main())


def test_a_peer_whose_bulk_port_is_gone_is_called_over_grpc_again() -> None:
    async def main() -> None:
        b = await Node.create(_flat(3.0, 1000), NodeConfig(node_id="b"))
        channels = Channels()
        try:
            channels._ask(b.address)
            for _ in range(100):
                if channels.bulk_port(b.address):
                    break
                await asyncio.sleep(0.05)
            assert b._bulk is not None
            await b._bulk.stop()  # the port closes; gRPC still serves
            call = channels.stream(b.address, EXCHANGE, 2.0)
            assert isinstance(call, BulkCall)
            with pytest.raises(PeerError) as info:
                await call.write(b"x")
            assert info.value.code == "UNAVAILABLE"
            call.cancel()
            assert channels.bulk_port(b.address) is None
            assert not isinstance(channels.stream(b.address, EXCHANGE, 2.0), BulkCall)
        finally:
            await channels.close()
            await b.stop(leave=False)

    run(main())


async def _learned(channels: Channels, address: str, port: int, within: float) -> bool:
    """Whether ``channels`` sends bulk calls to ``address``'s ``port`` within ``within`` s of calls."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        call = channels.stream(address, EXCHANGE, 2.0)  # a call asks, unless it asked lately
        call.cancel()
        if channels.bulk_port(address) == port:
            return True
        await asyncio.sleep(0.05)
    return False


def test_a_peer_back_on_its_ports_is_called_there_again_within_seconds() -> None:
    async def main() -> None:
        b = await Node.create(_flat(3.0, 1000), NodeConfig(node_id="b"))
        address = b.address
        assert b._bulk is not None
        port = b._bulk.port
        channels = Channels()  # asks again after a minute if the peer names no port or a closed one
        channels.ask_again = 60.0
        again: Node | None = None
        try:
            assert await _learned(channels, address, port, 10.0)
            await b.stop(leave=False)  # down: the next bulk calls fail before a word
            calls = [channels.stream(address, EXCHANGE, 2.0) for _ in range(5)]
            assert all(isinstance(c, BulkCall) for c in calls)

            async def fails(call: Any) -> None:
                with pytest.raises(PeerError):
                    await call.write(b"x")
                call.cancel()

            await asyncio.gather(*(fails(c) for c in calls))
            assert channels.bulk_port(address) is None
            assert channels._bulk_retry[address] == 2.0  # five losses together put the ask off once
            assert await _learned(channels, address, port, 1.5) is False  # still down: asks fail
            again = await Node.create(
                _flat(3.0, 1000), NodeConfig(node_id="b", listen=address, bulk_port=port)
            )
            assert again.address == address
            # Asked again 1 s after the lost call, then 2 s, 4 s...: well within the minute.
            assert await _learned(channels, address, port, 10.0)
        finally:
            await channels.close()
            await (again or b).stop(leave=False)  # stopping twice is a no-op

    run(main())


def test_a_port_that_fails_every_call_is_asked_less_and_less_often() -> None:
    async def main() -> None:
        b = await Node.create(_flat(3.0, 1000), NodeConfig(node_id="b"))
        channels = Channels()
        try:
            assert b._bulk is not None
            assert await _learned(channels, b.address, b._bulk.port, 10.0)
            b._bulk.node_id = "not-b"  # its Status still names the port; every hello is now refused
            before = (await fetch_status(b.address, timeout=5.0))["control_calls"]["Gossip/Status"]
            loop = asyncio.get_running_loop()
            end = loop.time() + 4.5
            while loop.time() < end:
                call = channels.stream(b.address, EXCHANGE, 2.0)
                if isinstance(call, BulkCall):
                    with pytest.raises(PeerError):
                        await call.write(b"x")
                        await call.read()
                call.cancel()
                await asyncio.sleep(0.05)
            after = (await fetch_status(b.address, timeout=5.0))["control_calls"]["Gossip/Status"]
            # Asked 1 s after the first loss, then 2 s after the next, 4 s...: not every second.
            assert 1 <= after - before - 1 <= 3
        finally:
            await channels.close()
            await b.stop(leave=False)

    run(main())


def test_a_peer_that_named_no_bulk_port_is_asked_again() -> None:
    async def main() -> None:
        b = await Node.create(_flat(3.0, 1000), NodeConfig(node_id="b", bulk_port=-1))
        address = b.address
        channels = Channels()
        channels.ask_again = 0.5
        again: Node | None = None
        try:
            call = channels.stream(address, EXCHANGE, 2.0)  # over gRPC; it asks
            call.cancel()
            for _ in range(100):
                if channels.bulk_port(address) is not None:
                    break
                await asyncio.sleep(0.05)
            assert channels.bulk_port(address) == 0
            await b.stop(leave=False)
            again = await Node.create(_flat(3.0, 1000), NodeConfig(node_id="b", listen=address))
            assert again._bulk is not None
            assert await _learned(channels, address, again._bulk.port, 10.0)
        finally:
            await channels.close()
            await (again or b).stop(leave=False)

    run(main())


def test_bulk_port_off_tls_and_bad_ports() -> None:
    async def main() -> None:
        n = await Node.create(_flat(1.0, 10), NodeConfig(bulk_port=-1))
        try:
            status = await fetch_status(n.address, timeout=5.0)
            assert status["bulk_port"] == 0 and f"at {n.address}, no bulk port (" in status_text(status)
            assert not n.channels.bulk
        finally:
            await n.stop(leave=False)

    run(main())
    assert not NodeConfig(security=SecurityConfig(tls_ca="ca.pem")).bulk
    assert NodeConfig().bulk
    for bad in (-2, 65536):
        with pytest.raises(ConfigError, match="bulk_port"):
            NodeConfig(bulk_port=bad).validate()
    assert chunk_bytes_for(0, None, bulk=True) == 1 << 20
    assert chunk_bytes_for(0, None) == 4 << 20
