"""Accuracy under churn: ``gossip simulate`` with and without ``--churn``, same seeds, alternating.

    python bench/churn.py [--seeds 0 1 2] [--churn 10] [--epochs 15] [-- EXTRA SIMULATE ARGS]

For each seed, one churn-free run and one with ``--churn RATE`` (and whatever
follows ``--``, e.g. ``--publish-every 0`` for restarts from scratch), back to
back so both see the same load. Prints a Markdown table (per seed: mean and min
accuracy of each run, the difference in points, kills / restarts / skipped
arrivals, the actual downtimes, wall times) and, last, one JSON line.
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


def _simulate(out: Path, seed: int, epochs: int, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gossip", "simulate", "--out", str(out), "--seed", str(seed)]
    cmd += ["--epochs", str(epochs), *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["command_seconds"] = time.monotonic() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--churn", type=float, default=10.0, help="kills per node per minute")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("extra", nargs="*", help="more `gossip simulate` arguments for both runs (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = _simulate(Path(tmp) / f"base{seed}", seed, args.epochs, args.extra)
            churn = _simulate(
                Path(tmp) / f"churn{seed}", seed, args.epochs, [*args.extra, "--churn", str(args.churn)]
            )
            c = churn["churn"]
            down = [e["downtime"] for e in c["events"] if e["event"] == "restarted"]
            rows.append(
                {
                    "seed": seed,
                    "base_mean": base["mean_accuracy"],
                    "base_min": base["min_accuracy"],
                    "churn_mean": churn["mean_accuracy"],
                    "churn_min": churn["min_accuracy"],
                    "diff_points": 100 * (churn["mean_accuracy"] - base["mean_accuracy"]),
                    "kills": c["kills"],
                    "restarts": c["restarts"],
                    "skipped": c["skipped"],
                    "init": c["init"],
                    "downtime_median": statistics.median(down) if down else None,
                    "base_wall": base["wall_seconds"],
                    "churn_wall": churn["wall_seconds"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| seed | no churn: mean (min) | churn: mean (min) | diff (points) | kills / restarts / skipped "
        "| actual downtime (median) | wall: no churn / churn |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dt = f"{r['downtime_median']:.1f} s" if r["downtime_median"] is not None else "n/a"
        print(
            f"| {r['seed']} | {r['base_mean']:.4f} ({r['base_min']:.4f}) | {r['churn_mean']:.4f} "
            f"({r['churn_min']:.4f}) | {r['diff_points']:+.2f} | {r['kills']} / {r['restarts']} / "
            f"{r['skipped']} | {dt} | {r['base_wall']:.1f} s / {r['churn_wall']:.1f} s |"
        )
    print(json.dumps({"churn": args.churn, "epochs": args.epochs, "extra": args.extra, "rows": rows}))


if __name__ == "__main__":
    main()
