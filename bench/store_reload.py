"""What the durable store (``--data-dir``) costs: writing shards, and reading them back at start.

    python bench/store_reload.py [--mib 256] [--shard-kib 1024] [--dir DIR] [--runs 3] [--gc-off]

One snapshot of ``--mib`` MiB of float32 in ``--shard-kib`` shards (blake3, as a node
cuts it) goes through a :class:`~gossip.store.durable.DurableStore` under ``--dir``
(default: a temporary folder on the disk the repo lives on):

- write: from the first shard kept until the writer has every file fsynced and
  renamed (what a node's writer thread spends; the event loop only queues);
- reload: ``DurableStore.load()`` on an event loop, as a restarted node runs it:
  every file read, every shard hashed and checked, the store filled. The page
  cache is warm (the files were just written), as after a process restart; a
  machine reboot reads from the device instead;
- loop stall: the longest gap a 1 ms ticker on the same loop saw during the
  reload (reading and hashing run on a worker thread). ``--gc-off`` disables the
  garbage collector for the reloads, to tell its full passes from the load's own work.

The last line printed is JSON: shards, mib, write_s, reload_s (median, with every
run), reload_mib_per_s and loop_stall_ms (the worst over the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gossip.core.layout import Layout
from gossip.store.durable import DurableStore
from gossip.store.manifest import Manifest, cut


def snapshot(mib: int, shard_bytes: int) -> tuple[Manifest, list[memoryview]]:
    import torch

    n = mib * (1 << 20) // 4
    layout = Layout.from_named([("w", torch.empty(n))])
    data = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    return cut(memoryview(data.tobytes()), layout, "bench", 1, "n0", 1, shard_bytes, 3)


async def reload(root: Path) -> tuple[float, float, int]:
    """(seconds to load, longest loop stall in seconds, shards loaded)."""
    store = DurableStore(str(root), capacity_bytes=1 << 40)
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    found = await store.load()
    took = time.perf_counter() - t0
    stop.set()
    await tick
    store.close(wait=60.0)
    return took, worst, len(found.shards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--shard-kib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder under bench/)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gc-off", action="store_true", help="no garbage collection during the reloads")
    args = ap.parse_args()
    manifest, shards = snapshot(args.mib, args.shard_kib << 10)
    with tempfile.TemporaryDirectory(dir=args.dir or Path(__file__).parent) as tmp:
        root = Path(tmp) / "data"
        store = DurableStore(str(root), capacity_bytes=1 << 40)
        store.load_now()
        t0 = time.perf_counter()
        store.add_manifest(manifest)
        for i, s in enumerate(shards):
            store.add(("bench", 1, i, manifest.shard_digests[i]), bytearray(s), "blake3")
        assert store.flush(600.0) and store.writer.failed == 0
        write_s = time.perf_counter() - t0
        store.close(wait=60.0)
        if args.gc_off:
            gc.collect()
            gc.disable()
        runs = [asyncio.run(reload(root)) for _ in range(args.runs)]
        gc.enable()
    assert all(n == len(shards) for _, _, n in runs)
    reload_s = statistics.median(r[0] for r in runs)
    out = {
        "shards": len(shards),
        "mib": args.mib,
        "write_s": round(write_s, 3),
        "reload_s": round(reload_s, 3),
        "reload_runs_s": [round(r[0], 3) for r in runs],
        "reload_mib_per_s": round(args.mib / reload_s),
        "loop_stall_ms": round(max(r[1] for r in runs) * 1000, 1),
    }
    print(f"{len(shards)} shards, {args.mib} MiB: written in {write_s:.2f} s, reloaded in {reload_s:.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
