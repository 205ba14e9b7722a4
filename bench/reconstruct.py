"""Rebuild a 100 MiB model from an 8-node local cluster (R=3) vs a raw TCP transfer of the same bytes.

    python bench/reconstruct.py [--mib 100] [--nodes 8] [--repeats 5] [--repair]

Eight gossip ``Node`` processes (each its own process, store enabled, a bare
16-float model of its own: no training) form a ring; node 0 publishes one
snapshot of a random float32 model of --mib MiB in 1 MiB shards, so every shard
lives on 3 of the 8. This process then rebuilds it through one node (a
different one each repeat) exactly as ``gossip reconstruct`` does: locate,
fetch every shard from its owners in parallel straight into one buffer, check
each shard's sha256 as it lands, build the tensors. The baseline is
a raw TCP transfer of the same number of bytes from another process
(``sendall`` of a memoryview into ``recv_into`` a preallocated buffer, on a
connection already open). Methods alternate within each repeat; medians are
reported; ratio = raw seconds / reconstruct seconds (1.0 = as fast as raw TCP),
with the client's channels already open like the raw connection (a first,
cold rebuild through a fresh client, as the CLI does, is reported beside it).

With ``--repair`` one node is then SIGKILLed and the time until every shard has
R copies again among the survivors is measured, on the default store and
membership settings (the death is noticed after 10 s of silence).

The last line printed is JSON: ratio, reconstruct_s and raw_s (medians), cold_reconstruct_s,
mb_per_s, raw_mb_per_s, bytes, shards, nodes, replication, peers (distinct
nodes that served shards, median), repeats, correct, and repair_s with
--repair. Children exit when this process does. The machine is shared and
noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import recv_exact, watch_parent

MiB = 1 << 20
STARTUP_TIMEOUT = 120.0


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _wait_file(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float = STARTUP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a child exited with {p.returncode} before writing {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear in {timeout:.0f} s")
        time.sleep(0.05)
    return json.loads(path.read_text())


# --- children --------------------------------------------------------------------------


async def _node_child(index: int, nodes: int, mib: int, workdir: Path) -> None:
    import torch

    from gossip.cluster.sysutil import tune_malloc
    from gossip.config import NodeConfig, StoreConfig
    from gossip.core.params import FlatParams, Layout
    from gossip.node.node import Node

    torch.set_num_threads(1)
    tune_malloc()  # as the runner does for every node process
    seed = [] if index == 0 else [_wait_file(workdir / "node0.json", [])["address"]]
    flat = FlatParams.zeros(Layout.from_named([("tiny", torch.empty(16))]))
    store = StoreConfig(publish_every=0, model_id="tiny", capacity_bytes=8 << 30)
    node = await Node.create(flat, NodeConfig(node_id=f"node{index}", peers=tuple(seed), store=store))
    _write(workdir / f"node{index}.json", {"address": node.address, "pid": os.getpid()})
    if index == 0:
        assert await node.wait_for_members(nodes, STARTUP_TIMEOUT)
        node.store.refresh()
        big = FlatParams.zeros(Layout.from_named([("w", torch.empty(mib * MiB // 4))]))
        big.segments["float32"].normal_(generator=torch.Generator().manual_seed(0))
        t0 = time.monotonic()
        m = await node.store.publish(big, 1, 0, model_id="big")
        _write(workdir / "published.json", {"sha256": m.sha256.hex(), "seconds": time.monotonic() - t0})
    await asyncio.Event().wait()  # serve until the parent ends us


def _raw_child(mib: int, workdir: Path) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    _write(workdir / "raw.json", {"port": ls.getsockname()[1]})
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = memoryview(bytearray(os.urandom(1 << 20)) * mib)
    while conn.recv(1):  # one byte asks for the whole buffer
        conn.sendall(data)


# --- the measuring side (this process) --------------------------------------------------


async def _replicated(addresses: list[str], replication: int) -> bool:
    from gossip.observe.status import fetch_status

    copies: dict[int, int] = {}
    shards = 0
    for address in addresses:
        st = (await fetch_status(address, 10.0))["store"]
        for snap in st["snapshots"]:
            if snap["model_id"] == "big":
                shards = snap["shards"]
                for i in snap["shards_held"]:
                    copies[i] = copies.get(i, 0) + 1
    want = min(replication, len(addresses))
    return shards > 0 and len(copies) == shards and all(c >= want for c in copies.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repair", action="store_true", help="also time the repair after one node dies")
    ap.add_argument("--child", choices=("node", "raw"), help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ppid", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        watch_parent(args.ppid)
        if args.child == "raw":
            _raw_child(args.mib, Path(args.workdir))
        else:
            asyncio.run(_node_child(args.index, args.nodes, args.mib, Path(args.workdir)))
        return 0

    import torch

    from gossip.cluster.sysutil import tune_malloc
    from gossip.store.reconstruct import fetch_snapshot
    from gossip.transport.channels import Channels

    torch.set_num_threads(1)
    tune_malloc()
    workdir = Path(tempfile.mkdtemp(prefix="bench-reconstruct-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    base = [
        sys.executable,
        __file__,
        "--workdir",
        str(workdir),
        "--ppid",
        str(os.getpid()),
        "--mib",
        str(args.mib),
    ]
    children: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        for i in range(args.nodes):
            cmd = [*base, "--child", "node", "--index", str(i), "--nodes", str(args.nodes)]
            children.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        children.append(subprocess.Popen([*base, "--child", "raw"], env=env, stdin=subprocess.DEVNULL))
        published = _wait_file(workdir / "published.json", children)
        addresses = [_wait_file(workdir / f"node{i}.json", children)["address"] for i in range(args.nodes)]
        port = _wait_file(workdir / "raw.json", children)["port"]
        print(
            f"{args.nodes} nodes up and {args.mib} MiB published in {time.monotonic() - t0:.1f} s "
            f"(the publish itself {published['seconds']:.2f} s)",
            file=sys.stderr,
        )
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw_buf = memoryview(bytearray(args.mib * MiB))
        raw_times, rebuild_times, cold_times, peers = [], [], [], []
        correct = True

        async def measure() -> None:
            nonlocal correct
            # Cold: a client with no channel yet, as `gossip reconstruct` runs. Warm: channels
            # already open, like the raw connection. Both are reported; the ratio uses warm.
            t = time.perf_counter()
            await fetch_snapshot(addresses[0], "big", timeout=30.0)
            cold_times.append(time.perf_counter() - t)
            client = Channels()
            try:
                for r in range(args.repeats + 1):
                    t = time.perf_counter()
                    sock.sendall(b"x")
                    recv_exact(sock, raw_buf)
                    raw = time.perf_counter() - t
                    t = time.perf_counter()
                    rebuilt = await fetch_snapshot(
                        addresses[r % args.nodes], "big", timeout=30.0, channels=client
                    )
                    took = time.perf_counter() - t
                    correct &= rebuilt.manifest.sha256.hex() == published["sha256"]
                    if r == 0:
                        continue  # opens the channels
                    raw_times.append(raw)
                    rebuild_times.append(took)
                    peers.append(len(rebuilt.peers))
                    print(
                        f"repeat {r}: raw {raw:.3f} s, reconstruct {took:.3f} s from {peers[-1]} nodes",
                        file=sys.stderr,
                    )
            finally:
                await client.close()

        asyncio.run(measure())
        sock.close()
        raw_s, rebuild_s = statistics.median(raw_times), statistics.median(rebuild_times)
        nbytes = args.mib * MiB
        result: dict[str, Any] = {
            "ratio": round(raw_s / rebuild_s, 3),
            "reconstruct_s": round(rebuild_s, 4),
            "raw_s": round(raw_s, 4),
            "mb_per_s": round(nbytes / 1e6 / rebuild_s, 1),
            "raw_mb_per_s": round(nbytes / 1e6 / raw_s, 1),
            "reconstruct_range_s": [round(min(rebuild_times), 4), round(max(rebuild_times), 4)],
            "raw_range_s": [round(min(raw_times), 4), round(max(raw_times), 4)],
            "cold_reconstruct_s": round(cold_times[0], 4),
            "bytes": nbytes,
            "shards": -(-nbytes // MiB),
            "nodes": args.nodes,
            "replication": 3,
            "peers": statistics.median(peers),
            "repeats": args.repeats,
            "correct": correct,
        }
        if args.repair:
            victim = json.loads((workdir / f"node{args.nodes - 1}.json").read_text())
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.monotonic()
            survivors = addresses[: args.nodes - 1]
            while not asyncio.run(_replicated(survivors, 3)):
                if time.monotonic() - killed > 180:
                    raise TimeoutError("the store did not repair within 180 s")
                time.sleep(0.25)
            result["repair_s"] = round(time.monotonic() - killed, 2)
            print(f"every shard had 3 copies again {result['repair_s']} s after the kill", file=sys.stderr)
        print(json.dumps(result))
        return 0 if correct else 1
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
        for p in children:
            p.wait(30)


if __name__ == "__main__":
    sys.exit(main())
