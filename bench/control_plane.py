"""The control plane: what it costs per node, and how fast it notices, at N nodes, per member protocol.

    python bench/control_plane.py [--sizes 16,64] [--protocols heartbeat,swim] [--processes 2]
        [--window 20] [--time-limit 1500] [--time-scale 1] [--converge-repeats 0]

For each N in ``--sizes`` and each member protocol in ``--protocols`` (heartbeat, the
default, swaps whole tables; swim probes and piggybacks news: gossip.core.swim): N real nodes (``gossip.node.node.Node``, gRPC on
127.0.0.1 port 0, a 16-float model, no training), the survivors spread over
``--processes`` worker processes and the N/10 victims (at least 1) in one more,
one asyncio loop per process. Every node joins through node 0. The figures:

- converge_s: from the first node's start until every node's table holds all N alive;
  ``converge_after_joins_s``: from the last node's start (the starts take time in
  proportion to N on one machine, which a cluster whose nodes start on their own
  machines does not pay). ``--converge-repeats K`` launches each size K more times on
  fresh processes for convergence alone: every launch's figures (``converge_all_s``,
  ``converge_after_joins_all_s``) and their medians (``converge_median_s``,
  ``converge_after_joins_median_s``).
- calls_per_node_per_s, bytes_per_node_per_s: over a ``--window`` of steady state
  (from ``--settle`` seconds after the snapshot below is placed), the control calls every server answered
  (every method but Exchange, Push, PutShard and GetShards) and their request +
  response bytes (serialized messages; HTTP/2 framing not counted; a call that
  fails counts its request only), counted by an interceptor the bench adds to each
  server, divided by N and the window. ``calls_by_method`` splits the calls.
- death_seen_s: from the SIGKILL of the victims' process until every survivor
  holds every victim as dead (``suspect_seen_s``: as not alive, i.e. suspect).
- rereplicated_s: node 0 publishes a snapshot (replication 3, 4 KiB shards,
  ``--shards`` of them) before the window; from the kill until every shard is on
  all 3 of its owners on the survivors' ring again.

A figure not reached within ``--give-up`` seconds is null (``converged_nodes_best``
then says how many nodes at best saw all N); the run goes on to the next figure.
``cores_used``: CPU of the node processes over the window, in cores.

Membership and store timings are the defaults a user gets (MembershipConfig() but
for the protocol, StoreConfig() but for the shard size and the model id), each period
and timeout (and the RPC deadline) multiplied by ``--time-scale`` K: every node then
makes K times fewer calls per second, so a machine holds K times more nodes before its
cores, not the protocol, decide the figures. Calls and bytes per node per second
compare between sizes run at the same K; times are in seconds at that K (divide by K
for rounds of the default 0.5 s). Nodes do
not train and ``idle_pause`` is 0, so no averaging runs: the traffic is the control
plane alone. The last line is JSON: each figure keyed by N as a string for swim (or
the one protocol run), every protocol's under ``by_protocol``, the config used, and
with both protocols ``swim_vs_heartbeat``: the ratios of calls and bytes per node per
second at each N (same run, one after the other).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import cpu_seconds, watch_parent

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA_METHODS = {"Exchange", "Push", "PutShard", "GetShards"}  # the data plane: not counted
SHARD_BYTES = 4096  # the smallest shard StoreConfig allows: many shards from a small snapshot
MODEL_ID = "bench"
REPLICATION = 3
START_BATCH = 16  # nodes a worker starts at once


def scaled_membership(protocol: str, scale: float) -> Any:
    """MembershipConfig() (the user's defaults) for ``protocol``, every period and timeout x ``scale``."""
    from gossip.core.membership import MembershipConfig

    d = MembershipConfig()
    return MembershipConfig(
        interval=d.interval * scale,
        suspect_after=d.suspect_after * scale,
        dead_after=d.dead_after * scale,
        left_ttl=d.left_ttl * scale,
        member_protocol=protocol,
    )


def scaled_store(scale: float) -> Any:
    """StoreConfig() but for the bench's shards and model id, its periods x ``scale``."""
    from gossip.config import StoreConfig

    d = StoreConfig()
    return StoreConfig(
        shard_bytes=SHARD_BYTES,
        model_id=MODEL_ID,
        publish_every=0,
        repair_interval=d.repair_interval * scale,
        scrub_interval=d.scrub_interval * scale,
        orphan_ttl=d.orphan_ttl * scale,
    )


# --- worker process ------------------------------------------------------------------------------


class Counter:
    """Counts the calls each server answers and the bytes of their serialized messages, by method."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def interceptor(self) -> Any:
        import grpc.aio

        counter = self

        class Counting(grpc.aio.ServerInterceptor):
            async def intercept_service(self, continuation: Any, details: Any) -> Any:
                handler = await continuation(details)
                method = details.method.rsplit("/", 1)[-1]
                if handler is None or method in DATA_METHODS:
                    return handler
                counter.calls[method] += 1
                deser, ser = handler.request_deserializer, handler.response_serializer

                def read(raw: bytes) -> Any:
                    counter.bytes[method] += len(raw)
                    return deser(raw) if deser is not None else raw

                def write(msg: Any) -> bytes:
                    raw = ser(msg) if ser is not None else msg
                    counter.bytes[method] += len(raw)
                    return raw

                return handler._replace(request_deserializer=read, response_serializer=write)

        return Counting()


def worker(conn: Connection, ppid: int) -> None:
    watch_parent(ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us
    logging.basicConfig(
        level=(os.environ.get("CONTROL_PLANE_LOG") or "ERROR").upper()
    )  # false deaths on a busy machine would flood the log
    asyncio.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    import grpc.aio
    import torch

    from gossip.config import GossipConfig, NodeConfig
    from gossip.core.params import FlatParams, Layout
    from gossip.node.node import Node

    counter = Counter()
    plain_server = grpc.aio.server

    def counted_server(*a: Any, interceptors: Any = (), **kw: Any) -> Any:
        return plain_server(*a, interceptors=[counter.interceptor(), *interceptors], **kw)

    grpc.aio.server = counted_server  # the bench's counting interceptor on every node's server

    def flat(numel: int) -> FlatParams:
        f = FlatParams.zeros(Layout.from_named([("w", torch.empty(numel))]))
        f.segments["float32"].copy_(torch.arange(numel, dtype=torch.float32))
        return f

    def config(node_id: str, seed: str | None, protocol: str, scale: float) -> NodeConfig:
        return NodeConfig(
            node_id=node_id,
            peers=(seed,) if seed else (),
            join_timeout=60.0,  # a few hundred nodes starting on 2 cores
            rpc_timeout=NodeConfig().rpc_timeout * scale,
            gossip=GossipConfig(idle_pause=0.0),
            membership=scaled_membership(protocol, scale),
            store=scaled_store(scale),
        )

    nodes: list[Node] = []
    loop = asyncio.get_running_loop()

    async def start(ids: list[str], seed: str | None, protocol: str, scale: float) -> dict[str, str]:
        made: list[Node] = []
        for b in range(0, len(ids), START_BATCH):  # a batch at a time: the seed answers every join
            made += await asyncio.gather(
                *(
                    Node.create(flat(16), config(i, seed, protocol, scale), seed=b + k)
                    for k, i in enumerate(ids[b : b + START_BATCH])
                )
            )
        nodes.extend(made)
        return {n.node_id: n.address for n in made}

    def view(watch: list[str]) -> dict[str, Any]:
        out = {}
        for n in nodes:
            assert n.members is not None
            table = n.members.table
            states = [table.members[w].state if w in table.members else "unknown" for w in watch]
            out[n.node_id] = (1 + len(table.alive()), states)
        return out

    async def publish(numel: int) -> Any:
        return await nodes[0].store.publish(flat(numel), 1, 0)

    def holds(m: Any) -> dict[str, list[int]]:
        return {n.node_id: [i for i in range(m.num_shards) if n.store.store.holds(m, i)] for n in nodes}

    handlers: dict[str, Callable[..., Any]] = {
        "start": start,
        "view": view,
        "counts": lambda: (dict(counter.calls), dict(counter.bytes)),
        "publish": publish,
        "holds": holds,
    }
    conn.send(("ready", None))
    try:
        while True:
            cmd, args = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            try:
                result = handlers[cmd](*args)
                if isinstance(result, Awaitable):
                    result = await result
            except Exception as exc:  # the parent reports it and ends the run
                conn.send(("error", repr(exc)))
                continue
            conn.send(("ok", result))
    finally:
        await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)
        conn.send(("ok", None))


# --- the parent --------------------------------------------------------------------------------


class Host:
    """One worker process and its pipe."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def recv(self, timeout: float = 120.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker {self.proc.pid} did not answer within {timeout} s")
        status, result = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"worker {self.proc.pid}: {result}")
        return result

    def ask(self, cmd: str, *args: Any, timeout: float = 120.0) -> Any:
        self.send(cmd, *args)
        return self.recv(timeout)

    def end(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, TimeoutError, EOFError, RuntimeError):
                self.ask("stop", timeout=20.0)
            self.proc.join(10.0)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10.0)


def ask_all(hosts: list[Host], cmd: str, *args: Any) -> list[Any]:
    for h in hosts:
        h.send(cmd, *args)
    return [h.recv() for h in hosts]


def views(hosts: list[Host], watch: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ask_all(hosts, "view", watch):
        out.update(part)
    return out


def placed(hosts: list[Host], m: Any, alive: list[str], vnodes: int) -> tuple[int, int]:
    """(shards on all R owners of the ``alive`` ring, shards in all)."""
    from gossip.core.ring import Ring

    held: dict[str, set[int]] = {}
    for part in ask_all(hosts, "holds", m):
        held.update({k: set(v) for k, v in part.items()})
    ring = Ring(alive, vnodes)
    ok = sum(
        all(i in held.get(o, ()) for o in ring.preference_list(m.shard_key(i), REPLICATION))
        for i in range(m.num_shards)
    )
    return ok, m.num_shards


def say(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:7.1f} s] {msg}", flush=True)


def groups_of(n: int, processes: int) -> tuple[list[str], list[str], list[list[str]]]:
    """(every id, the survivors, the worker groups: ``processes`` of survivors, then the victims)."""
    victims_n = max(1, n // 10)
    ids = [f"n{i:03d}" for i in range(n)]
    survivors, victims = ids[: n - victims_n], ids[n - victims_n :]
    return ids, survivors, [survivors[k::processes] for k in range(processes)] + [victims]


def launch(
    n: int, protocol: str, args: argparse.Namespace, t0: float, hosts: list[Host], groups: list[list[str]]
) -> tuple[float | None, float, int]:
    """Start every group's nodes on its worker (the first node of the first group first: the seed)
    and wait until every node's table holds all N alive: (seconds from the first start until then,
    None if not within ``--give-up``; seconds the starts took; most nodes that saw all at once)."""
    start = time.monotonic()
    scale = args.time_scale
    seed = hosts[0].ask("start", [groups[0][0]], None, protocol, scale)[groups[0][0]]
    for h, g in zip(hosts, groups, strict=True):
        h.send("start", [i for i in g if i != groups[0][0]], seed, protocol, scale)
    for h in hosts:
        h.recv()
    joined = time.monotonic() - start
    say(f"N={n}: all joined in {joined:.1f} s", t0)
    last, converge, best = 0.0, None, 0
    while time.monotonic() - start < args.give_up:
        v = views(hosts, [])
        full = sum(c >= n for c, _ in v.values())
        best = max(best, full)
        if full == n:
            converge = time.monotonic() - start
            break
        if time.monotonic() - last > 2:
            smallest = min(c for c, _ in v.values())
            say(f"N={n}: {full}/{n} nodes see all {n} alive (smallest view {smallest})", t0)
            last = time.monotonic()
        time.sleep(0.2)
    if converge is None:
        say(f"N={n}: NOT converged within {args.give_up:.0f} s (at best {best}/{n} nodes saw all)", t0)
    else:
        say(f"N={n}: converged in {converge:.2f} s ({converge - joined:.2f} s after the last join)", t0)
    return converge, joined, best


def spawn_hosts(hosts: list[Host], count: int) -> None:
    ctx = mp.get_context("spawn")
    hosts.extend(Host(ctx) for _ in range(count))
    for h in hosts:
        h.recv()


def converge_only(
    n: int, protocol: str, args: argparse.Namespace, t0: float, hosts: list[Host]
) -> tuple[Any, Any]:
    """One more launch of N fresh nodes, for its convergence only: (converge_s, after the joins)."""
    _, _, groups = groups_of(n, args.processes)
    spawn_hosts(hosts, len(groups))
    converge, joined, _ = launch(n, protocol, args, t0, hosts, groups)
    return converge, None if converge is None else converge - joined


def run_size(n: int, protocol: str, args: argparse.Namespace, t0: float, hosts: list[Host]) -> dict[str, Any]:
    from gossip.config import StoreConfig

    ids, survivors, groups = groups_of(n, args.processes)
    victims = groups[-1]
    spawn_hosts(hosts, len(groups))
    say(
        f"N={n} ({protocol}): {len(hosts)} processes up ({args.processes} x "
        f"~{len(survivors) // args.processes}, {len(victims)} victims in one)",
        t0,
    )
    # --- convergence
    converge, joined, best = launch(n, protocol, args, t0, hosts, groups)
    if converge is None:
        say(f"N={n}: measuring the rest anyway", t0)
    # --- the snapshot, placed before the window so its manifests are not counted
    pub0 = time.monotonic()
    m: Any = None
    try:
        m = hosts[0].ask("publish", args.shards * SHARD_BYTES // 4)
    except RuntimeError as exc:  # a PublishError on a cluster that has not converged
        say(f"N={n}: the publish failed ({exc}); no re-replication figure", t0)
    vnodes = StoreConfig().vnodes
    if m is not None:
        p0 = time.monotonic()
        say(f"N={n}: published {m.num_shards} shards in {p0 - pub0:.1f} s; waiting for placement", t0)
        while (p := placed(hosts, m, ids, vnodes))[0] < p[1] and time.monotonic() - p0 < args.give_up:
            say(f"N={n}: {p[0]}/{p[1]} shards on all {REPLICATION} owners", t0)
            time.sleep(2.0)
        say(f"N={n}: snapshot of {m.num_shards} shards, {p[0]} on all {REPLICATION} owners", t0)
    # --- steady state
    if args.settle > 0:  # swim's join news are still being sent for a few rounds: not steady yet
        say(f"N={n}: settling for {args.settle:.0f} s before the window", t0)
        time.sleep(args.settle)
    before = ask_all(hosts, "counts")
    cpu0 = sum(cpu_seconds(h.proc.pid) for h in hosts)
    w0 = time.monotonic()
    while time.monotonic() - w0 < args.window:
        time.sleep(min(5.0, args.window - (time.monotonic() - w0)))
        say(f"N={n}: window {time.monotonic() - w0:.0f}/{args.window:.0f} s", t0)
    after = ask_all(hosts, "counts")
    span = time.monotonic() - w0
    cores = (sum(cpu_seconds(h.proc.pid) for h in hosts) - cpu0) / span
    say(f"N={n}: the node processes used {cores:.2f} cores over the window", t0)
    calls: collections.Counter[str] = collections.Counter()
    nbytes: collections.Counter[str] = collections.Counter()
    for (c0, b0), (c1, b1) in zip(before, after, strict=True):
        calls.update(collections.Counter(c1) - collections.Counter(c0))
        nbytes.update(collections.Counter(b1) - collections.Counter(b0))
    per_call = {k: round(calls[k] / n / span, 2) for k in sorted(calls)}
    say(f"N={n}: calls per node per s by method {per_call}", t0)
    say(f"N={n}: bytes per call by method { {k: nbytes[k] // max(1, calls[k]) for k in sorted(calls)} }", t0)
    # --- the kill
    victim_host = hosts[-1]
    os.kill(victim_host.proc.pid, signal.SIGKILL)
    kill = time.monotonic()
    victim_host.proc.join(10.0)
    live = hosts[:-1]
    suspect_seen = dead_seen = rereplicated = None
    last = 0.0
    while time.monotonic() - kill < args.give_up:
        now = time.monotonic() - kill
        v = views(live, victims)
        if suspect_seen is None and all(s != "alive" for _, st in v.values() for s in st):
            suspect_seen = now
        if dead_seen is None and all(s in ("dead", "unknown") for _, st in v.values() for s in st):
            dead_seen = now
        ok, total = placed(live, m, survivors, vnodes) if m is not None else (0, -1)
        if rereplicated is None and ok == total:
            rereplicated = time.monotonic() - kill
        if time.monotonic() - last > 2:
            seeing = sum(all(s in ("dead", "unknown") for s in st) for _, st in v.values())
            say(
                f"N={n}: {now:.1f} s after the kill: {seeing}/{len(v)} see all victims dead, "
                f"{ok}/{total} shards on R owners",
                t0,
            )
            last = time.monotonic()
        if dead_seen is not None and (rereplicated is not None or m is None):
            break
        time.sleep(0.2)
    say(
        f"N={n}: suspect everywhere {suspect_seen}, dead everywhere {dead_seen}, re-replicated {rereplicated}",
        t0,
    )
    r = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {
        "calls": round(sum(calls.values()) / n / span, 2),
        "bytes": round(sum(nbytes.values()) / n / span, 1),
        "converge": r(converge),
        "after_joins": None if converge is None else r(converge - joined),
        "suspect": r(suspect_seen),
        "dead": r(dead_seen),
        "rereplicated": r(rereplicated),
        "by_method": per_call,
        "cores": round(cores, 2),
        "converged_best": best,
    }


class TimeLimit(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64", help="comma-separated node counts")
    ap.add_argument("--protocols", default="heartbeat,swim", help="member protocols, each run at each size")
    ap.add_argument("--processes", type=int, default=2, help="worker processes for the survivors")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of steady state counted")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after placement before the window")
    ap.add_argument("--shards", type=int, default=64, help="shards in the published snapshot")
    ap.add_argument(
        "--give-up",
        type=float,
        default=120.0,
        help="seconds to wait for convergence, placement, and after the kill",
    )
    ap.add_argument("--time-limit", type=float, default=1500.0, help="hard limit on the whole run")
    ap.add_argument(
        "--converge-repeats",
        type=int,
        default=0,
        help="after each size, launch it this many more times on fresh processes, for convergence only",
    )
    ap.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every membership and store period and timeout (and the RPC deadline) by this: "
        "K times fewer calls per node per second, so K times more nodes fit on a machine",
    )
    args = ap.parse_args()
    if args.time_scale < 1:
        ap.error(f"--time-scale must be >= 1, got {args.time_scale}")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or not set(protocols) <= {"heartbeat", "swim"}:
        ap.error(f"--protocols: heartbeat and/or swim, got {args.protocols!r}")
    t0 = time.monotonic()

    mc, sc = scaled_membership("swim", args.time_scale), scaled_store(args.time_scale)
    config = {
        "time_scale": args.time_scale,
        "sizes": sizes,
        "protocols": protocols,
        "processes": args.processes,
        "window_s": args.window,
        "settle_s": args.settle,
        "shards": args.shards,
        "shard_bytes": SHARD_BYTES,
        "replication": REPLICATION,
        "membership": {
            "interval": mc.interval,
            "suspect_after": mc.suspect_after,
            "dead_after": mc.dead_after,
        },
        "store": {"repair_interval": sc.repair_interval, "scrub_interval": sc.scrub_interval},
        "victims": "N//10 (at least 1) in one process, SIGKILLed",
    }
    say(f"control plane bench: {json.dumps(config)}", t0)

    def on_alarm(*_: Any) -> None:
        raise TimeLimit(f"--time-limit of {args.time_limit} s reached")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.alarm(max(1, int(args.time_limit)))
    results: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in protocols}
    hosts: list[Host] = []
    try:
        for n in sizes:
            for protocol in protocols:
                try:
                    results[protocol][n] = run_size(n, protocol, args, t0, hosts)
                except (RuntimeError, TimeoutError) as exc:
                    say(f"N={n} ({protocol}) failed: {exc}", t0)
                finally:
                    while hosts:
                        hosts.pop().end()
                if n not in results[protocol]:
                    continue
                row = results[protocol][n]
                row["converge_all"], row["after_joins_all"] = [row["converge"]], [row["after_joins"]]
                for k in range(args.converge_repeats):
                    say(
                        f"N={n} ({protocol}): launch {k + 2} of {args.converge_repeats + 1}, convergence only",
                        t0,
                    )
                    try:
                        c, a = converge_only(n, protocol, args, t0, hosts)
                        row["converge_all"].append(None if c is None else round(c, 2))
                        row["after_joins_all"].append(None if a is None else round(a, 2))
                    except (RuntimeError, TimeoutError) as exc:
                        say(f"N={n} ({protocol}) launch failed: {exc}", t0)
                    finally:
                        while hosts:
                            hosts.pop().end()
                for key in ("converge", "after_joins"):
                    got = [x for x in row[f"{key}_all"] if x is not None]
                    row[f"{key}_median"] = statistics.median(got) if got else None
    except (TimeLimit, KeyboardInterrupt) as exc:
        say(f"stopped: {exc!r}; reporting the sizes that finished", t0)
    finally:
        signal.alarm(0)
        for h in hosts:
            if h.proc.is_alive():
                h.proc.kill()
            h.proc.join(10.0)
    keys = {
        "calls_per_node_per_s": "calls",
        "bytes_per_node_per_s": "bytes",
        "converge_s": "converge",
        "converge_after_joins_s": "after_joins",
        "converge_median_s": "converge_median",
        "converge_after_joins_median_s": "after_joins_median",
        "converge_all_s": "converge_all",
        "converge_after_joins_all_s": "after_joins_all",
        "death_seen_s": "dead",
        "suspect_seen_s": "suspect",
        "rereplicated_s": "rereplicated",
        "calls_by_method": "by_method",
        "cores_used": "cores",
        "converged_nodes_best": "converged_best",
    }
    # The keys, each keyed by N, for the protocol that scales (swim when it ran);
    # every protocol's figures under by_protocol.
    main_protocol = "swim" if "swim" in protocols else protocols[0]
    out: dict[str, Any] = {
        k: {str(n): r[v] for n, r in results[main_protocol].items()} for k, v in keys.items()
    }
    out["protocol"] = main_protocol
    out["by_protocol"] = {
        p: {k: {str(n): r[v] for n, r in results[p].items()} for k, v in keys.items()} for p in protocols
    }
    if len(protocols) == 2:
        hb, sw = results["heartbeat"], results["swim"]
        out["swim_vs_heartbeat"] = {
            what: {str(n): round(sw[n][what] / hb[n][what], 3) for n in sizes if n in hb and n in sw}
            for what in ("calls", "bytes")
        }
    out["config"] = config
    print(json.dumps(out))


if __name__ == "__main__":
    main()
