"""The fast receive path of an exchange: finiteness, hand-over without a copy, check before commit."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.config import GossipConfig, NodeConfig
from gossip.core.codecs import PayloadReceiver, encode, payload_nbytes
from gossip.core.membership import MemberRecord
from gossip.core.params import FlatParams, Layout, LayoutError, all_finite
from gossip.node import pairwise
from gossip.node.node import Node
from gossip.observe.status import fetch_status
from gossip.transport import frames as wire
from gossip.transport.channels import GOSSIP
from gossip.transport.server import ServerStream, bidi, start_server

T = TypeVar("T")
CALL_TIMEOUT = 10.0
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _mixed(other: torch.dtype = torch.float64, seed: int = 0) -> FlatParams:
    """float32 (15), then ``other`` (7), then float32 again (4): two segments."""
    g = torch.Generator().manual_seed(seed)
    named = [
        ("w", torch.randn(3, 5, generator=g)),
        ("b", torch.randn(7, generator=g).to(other)),
        ("c", torch.randn(2, 2, generator=g)),
    ]
    flat = FlatParams.zeros(Layout.from_named(named))
    for (_, t), view in zip(named, flat.state_dict().values(), strict=True):
        view.copy_(t)
    return flat


# --- all_finite ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 7, 8, 17, 64, 1000, 4099])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_bad_value_anywhere(dtype: torch.dtype, n: int, bad: float) -> None:
    for pos in sorted({0, n // 2, n - 1}):
        x = torch.randn(n).to(dtype)
        x[pos] = bad
        assert not all_finite(x), (dtype, n, pos, bad)


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_accepts_the_extremes(dtype: torch.dtype) -> None:
    fi = torch.finfo(dtype)
    assert all_finite(torch.tensor([fi.max, -fi.max, fi.tiny, 0.0, -0.0], dtype=dtype))
    assert all_finite(torch.empty(0, dtype=dtype))
    assert all_finite(torch.randn(8, 8).to(dtype).t())  # not contiguous


# --- PayloadReceiver: check_finite and consume -------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 15 * 4 + 7 * 8 + 4 * 4), max_size=10),
    codec=st.sampled_from(["raw", "fp16", "bf16"]),
)
def test_consume_sees_every_element_once_in_order_for_any_split(cuts: list[int], codec: str) -> None:
    src = _mixed()
    data = b"".join(bytes(v) for v in encode(src, codec))
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    reference = PayloadReceiver(src.layout, codec)
    reference.write(data)
    expected = reference.finish()
    seen: dict[int, list[tuple[int, int]]] = {}
    out = FlatParams.zeros(src.layout)
    segs = list(out)

    def consume(i: int, start: int, stop: int, values: torch.Tensor) -> None:
        seen.setdefault(i, []).append((start, stop))
        segs[i][start:stop] = values * 2  # proves the receiver stores nothing itself

    receiver = PayloadReceiver(src.layout, codec, out=out, check_finite=True, consume=consume)
    for lo, hi in itertools.pairwise(bounds):
        receiver.write(memoryview(data)[lo:hi])
    assert receiver.finish() is out

    for i, (dt, seg) in enumerate(expected.segments.items()):
        ranges = seen[i]
        assert ranges[0][0] == 0 and ranges[-1][1] == seg.numel()
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges
        assert torch.equal(out.segments[dt], seg * 2)


@pytest.mark.parametrize("codec", ["raw", "fp16", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("piece", [4, 6, 13, 1000])
def test_check_finite_refuses_a_bad_value_before_finish_returns(codec: str, bad: float, piece: int) -> None:
    src = _mixed(torch.float32)
    src.segments["float32"][16] = bad
    data = b"".join(bytes(v) for v in encode(src, codec))
    receiver = PayloadReceiver(src.layout, codec, check_finite=True)

    with pytest.raises(LayoutError, match="NaN or Inf"):
        for start in range(0, len(data), piece):
            receiver.write(data[start : start + piece])
        receiver.finish()


def test_check_finite_catches_bf16_values_that_overflow_a_float16_segment() -> None:
    layout = Layout.from_named([("h", torch.empty(4, dtype=torch.float16))])
    wire_values = torch.tensor([1.0, 2.0, 1e10, 3.0], dtype=torch.bfloat16)  # finite in bf16
    receiver = PayloadReceiver(layout, "bf16", check_finite=True)
    receiver.write(bytes(memoryview(wire_values.view(torch.uint8).numpy())))

    with pytest.raises(LayoutError, match="NaN or Inf"):
        receiver.finish()


def test_finite_payload_passes_the_check_unchanged() -> None:
    src = _mixed()
    receiver = PayloadReceiver(src.layout, "raw", check_finite=True)
    for v in encode(src, "raw"):
        receiver.write(v)
    out = receiver.finish()
    for dt, seg in src.segments.items():
        assert torch.equal(out.segments[dt], seg)


# --- nodes -----------------------------------------------------------------------------


def _vector(values: list[float]) -> FlatParams:
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(len(values)))]))
    flat.segments["float32"].copy_(torch.tensor(values))
    return flat


@pytest.mark.parametrize("codec", ["raw", "fp16", "bf16"])
@pytest.mark.parametrize("chunk", [4096, 4100])  # 4100: not a whole number of floats per chunk... of 4096+4
def test_two_nodes_average_exactly_for_every_codec_and_chunking(codec: str, chunk: int) -> None:
    n = 5000  # several chunks, the last one short
    g = GossipConfig(codec=codec, chunk_bytes=chunk, idle_pause=0.0)

    async def main() -> None:
        a = await Node.create(_vector([1.0] * n), NodeConfig(node_id="a", gossip=dataclasses.replace(g)))
        b = await Node.create(
            _vector([3.0] * n), NodeConfig(node_id="b", peers=(a.address,), gossip=dataclasses.replace(g))
        )
        try:
            assert await b.wait_for_members(2, CALL_TIMEOUT)
            assert b.gossip_now()
            await asyncio.wait_for(b.slot.wait_own(), CALL_TIMEOUT)
            assert b.stats.exchanges_ok == 1 and a.stats.exchanges_served == 1
            assert torch.equal(a.flat.segments["float32"], torch.full((n,), 2.0))
            assert torch.equal(b.flat.segments["float32"], torch.full((n,), 2.0))
            assert not a.slot.busy and not b.slot.busy
        finally:
            await b.stop(leave=False)
            await a.stop(leave=False)

    run(main())


class _NanAnswerer:
    """A callee that accepts, reads the payload, answers with a NaN and reports how the call ended."""

    def __init__(self, flat: FlatParams) -> None:
        self.flat = flat
        self.ended: asyncio.Future[str] | None = None

    async def exchange(self, stream: ServerStream) -> None:
        assert self.ended is not None
        first = await stream.read()
        assert first is not None
        h = wire.header_from_frame(first)
        got = 0
        while got < h.total_bytes:
            frame = await stream.read()
            assert frame is not None
            got += len(wire.chunk_from_frame(frame))
        reply = dataclasses.replace(h, sender="nan", outcome="accepted")
        await stream.write(wire.header_to_frame(reply))
        answer = torch.ones(self.flat.numel)
        answer[3] = float("nan")
        await stream.write(wire.chunk_frame(memoryview(answer.numpy()).cast("B")))
        try:
            last = await stream.read()
            if last == wire.COMMIT_FRAME:
                self.ended.set_result("committed")
            else:
                self.ended.set_result("closed" if last is None else "more data")
        except BaseException:
            self.ended.set_result("cancelled")
            raise


def test_caller_refuses_a_non_finite_answer_before_it_commits() -> None:
    async def main() -> None:
        flat = _vector([1.0] * 64)
        fake = _NanAnswerer(flat)
        fake.ended = asyncio.get_running_loop().create_future()
        server, port = await start_server(
            "127.0.0.1:0", [("gossip.proto.Gossip", {"Exchange": bidi(fake.exchange)})]
        )
        node = await Node.create(_vector([1.0] * 64), NodeConfig(node_id="a"))
        try:
            peer = MemberRecord("nan", f"127.0.0.1:{port}", 1, 0, fingerprint=flat.fingerprint)

            def connect(address: str) -> Any:
                return node.channels.stream(address, GOSSIP + "Exchange", CALL_TIMEOUT)

            assert node.slot.claim_own(running=True)
            assert await pairwise.call(node.party, peer, connect) == "failed"
            node.slot.release()
            assert node.stats.exchanges_failed == 1
            assert torch.equal(node.flat.segments["float32"], torch.ones(64))
            # The callee never saw the commit frame: only a close or the cancel.
            assert await asyncio.wait_for(fake.ended, CALL_TIMEOUT) in ("closed", "cancelled")
        finally:
            await node.stop(leave=False)
            await server.stop(0)

    run(main())


def test_payload_nbytes_matches_what_the_fast_path_expects() -> None:
    flat = _mixed(torch.bfloat16)
    assert payload_nbytes(flat.layout, "raw") == sum(len(v) for v in encode(flat, "raw"))


def test_callee_takes_no_half_when_the_caller_closes_without_committing() -> None:
    n = 300

    async def main() -> None:
        node = await Node.create(_vector([3.0] * n), NodeConfig(node_id="b"))
        try:
            h = wire.Header(
                fingerprint=node.flat.fingerprint,
                sender="caller",
                step=1,
                codec="raw",
                total_bytes=n * 4,
                chunk_bytes=4096,
            )
            payload = torch.ones(n)
            async with grpc.aio.insecure_channel(node.address) as ch:
                call = ch.stream_stream(GOSSIP + "Exchange")(timeout=CALL_TIMEOUT)
                await call.write(wire.header_to_frame(h))
                await call.write(wire.chunk_frame(memoryview(payload.numpy()).cast("B")))
                reply = wire.header_from_frame(await call.read())
                assert reply.outcome == "accepted"
                got = 0
                while got < n * 4:
                    got += len(wire.chunk_from_frame(await call.read()))
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "without committing" in (await call.details() or "")
            assert torch.equal(node.flat.segments["float32"], torch.full((n,), 3.0))
            assert not node.slot.busy and node.stats.exchanges_served == 0
        finally:
            await node.stop(leave=False)

    run(main())


# --- --max-send-rate ----------------------------------------------------------------


def test_paced_nodes_exchange_at_their_send_rate_and_exactly() -> None:
    """Two nodes capped at 16 Mbit/s (2 MB/s) each: a 1 MiB exchange in 64 KiB chunks cannot
    take less than the 15 chunks after the first need at that rate, and still meets in the middle."""
    n = 1 << 18  # 1 MiB of float32
    rate = 2e6
    gossip = GossipConfig(chunk_bytes=1 << 16)

    async def main() -> float:
        b = await Node.create(
            _vector([3.0] * n), NodeConfig(node_id="b", max_send_rate="16mbit", gossip=gossip)
        )
        a = await Node.create(
            _vector([1.0] * n),
            NodeConfig(node_id="a", peers=(b.address,), max_send_rate="16mbit", gossip=gossip),
        )
        try:
            assert await a.wait_for_members(2, CALL_TIMEOUT)
            peer = next(m for m in a.neighbours() if m.node_id == "b")
            assert a.party.deadline > 2 * (n * 4) / rate  # the deadline stretched to the rate

            def connect(address: str) -> Any:
                return a.channels.stream(address, GOSSIP + "Exchange", a.party.deadline)

            assert a.pacer is not None and b.pacer is not None
            sent_a, sent_b = a.pacer.sent, b.pacer.sent
            t0 = asyncio.get_running_loop().time()
            assert a.slot.claim_own(running=True)
            try:
                assert await pairwise.call(a.party, peer, connect) == "ok"
            finally:
                a.slot.own_finished()
            elapsed = asyncio.get_running_loop().time() - t0
            await asyncio.sleep(0)  # b adds its half right after its OK
            assert torch.equal(a.flat.segments["float32"], torch.full((n,), 2.0))
            assert torch.equal(b.flat.segments["float32"], torch.full((n,), 2.0))
            # Every byte of both payloads went through the pacers, and the status says so.
            assert a.pacer.sent - sent_a >= n * 4 and b.pacer.sent - sent_b >= n * 4
            reply = await fetch_status(a.address, CALL_TIMEOUT)
            assert reply["max_send_rate"] == rate and n * 4 <= reply["paced_bytes"] <= a.pacer.sent
            assert 0 < reply["paced_wait_seconds"] <= a.pacer.waited
            return elapsed
        finally:
            await a.stop(leave=False)
            await b.stop(leave=False)

    elapsed = run(main())
    assert elapsed >= 15 * (1 << 16) / rate * 0.99, elapsed  # a rate limit only ever slows


def test_a_send_limit_picks_chunks_the_limit_sends_in_a_fifth_of_a_second() -> None:
    """Automatic chunks under --max-send-rate 16mbit (2 MB/s): 256 KiB frames, not 4 MiB."""
    n = 1 << 18  # 1 MiB of float32
    sizes: list[int] = []

    async def main() -> None:
        b = await Node.create(_vector([3.0] * n), NodeConfig(node_id="b", max_send_rate="16mbit"))
        a = await Node.create(
            _vector([1.0] * n), NodeConfig(node_id="a", peers=(b.address,), max_send_rate="16mbit")
        )
        try:
            assert a.config.gossip.chunk_bytes == b.config.gossip.chunk_bytes == 256 << 10
            assert await a.wait_for_members(2, CALL_TIMEOUT)
            peer = next(m for m in a.neighbours() if m.node_id == "b")
            assert a.pacer is not None
            take = a.pacer.take

            async def spy(nbytes: int) -> None:
                sizes.append(nbytes)
                await take(nbytes)

            a.pacer.take = spy  # type: ignore[method-assign]

            def connect(address: str) -> Any:
                return a.channels.stream(address, GOSSIP + "Exchange", a.party.deadline)

            assert a.slot.claim_own(running=True)
            try:
                assert await pairwise.call(a.party, peer, connect) == "ok"
            finally:
                a.slot.own_finished()
            assert torch.equal(a.flat.segments["float32"], torch.full((n,), 2.0))
        finally:
            await a.stop(leave=False)
            await b.stop(leave=False)

    run(main())
    assert sum(s >= 256 << 10 for s in sizes) == 4, sizes  # the 1 MiB payload in four frames
    assert max(sizes) <= (256 << 10) + 64, sizes
