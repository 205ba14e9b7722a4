"""Idle nodes rest: CPU and exchanges of nodes done training, with and without the back-off.

    python bench/idle.py [--window 40] [--simulate-runs 3]

Part 1, two idle nodes: two ``gossip node`` processes (digits + mlp, ranked,
complete graph) train 2 epochs and then stay up. Once both wrote their "done"
record, each is watched for ``--window`` seconds: its CPU (utime + stime from
/proc) and the exchanges it took part in (ok + served, from ``gossip status``).
Run once with the defaults (the node rests: pauses double up to --rest-pause
once exchanges no longer move it) and once with ``--rest-pause`` equal to
``--idle-pause`` (0.02 s: no back-off, the behaviour before resting), back to
back.

Part 2, no loss of consensus: the default ``gossip simulate`` (8 nodes), with
and without the back-off, alternating, ``--simulate-runs`` times each; the final
consensus distance and the mean accuracy of each.

The last line is JSON: cpu_percent_rest / cpu_percent_no_rest (mean over the two
nodes), exchanges_per_5s_rest / _no_rest (the busier node), the simulate
figures, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_seconds

NO_REST = ["--rest-pause", "0.02", "--idle-pause", "0.02"]


def _status(address: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "gossip", "status", "--peer", address, "--json", "--timeout", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _done(metrics: Path) -> bool:
    return metrics.exists() and any('"done": true' in line for line in metrics.read_text().splitlines())


def two_idle_nodes(folder: Path, extra: list[str], window: float) -> dict[str, Any]:
    common = ["--topology", "complete", "--world-size", "2", "--epochs", "2", "--publish-every", "0"]
    procs, names = [], ["a", "b"]
    try:
        for rank, name in enumerate(names):
            args = [sys.executable, "-m", "gossip", "node", "--listen", "127.0.0.1:0", *common, *extra]
            args += ["--rank", str(rank), "--node-id", name, "--metrics", str(folder / f"{name}.jsonl")]
            args += ["--ready-file", str(folder / f"{name}.ready"), "--wait-for", "2"]
            if rank:
                args += ["--seed-file", str(folder / "a.ready")]
            log = (folder / f"{name}.log").open("w")
            procs.append(
                subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + 300
        while not all(_done(folder / f"{n}.jsonl") for n in names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"the nodes did not finish training; see {folder}")
            time.sleep(0.5)
        time.sleep(2.0)  # settle: the first averaging-only exchanges
        addresses = [json.loads((folder / f"{n}.ready").read_text())["address"] for n in names]
        before = [_status(a) for a in addresses]
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(window)
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        elapsed = time.monotonic() - t0
        after = [_status(a) for a in addresses]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def took_part(st: dict[str, Any]) -> int:
        return int(st["exchanges_ok"]) + int(st["exchanges_served"])

    cpu = [100 * (c1 - c0) / elapsed for c0, c1 in zip(cpu0, cpu1, strict=True)]
    exchanges = [took_part(b) - took_part(a) for a, b in zip(before, after, strict=True)]
    return {
        "cpu_percent": [round(c, 2) for c in cpu],
        "exchanges_per_5s": [round(5 * e / elapsed, 3) for e in exchanges],
        "resting": [bool(st.get("resting")) for st in after],
        "window_s": round(elapsed, 1),
    }


def simulate(folder: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gossip", "simulate", "--out", str(folder), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    s: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    return {k: s[k] for k in ("mean_accuracy", "min_accuracy", "consensus_distance", "wall_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=40.0, help="seconds each idle pair is watched")
    ap.add_argument(
        "--simulate-runs", type=int, default=3, help="default simulate runs per setting (0: skip)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "rest").mkdir()
        (root / "norest").mkdir()
        rest = two_idle_nodes(root / "rest", [], args.window)
        print(f"two idle nodes, resting:     {rest}", flush=True)
        busy = two_idle_nodes(root / "norest", NO_REST, args.window)
        print(f"two idle nodes, no back-off: {busy}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"rest": [], "no_rest": []}
        for i in range(args.simulate_runs):
            for name, extra in (("rest", []), ("no_rest", NO_REST)):
                r = simulate(root / f"sim-{name}-{i}", extra)
                runs[name].append(r)
                print(f"simulate ({name}, run {i}): {r}", flush=True)
    result: dict[str, Any] = {
        "cpu_percent_rest": round(statistics.mean(rest["cpu_percent"]), 2),
        "cpu_percent_no_rest": round(statistics.mean(busy["cpu_percent"]), 2),
        "exchanges_per_5s_rest": max(rest["exchanges_per_5s"]),
        "exchanges_per_5s_no_rest": max(busy["exchanges_per_5s"]),
        "resting": rest["resting"],
    }
    if args.simulate_runs:
        for name in runs:
            cds = [r["consensus_distance"] for r in runs[name]]
            result[f"consensus_distance_{name}"] = cds
            result[f"mean_accuracy_{name}"] = [round(r["mean_accuracy"], 4) for r in runs[name]]
        result["consensus_ratio"] = round(
            statistics.median(result["consensus_distance_rest"])
            / statistics.median(result["consensus_distance_no_rest"]),
            3,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
