"""Rebuild a 100 MiB model from an 8-node cluster (R=3): against raw TCP on loopback, or on shaped links.

    python bench/reconstruct.py [--mib 100] [--nodes 8] [--repeats 21] [--repair] [--no-bulk]
    python bench/reconstruct.py --link 200mbit [--rebuilder-link 1gbit] [--repeats 9]   # root

Eight gossip ``Node`` processes (each its own process, store enabled, a bare
16-float model of its own: no training) form a ring; node 0 publishes one
snapshot of a random float32 model of --mib MiB in 1 MiB shards, so every shard
lives on 3 of the 8. This process then rebuilds it through one node (a
different one each repeat) exactly as ``gossip reconstruct`` does: locate,
fetch every shard from its owners in parallel straight into one buffer, check
each shard's digest (blake3) as it lands, build the tensors. The rebuilds after
the first fill the buffer of the one before (``reuse=``), as the yardstick
reuses its own; a first, cold rebuild through a fresh client and a fresh
buffer, as the CLI runs, is reported beside them.

Loopback (the default): the yardstick is a raw TCP transfer of the same bytes
from another process (``sendall`` of a memoryview into ``recv_into`` a
preallocated buffer, on a connection already open). ``rebuild_ratio`` = raw
seconds / rebuild seconds (1.0 = as fast as raw TCP).

``--link RATE``: every node and the raw donor run on hosts of their own
(network namespaces, the tests' lab), each host's link shaped to RATE both ways
with ``tc tbf``; this process rebuilds from a host whose link is
--rebuilder-link. The yardstick is ONE raw TCP stream of the same bytes from
ONE donor over a RATE link: what a rebuild from a single peer could do at
best. ``rebuild_vs_one_donor`` = one-donor seconds / rebuild seconds: how much
fetching from every owner at once gains.

Within each repeat both methods run back to back, their order alternating; the
reported ratios are paired (the median of the per-repeat ratios, with their
quartiles), which cancels the slow drifts of a shared machine. With
``--repair`` one node is then SIGKILLed and the time until every shard has R
copies again among the survivors is measured, on the default store and
membership settings (the death is noticed after 10 s of silence).

The last line printed is JSON: rebuild_ratio (loopback) or rebuild_vs_one_donor
(--link), with its quartiles; ratio (loopback: the ratio of the medians, as this
bench reported before it paired them); reconstruct_s, raw_s (loopback) or
one_donor_s (--link), medians; cold_reconstruct_s, mb_per_s, bytes, shards,
nodes, replication, peers (distinct nodes that served shards, median),
digest_algorithm, link, repeats, correct, and repair_s with --repair. Children
exit when this process does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    add_cc_option,
    cc_error,
    congestion_control,
    inside_netns,
    quartiles,
    recv_exact,
    shaped_hosts,
    watch_parent,
)

MiB = 1 << 20
STARTUP_TIMEOUT = 180.0  # on 200 Mbit/s links the publish of 100 MiB x 3 copies alone takes ~12 s


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


async def _node_child(index: int, nodes: int, mib: int, workdir: Path, host: str) -> None:
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
    bulk_port = -1 if os.environ.get("GOSSIP_NO_BULK") else 0  # --no-bulk: every shard over gRPC
    config = NodeConfig(
        listen=f"{host}:0", node_id=f"node{index}", peers=tuple(seed), store=store, bulk_port=bulk_port
    )
    node = await Node.create(flat, config)
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


def _raw_child(mib: int, workdir: Path, host: str) -> None:
    ls = socket.socket()
    ls.bind((host, 0))
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


def _quartiles(xs: list[float]) -> list[float]:
    return [round(q, 3) for q in quartiles(xs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument(
        "--repeats", type=int, default=0, help="timed repeats (default 21 on loopback, 9 with --link)"
    )
    ap.add_argument("--repair", action="store_true", help="also time the repair after one node dies")
    ap.add_argument(
        "--link",
        default="",
        metavar="RATE",
        help="every node and the one-donor yardstick on a host of its own whose link is shaped to RATE "
        "both ways (tc tbf, e.g. 200mbit; root); default: loopback, one host",
    )
    ap.add_argument(
        "--rebuilder-link", default="1gbit", metavar="RATE", help="with --link: the rebuilding host's link"
    )
    ap.add_argument(
        "--no-bulk",
        action="store_true",
        help="the nodes serve shards over gRPC only (bulk_port -1), as before the bulk port",
    )
    add_cc_option(ap)
    ap.add_argument("--child", choices=("node", "raw"), help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ppid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        watch_parent(args.ppid)
        if args.child == "raw":
            _raw_child(args.mib, Path(args.workdir), args.host)
        else:
            asyncio.run(_node_child(args.index, args.nodes, args.mib, Path(args.workdir), args.host))
        return 0
    if (why := cc_error(args.cc, args.link)) is not None:
        ap.error(why)
    repeats = args.repeats or (9 if args.link else 21)
    if args.no_bulk:
        os.environ["GOSSIP_NO_BULK"] = "1"  # before the children start

    workdir = Path(tempfile.mkdtemp(prefix="bench-reconstruct-"))
    lab = contextlib.ExitStack()
    children: list[subprocess.Popen[bytes]] = []
    try:
        # Where each process runs: (network namespace or None, its address).
        node_hosts: list[tuple[str | None, str]] = [(None, "127.0.0.1")] * args.nodes
        donor_host: tuple[str | None, str] = (None, "127.0.0.1")
        if args.link:
            rates = [args.rebuilder_link] + [args.link] * (args.nodes + 1)
            net = lab.enter_context(shaped_hosts(rates, str(workdir), args.cc))
            node_hosts = [(h.ns, h.ip) for h in net.hosts[1 : args.nodes + 1]]
            donor_host = (net.hosts[-1].ns, net.hosts[-1].ip)
            # Before grpc or torch start threads: setns moves only the calling thread.
            lab.enter_context(inside_netns(net.hosts[0].ns))
        return _measure(args, repeats, workdir, node_hosts, donor_host, children)
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
        for p in children:
            p.wait(30)
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(
    args: argparse.Namespace,
    repeats: int,
    workdir: Path,
    node_hosts: list[tuple[str | None, str]],
    donor_host: tuple[str | None, str],
    children: list[subprocess.Popen[bytes]],
) -> int:
    import torch

    from gossip.cluster.sysutil import tune_malloc
    from gossip.store.reconstruct import Rebuilt, fetch_snapshot
    from gossip.transport.channels import Channels

    torch.set_num_threads(1)
    tune_malloc()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    base = [__file__, "--workdir", str(workdir), "--ppid", str(os.getpid()), "--mib", str(args.mib)]

    def start(where: tuple[str | None, str], *extra: str) -> None:
        ns, ip = where
        wrap = ["ip", "netns", "exec", ns] if ns else []  # execs: the pid is python's, its parent us
        cmd = [*wrap, sys.executable, *base, "--host", ip, *extra]
        children.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))

    t0 = time.monotonic()
    for i in range(args.nodes):
        start(node_hosts[i], "--child", "node", "--index", str(i), "--nodes", str(args.nodes))
    start(donor_host, "--child", "raw")
    published = _wait_file(workdir / "published.json", children)
    addresses = [_wait_file(workdir / f"node{i}.json", children)["address"] for i in range(args.nodes)]
    port = _wait_file(workdir / "raw.json", children)["port"]
    where = f"on {args.link} links, rebuilding over {args.rebuilder_link}" if args.link else "on loopback"
    print(
        f"{args.nodes} nodes up {where} and {args.mib} MiB published in {time.monotonic() - t0:.1f} s "
        f"(the publish itself {published['seconds']:.2f} s)",
        file=sys.stderr,
    )
    sock = socket.create_connection((donor_host[1], port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw_buf = memoryview(bytearray(args.mib * MiB))
    raw_times: list[float] = []
    rebuild_times: list[float] = []
    cold_times: list[float] = []
    peers: list[int] = []
    algorithms: set[str] = set()
    correct = True

    async def measure() -> None:
        nonlocal correct
        # Cold: a client with no channel and no buffer yet, as `gossip reconstruct` runs. Warm:
        # channels open and the last rebuild's buffer reused, like the raw connection and buffer.
        t = time.perf_counter()
        await fetch_snapshot(addresses[0], "big", timeout=30.0)
        cold_times.append(time.perf_counter() - t)
        client = Channels()
        last: Rebuilt | None = None

        def raw_once() -> float:
            t = time.perf_counter()
            sock.sendall(b"x")
            recv_exact(sock, raw_buf)
            return time.perf_counter() - t

        async def rebuild_once(r: int) -> float:
            nonlocal correct, last
            t = time.perf_counter()
            last = await fetch_snapshot(
                addresses[r % args.nodes], "big", timeout=30.0, channels=client, reuse=last
            )
            took = time.perf_counter() - t
            correct &= last.manifest.sha256.hex() == published["sha256"]
            algorithms.add(last.manifest.digest_algorithm)
            return took

        try:
            for r in range(repeats + 1):
                if r % 2:
                    raw = raw_once()
                    took = await rebuild_once(r)
                else:
                    took = await rebuild_once(r)
                    raw = raw_once()
                if r == 0:
                    continue  # opens the channels
                raw_times.append(raw)
                rebuild_times.append(took)
                assert last is not None
                peers.append(len(last.peers))
                print(
                    f"repeat {r}: {'one donor' if args.link else 'raw'} {raw:.3f} s, reconstruct {took:.3f} s "
                    f"from {peers[-1]} nodes, ratio {raw / took:.2f}",
                    file=sys.stderr,
                )
        finally:
            await client.close()

    asyncio.run(measure())
    sock.close()
    raw_s, rebuild_s = statistics.median(raw_times), statistics.median(rebuild_times)
    paired = [a / b for a, b in zip(raw_times, rebuild_times, strict=True)]
    nbytes = args.mib * MiB
    result: dict[str, Any] = {
        "bench": "reconstruct",
        "link": args.link or "loopback",
        "congestion_control": congestion_control(),  # the rebuilder's (inside its host with --link)
    }
    if args.link:
        result |= {
            "rebuild_vs_one_donor": round(statistics.median(paired), 3),
            "rebuild_vs_one_donor_iqr": _quartiles(paired),
            "one_donor_s": round(raw_s, 4),
            "rebuilder_link": args.rebuilder_link,
        }
    else:
        result |= {
            "rebuild_ratio": round(statistics.median(paired), 3),
            "rebuild_ratio_iqr": _quartiles(paired),
            "ratio": round(raw_s / rebuild_s, 3),
            "raw_s": round(raw_s, 4),
        }
    result |= {
        "reconstruct_s": round(rebuild_s, 4),
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
        "digest_algorithm": ",".join(sorted(algorithms)),
        "repeats": repeats,
        "bulk": not args.no_bulk,
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


if __name__ == "__main__":
    sys.exit(main())
