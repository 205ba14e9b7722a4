"""The simulator against real node processes on the same small configuration.

    python bench/sim_vs_real.py [--topologies ring,exponential] [--seeds 0] [--strategies pairwise]
                                [--compress none,topk:0.1+int8]

For each topology, seed and strategy: ``gossip simulate`` (8 real node
processes on loopback, gRPC, asynchronous push-pull) and the vectorized
simulator run the same configuration: 8 nodes, digits, the default MLP,
TrainConfig's defaults (15 epochs, batch 16, lr 0.3, momentum 0.5, constant
lr), the same seed, hence the same initial weights and the same partition.
The simulator runs one round per local step (15 epochs x ceil(slice / 16)
steps), mixing once per round, as a real node gossips about once per step.
Both report the mean test accuracy over nodes; the check is that they end
within 2 points of each other. ``--compress`` adds compressed exchanges (real
nodes' ``--compress``, the simulator's pairwise CHOCO rounds: the same per-pair
arithmetic, ``gossip.core.choco``); both count the bytes their payloads took. Real runs need free CPU: on a loaded machine
their timing (and so how much they mix) changes, their accuracy hardly.

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gossip.config import TrainConfig
from gossip.sim.engine import SimConfig, Simulator
from gossip.train.data import load_dataset, partition

NODES = 8
TOLERANCE_POINTS = 2.0


def real(topology: str, strategy: str, seed: int, out: Path, compress: str = "none") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gossip", "simulate", "--nodes", str(NODES), "--topology", topology]
    cmd += ["--strategy", strategy, "--seed", str(seed), "--out", str(out), "--compress", compress]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gossip simulate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "mean_accuracy": summary["mean_accuracy"],
        "min_accuracy": summary["min_accuracy"],
        "consensus_distance": summary["consensus_distance"],
        "bytes_sent": summary["bytes_sent"],
        "seconds": time.perf_counter() - start,
    }


def simulated(topology: str, strategy: str, seed: int, compress: str = "none") -> dict[str, Any]:
    train = TrainConfig(seed=seed)
    ds = load_dataset(train.dataset, seed=seed)
    parts = partition(ds.y_train, NODES, train.partition, seed=seed)
    steps = train.epochs * max(math.ceil(len(p) / train.batch_size) for p in parts)
    cfg = SimConfig(
        nodes=NODES,
        topology=topology,
        strategy=strategy,
        dataset=train.dataset,
        model=train.model,
        partition=train.partition,
        rounds=steps,
        eval_every=steps,
        seed=seed,
        compress=compress,
    )
    start = time.perf_counter()
    final = Simulator(cfg, dataset=ds).run()[-1]
    return {
        "mean_accuracy": final.mean_accuracy,
        "min_accuracy": final.worst_accuracy,
        "consensus_distance": final.consensus_distance,
        "bytes_sent": final.bytes_sent,
        "rounds": steps,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="ring,exponential")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--strategies", default="pairwise", help="pairwise and/or push-sum")
    parser.add_argument(
        "--compress", default="none", help="compress specs, e.g. none,topk:0.1+int8 (pairwise)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sim-vs-real-") as tmp:
        for topology in args.topologies.split(","):
            for strategy, compress in itertools.product(args.strategies.split(","), args.compress.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = Path(tmp) / f"{topology}-{strategy}-{seed}-{len(rows)}"
                    r = real(topology, strategy, seed, out, compress)
                    s = simulated(topology, strategy, seed, compress)
                    diff = 100 * (s["mean_accuracy"] - r["mean_accuracy"])
                    rows.append(
                        {
                            "topology": topology,
                            "strategy": strategy,
                            "compress": compress,
                            "seed": seed,
                            "real": r,
                            "sim": s,
                            "diff_points": diff,
                        }
                    )
                    print(
                        f"{topology:>12} {strategy:>8} {compress} seed {seed}: real {r['mean_accuracy']:.4f} "
                        f"(min {r['min_accuracy']:.4f}, consensus {r['consensus_distance']:.3g}, {r['seconds']:.0f} s)  "
                        f"sim {s['mean_accuracy']:.4f} (min {s['min_accuracy']:.4f}, consensus "
                        f"{s['consensus_distance']:.3g}, {s['seconds']:.1f} s)  diff {diff:+.2f} points; "
                        f"MB sent real {r['bytes_sent'] / 1e6:.1f}, sim {s['bytes_sent'] / 1e6:.1f}",
                        flush=True,
                    )
    worst = max(abs(r["diff_points"]) for r in rows)
    print(
        json.dumps(
            {"runs": rows, "max_abs_diff_points": worst, "within_tolerance": worst <= TOLERANCE_POINTS}
        )
    )


if __name__ == "__main__":
    main()
