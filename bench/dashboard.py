"""The dashboard at 32 nodes: how fresh is the page, and what does watching cost?

    python bench/dashboard.py [--nodes 32] [--per-process 8] [--polls 45] [--interval 1.0]

``--nodes`` real nodes (``tests/support/nodehost.py``, ``--per-process`` to a
process, each training a tiny model and gossiping) and one ``gossip dashboard``
process polling all of them every ``--interval`` seconds (16 calls in flight).
Once every node answers, two windows of ``--polls`` rounds each, back to back:

- page: a client fetches ``/api/state?since=...`` once per interval, as the page
  does. Refresh latency = one full poll round (every node asked, every answer
  aggregated; the dashboard times it) + that fetch: how long after the round
  began the page can hold all of its data. The dashboard's CPU over the window
  (utime + stime from /proc, as a fraction of one core) is the cost of watching.
- watcher: the client fetches four times per interval and notes when each round
  first shows up: seen latency = that moment - the round's start, a check of
  the first figure from outside the dashboard (up to a quarter interval late by
  construction); its CPU too (four fetches a round instead of one).

The last line is JSON: nodes, refresh_latency_s and _p95_s, round_seconds and
_p95, api_state_seconds, seen_latency_s and _p95, dashboard_cpu_fraction (page
window) and dashboard_cpu_fraction_watcher, the state's size in bytes. Targets
(issue 13): refresh under 1 s, CPU under 10 % of one core at 32 nodes. The
machine is shared with the nodes: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
# The library's failure detection (not the tests' fast one): 32 nodes on 2 busy cores.
MEMBERSHIP = ["--member-interval", "0.5", "--suspect-after", "4", "--dead-after", "10"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def env() -> dict[str, str]:
    return dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), GRPC_VERBOSITY="NONE"
    )


def start_nodes(
    folder: Path, nodes: int, per: int, step_every: float
) -> tuple[list[subprocess.Popen[bytes]], str]:
    procs = []
    for k in range(0, nodes, per):
        ids = [f"n{i:02d}" for i in range(k, min(nodes, k + per))]
        cmd = [sys.executable, "-m", "tests.support.nodehost", "--ids", ",".join(ids), "--seed", str(k)]
        cmd += ["--ready", str(folder / f"h{k}.ready"), "--step-every", str(step_every), *MEMBERSHIP]
        if k:
            cmd += ["--peer-file", str(folder / "h0.ready")]
        log = (folder / f"h{k}.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT))
    deadline = time.monotonic() + 300
    for k, p in zip(range(0, nodes, per), procs, strict=True):
        ready = folder / f"h{k}.ready"
        while not ready.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"node host {k} failed: {(folder / f'h{k}.log').read_text()[-2000:]}")
            time.sleep(0.1)
    first = json.loads((folder / "h0.ready").read_text())["addresses"]
    return procs, next(iter(first.values()))


def fetch(url: str) -> tuple[dict[str, Any], float, int]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=30) as res:
        body = res.read()
    return json.loads(body), time.monotonic() - t0, len(body)


class Client:
    """Fetches /api/state like the page: since the last round it holds; keeps every round's timing."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.last = 0
        self.rounds: dict[int, dict[str, Any]] = {}  # round -> its series point, plus when first seen
        self.fetches: list[float] = []
        self.size = 0

    def once(self) -> dict[str, Any]:
        state, took, self.size = fetch(f"{self.base}api/state?since={self.last}")
        seen = time.time()
        self.fetches.append(took)
        for p in state["series"]:
            self.rounds.setdefault(p["round"], {**p, "seen": seen, "fetch": took})
        self.last = state["round"]
        return state


def window(
    board: subprocess.Popen[str], client: Client, polls: int, interval: float, per_round: int
) -> dict[str, Any]:
    """``polls`` rounds with ``per_round`` fetches each; the rounds that began inside, and the CPU."""
    first = client.last + 1
    c0, t0 = cpu_seconds(board.pid), time.monotonic()
    while client.last < first + polls:
        client.once()
        time.sleep(interval / per_round)
    cpu = (cpu_seconds(board.pid) - c0) / (time.monotonic() - t0)
    rounds = [client.rounds[r] for r in range(first, first + polls) if r in client.rounds]
    return {"cpu": cpu, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--per-process", type=int, default=8, help="nodes per node process")
    ap.add_argument("--polls", type=int, default=45, help="rounds measured in each window")
    ap.add_argument("--interval", type=float, default=1.0, help="the dashboard's --interval")
    ap.add_argument("--step-every", type=float, default=0.25, help="seconds between two steps of a node")
    args = ap.parse_args()
    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            hosts, seed = start_nodes(Path(tmp), args.nodes, args.per_process, args.step_every)
            procs += hosts
            print(f"{args.nodes} nodes in {len(hosts)} processes, first at {seed}", flush=True)
            cmd = [sys.executable, "-m", "gossip", "dashboard", "--peer", seed, "--listen", "127.0.0.1:0"]
            board = subprocess.Popen(
                [*cmd, "--interval", str(args.interval), "--timeout", "5"],
                stdout=subprocess.PIPE,
                text=True,
                env=env(),
                cwd=ROOT,
            )
            procs.append(board)
            assert board.stdout is not None
            if not select.select([board.stdout], [], [], 60)[0]:
                raise SystemExit("the dashboard did not start")
            base = board.stdout.readline().split(" at ")[1].split()[0]
            client = Client(base)
            deadline = time.monotonic() + 180
            while sum(n["reachable"] for n in client.once()["nodes"]) < args.nodes:
                if time.monotonic() > deadline:
                    raise SystemExit("not every node answered the dashboard within 180 s")
                time.sleep(args.interval)
            print("every node answers; measuring", flush=True)
            page = window(board, client, args.polls, args.interval, 1)
            print(
                f"page window: CPU {page['cpu']:.3f} of a core over {len(page['rounds'])} rounds", flush=True
            )
            watcher = window(board, client, args.polls, args.interval, 4)
            print(f"watcher window: CPU {watcher['cpu']:.3f} of a core", flush=True)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(30)
    rs = page["rounds"]
    refresh = [r["round_seconds"] + r["fetch"] for r in rs]
    seen = [r["seen"] - (r["t"] - r["round_seconds"]) for r in watcher["rounds"]]
    result = {
        "nodes": args.nodes,
        "interval_s": args.interval,
        "polls": len(rs),
        "answering_min": min(r["answering"] for r in rs + watcher["rounds"]),
        "refresh_latency_s": round(statistics.median(refresh), 4),
        "refresh_latency_p95_s": round(pct(refresh, 0.95), 4),
        "round_seconds": round(statistics.median(r["round_seconds"] for r in rs), 4),
        "round_seconds_p95": round(pct([r["round_seconds"] for r in rs], 0.95), 4),
        "api_state_seconds": round(statistics.median(r["fetch"] for r in rs), 4),
        "seen_latency_s": round(statistics.median(seen), 4),
        "seen_latency_p95_s": round(pct(seen, 0.95), 4),
        "dashboard_cpu_fraction": round(page["cpu"], 4),
        "dashboard_cpu_fraction_watcher": round(watcher["cpu"], 4),
        "state_bytes": client.size,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
