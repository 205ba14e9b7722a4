"""A flood of calls from one or many peers against a training node: does training keep its pace?

    python bench/flood.py [--rates 250,500,1000,2000,0] [--window 6]
    python bench/flood.py --connections 16 [--token]

A real ``gossip node`` process trains (the default MLP on digits, one torch
thread, alone, so nothing but the flood disturbs it). Its step rate is measured
over ``--window`` seconds undisturbed, then while a second process floods it
with Status and Sync calls at each of ``--rates`` calls per second in all (0 =
as fast as it can, 64 calls in flight per connection), then undisturbed again.
The step rate comes from the node's own counter (one Status call at the start
and end of each window). The flooder's Sync tables come from a member with
another model's fingerprint, so the node merges them but never picks it.

``--connections N`` floods from N connections at once (each its own TCP
connection, as N peers would open), the rate split evenly among them; each
connection cycles through a Status call (no id), a Sync call from its own
member id, a Sync call of junk bytes and a call of a method that does not
exist. ``--token`` starts the node with a token that the flooders do not have:
all of their calls are unauthenticated.

Served = calls answered OK; answered = those plus the calls the limits let through
that a handler or the token check then refused (junk, unknown methods, no token).
Load held = the most calls per second the node served while training at
>= 90 % of its undisturbed step rate (the mean of the undisturbed windows just
before and just after; undisturbed and flooded windows alternate).
The last line printed is JSON: undisturbed_steps_per_s, load_held_calls_per_s,
load_held_step_ratio, and one row per window (rate asked, calls/s served and
answered, refused by code, steps/s, ratio). Every child process is ended when this one
ends; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from _common import watch_parent

from gossip.core.membership import MemberRecord
from gossip.proto import gossip_pb2 as pb
from gossip.transport import serde

SERVICE = "/gossip.proto.Gossip/"
CALL_TIMEOUT = 5.0
IN_FLIGHT = 64  # per connection
# Channels of one process to one address share a TCP connection unless each has
# its own subchannel pool; a flood "from N peers" needs N connections.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Refusals that came from a handler or the token check, so after the rate limit let
# the call through: junk, unknown methods and calls without the token.
PAST_THE_LIMITS = ("INVALID_ARGUMENT", "UNIMPLEMENTED", "UNAUTHENTICATED")


# --- the flooder (its own process) ---------------------------------------------------------


async def node_step(address: str, token: str = "") -> tuple[int, float]:
    metadata = (("authorization", "Bearer " + token),) if token else ()
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(
            SERVICE + "Status",
            request_serializer=pb.Empty.SerializeToString,
            response_deserializer=pb.StatusReply.FromString,
        )
        reply = await call(pb.Empty(), timeout=CALL_TIMEOUT, metadata=metadata)
    return int(reply.step), time.monotonic()


class _Flooder:
    """One connection's calls: Status and Sync alternating, or (``mixed``) four kinds in turn."""

    def __init__(self, ch: grpc.aio.Channel, k: int, mixed: bool) -> None:
        self.mixed = mixed
        self.sender = MemberRecord(
            f"flooder-{k}", f"127.0.0.1:{10 + k}", incarnation=1, heartbeat=0, fingerprint=b"other"
        )
        self.status = ch.unary_unary(
            SERVICE + "Status",
            request_serializer=pb.Empty.SerializeToString,
            response_deserializer=pb.StatusReply.FromString,
        )
        self.sync = ch.unary_unary(SERVICE + "Sync")
        self.raw_sync = ch.unary_unary(SERVICE + "Sync")
        self.nope = ch.unary_unary(SERVICE + "NoSuchMethod")

    async def call(self, i: int) -> None:
        kind = i % 4 if self.mixed else i % 2
        if kind == 1:
            self.sender.heartbeat += 1
            await self.sync(serde.table_to_bytes(self.sender, [], protocol="swim"), timeout=CALL_TIMEOUT)
        elif kind == 2:
            await self.raw_sync(os.urandom(64), timeout=CALL_TIMEOUT)
        elif kind == 3:
            await self.nope(b"", timeout=CALL_TIMEOUT)
        else:
            await self.status(pb.Empty(), timeout=CALL_TIMEOUT)


async def flood(address: str, rate: float, seconds: float, connections: int, token: str) -> dict[str, Any]:
    """Calls at ``rate`` per second in all (0: as fast as possible) from ``connections`` connections."""
    served = 0
    refused: dict[str, int] = {}
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(connections)]
    flooders = [_Flooder(ch, k, mixed=connections > 1) for k, ch in enumerate(channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), CALL_TIMEOUT) for ch in channels))
        per_connection = rate / connections

        async def one(f: _Flooder, i: int, slots: asyncio.Semaphore) -> None:
            nonlocal served
            try:
                await f.call(i)
                served += 1
            except grpc.aio.AioRpcError as exc:
                refused[exc.code().name] = refused.get(exc.code().name, 0) + 1
            finally:
                slots.release()

        async def run(f: _Flooder, t0: float) -> None:
            slots = asyncio.Semaphore(IN_FLIGHT)
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            while (now := time.monotonic()) - t0 < seconds:
                if per_connection > 0 and i >= (now - t0) * per_connection:
                    await asyncio.sleep(i / per_connection - (now - t0))  # paced: no busy polling
                    continue
                await slots.acquire()
                task = asyncio.create_task(one(f, i, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)

        # The window starts once this process is up and connected (its imports are not
        # in it) and ends when the flood does; the node's step counter brackets it.
        step0, t0 = await node_step(address, token)
        await asyncio.gather(*(run(f, t0) for f in flooders))
        step1, t1 = await node_step(address, token)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return {"served": served, "refused": refused, "seconds": t1 - t0, "steps": step1 - step0}


# --- the conductor -----------------------------------------------------------------------


def window(address: str, rate: float | None, seconds: float, connections: int, token: str) -> dict[str, Any]:
    """One measuring window: the node's step rate, with a flood at ``rate`` beside it (None: none)."""
    if rate is None:
        s0, t0 = asyncio.run(node_step(address, token))
        time.sleep(seconds)
        s1, t1 = asyncio.run(node_step(address, token))
        flooded: dict[str, Any] = {"served": 0, "refused": {}, "seconds": t1 - t0, "steps": s1 - s0}
    else:
        out = subprocess.run(
            [sys.executable, __file__, "--flood", address, str(rate), str(seconds), str(connections), token],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        flooded = json.loads(out.stdout.strip().splitlines()[-1])
    answered = flooded["served"] + sum(n for c, n in flooded["refused"].items() if c in PAST_THE_LIMITS)
    return {
        "rate_asked": "none" if rate is None else ("max" if rate == 0 else rate),
        "calls_per_s": round(flooded["served"] / flooded["seconds"], 1),
        "answered_per_s": round(answered / flooded["seconds"], 1),
        "refused": flooded["refused"],
        "steps_per_s": round(flooded["steps"] / flooded["seconds"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="250,500,1000,2000,0", help="calls/s per flood window; 0 = max")
    ap.add_argument("--window", type=float, default=5.0, help="seconds per window")
    ap.add_argument("--repeats", type=int, default=3, help="times each rate is measured (medians reported)")
    ap.add_argument(
        "--node-args", default="", help="extra `gossip node` flags, e.g. '--peer-call-rate 0' (no limit)"
    )
    ap.add_argument("--connections", type=int, default=1, help="connections the flood comes from")
    ap.add_argument("--token", action="store_true", help="the node needs a token the flooders lack")
    ap.add_argument("--flood", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:
        address, rate, seconds, connections, token = args.flood
        watch_parent(os.getppid())
        result = asyncio.run(flood(address, float(rate), float(seconds), int(connections), token))
        print(json.dumps(result))
        return

    rates = [float(r) for r in args.rates.split(",")]
    if min(rates) < 0 or args.repeats < 1 or args.window <= 0 or args.connections < 1:
        raise SystemExit("rates must be >= 0, --repeats, --connections >= 1 and --window > 0")
    token = secrets.token_hex(16) if args.token else ""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        token_args = []
        if token:
            (Path(tmp) / "token").write_text(token)
            token_args = ["--token-file", str(Path(tmp) / "token")]
        node = subprocess.Popen(
            [sys.executable, "-m", "gossip", "node", "--epochs", "100000", "--eval-every", "100000",
             "--threads", "1", "--ready-file", str(ready), *token_args, *args.node_args.split()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if node.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the node did not start")
                time.sleep(0.1)
            address = json.loads(ready.read_text())["address"]
            time.sleep(2.0)  # past the first steps' warm-up
            # Undisturbed windows between the flooded ones: each flooded window is
            # compared with the mean of its two neighbours, which follows the drift of
            # a shared machine's load.
            rows = [window(address, None, args.window, args.connections, token)]
            for _ in range(args.repeats):
                for rate in rates:
                    rows += [
                        window(address, rate, args.window, args.connections, token),
                        window(address, None, args.window, args.connections, token),
                    ]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGTERM)
            try:
                node.wait(15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    quiet = [r["steps_per_s"] for r in rows[::2]]
    base = sum(quiet) / len(quiet)
    for i in range(1, len(rows), 2):
        around = (rows[i - 1]["steps_per_s"] + rows[i + 1]["steps_per_s"]) / 2
        rows[i]["step_ratio"] = round(rows[i]["steps_per_s"] / around, 3) if around else None
    for r in rows[::2]:
        r["step_ratio"] = None
    per_rate = []
    for asked in dict.fromkeys(r["rate_asked"] for r in rows[1::2]):
        mine = [r for r in rows[1::2] if r["rate_asked"] == asked]
        refused: dict[str, int] = {}
        for r in mine:
            for code, n in r["refused"].items():
                refused[code] = refused.get(code, 0) + n
        per_rate.append(
            {
                "rate_asked": asked,
                "calls_per_s": round(statistics.median(r["calls_per_s"] for r in mine), 1),
                "answered_per_s": round(statistics.median(r["answered_per_s"] for r in mine), 1),
                "step_ratio": statistics.median(r["step_ratio"] for r in mine),
                "step_ratio_range": [min(r["step_ratio"] for r in mine), max(r["step_ratio"] for r in mine)],
                "refused": refused,
            }
        )
    held = [r for r in per_rate if r["step_ratio"] >= 0.9]
    best = max(held, key=lambda r: r["calls_per_s"], default=None)
    print(
        f"undisturbed: {base:.0f} steps/s; flood from {args.connections} connection(s)"
        f"{' without the token' if token else ''}; medians of {args.repeats} windows of {args.window:g} s per rate"
    )
    print(f"{'flood asked':>12} {'served/s':>9} {'answered/s':>10} {'step ratio':>10} {'range':>13}  refused")
    for r in per_rate:
        lo, hi = r["step_ratio_range"]
        print(
            f"{r['rate_asked']!s:>12} {r['calls_per_s']:>9} {r['answered_per_s']:>10}"
            f" {r['step_ratio']:>10.3f} {f'{lo:.2f}-{hi:.2f}':>13}  {r['refused'] or '-'}"
        )
    print(
        json.dumps(
            {
                "connections": args.connections,
                "token": bool(token),
                "undisturbed_steps_per_s": round(base, 1),
                "load_held_calls_per_s": best["calls_per_s"] if best else 0.0,
                "load_held_step_ratio": best["step_ratio"] if best else None,
                "per_rate": per_rate,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
