"""The exchange protocols' own cost, without gRPC: snapshots kept as frames vs copied.

    python bench/protocol.py [--mib 100] [--repeats 40]

Two parties in this process run whole pairwise exchanges (``pairwise.call`` and
``pairwise.answer``, the code nodes run) over in-memory frame streams
(``gossip.node.memory``): both snapshots, both answers, every check, both deltas
and both applies, one thread, no sockets. So the time is all CPU: what a node
spends per exchange besides the transport. Two pairs alternate within each
repeat: one whose slots keep their snapshot as the chunk frames they send (what
nodes on the raw path do), one whose slots copy it into a separate buffer and
frame it while sending (what they did before, and what a pipeline with stages
or another codec still does). Correctness: 1.0 and 3.0 meet at 2.0 each time.

Then the snapshot a publishing node hands its store, taken on the training thread
under the node's lock: a fresh clone of the model against a copy into the buffer of
an earlier snapshot (what nodes do once the store is done with one), paired.

The last line is JSON: frames_ms and copy_ms (medians, per exchange, both sides),
frames_vs_copy (median of the per-repeat ratios copy / frames; > 1 = frames are
cheaper), publish_clone_ms and publish_reuse_ms (medians) and publish_clone_vs_reuse
(paired), repeats, correct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

MiB = 1 << 20


def _party(name: str, value: float, numel: int, frame_bytes: int) -> Any:
    import torch

    from gossip.config import GossipConfig, chunk_bytes_for
    from gossip.core.params import FlatParams, Layout
    from gossip.core.pipeline import Pipeline
    from gossip.node.protocol import Party
    from gossip.node.slot import ExchangeSlot

    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(numel))]))
    flat.segments["float32"].fill_(value)
    slot = ExchangeSlot(flat, max_lag=1, frame_bytes=frame_bytes)
    return Party(
        name,
        flat,
        slot,
        Pipeline(flat.layout, "raw"),
        GossipConfig(chunk_bytes=chunk_bytes_for(0, None)),
        lambda: True,
    )


async def _exchange(a: Any, b: Any) -> float:
    """One whole exchange, a calling b: its wall time in ms (all of it CPU: one thread, no I/O)."""
    from gossip.core.membership import MemberRecord
    from gossip.node import pairwise
    from gossip.node.memory import MemoryCall, memory_call

    def connect(address: str) -> MemoryCall:
        return memory_call(lambda stream: pairwise.answer(b, stream), address)

    t0 = time.perf_counter()
    if not a.slot.claim_own(running=True):
        raise RuntimeError("party a is busy")
    try:
        peer = MemberRecord("b", "memory:b", 1, 0, fingerprint=b.fingerprint)
        outcome = await pairwise.call(a, peer, connect)
    finally:
        a.slot.own_finished()
    await asyncio.sleep(0)  # the callee adds its half right after its OK
    if outcome != "ok" or a.slot.busy or b.slot.busy:
        raise RuntimeError(f"exchange ended {outcome!r} or left a slot busy")
    return (time.perf_counter() - t0) * 1e3


def _correct(*parties: Any) -> bool:
    import torch

    return all(bool(torch.all(p.flat.segments["float32"] == 2.0)) for p in parties)


async def _run(mib: int, repeats: int, warmup: int) -> dict[str, Any]:
    from gossip.config import chunk_bytes_for

    numel = mib * MiB // 4
    chunk = chunk_bytes_for(0, None)  # a node's chunk size without a send limit
    pairs = {
        "frames": (_party("a", 1.0, numel, chunk), _party("b", 3.0, numel, chunk)),
        "copy": (_party("a", 1.0, numel, 0), _party("b", 3.0, numel, 0)),
    }
    correct = True
    for a, b in pairs.values():
        await _exchange(a, b)
        correct = correct and _correct(a, b)
        for _ in range(warmup):
            await _exchange(a, b)
    times: dict[str, list[float]] = {k: [] for k in pairs}
    for i in range(repeats):
        order = list(pairs) if i % 2 == 0 else list(reversed(pairs))
        for k in order:
            times[k].append(await _exchange(*pairs[k]))
    correct = correct and all(_correct(a, b) for a, b in pairs.values())

    model = pairs["frames"][0].flat
    spare = model.clone()
    clone_ms: list[float] = []
    reuse_ms: list[float] = []
    for i in range(repeats):
        for how in ("clone", "reuse") if i % 2 == 0 else ("reuse", "clone"):
            t0 = time.perf_counter()
            if how == "clone":
                fresh = model.clone()
                clone_ms.append((time.perf_counter() - t0) * 1e3)
                del fresh
            else:
                spare.copy_(model)
                reuse_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "bench": "protocol",
        "mib": mib,
        "frames_ms": round(statistics.median(times["frames"]), 2),
        "copy_ms": round(statistics.median(times["copy"]), 2),
        "frames_vs_copy": round(
            statistics.median(c / f for c, f in zip(times["copy"], times["frames"], strict=True)), 3
        ),
        "publish_clone_ms": round(statistics.median(clone_ms), 2),
        "publish_reuse_ms": round(statistics.median(reuse_ms), 2),
        "publish_clone_vs_reuse": round(
            statistics.median(c / r for c, r in zip(clone_ms, reuse_ms, strict=True)), 2
        ),
        "repeats": repeats,
        "correct": correct,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100, help="model size in MiB (default 100)")
    ap.add_argument("--repeats", type=int, default=40, help="timed repeats, each mode once per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed exchanges per mode")
    args = ap.parse_args(argv)
    import torch

    from gossip.cluster.sysutil import tune_malloc

    torch.set_num_threads(1)  # as the runner does for every node process
    tune_malloc()
    summary = asyncio.run(_run(args.mib, args.repeats, args.warmup))
    print(
        f"{args.mib} MiB exchange, both sides, no transport: snapshot as frames {summary['frames_ms']:.1f} ms, "
        f"copied {summary['copy_ms']:.1f} ms; copy / frames {summary['frames_vs_copy']:.2f}"
    )
    print(
        f"{args.mib} MiB snapshot to publish: fresh clone {summary['publish_clone_ms']:.1f} ms, "
        f"into a reused buffer {summary['publish_reuse_ms']:.1f} ms"
    )
    print(json.dumps(summary), flush=True)
    return 0 if summary["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
