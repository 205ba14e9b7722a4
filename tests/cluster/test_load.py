"""Load: eight training node processes on this machine, and floods from many connections.

The eight real ``gossip node`` processes (default membership: swim, a probe's
deadline 2 s, dead after at least 6 s of suspicion) start and then train at once on however few cores
the machine has, for 1.5 times the time to a death (almost four times the time
to a suspicion); no member may ever be declared dead. Every process is
killed by its PID when the test ends, pass or fail.

The floods run against in-process nodes with small limits, from sixteen
connections of their own (as sixteen peers would open); what is checked is
behaviour (refusals, a bounded number served, legitimate calls still answered),
not timings.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.aio
import pytest
import torch

from gossip.config import NodeConfig, SecurityConfig
from gossip.core.membership import MemberRecord, MembershipConfig
from gossip.node.node import Node
from gossip.proto import gossip_pb2 as pb
from gossip.transport import serde, server
from gossip.transport.channels import Channels
from tests.support.inproc import vector

GOSSIP = "/gossip.proto.Gossip/"
START_TIMEOUT = 120.0  # imports and the dataset, eight at once on a loaded 2-core machine
CALL_TIMEOUT = 5.0
STATUS_TIMEOUT = 15.0  # a status call to a node that shares two cores with seven others

# --- eight training processes ------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path
    ready: Path
    address: str = ""

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            if p.popen.poll() is None:
                p.popen.kill()
        for p in started:
            p.popen.wait(30)
            p.log.close()


def start_node(tmp: Path, started: list[Proc], name: str, count: int, seed: str | None) -> Proc:
    ready = tmp / f"{name}.ready"
    cmd = [sys.executable, "-m", "gossip", "node", "--node-id", name, "--threads", "1"]
    # Trains until killed; one evaluation at the start only.
    cmd += ["--epochs", "100000", "--eval-every", "100000", "--wait-for", str(count)]
    cmd += ["--ready-file", str(ready)]
    if seed:
        cmd += ["--peers", seed]
    log_path = tmp / f"{name}.log"
    log = log_path.open("wb")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    p = Proc(name, popen, log, log_path, ready)
    started.append(p)
    return p


def wait_ready(p: Proc, deadline: float) -> None:
    while not p.ready.exists():
        assert p.popen.poll() is None, f"{p.name} exited before serving:\n{p.text()[-3000:]}"
        assert time.monotonic() < deadline, f"{p.name} did not start in time:\n{p.text()[-3000:]}"
        time.sleep(0.05)
    p.address = json.loads(p.ready.read_text())["address"]


async def watch(procs: list[Proc], seconds: float) -> dict[str, Any]:
    """Once everyone knows everyone: every node's view of every other, once a second, for ``seconds``."""
    seen: dict[str, Any] = {"not_alive": [], "worst_quiet": 0.0, "steps": {}, "exchanges": {}}
    channels = [grpc.aio.insecure_channel(p.address) for p in procs]
    try:
        status = [
            ch.unary_unary(GOSSIP + "Status", pb.Empty.SerializeToString, pb.StatusReply.FromString)
            for ch in channels
        ]
        deadline = time.monotonic() + 60.0
        while True:
            replies = await asyncio.gather(*(s(pb.Empty(), timeout=STATUS_TIMEOUT) for s in status))
            alive = serde.STATE_TO_PB["alive"]
            if all(sum(m.state == alive for m in r.members) == len(procs) - 1 for r in replies):
                break
            assert time.monotonic() < deadline, "the nodes did not all learn of each other in 60 s"
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        first: dict[str, int] = {}
        while (elapsed := time.monotonic() - t0) < seconds:
            replies = await asyncio.gather(*(s(pb.Empty(), timeout=STATUS_TIMEOUT) for s in status))
            for p, r in zip(procs, replies, strict=True):
                first.setdefault(p.name, r.step)
                seen["steps"][p.name] = r.step - first[p.name]
                seen["exchanges"][p.name] = r.exchanges_ok + r.exchanges_served
                others = {m.node_id: m for m in r.members}
                assert len(others) == len(procs) - 1, f"{p.name} knows {sorted(others)}"
                for m in others.values():
                    seen["worst_quiet"] = max(seen["worst_quiet"], m.seconds_since_heartbeat)
                    state = serde.STATE_NAMES.get(m.state, "?")
                    if state != "alive":
                        seen["not_alive"].append((round(elapsed, 1), p.name, m.node_id, state))
            await asyncio.sleep(1.0)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return seen


@pytest.mark.timeout(240)
def test_eight_training_processes_declare_no_one_dead(procs: list[Proc], tmp_path: Path) -> None:
    count = 8
    dead_after = MembershipConfig().dead_after  # what `gossip node` runs with
    window = 1.5 * dead_after
    deadline = time.monotonic() + START_TIMEOUT
    seed = start_node(tmp_path, procs, "n0", count, None)
    wait_ready(seed, deadline)
    for i in range(1, count):
        start_node(tmp_path, procs, f"n{i}", count, seed.address)
    for p in procs:
        wait_ready(p, deadline)

    started = time.monotonic()
    seen = asyncio.run(asyncio.wait_for(watch(procs, window), window + 60.0))
    print(
        f"started in {started - (deadline - START_TIMEOUT):.1f} s, watched {time.monotonic() - started:.1f} s"
    )

    for p in procs:
        assert p.popen.poll() is None, f"{p.name} exited:\n{p.text()[-3000:]}"
    logs = {p.name: p.text() for p in procs}
    deaths = [f"{n}: {line}" for n, t in logs.items() for line in t.splitlines() if "declared dead" in line]
    stalls = [f"{n}: {line}" for n, t in logs.items() for line in t.splitlines() if "membership loop" in line]
    summary = (
        f"worst quiet {seen['worst_quiet']:.1f} s, not alive {seen['not_alive']}, "
        f"steps {seen['steps']}, stalls {stalls}"
    )
    print(summary)
    assert deaths == [], f"{deaths}; {summary}"
    assert not [s for s in seen["not_alive"] if s[3] == "dead"], summary
    assert seen["worst_quiet"] < dead_after, summary
    # The load was real: every node trained and averaged throughout.
    assert all(s > 0 for s in seen["steps"].values()), seen["steps"]
    assert all(x > 0 for x in seen["exchanges"].values()), seen["exchanges"]


# --- floods from many connections -----------------------------------------------------------

# Channels of one process to one address share one connection unless each has its
# own subchannel pool: "sixteen peers" need sixteen connections.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
FLOOD_CONNECTIONS = 16
SLOW = MembershipConfig(interval=1.0, suspect_after=60.0, dead_after=120.0)


async def flood(address: str, seconds: float, per_connection: int) -> dict[str, int]:
    """Status, Sync, junk and unknown calls from FLOOD_CONNECTIONS connections, ``per_connection`` in flight each."""
    codes: dict[str, int] = {}
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(FLOOD_CONNECTIONS)]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), CALL_TIMEOUT) for ch in channels))
        stop_at = time.monotonic() + seconds

        async def caller(k: int, ch: grpc.aio.Channel, j: int) -> None:
            me = MemberRecord(f"flooder-{k}", f"127.0.0.1:{10 + k}", 1, 0, fingerprint=b"other")
            i = j
            while time.monotonic() < stop_at:
                kind = i % 4
                i += 1
                try:
                    if kind == 0:
                        await ch.unary_unary(GOSSIP + "Status")(b"", timeout=1.0)
                    elif kind == 1:
                        me.heartbeat += 1
                        table = serde.table_to_bytes(me, [], protocol="swim")
                        await ch.unary_unary(GOSSIP + "Sync")(table, timeout=1.0)
                    elif kind == 2:
                        await ch.unary_unary(GOSSIP + "Sync")(os.urandom(64), timeout=1.0)
                    else:
                        await ch.unary_unary(GOSSIP + "NoSuchMethod")(b"", timeout=1.0)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(
            *(caller(k, ch, j) for k, ch in enumerate(channels) for j in range(per_connection))
        )
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return codes


def test_a_flood_from_many_connections_is_bounded_and_peers_are_still_answered() -> None:
    rate, burst = 20.0, 20
    sec = SecurityConfig(peer_call_rate=50.0, peer_call_burst=10, node_call_rate=rate, node_call_burst=burst)

    async def main() -> tuple[dict[str, int], float, list[str]]:
        a = await Node.create(
            vector([1.0] * 4), NodeConfig(node_id="a", membership=SLOW, security=sec), seed=0
        )
        b = await Node.create(
            vector([3.0] * 4),
            NodeConfig(node_id="b", peers=(a.address,), membership=SLOW, security=sec),
            seed=1,
        )
        client = Channels()
        try:
            assert await a.wait_for_members(2, 20.0) and await b.wait_for_members(2, 20.0)
            t0 = time.monotonic()
            flooding = asyncio.create_task(flood(a.address, 2.0, per_connection=8))
            await asyncio.sleep(0.5)  # the flood is on
            legit = []
            st = serde.status_from_bytes(
                await client.unary(a.address, GOSSIP + "Status", serde.EMPTY, CALL_TIMEOUT)
            )
            legit.append(f"status {st.node_id}")  # a client that is not flooding
            assert b.members is not None
            table = serde.table_to_bytes(b.members.me, [], protocol="swim")
            reply = await client.unary(a.address, GOSSIP + "Sync", table, CALL_TIMEOUT)  # a member's sync
            legit.append(f"sync {len(serde.table_message_from_bytes(reply, 'swim')[1])}")  # swim: with claims
            assert b.gossip_now()  # an exchange (bulk: not metered)
            await asyncio.wait_for(b.slot.wait_own(), 30.0)
            legit.append(f"exchange {b.stats.exchanges_ok}")
            codes = await flooding
            elapsed = time.monotonic() - t0
            assert b.stats.exchanges_ok == 1, legit
            assert torch.equal(a.flat.segments["float32"], torch.full((4,), 2.0))
            assert a.members is not None and a.members.table.members["b"].state == "alive"
            return codes, elapsed, legit
        finally:
            await client.close()
            await asyncio.gather(a.stop(leave=False), b.stop(leave=False))

    codes, elapsed, legit = asyncio.run(asyncio.wait_for(main(), 60.0))
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes
    # Served (answered by a handler: OK, or junk refused after its turn) at most the
    # node's budget: its burst once per connection share as they open, its rate since.
    # Each connection alone (50/s after 10) would have been let through 16x that.
    handled = sum(n for code, n in codes.items() if code in ("OK", "INVALID_ARGUMENT", "UNIMPLEMENTED"))
    connections = FLOOD_CONNECTIONS + 2
    bound = burst * (1 + math.log(connections)) + rate * elapsed + connections
    assert handled <= bound, (codes, bound)
    assert set(codes) <= {
        "OK",
        "INVALID_ARGUMENT",
        "UNIMPLEMENTED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
    }
    assert len(legit) == 3


def test_calls_beyond_the_servers_open_call_cap_are_refused_before_any_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = 8
    monkeypatch.setattr(server, "MAX_OPEN_CALLS", cap)

    async def main() -> tuple[list[str], str]:
        node = await Node.create(vector([1.0] * 4), NodeConfig(node_id="a", membership=SLOW))
        held: list[Any] = []
        try:
            async with grpc.aio.insecure_channel(node.address, options=OWN_CONNECTION) as ch:
                # Exchanges that never send their header: each holds a handler open.
                for _ in range(cap):
                    call = ch.stream_stream(GOSSIP + "Exchange")(timeout=CALL_TIMEOUT)
                    held.append(call)
                await asyncio.sleep(0.3)  # every one reached the server
                codes = []
                for method in ("Status", "Sync"):
                    try:
                        await ch.unary_unary(GOSSIP + method)(b"", timeout=CALL_TIMEOUT)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
                for call in held:
                    call.cancel()
                await asyncio.sleep(0.3)
                after = await ch.unary_unary(
                    GOSSIP + "Status", pb.Empty.SerializeToString, pb.StatusReply.FromString
                )(pb.Empty(), timeout=CALL_TIMEOUT)
            return codes, after.node_id
        finally:
            for call in held:
                call.cancel()
            await node.stop(leave=False)

    codes, after = asyncio.run(asyncio.wait_for(main(), 60.0))
    assert codes == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert after == "a"  # answered again once the held calls ended
