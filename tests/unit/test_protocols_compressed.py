"""Compressed pairwise exchanges over in-memory calls: the caller asks first (no gRPC, the nodes' code)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from gossip.config import GossipConfig
from gossip.core.choco import Choco, Offer
from gossip.core.pipeline import Pipeline
from gossip.node import pairwise
from gossip.node.memory import MemoryCall, memory_call
from gossip.node.protocol import Party
from gossip.node.slot import ExchangeSlot
from gossip.transport import frames
from tests.support.inproc import vector
from tests.unit.test_protocols import member, run, serving, values

SPEC = "topk:0.25+int8"
N = 64


def party(name: str, x: torch.Tensor, seed: int) -> Party:
    flat = vector(x)
    choco = Choco.of(SPEC, 1.0, N, seed)
    g = GossipConfig(compress=SPEC, gamma=1.0, exchange_timeout=1.0, chunk_bytes=4096)
    slot = ExchangeSlot(flat, max_lag=1)
    return Party(name, flat, slot, Pipeline(flat.layout, "raw", choco=choco), g, lambda: True)


def choco(p: Party) -> Choco:
    assert p.pipeline.choco is not None
    return p.pipeline.choco


def count_offers(p: Party) -> list[str]:
    """The peers ``p`` made an offer for, in order (each is one compression)."""
    made: list[str] = []
    c = choco(p)
    offer: Callable[[str, torch.Tensor], Offer] = c.offer

    def counted(peer: str, snapshot: torch.Tensor) -> Offer:
        made.append(peer)
        return offer(peer, snapshot)

    c.offer = counted  # type: ignore[method-assign]
    return made


def pairs(p: Party) -> dict[str, tuple[int, bytes, bytes]]:
    return {
        k: (v.rounds, v.own.numpy().tobytes(), v.peer.numpy().tobytes()) for k, v in choco(p)._pairs.items()
    }


def start() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, generator=g), torch.randn(N, generator=g) + 2


def test_a_compressed_exchange_in_memory_keeps_mirrored_copies_and_the_sum() -> None:
    xa, xb = start()

    async def main() -> tuple[Party, Party, list[str], list[str]]:
        a, b = party("a", xa, 1), party("b", xb, 2)
        made_a, made_b = count_offers(a), count_offers(b)
        for _ in range(3):
            assert a.slot.claim_own(running=True)
            assert await pairwise.call(a, member(b), serving(b, [])) == "ok"
            a.slot.own_finished()  # as run_own does
            await asyncio.sleep(0)  # the callee adds its half right after its OK
        return a, b, made_a, made_b

    a, b, made_a, made_b = run(main())
    assert made_a == ["b"] * 3 and made_b == ["a"] * 3  # one compression per side per exchange
    pa, pb = choco(a)._pairs["b"], choco(b)._pairs["a"]
    assert pa.rounds == pb.rounds == 3
    assert torch.equal(pa.own, pb.peer) and torch.equal(pa.peer, pb.own)
    torch.testing.assert_close((values(a) + values(b)).double(), (xa + xb).double(), rtol=0, atol=1e-5)
    assert not torch.equal(values(a), xa)
    assert a.stats.bytes_out == b.stats.bytes_in > 0 and b.stats.bytes_out == a.stats.bytes_in > 0


def test_a_busy_callee_costs_the_caller_no_compression() -> None:
    xa, xb = start()

    async def main() -> tuple[Party, Party, list[str], list[MemoryCall]]:
        a, b = party("a", xa, 1), party("b", xb, 2)
        made = count_offers(a)
        assert a.slot.claim_own(running=True) and b.slot.claim_own(running=True)
        calls: list[MemoryCall] = []
        assert await pairwise.call(a, member(b), serving(b, calls)) == "busy"
        return a, b, made, calls

    a, b, made, calls = run(main())
    assert len(calls) == 1 and made == [] and pairs(a) == {} and pairs(b) == {}
    assert a.stats.busy_replies == 1 and b.stats.exchanges_declined == 1
    assert a.stats.bytes_out == 0 and torch.equal(values(a), xa)


def test_an_answer_out_of_step_is_refused_before_the_caller_compresses() -> None:
    xa, xb = start()

    async def main() -> tuple[Party, list[str]]:
        a, b = party("a", xa, 1), party("b", xb, 2)
        pair = choco(a).pair("b")  # the caller remembers 2 exchanges the callee does not
        pair.rounds = 2
        made = count_offers(a)
        assert a.slot.claim_own(running=True)
        assert await pairwise.call(a, member(b), serving(b, [])) == "failed"
        return a, made

    a, made = run(main())
    assert made == []  # the callee refused the count first (FAILED_PRECONDITION) ...
    assert pairs(a) == {}  # ... and the caller forgot the pair, as the callee did
    assert torch.equal(values(a), xa) and a.stats.exchanges_failed == 1


@pytest.mark.parametrize("second", [None, "another sender"], ids=["no-second-header", "another-sender"])
def test_a_caller_without_a_valid_second_header_changes_nothing(second: str | None) -> None:
    xb = start()[1]

    async def main() -> tuple[Party, BaseException | None]:
        b = party("b", xb, 2)
        first = frames.Header(b.fingerprint, "x", 1, "raw", 0, pipeline=b.pipeline.spec)
        call = memory_call(lambda stream: pairwise.answer(b, stream))
        await call.write(frames.header_to_frame(first))
        reply = await call.read()
        assert reply is not None and frames.header_from_frame(reply).outcome == "accepted"
        if second is None:
            await call.done_writing()
        else:
            other = frames.Header(b.fingerprint, "y", 1, "raw", 10, pipeline=b.pipeline.spec)
            await call.write(frames.header_to_frame(other))
        with pytest.raises(Exception, match="second header"):
            await call.finish()
        return b, call.served.exception()

    b, refused = run(main())
    assert getattr(refused, "code", None) == "INVALID_ARGUMENT"
    assert torch.equal(values(b), xb) and not b.slot.busy and pairs(b) == {}
    assert b.stats.exchanges_served == 0
