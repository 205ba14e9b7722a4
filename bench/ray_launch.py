"""``gossip launch --ray`` on a local 3-node Ray test cluster against ``gossip simulate``, same seed.

    python bench/ray_launch.py [--nodes 16] [--epochs 5] [--seed 0] [--ray-nodes 3]

Starts Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``: a head and
two more Ray nodes, raylets on this machine, CPUs enough for one bundle per node),
runs ``gossip launch --ray ADDRESS --nodes N`` on it, shuts it down, then runs
``gossip simulate --nodes N`` with the same knobs and seed. It reports both wall
times (the launcher's, as its summary has it, and the command's from start to exit),
both mean accuracies, the difference in points, the Ray nodes the placement used and
the time the test cluster took to start. Needs the ray extra. One run each: on a
shared machine the wall times move with the load.

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(cmd: list[str], out: Path) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=ENV, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray-nodes", type=int, default=3)
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    knobs = ["--nodes", str(args.nodes), "--epochs", str(args.epochs), "--seed", str(args.seed)]
    cpus = math.ceil(args.nodes / args.ray_nodes)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
        try:
            for _ in range(args.ray_nodes - 1):
                cluster.add_node(num_cpus=cpus)
            cluster.wait_for_nodes()
            cluster_start = time.perf_counter() - t0
            out = Path(tmp) / "ray"
            cmd = [
                sys.executable,
                "-m",
                "gossip",
                "launch",
                "--ray",
                cluster.address,
                *knobs,
                "--out",
                str(out),
            ]
            on_ray, ray_cmd = _run(cmd, out)
        finally:
            cluster.shutdown()
        out = Path(tmp) / "simulate"
        cmd = [sys.executable, "-m", "gossip", "simulate", *knobs, "--out", str(out)]
        local, sim_cmd = _run(cmd, out)
    result = {
        "nodes": args.nodes,
        "epochs": args.epochs,
        "seed": args.seed,
        "ray_nodes": len(on_ray["ray"]["ray_nodes"]),
        "cluster_start_s": round(cluster_start, 1),
        "ray_wall_s": on_ray["wall_seconds"],
        "ray_command_s": round(ray_cmd, 1),
        "simulate_wall_s": local["wall_seconds"],
        "simulate_command_s": round(sim_cmd, 1),
        "wall_ratio": round(on_ray["wall_seconds"] / local["wall_seconds"], 2),
        "ray_mean_accuracy": round(on_ray["mean_accuracy"], 4),
        "simulate_mean_accuracy": round(local["mean_accuracy"], 4),
        "accuracy_gap_points": round(100 * (on_ray["mean_accuracy"] - local["mean_accuracy"]), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
