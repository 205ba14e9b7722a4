"""The exchange protocols over in-memory calls: no gRPC, no sockets, the same code nodes run."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch

from gossip.config import GossipConfig
from gossip.core import averaging
from gossip.core.membership import MemberRecord
from gossip.core.params import FlatParams
from gossip.core.pipeline import Pipeline, Runs, Stage
from gossip.node import pairwise, pushsum
from gossip.node.memory import MemoryCall, memory_call
from gossip.node.protocol import MAX_BUSY_BACKOFF, FrameStream, Party
from gossip.node.slot import ExchangeSlot
from gossip.transport import frames
from tests.support.inproc import vector

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30.0))


def party(
    name: str,
    values: list[float],
    strategy: str = "pairwise",
    stages: tuple[Stage, ...] = (),
    frame_bytes: int = 0,
    chunk_bytes: int = 4096,
) -> Party:
    flat = vector(values)
    g = GossipConfig(strategy=strategy, chunk_bytes=chunk_bytes)
    slot = ExchangeSlot(flat, max_lag=1, frame_bytes=frame_bytes)
    return Party(name, flat, slot, Pipeline(flat.layout, "raw", stages), g, lambda: True)


def member(p: Party) -> MemberRecord:
    return MemberRecord(p.node_id, f"memory:{p.node_id}", 1, 0, fingerprint=p.fingerprint)


def values(p: Party) -> torch.Tensor:
    return p.flat.segments["float32"]


def serving(callee: Party, calls: list[MemoryCall]) -> pairwise.Connect:
    def connect(address: str) -> MemoryCall:
        call = memory_call(lambda stream: pairwise.answer(callee, stream), address)
        calls.append(call)
        return call

    return connect


def test_a_pairwise_exchange_in_memory_meets_in_the_middle() -> None:
    async def main() -> tuple[Party, Party]:
        a, b = party("a", [1.0] * 3000), party("b", [3.0] * 3000)
        assert a.slot.claim_own(running=True)

        outcome = await pairwise.call(a, member(b), serving(b, []))

        assert outcome == "ok"
        return a, b

    a, b = run(main())
    assert torch.equal(values(a), torch.full((3000,), 2.0)) and torch.equal(
        values(b), torch.full((3000,), 2.0)
    )
    assert (a.stats.exchanges_ok, b.stats.exchanges_served) == (1, 1)
    assert not a.slot.busy and not b.slot.busy


@pytest.mark.parametrize(
    ("a_chunk", "b_chunk"),
    [(4096, 4096), (4096, 12288), (12288, 4100), (4100, 4096)],
    ids=["same", "callee-larger", "callee-unaligned", "caller-unaligned"],
)
def test_snapshots_kept_as_frames_give_the_exact_delta(a_chunk: int, b_chunk: int) -> None:
    """A snapshot taken as its frames (no separate copy) yields the same bits as a copied one,
    whatever chunk sizes the two sides cut their payloads in."""
    gen = torch.Generator().manual_seed(7)
    xa, xb = torch.randn(9001, generator=gen), torch.randn(9001, generator=gen)

    async def main() -> tuple[Party, Party]:
        a = party("a", xa.tolist(), frame_bytes=a_chunk, chunk_bytes=a_chunk)
        b = party("b", xb.tolist(), frame_bytes=b_chunk, chunk_bytes=b_chunk)
        assert a.slot.claim_own(running=True)
        assert (a.slot.frames is not None) == (a_chunk % 8 == 0)
        assert await pairwise.call(a, member(b), serving(b, [])) == "ok"
        await asyncio.sleep(0)  # the callee adds its half right after its OK
        return a, b

    a, b = run(main())
    assert torch.equal(values(a), xa + averaging.pairwise_delta(xa, xb))
    assert torch.equal(values(b), xb + averaging.pairwise_delta(xb, xa))
    assert a.slot.frames is None and b.slot.frames is None  # released with the slot


def test_a_callee_takes_each_frame_of_its_snapshot_when_it_is_first_needed() -> None:
    """The callee's answer starts without a copy of the whole model: frame k is copied when it
    is sent or read back for the delta, so a step between two frames shows in the later ones,
    and the delta is formed from exactly what was sent (the sum stays exact)."""
    b = party("b", [3.0] * 3000, frame_bytes=4096)  # 3 frames: 1024, 1024 and 952 floats
    asked: list[int] = []
    assert b.slot.claim_incoming(running=True, framed=True)
    held = b.slot.frames
    assert held is not None and len(held) == 3
    own = b.slot.own_values()
    assert isinstance(own, Runs)
    first = bytes(held.chunk(0))  # sent: taken now
    values(b).add_(1.0)  # a training step of the callee, between its first and second frame
    sent = torch.frombuffer(
        bytearray(first + bytes(held.chunk(1)) + bytes(held.chunk(2))), dtype=torch.float32
    )
    assert torch.equal(sent[:1024], torch.full((1024,), 3.0))  # taken before the step
    assert torch.equal(sent[1024:], torch.full((1976,), 4.0))  # taken after it
    other = torch.full((3000,), 1.0)
    change = b.pipeline.pairwise(own, b.slot.recv, "a", "raw")
    change.receiver.write(memoryview(other.numpy()).cast("B"))
    change.receiver.finish()
    assert torch.equal(change.delta().segments["float32"], other - sent)  # exactly what was sent

    lazy = Runs.of_chunks(b.flat.layout, lambda k: asked.append(k) or held.chunk(k), held.lengths)
    assert asked == []  # nothing asked for until a value is read
    out = torch.empty(3000)
    lazy.sub(0, 1024, 2048, other[1024:2048], out)
    assert asked == [1] and torch.equal(out[1024:2048], torch.full((1024,), -3.0))
    b.slot.release()
    assert b.slot.frames is None


def test_an_answer_cancelled_as_it_starts_stops_its_sender() -> None:
    """A deadline or a stopping server can cancel the answer the moment it has started its
    sending task; that task must end with it (nothing written after the call is over)."""

    class Stream:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        async def read(self) -> bytes | None:
            await asyncio.Event().wait()  # the caller's payload never comes
            return None

        async def write(self, frame: bytes) -> None:
            self.written.append(frame)
            await asyncio.sleep(0)

    async def main() -> tuple[int, int, int]:
        before = asyncio.all_tasks()
        b = party("b", [3.0] * 3000, frame_bytes=4096)
        assert b.slot.claim_incoming(running=True, framed=True)
        change = b.pipeline.pairwise(b.slot.own_values(), b.slot.recv, "a", "raw")
        stream = Stream()
        task = asyncio.ensure_future(pairwise._serve(b, stream, change, dict, None))
        await asyncio.sleep(0)  # the answer has started its sender and yields once
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        at_cancel = len(stream.written)
        for _ in range(20):
            await asyncio.sleep(0)
        return at_cancel, len(stream.written), len(asyncio.all_tasks() - before - {task})

    at_cancel, later, others = run(main())
    assert later == at_cancel and others == 0


def test_a_busy_callee_declines_and_nothing_moves() -> None:
    async def main() -> tuple[Party, Party, str]:
        a, b = party("a", [1.0] * 8), party("b", [3.0] * 8)
        assert a.slot.claim_own(running=True) and b.slot.claim_own(running=True)
        return a, b, await pairwise.call(a, member(b), serving(b, []))

    a, b, outcome = run(main())
    assert outcome == "busy"
    assert a.stats.busy_replies == 1 and b.stats.exchanges_declined == 1
    assert torch.equal(values(a), torch.ones(8)) and torch.equal(values(b), torch.full((8,), 3.0))


def test_the_back_off_after_a_busy_answer_grows_with_the_round_trip_and_is_bounded() -> None:
    p = party("a", [1.0] * 8)
    floor = p.gossip.backoff
    assert p.busy_backoff() == floor  # no busy answer yet
    p.declined(0.001)
    assert p.busy_backoff() == floor  # loopback: the configured bound decides
    p.declined(0.04)  # a 40 ms round trip
    for _ in range(40):
        p.declined(0.04)
    assert p.busy_backoff() == pytest.approx(0.08, rel=1e-3)  # a mean back-off of one round trip
    for _ in range(40):
        p.declined(5.0)  # answers that came near the deadline
    assert p.busy_backoff() == MAX_BUSY_BACKOFF
    for _ in range(40):
        p.declined(0.001)
    assert p.busy_backoff() == floor  # and back once round trips are short again


def test_a_busy_answer_feeds_the_round_trip_the_back_off_follows() -> None:
    async def main() -> Party:
        a, b = party("a", [1.0] * 8), party("b", [3.0] * 8)
        assert a.slot.claim_own(running=True) and b.slot.claim_own(running=True)
        assert await pairwise.call(a, member(b), serving(b, [])) == "busy"
        return a

    a = run(main())
    assert 0.0 < a.busy_round_trip_s < 5.0


def test_no_second_own_exchange_starts_while_the_first_backs_off() -> None:
    p = party("a", [1.0] * 8)
    assert p.slot.claim_own(running=True)
    p.slot.release()  # backing off after a busy answer: the slot is free, the own exchange is not over
    assert not p.slot.claim_own(running=True)
    assert p.slot.claim_incoming(running=True, framed=False)  # a neighbour's call lands meanwhile
    p.slot.release()
    p.slot.own_finished()
    assert p.slot.claim_own(running=True)


def test_an_exchange_a_neighbour_finished_during_the_back_off_ends_the_own_attempt() -> None:
    p = party("a", [1.0] * 8)
    assert p.slot.claim_own(running=True)
    p.slot.release()  # a busy answer: back off with the slot free
    assert p.slot.reclaim_own(running=True)  # nobody came: try the next neighbour
    p.slot.release()
    assert p.slot.claim_incoming(running=True, framed=False)  # a neighbour's exchange lands
    p.slot.deliver(p.slot.release_locked)  # and its result is applied
    p.slot.incoming_finished()
    assert not p.slot.reclaim_own(running=True)  # this step is mixed already
    p.slot.own_finished()
    assert p.slot.claim_own(running=True)  # the next step's exchange starts as usual
    p.slot.release()
    assert p.slot.reclaim_own(running=True)


class Scale(Stage):
    """A test stage: sends twice its snapshot and halves what it receives; records what it sees."""

    name = "scale:2"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def outgoing_(self, snap: FlatParams, peer: str) -> None:
        self.seen.append(("out", peer, True))
        for s in snap:
            s.mul_(2.0)

    def incoming_(self, own: FlatParams, other: FlatParams, peer: str) -> None:
        self.seen.append(("in", peer, True))
        for o, s in zip(other, own, strict=True):
            o.mul_(0.5)
            s.mul_(0.5)

    def settle(self, peer: str, committed: bool) -> None:
        self.seen.append(("settle", peer, committed))


def test_a_stage_runs_on_both_sides_and_hears_the_commit() -> None:
    sa, sb = Scale(), Scale()

    async def main() -> tuple[Party, Party, str]:
        a, b = party("a", [1.0] * 8, stages=(sa,)), party("b", [3.0] * 8, stages=(sb,))
        assert a.slot.claim_own(running=True)
        return a, b, await pairwise.call(a, member(b), serving(b, []))

    a, b, outcome = run(main())
    assert outcome == "ok"
    # Doubled out, halved in: the stage's round trip is the identity, so they still meet at 2.
    assert torch.equal(values(a), torch.full((8,), 2.0)) and torch.equal(values(b), torch.full((8,), 2.0))
    assert sa.seen == [("out", "b", True), ("in", "b", True), ("settle", "b", True)]
    assert sb.seen == [("out", "a", True), ("in", "a", True), ("settle", "a", True)]


def test_another_pipeline_is_refused_before_anything_moves() -> None:
    calls: list[MemoryCall] = []

    async def main() -> tuple[Party, Party, str]:
        a, b = party("a", [1.0] * 8), party("b", [3.0] * 8, stages=(Scale(),))
        assert a.slot.claim_own(running=True)
        return a, b, await pairwise.call(a, member(b), serving(b, calls))

    a, b, outcome = run(main())
    assert outcome == "failed" and a.stats.exchanges_failed == 1
    refused = calls[0].served.exception()
    assert getattr(refused, "code", None) == "FAILED_PRECONDITION" and "pipeline" in str(refused)
    assert torch.equal(values(a), torch.ones(8)) and torch.equal(values(b), torch.full((8,), 3.0))
    assert not b.slot.busy


async def _caller_without_commit(callee: Party, send: torch.Tensor) -> MemoryCall:
    """A caller that sends its snapshot, reads the whole answer, then closes without the commit."""
    header = frames.Header(callee.fingerprint, "x", 1, "raw", send.numel() * 4, chunk_bytes=4096)
    call = memory_call(lambda stream: pairwise.answer(callee, stream))
    await call.write(frames.header_to_frame(header))
    await call.write(frames.chunk_frame(memoryview(send.numpy()).cast("B")))
    reply = await call.read()
    assert reply is not None and frames.header_from_frame(reply).outcome == "accepted"
    got = 0
    while got < send.numel() * 4:
        frame = await call.read()
        assert frame is not None
        got += len(frames.chunk_from_frame(frame))
    await call.done_writing()
    return call


def test_the_callee_takes_no_half_without_the_commit_frame() -> None:
    async def main() -> tuple[Party, BaseException | None]:
        b = party("b", [3.0] * 8)
        call = await _caller_without_commit(b, torch.ones(8))
        with pytest.raises(Exception, match="without committing"):
            await call.finish()
        return b, call.served.exception()

    b, refused = run(main())
    assert getattr(refused, "code", None) == "INVALID_ARGUMENT"
    assert torch.equal(values(b), torch.full((8,), 3.0)) and not b.slot.busy
    assert b.stats.exchanges_served == 0


def test_a_push_in_memory_moves_half_the_mass() -> None:
    async def main() -> tuple[Party, Party]:
        a, b = party("a", [1.0] * 8, "push-sum"), party("b", [3.0] * 8, "push-sum")
        assert a.slot.claim_own(running=True)

        def connect(address: str) -> MemoryCall:
            return memory_call(lambda stream: pushsum.receive(b, stream), address)

        await pushsum.run_own(a, member(b), connect)
        return a, b

    a, b = run(main())
    assert (a.weight, b.weight) == (0.5, 1.5)
    assert torch.equal(values(a), torch.ones(8))  # de-biased: a keeps its values, at half the weight
    assert torch.allclose(values(b), torch.full((8,), 7.0 / 3.0))  # (3 * 1 + 1 * 0.5) / 1.5
    mass = values(a) * a.weight + values(b) * b.weight
    assert torch.allclose(mass, torch.full((8,), 4.0))


@pytest.mark.parametrize("frame_bytes", [0, 4096, 8192], ids=["copied", "frames", "larger-frames"])
def test_a_push_from_a_snapshot_kept_as_frames_removes_exactly_what_left(frame_bytes: int) -> None:
    """The sender gives up exactly the numerator it sent, snapshot kept as frames or copied,
    even when its model moved between the snapshot and the acknowledgement."""
    gen = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    moved = torch.randn(5000, generator=gen)

    async def main() -> tuple[Party, Party]:
        a = party("a", xa.tolist(), "push-sum", frame_bytes=frame_bytes)
        b = party("b", xb.tolist(), "push-sum")
        assert a.slot.claim_own(running=True)
        assert (a.slot.frames is not None) == bool(frame_bytes)
        values(a).add_(moved)  # a training step after the snapshot

        def connect(address: str) -> MemoryCall:
            return memory_call(lambda stream: pushsum.receive(b, stream), address)

        await pushsum.run_own(a, member(b), connect)
        return a, b

    a, b = run(main())
    z = (xa + moved).mul_(1.0 / 0.5).sub_(xa, alpha=0.5 / 0.5)  # the copy path's arithmetic
    assert a.weight == 0.5 and torch.equal(values(a), z)
    assert not a.slot.busy and a.slot.frames is None
    # The receiver merged exactly the snapshot (not the moved model), with the weight sent.
    assert b.weight == 1.5 and torch.equal(values(b), xb.clone().mul_(1.0 / 1.5).add_(xa, alpha=0.5 / 1.5))


def test_frame_streams_are_what_the_protocols_need() -> None:
    async def serve(stream: FrameStream) -> bytes:
        got = [await stream.read(), await stream.read()]
        await stream.write(b"pong")
        return b"|".join(f or b"" for f in got)

    async def main() -> tuple[bytes | None, bytes]:
        call = memory_call(serve)
        await call.write(b"ping")
        await call.done_writing()
        return await call.read(), await call.response()

    assert run(main()) == (b"pong", b"ping|")


def test_the_callee_answers_while_the_payload_is_still_coming() -> None:
    # Both directions at once: the answer's first chunk comes before the caller sent any.
    async def main() -> tuple[Party, bytes]:
        b = party("b", [3.0] * 3000)  # 12 000 bytes: 3 chunks of 4096
        header = frames.Header(b.fingerprint, "x", 1, "raw", 12_000, chunk_bytes=4096)
        call = memory_call(lambda stream: pairwise.answer(b, stream))
        await call.write(frames.header_to_frame(header))
        reply = await asyncio.wait_for(call.read(), 5.0)
        assert reply is not None and frames.header_from_frame(reply).outcome == "accepted"
        first = await asyncio.wait_for(call.read(), 5.0)  # no payload sent yet
        assert first is not None
        payload = torch.ones(3000).numpy().tobytes()
        for start in range(0, len(payload), 4096):
            await call.write(frames.chunk_frame(memoryview(payload)[start : start + 4096]))
        got = len(frames.chunk_from_frame(first))
        while got < 12_000:
            frame = await call.read()
            assert frame is not None
            got += len(frames.chunk_from_frame(frame))
        await call.write(frames.COMMIT_FRAME)
        await call.done_writing()
        await call.finish()
        return b, bytes(frames.chunk_from_frame(first))

    b, first = run(main())
    assert first == torch.full((1024,), 3.0).numpy().tobytes()  # its snapshot, not a mix
    assert torch.equal(values(b), torch.full((3000,), 2.0)) and b.stats.exchanges_served == 1
