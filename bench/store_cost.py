"""What the model store costs a training run: CPU of publishing and repair vs the run's own.

    python bench/store_cost.py [--runs 3]

1. In one process, 8 nodes of the default model's size (9 610 float32, one
   shard) on loopback, the default store settings: the cluster's CPU per second
   while idle, with the repair loop and with it parked (the difference is what
   repair costs), and the CPU of one publish (cut, 3 shard copies, the manifest
   to every member, whatever repair it triggers).
2. ``--runs N`` default ``gossip simulate`` runs with ``--publish-every 0`` and
   ``20`` (the default), alternating: the CPU all node processes used, medians.

The last line printed is JSON: repair_ms_per_node_s, publish_ms, publishes
(in the default run), simulate_cpu_s_off/on (medians), estimated_overhead (the
publishes' and repair's CPU over the default run's CPU, from part 1) and
measured_overhead (part 2: the mean over pairs of on/off - 1, with its range).
The machine is shared and noisy: part 2 varies by several percent run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

NODES = 8


async def _cluster_cpu(repair_interval: float, publishes: int) -> tuple[float, float]:
    """(CPU seconds per second while idle, CPU seconds per publish) of an 8-node cluster."""
    import torch

    from gossip.config import NodeConfig, StoreConfig
    from gossip.core.params import FlatParams, Layout
    from gossip.node.node import Node

    layout = Layout.from_named([("w", torch.empty(9610))])
    nodes: list[Node] = []
    try:
        for i in range(NODES):
            store = StoreConfig(model_id="m", repair_interval=repair_interval)
            peers = (nodes[0].address,) if nodes else ()
            nodes.append(
                await Node.create(
                    FlatParams.zeros(layout), NodeConfig(node_id=f"n{i}", peers=peers, store=store)
                )
            )
        for n in nodes:
            assert await n.wait_for_members(NODES, 30.0)
        await asyncio.sleep(2.0)
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(15.0)
        idle = (time.process_time() - c0) / (time.monotonic() - t0)
        c0, t0 = time.process_time(), time.monotonic()
        for v in range(1, publishes + 1):
            publisher = nodes[v % NODES]
            await publisher.store.publish(publisher.flat.clone(), v, 20 * v)
            await asyncio.sleep(0.3)
        spent = time.process_time() - c0 - idle * (time.monotonic() - t0)
        return idle, spent / publishes
    finally:
        await asyncio.gather(*(n.stop(leave=False) for n in nodes))


def _simulate_cpu(publish_every: int) -> float:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "gossip",
            "simulate",
            "--publish-every",
            str(publish_every),
            "--out",
            out,
        ]
        subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="simulate runs per setting (0 skips part 2)")
    args = ap.parse_args()
    idle_on, publish = asyncio.run(_cluster_cpu(5.0, 20))
    idle_off, _ = asyncio.run(_cluster_cpu(1e9, 1))
    repair = (idle_on - idle_off) / NODES
    print(
        f"repair: {repair * 1000:.2f} ms CPU per node-second; one publish: {publish * 1000:.1f} ms CPU",
        file=sys.stderr,
    )
    result: dict[str, Any] = {
        "repair_ms_per_node_s": round(repair * 1000, 3),
        "publish_ms": round(publish * 1000, 2),
        # digits: 1437 samples / 8 nodes / 16 per batch = 12 steps an epoch, 15 epochs, every 20th.
        "publishes": 12 * 15 // 20,
    }
    off, on = [], []
    for r in range(args.runs):
        off.append(_simulate_cpu(0))
        on.append(_simulate_cpu(20))
        print(
            f"run {r}: simulate CPU {off[-1]:.2f} s without publishing, {on[-1]:.2f} s with", file=sys.stderr
        )
    if args.runs:
        cpu_off, cpu_on = statistics.median(off), statistics.median(on)
        wall_guess = cpu_off / 2  # two cores, busy
        store = result["publishes"] * publish + repair * NODES * wall_guess
        # Paired: each run with publishing against the run without it just before it.
        diffs = [(b - a) / a for a, b in zip(off, on, strict=True)]
        result.update(
            simulate_cpu_s_off=round(cpu_off, 2),
            simulate_cpu_s_on=round(cpu_on, 2),
            estimated_overhead=round(store / cpu_off, 4),
            measured_overhead=round(statistics.mean(diffs), 4),
            measured_overhead_range=[round(min(diffs), 4), round(max(diffs), 4)],
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
