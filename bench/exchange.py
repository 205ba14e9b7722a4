"""Push-pull exchange: two gossip Node processes over gRPC vs raw TCP, on loopback.

    python bench/exchange.py [--sizes 1,16,100] [--repeats 200,60,40]

Node A (this process) exchanges a float32 parameter vector of each size with
node B (its own process) the way the node does it: a snapshot, then
``gossip.node.pairwise.call`` (what a node's own exchange runs), timed from the
start of the call until A's exchange is committed (answer received and checked,
commit acknowledged by B, delta computed and applied). The baseline is a raw TCP
push-pull of the same bytes between A and a raw peer in a third process:
``sendall`` from a memoryview, ``recv_into`` a preallocated tensor, then back,
on a connection that is already open. Methods alternate within each repeat;
medians are reported; ratio = raw / gossip (1.0 = as fast as raw TCP).

Ratios are paired: each repeat times raw and gossip back to back (their order
alternating), and the reported ratio is the median of the per-repeat ratios, which
cancels the machine's slow drifts that separate medians do not.

Correctness is checked once per size: A starts at 1.0 and B at 3.0, and after
one exchange both must hold 2.0 everywhere (neither node trains, so each
applies its delta at once).

The last line printed is JSON: ratio_1mib/ratio_16mib/ratio_100mib (raw ms /
gossip ms), ms_1mib, raw_ms and gossip_ms (medians), their min-max ranges,
snapshot_ms (A's snapshot copy, not in gossip_ms), repeats, correct. Every child
process is ended when this one ends (also on SIGTERM), each child exits on its
own if this process disappears, and the whole run stops at --time-limit.
The machine is shared and noisy: compare ratios, within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    add_cc_option,
    cc_error,
    congestion_control,
    enter_netns,
    inside_netns,
    quartiles,
    recv_exact,
    shaped_pair,
    watch_parent,
)

MiB = 1 << 20
_NETNS_PY = Path(__file__).resolve().parents[1] / "tests" / "support" / "netns.py"
# Both nodes' gossip settings: the defaults, but no averaging of their own after "training"
# (they never train); GOSSIP_CHUNK_BYTES overrides the chunk size for an experiment.
GOSSIP: Any = None
BARE_CHUNK = 0  # the bare gRPC stream's frames: gRPC's automatic chunk size
BULK = True  # the nodes send bulk calls over their plain-TCP bulk port (--no-bulk: over gRPC)
RATE = ""  # both nodes' --max-send-rate (--max-send-rate here; children read it from the environment)
CALL_TIMEOUT = 30.0  # any single exchange or command
STARTUP_TIMEOUT = 60.0  # a child importing torch and grpc on a loaded machine


# --- helpers shared by the processes ---------------------------------------------------


def _setup_process(mallopt: bool) -> None:
    import torch

    from gossip.config import GossipConfig, chunk_bytes_for, parse_rate

    global GOSSIP, RATE, BULK, BARE_CHUNK
    RATE = os.environ.get("GOSSIP_MAX_SEND_RATE", "")
    BULK = not os.environ.get("GOSSIP_NO_BULK")
    # The nodes' chunk size, automatic as a node's (from RATE, and the bulk port's) unless set;
    # the bare gRPC stream's is gRPC's automatic one.
    given, rate = int(os.environ.get("GOSSIP_CHUNK_BYTES", "0")), parse_rate(RATE) if RATE else None
    GOSSIP = GossipConfig(chunk_bytes=chunk_bytes_for(given, rate, bulk=BULK), idle_pause=0.0)
    BARE_CHUNK = chunk_bytes_for(given, rate)

    import gossip.node.node  # noqa: F401  (everything a node imports, before the heap is frozen)
    from gossip.cluster.sysutil import freeze_heap, tune_malloc

    torch.set_num_threads(1)  # as gossip's runner does: one thread per node process
    if mallopt:
        tune_malloc()
    if not os.environ.get("GOSSIP_BENCH_NO_FREEZE"):
        freeze_heap()  # as the runner does once the node is built
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s: %(message)s")


# --- raw TCP peer (own process) --------------------------------------------------------


DUPLEX = 1 << 63  # the length word's top bit: send the answer while the payload arrives


def _child(ppid: int, mallopt: bool, netns: str | None) -> None:
    """A peer process's start: gone with its parent, on its host, tuned like a node."""
    watch_parent(ppid)
    if netns:
        enter_netns(netns)
    _setup_process(mallopt)


def raw_peer(conn: Any, ppid: int, mallopt: bool, netns: str | None, host: str) -> None:
    _child(ppid, mallopt, netns)
    import torch

    ls = socket.socket()
    ls.bind((host, 0))
    ls.listen(1)
    conn.send(ls.getsockname()[1])
    ls.settimeout(STARTUP_TIMEOUT)
    bufs: dict[int, tuple[memoryview, memoryview, torch.Tensor, torch.Tensor]] = {}
    while True:  # a relay's readiness probe is a connection too: serve each until it closes
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            _serve_raw(c, bufs)


def _serve_raw(c: socket.socket, bufs: dict[int, Any]) -> None:
    import torch

    hdr = bytearray(8)
    while True:
        try:
            recv_exact(c, memoryview(hdr))
        except ConnectionError:
            return
        word = int.from_bytes(hdr, "little")
        n = word & ~DUPLEX
        if n not in bufs:
            src, dst = torch.full((n // 4,), 3.0), torch.empty(n // 4)
            bufs[n] = (memoryview(src.numpy()).cast("B"), memoryview(dst.numpy()).cast("B"), src, dst)
        send, recv, _, _ = bufs[n]
        if word & DUPLEX:
            sender = threading.Thread(target=c.sendall, args=(send,))
            sender.start()
            recv_exact(c, recv)
            sender.join()
        else:
            recv_exact(c, recv)
            c.sendall(send)


# --- bare gRPC peer (own process): the floor of any exchange over grpc.aio ---------------

BARE_METHOD = "/bench.Bare/Duplex"


def _bare_frames(nbytes: int, chunk: int) -> list[bytes]:
    """Ready chunk frames of ``nbytes`` in all: sent as they are, no copy per exchange."""
    from gossip.transport.frames import chunk_frame

    block = memoryview(bytes(chunk))
    return [chunk_frame(block[: min(chunk, nbytes - s)]) for s in range(0, nbytes, chunk)]


def bare_peer(conn: Any, ppid: int, mallopt: bool, netns: str | None, host: str) -> None:
    _child(ppid, mallopt, netns)
    asyncio.run(_bare_peer(conn, host))


async def _bare_peer(conn: Any, host: str) -> None:
    """A grpc.aio server with gossip's options whose one method answers while it reads, like an exchange."""
    import grpc
    import grpc.aio

    from gossip.transport.frames import chunk_from_frame
    from gossip.transport.server import SERVER_OPTIONS

    cache: dict[int, list[bytes]] = {}

    async def duplex(requests: Any, context: Any) -> None:
        first = await context.read()
        n = int.from_bytes(first, "little")
        frames = cache.setdefault(n, _bare_frames(n, BARE_CHUNK))

        async def send() -> None:
            for f in frames:
                await context.write(f)

        sender = asyncio.ensure_future(send())
        got = 0
        while got < n:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                break
            got += len(chunk_from_frame(msg))
        await sender

    def ident(b: bytes) -> bytes:
        return b

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(duplex, ident, ident)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Bare", {"Duplex": handler}),)
    )
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    conn.send(port)
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, conn.poll, 0.5):
        pass
    await server.stop(0)


# --- node B (own process) -----------------------------------------------------------


def node_peer(conn: Any, ppid: int, mallopt: bool, netns: str | None, host: str) -> None:
    _child(ppid, mallopt, netns)
    asyncio.run(_node_peer(conn, host))


async def _node_peer(conn: Any, host: str) -> None:
    import torch

    from gossip.config import NodeConfig
    from gossip.core.params import FlatParams, Layout
    from gossip.node.node import Node

    loop = asyncio.get_running_loop()
    nodes: dict[int, Node] = {}
    conn.send(("ready", None))
    try:
        while True:
            if not await loop.run_in_executor(None, conn.poll, 0.5):
                continue
            cmd, arg = conn.recv()
            if cmd == "create":
                n, value, listen, advertise = arg
                flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(n))]))
                flat.segments["float32"].fill_(value)
                config = NodeConfig(
                    listen=listen,
                    advertise=advertise,
                    node_id=f"B{n}",
                    gossip=GOSSIP,
                    max_send_rate=RATE,
                    bulk_port=0 if BULK else -1,
                )
                node = await Node.create(flat, config)
                nodes[n] = node
                conn.send(("ok", node.address))
            elif cmd == "check":
                node = nodes[arg]
                lo, hi = torch.aminmax(node.flat.segments["float32"])
                conn.send(("ok", (float(lo), float(hi), node.stats.exchanges_served)))
            elif cmd == "drop":
                node = nodes.pop(arg)
                await node.stop(leave=False)
                conn.send(("ok", None))
            elif cmd == "quit":
                conn.send(("ok", None))
                return
    finally:
        for node in nodes.values():
            await node.stop(leave=False)


# --- node A: the measuring side (this process) ----------------------------------------------


class Child:
    def __init__(self, target: Any, mallopt: bool, name: str, netns: str | None, host: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=target, args=(child_conn, os.getpid(), mallopt, netns, host), name=name, daemon=True
        )
        self.proc.start()

    def recv(self, timeout: float = CALL_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name} did not answer within {timeout:.0f} s")
        return self.conn.recv()

    def call(self, cmd: str, arg: Any = None, timeout: float = CALL_TIMEOUT) -> Any:
        self.conn.send((cmd, arg))
        status, value = self.recv(timeout)
        if status != "ok":
            raise RuntimeError(f"{self.proc.name}: {cmd} failed: {value}")
        return value

    def end(self) -> None:
        if self.proc.pid is None:
            return
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _raw_exchange(sock: socket.socket, send: memoryview, recv: memoryview) -> None:
    """Push, then pull: the peer answers once the whole payload arrived."""
    sock.sendall(len(send).to_bytes(8, "little"))
    sock.sendall(send)
    recv_exact(sock, recv)


def _raw_duplex(sock: socket.socket, send: memoryview, recv: memoryview) -> None:
    """Both directions at once: the peer answers while the payload arrives."""
    sock.sendall((len(send) | DUPLEX).to_bytes(8, "little"))
    sender = threading.Thread(target=sock.sendall, args=(send,))
    sender.start()
    recv_exact(sock, recv)
    sender.join()


async def _bare_duplex(method: Any, frames: list[bytes], nbytes: int) -> None:
    """One exchange over a bare grpc.aio stream: both directions at once, ready frames, no node logic."""
    from gossip.transport.frames import chunk_from_frame

    call = method()

    async def send() -> None:
        await call.write(nbytes.to_bytes(8, "little"))
        for f in frames:
            await call.write(f)
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    got = 0
    while got < nbytes:
        msg = await call.read()
        got += len(chunk_from_frame(msg))
    await sender
    await call.code()


_CPU: list[float] = []  # node A's CPU time (every thread) per exchange, ms


async def _gossip_exchange(node: Any, peer: Any) -> tuple[float, float]:
    """One exchange started as the node starts its own: (snapshot ms, exchange ms to committed)."""
    from gossip.node import pairwise
    from gossip.transport.channels import GOSSIP

    def connect(address: str) -> Any:
        return node.channels.stream(address, GOSSIP + "Exchange", node.party.deadline)

    t0 = time.perf_counter()
    if not node.slot.claim_own(running=True):  # the snapshot copy, as Node.step takes it
        raise RuntimeError("node A is busy before its exchange")
    t1 = time.perf_counter()
    c1 = time.process_time()
    try:
        outcome = await asyncio.wait_for(pairwise.call(node.party, peer, connect), CALL_TIMEOUT)
    finally:
        node.slot.own_finished()
    t2 = time.perf_counter()
    _CPU.append((time.process_time() - c1) * 1e3)
    if outcome != "ok":
        node.slot.release()
        raise RuntimeError(f"exchange ended {outcome!r}")
    if node.slot.busy:
        raise RuntimeError("node A did not apply its delta at once (it should: it is not training)")
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


async def _run_size(
    size_mib: int,
    repeats: int,
    warmup: int,
    b: Child,
    b_at: tuple[str, str | None],
    sock: socket.socket,
    host: str,
    bare: Any,
) -> dict[str, Any]:
    import torch

    from gossip.config import NodeConfig
    from gossip.core.params import FlatParams, Layout
    from gossip.node.node import Node

    nbytes = size_mib * MiB
    n = nbytes // 4
    b_addr = b.call("create", (n, 3.0, *b_at))
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(n))]))
    flat.segments["float32"].fill_(1.0)
    node = await Node.create(
        flat,
        NodeConfig(
            listen=f"{host}:0",
            node_id=f"A{n}",
            peers=(b_addr,),
            gossip=GOSSIP,
            max_send_rate=RATE,
            bulk_port=0 if BULK else -1,
        ),
    )
    try:
        if not await node.wait_for_members(2, CALL_TIMEOUT):
            raise TimeoutError("node A did not see node B")
        peers = [m for m in node.neighbours() if m.address == b_addr]
        if not peers:
            raise RuntimeError("node B is not a neighbour of node A")
        peer = peers[0]
        raw_send_t = torch.full((n,), 1.0)
        raw_recv_t = torch.empty(n)
        raw_send = memoryview(raw_send_t.numpy()).cast("B")
        raw_recv = memoryview(raw_recv_t.numpy()).cast("B")

        # Correctness, once: 1.0 and 3.0 average to 2.0 on both sides.
        await _gossip_exchange(node, peer)
        lo, hi = (float(v) for v in torch.aminmax(flat.segments["float32"]))
        b_lo, b_hi, served = b.call("check", n)
        correct = lo == hi == 2.0 and b_lo == b_hi == 2.0 and served == 1
        _raw_exchange(sock, raw_send, raw_recv)
        raw_correct = bool((raw_recv_t == 3.0).all())
        if not correct:
            print(
                f"  !! {size_mib} MiB: A holds [{lo}, {hi}], B holds [{b_lo}, {b_hi}], expected 2.0",
                file=sys.stderr,
            )
        if not raw_correct:
            print(f"  !! {size_mib} MiB: raw peer's bytes did not arrive intact", file=sys.stderr)

        bare_frames = _bare_frames(nbytes, BARE_CHUNK)
        for _ in range(warmup):
            _raw_exchange(sock, raw_send, raw_recv)
            await _gossip_exchange(node, peer)
            await _bare_duplex(bare, bare_frames, nbytes)
        # The first call to B went over gRPC while A asked B for its bulk port; timed ones do not.
        for _ in range(100):
            if not BULK or node.channels.bulk_port(b_addr):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("node A never learned node B's bulk port")

        raw_ms: list[float] = []
        duplex_ms: list[float] = []
        gossip_ms: list[float] = []
        bare_ms: list[float] = []
        snap_ms: list[float] = []

        async def bare_once() -> None:
            t0 = time.perf_counter()
            await _bare_duplex(bare, bare_frames, nbytes)
            bare_ms.append((time.perf_counter() - t0) * 1e3)

        def raw_once() -> None:
            t0 = time.perf_counter()
            _raw_exchange(sock, raw_send, raw_recv)
            raw_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            _raw_duplex(sock, raw_send, raw_recv)
            duplex_ms.append((time.perf_counter() - t0) * 1e3)

        async def gossip_once() -> None:
            s, g = await _gossip_exchange(node, peer)
            snap_ms.append(s)
            gossip_ms.append(g)

        _CPU.clear()
        for i in range(repeats):
            if i % 2 == 0:
                raw_once()
                await gossip_once()
                await bare_once()
            else:
                await bare_once()
                await gossip_once()
                raw_once()
        # Deltas between equal models are zero: still 2.0 after all the repeats.
        lo, hi = (float(v) for v in torch.aminmax(flat.segments["float32"]))
        correct = correct and lo == hi == 2.0
    finally:
        await node.stop(leave=False)
        b.call("drop", n)
    return {
        "size_mib": size_mib,
        "repeats": repeats,
        "raw_ms": statistics.median(raw_ms),
        "duplex_ms": statistics.median(duplex_ms),
        "gossip_ms": statistics.median(gossip_ms),
        "snapshot_ms": statistics.median(snap_ms),
        "ratio": statistics.median(r / g for r, g in zip(raw_ms, gossip_ms, strict=True)),
        "duplex_ratio": statistics.median(d / g for d, g in zip(duplex_ms, gossip_ms, strict=True)),
        "ratio_iqr": quartiles([r / g for r, g in zip(raw_ms, gossip_ms, strict=True)]),
        "bare_ms": statistics.median(bare_ms),
        "cpu_ms": statistics.median(_CPU),
        "bare_ratio": statistics.median(r / b for r, b in zip(raw_ms, bare_ms, strict=True)),
        "vs_bare": statistics.median(b / g for b, g in zip(bare_ms, gossip_ms, strict=True)),
        "raw_range_ms": [min(raw_ms), max(raw_ms)],
        "gossip_range_ms": [min(gossip_ms), max(gossip_ms)],
        "correct": bool(correct and raw_correct),
    }


def delayed(net: Any, host: Any, port: int, k: int, delay: float) -> int:
    """Start a delaying relay on ``host``'s link address to its local ``port``; the port to dial."""
    from tests.support.netns import RELAY_PORT

    relay_port = RELAY_PORT + k
    argv = [sys.executable, str(_NETNS_PY), "relay", "--listen", f"{host.ip}:{relay_port}",
            "--to", f"127.0.0.1:{port}", "--delay", str(delay)]  # fmt: skip
    net.start(host, f"relay-{k}", argv)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            socket.create_connection((host.ip, relay_port), timeout=1).close()
            return relay_port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _default_repeats(size_mib: int) -> int:
    return 200 if size_mib <= 1 else 60 if size_mib <= 16 else 40


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,16,100", help="sizes in MiB, comma-separated (default 1,16,100)")
    ap.add_argument(
        "--repeats",
        default="",
        help="timed repeats: one number for every size, or one per size (default 200/60/40 by size; "
        "paired ratios need 40+)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed exchanges of each kind per size")
    ap.add_argument("--no-mallopt", action="store_true", help="leave glibc malloc at its defaults")
    ap.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --link: add MS milliseconds each way through the lab's delaying TCP relay "
        "(this kernel has no netem), for every method alike",
    )
    ap.add_argument(
        "--max-send-rate",
        default="",
        metavar="RATE",
        help="give both gossip nodes --max-send-rate RATE (the raw and bare peers are not paced): "
        "compare with --link RATE to see the user-space limit against a shaped link",
    )
    ap.add_argument(
        "--no-bulk",
        action="store_true",
        help="the nodes send everything over gRPC (bulk_port -1), as before the bulk port",
    )
    ap.add_argument("--time-limit", type=float, default=400.0, help="hard limit on the whole run (s)")
    ap.add_argument(
        "--link",
        default="",
        metavar="RATE",
        help="run node B and the raw peer on a second host (network namespace) joined by a link shaped "
        "to RATE each way with tc tbf, e.g. 1gbit or 200mbit (root; default: loopback, one host)",
    )
    add_cc_option(ap)
    args = ap.parse_args(argv)
    if args.delay and not args.link:
        ap.error("--delay needs --link")
    if (why := cc_error(args.cc, args.link)) is not None:
        ap.error(why)
    if args.max_send_rate:
        os.environ["GOSSIP_MAX_SEND_RATE"] = args.max_send_rate  # before the children start
    if args.no_bulk:
        os.environ["GOSSIP_NO_BULK"] = "1"
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.repeats:
        reps = [int(r) for r in args.repeats.split(",")]
        if len(reps) == 1:
            reps *= len(sizes)
        if len(reps) != len(sizes):
            ap.error("--repeats takes one number or one per size")
    else:
        reps = [_default_repeats(s) for s in sizes]
    mallopt = not args.no_mallopt
    _setup_process(mallopt)

    children: list[Child] = []

    def hard_stop() -> None:  # the last resort: a hung call must not outlive the limit
        print(
            f"bench/exchange.py: over the {args.time_limit:.0f} s limit, stopping",
            file=sys.stderr,
            flush=True,
        )
        for c in children:
            c.end()
        os._exit(3)

    def on_term(signum: int, frame: object) -> None:  # SIGTERM: unwind, so the finally ends the children
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    watchdog = threading.Timer(args.time_limit, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    lab = contextlib.ExitStack()
    try:
        here, there, ns = "127.0.0.1", "127.0.0.1", None
        listen = there  # where the peers on the far host listen
        net: Any = None
        if args.link:
            net = lab.enter_context(
                shaped_pair(
                    args.link, lab.enter_context(tempfile.TemporaryDirectory()), args.delay / 1e3, args.cc
                )
            )
            (a_host, b_host) = net.hosts
            # Node A and the raw client: host 0 (left before the lab closes, which kills what is
            # inside its hosts); node B and the raw and bare peers: host 1.
            lab.enter_context(inside_netns(a_host.ns))
            here, there, ns = a_host.ip, b_host.ip, b_host.ns
            # With a delay every peer listens inside its host and is dialled through a delaying relay.
            listen = "127.0.0.1" if args.delay else there
        cc = congestion_control()  # inside host A with --link
        b_at: tuple[str, str | None] = (f"{listen}:0", None)
        if args.delay:
            b_at = (b_host.local, b_host.address)  # the lab's own relay leads to node B
        raw = Child(raw_peer, mallopt, "raw-peer", ns, listen)
        children.append(raw)
        b = Child(node_peer, mallopt, "node-B", ns, listen)
        children.append(b)
        bare_peer_proc = Child(bare_peer, mallopt, "bare-grpc-peer", ns, listen)
        children.append(bare_peer_proc)
        raw_port = raw.recv(STARTUP_TIMEOUT)
        bare_port = bare_peer_proc.recv(STARTUP_TIMEOUT)
        if b.recv(STARTUP_TIMEOUT)[0] != "ready":
            raise RuntimeError("node B did not start")
        if args.delay:
            raw_port = delayed(net, b_host, raw_port, 1, args.delay / 1e3)
            bare_port = delayed(net, b_host, bare_port, 2, args.delay / 1e3)
        sock = socket.create_connection((there, raw_port), timeout=CALL_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            print(
                f"{'size':>7} {'raw ms':>8} {'duplex ms':>10} {'bare ms':>8} {'gossip ms':>10} {'ratio':>6} "
                f"{'vs duplex':>10} {'vs bare':>8} {'gossip MB/s':>12} {'snap ms':>8} {'reps':>5} {'ok':>3}",
                flush=True,
            )

            async def run_all() -> None:
                import grpc.aio

                from gossip.transport.channels import CHANNEL_OPTIONS

                channel = grpc.aio.insecure_channel(f"{there}:{bare_port}", options=CHANNEL_OPTIONS)
                bare = channel.stream_stream(BARE_METHOD)
                try:
                    for size, r in zip(sizes, reps, strict=True):
                        res = await _run_size(size, r, args.warmup, b, b_at, sock, here, bare)
                        results.append(res)
                        mb = 2 * size * MiB / 1e6  # both directions
                        print(
                            f"{size:>4} MiB {res['raw_ms']:8.2f} {res['duplex_ms']:10.2f} {res['bare_ms']:8.2f} "
                            f"{res['gossip_ms']:10.2f} {res['ratio']:6.2f} {res['duplex_ratio']:10.2f} "
                            f"{res['vs_bare']:8.2f} {mb / res['gossip_ms'] * 1e3:12.0f} {res['snapshot_ms']:8.2f} "
                            f"{res['cpu_ms']:7.1f} {r:>5} {'yes' if res['correct'] else 'NO':>3}",
                            flush=True,
                        )
                finally:
                    await channel.close()

            asyncio.run(run_all())
        finally:
            sock.close()
            with contextlib.suppress(Exception):
                b.call("quit", timeout=10)
            with contextlib.suppress(Exception):
                bare_peer_proc.conn.send(("quit", None))
    finally:
        for c in children:
            c.end()
        lab.close()
        watchdog.cancel()

    by_size = {r["size_mib"]: r for r in results}
    summary: dict[str, Any] = {
        "bench": "exchange",
        "sizes_mib": sizes,
        "link": args.link or "loopback",
        "raw_ms": {str(s): round(r["raw_ms"], 3) for s, r in by_size.items()},
        "raw_duplex_ms": {str(s): round(r["duplex_ms"], 3) for s, r in by_size.items()},
        "gossip_ms": {str(s): round(r["gossip_ms"], 3) for s, r in by_size.items()},
        "bare_grpc_ms": {str(s): round(r["bare_ms"], 3) for s, r in by_size.items()},
        # raw / bare gRPC: the most any exchange over grpc.aio could reach against raw TCP here
        "bare_grpc_ratio": {str(s): round(r["bare_ratio"], 3) for s, r in by_size.items()},
        # bare gRPC / gossip: what the node's logic costs over that floor
        "gossip_vs_bare": {str(s): round(r["vs_bare"], 3) for s, r in by_size.items()},
        "snapshot_ms": {str(s): round(r["snapshot_ms"], 3) for s, r in by_size.items()},
        "caller_cpu_ms": {str(s): round(r["cpu_ms"], 3) for s, r in by_size.items()},
        "raw_range_ms": {str(s): [round(v, 3) for v in r["raw_range_ms"]] for s, r in by_size.items()},
        "gossip_range_ms": {str(s): [round(v, 3) for v in r["gossip_range_ms"]] for s, r in by_size.items()},
        "repeats": {str(s): r["repeats"] for s, r in by_size.items()},
        "correct": all(r["correct"] for r in results),
        "mallopt": mallopt,
        "max_send_rate": args.max_send_rate or None,
        "bulk": not args.no_bulk,
        "congestion_control": cc,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    for s in (1, 16, 100):
        r = by_size.get(s)
        summary[f"ratio_{s}mib"] = round(r["ratio"], 3) if r else None
        if r:
            summary[f"ratio_iqr_{s}mib"] = [round(v, 3) for v in r["ratio_iqr"]]
    summary["ms_1mib"] = round(by_size[1]["gossip_ms"], 3) if 1 in by_size else None
    if args.link:  # on a shaped link the yardstick is both directions at once
        big = by_size[max(by_size)]
        key = f"link_ratio_{args.link}" + (f"_{args.delay:g}ms" if args.delay else "")
        summary[key] = round(big["duplex_ratio"], 3)
        summary["delay_ms"] = args.delay
        summary["link_ratio_by_size"] = {str(s): round(r["duplex_ratio"], 3) for s, r in by_size.items()}
    print(json.dumps(summary), flush=True)
    return 0 if summary["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
