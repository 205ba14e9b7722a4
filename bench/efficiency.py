"""Bytes to target on the vectorised simulator: local steps, outer optimizer, compression.

    python bench/efficiency.py [--tasks digits,text] [--steps 150] [--nodes 32] [--strategy sync]
        [--grid "H=1,10,50 outer=none,nesterov:0.7:0.9 compress=none,int8,topk:0.01+int8,sign gamma=0,1"]
        [--seed 0] [--eval-steps K] [--batch B] [--context C] [--eval-samples N]

Two tasks, each on ``--nodes`` simulated nodes (32) on the static exponential graph,
synchronous rounds (``--strategy sync``: D-PSGD, every node sends to its 9 neighbours
each round; CHOCO-Gossip when compressed) or pairwise rounds (``--strategy pairwise``:
a random matching of the graph's edges each round, as real nodes exchange; CHOCO per
pair when compressed, ``gossip.core.choco``):

- ``digits``: digits + cnn, lr 0.3, momentum 0.5, batch 16, constant rate:
  TrainConfig's defaults, which ``gossip simulate`` and the simulator use unchanged
  for the cnn too. Metric: test accuracy of the average model.
- ``text``: text:stdlib + gpt:2:128:4 with lr 0.3 (what the text example of
  docs/simulate.md uses), the other knobs TrainConfig's. Metric: validation loss
  (nats per byte) of the average model. ``--context C`` reads ``text:stdlib:C`` (64);
  ``--batch B`` sets the batch of both tasks (TrainConfig's 16). On 2 cores one step of
  32 nodes takes about 4 s at context 64, batch 16, and 1.2 s at context 32, batch 8.

Every configuration runs the same number of local steps S (``--steps``), so
``rounds = S / H``. The reference is dense (compress none), H = 1, outer none, same
strategy; its
final metric minus 1 accuracy point (digits), or plus 1 % validation loss (text), is
the target. For each configuration of the grid (H x outer x compress x gamma, gamma 0
being the compressor's default consensus step) the bench
records the bytes sent per node (``sim.bytes_sent / nodes``, the real payloads'
sizes) at the first evaluation that meets the target, and the final metric.

Only the average model is evaluated (``gossip.train.trainer.evaluate``), never every
node (``Simulator.evaluate`` costs minutes per call for text at 32 nodes). It is
evaluated after every round whose local steps so far are a multiple of K
(``--eval-steps``; default 1 for digits, 10 for text), i.e. every round for H >= K
and every K / H rounds below; the last round is always evaluated. So bytes to target
are exact to one evaluation's worth of rounds. ``--eval-samples N`` evaluates on the
first N test (validation) samples only, the same N for every configuration (0: all).

The best configuration is the one with the fewest bytes to target among those that
reach the target and still meet it at the end (a run that passes the target and then
diverges does not count); ``first_to_target`` names the fewest bytes to target
without that condition. Reduction = reference bytes to target / best configuration's
bytes to target (null for a task not run, or if none qualifies). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from gossip.config import ConfigError, TrainConfig
from gossip.sim.engine import SimConfig, Simulator
from gossip.train.data import Dataset, load_dataset
from gossip.train.trainer import evaluate

TOPOLOGY = "exponential"
TASKS: dict[str, dict[str, Any]] = {
    # lr: TrainConfig's default (0.3) for digits; 0.3 from docs/simulate.md for text.
    "digits": {"dataset": "digits", "model": "cnn", "lr": 0.3, "eval_steps": 1},
    "text": {"dataset": "text:stdlib:{context}", "model": "gpt:2:128:4", "lr": 0.3, "eval_steps": 10},
}
GRID = {
    "H": ["1", "10", "50"],
    "outer": ["none", "nesterov:0.7:0.9"],
    "compress": ["none", "int8", "topk:0.01+int8", "sign"],
    # The compressors' default steps (fitted to pure consensus) and 1, which training liked.
    "gamma": ["0", "1"],
}
REFERENCE = (1, "none", "none", 0.0)


@dataclass(frozen=True)
class Point:
    h: int
    outer: str
    compress: str
    gamma: float = 0.0

    def name(self) -> str:
        step = f" gamma={self.gamma:g}" if self.gamma else ""
        return f"H={self.h} outer={self.outer} compress={self.compress}{step}"


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_grid(text: str) -> list[Point]:
    grid = dict(GRID)
    for part in text.split():
        key, _, values = part.partition("=")
        if key not in grid or not values:
            raise SystemExit(f"--grid: expected KEY=V1,V2 with KEY in {', '.join(GRID)}, got {part!r}")
        grid[key] = values.split(",")
    points = [
        Point(int(h), outer, compress, float(gamma))
        for h in grid["H"]
        for outer in grid["outer"]
        for compress in grid["compress"]
        for gamma in grid["gamma"]
    ]
    return list(
        dict.fromkeys(
            Point(p.h, p.outer, p.compress, p.gamma if p.compress != "none" else 0.0) for p in points
        )
    )


def dataset_spec(task: str, args: argparse.Namespace) -> str:
    return str(TASKS[task]["dataset"]).format(context=args.context)


def better(task: str, metric: float, target: float) -> bool:
    """Whether ``metric`` meets ``target``: accuracy at least, loss at most."""
    return metric >= target if task == "digits" else metric <= target


def run_point(
    task: str, ds: Dataset, point: Point, args: argparse.Namespace, target: float | None
) -> dict[str, Any]:
    spec = TASKS[task]
    row: dict[str, Any] = {
        "H": point.h,
        "outer": point.outer,
        "compress": point.compress,
        "gamma": point.gamma,
    }
    if args.steps % point.h:
        row["error"] = f"steps {args.steps} is not a multiple of H = {point.h}"
        say(f"  skipped: {row['error']}")
        return row
    rounds = args.steps // point.h
    cfg = SimConfig(
        nodes=args.nodes,
        topology=TOPOLOGY,
        strategy=args.strategy,
        dataset=dataset_spec(task, args),
        model=spec["model"],
        batch_size=args.batch,
        rounds=rounds,
        local_steps=point.h,
        lr=spec["lr"],
        seed=args.seed,
        eval_every=rounds,
        compress=point.compress,
        gamma=point.gamma,
        outer=point.outer,
    )
    try:
        sim = Simulator(cfg, dataset=ds)
    except ConfigError as exc:
        row["error"] = str(exc)
        say(f"  refused: {exc}")
        return row
    k = args.eval_steps or spec["eval_steps"]
    every = max(1, math.ceil(k / point.h))
    index = 1 if task == "digits" else 0  # evaluate() gives (loss, accuracy)
    n = args.eval_samples or len(ds.x_test)
    x_test, y_test = ds.x_test[:n], ds.y_test[:n]
    curve: list[tuple[int, float, float]] = []  # (steps, bytes per node, metric)
    reached: float | None = None
    reached_step: int | None = None
    start = time.perf_counter()
    last_print = start
    for r in range(1, rounds + 1):
        sim.step()
        if r % every and r != rounds:
            continue
        metric = evaluate(sim.average_model(), x_test, y_test)[index]
        per_node = sim.bytes_sent / args.nodes
        curve.append((sim.steps, per_node, metric))
        if not math.isfinite(metric):
            say(f"  step {sim.steps}: metric {metric}: diverged, stopping")
            break
        if target is not None and reached is None and better(task, metric, target):
            reached, reached_step = per_node, sim.steps
        now = time.perf_counter()
        if now - last_print >= 10 or r == rounds:
            last_print = now
            say(
                f"  step {sim.steps}/{args.steps}  metric {metric:.4f}  bytes/node {per_node:,.0f}"
                f"  {now - start:.0f} s"
            )
    row.update(
        rounds=rounds,
        eval_every_rounds=every,
        final_metric=curve[-1][2],
        bytes_per_node_total=sim.bytes_sent / args.nodes,
        bytes_to_target=reached,
        steps_to_target=reached_step,
        seconds=round(time.perf_counter() - start, 1),
    )
    if not math.isfinite(row["final_metric"]):
        row["final_metric"] = None
    row["curve"] = curve if target is None else None  # the reference's curve sets its own target
    return row


def run_task(task: str, args: argparse.Namespace, points: list[Point]) -> dict[str, Any]:
    say(f"{task}: loading {dataset_spec(task, args)} ...")
    ds = load_dataset(dataset_spec(task, args), seed=args.seed)
    ref_point = Point(*REFERENCE)
    say(f"{task}: reference {ref_point.name()}, {args.steps} steps")
    ref = run_point(task, ds, ref_point, args, None)
    if ref.get("final_metric") is None:
        raise SystemExit(f"{task}: the reference did not finish: {ref.get('error', 'diverged')}")
    ref_final = ref["final_metric"]
    target = ref_final - 0.01 if task == "digits" else ref_final * 1.01
    for steps, per_node, metric in ref.pop("curve"):
        if better(task, metric, target):
            ref["bytes_to_target"], ref["steps_to_target"] = per_node, steps
            break
    say(
        f"{task}: reference final {ref_final:.4f}, target {target:.4f}, bytes to target {ref['bytes_to_target']}"
    )
    rows = [ref]
    others = [p for p in points if p != ref_point]
    for i, point in enumerate(others, 1):
        say(f"{task}: [{i}/{len(others)}] {point.name()}")
        row = run_point(task, ds, point, args, target)
        row.pop("curve", None)
        rows.append(row)
        if row.get("final_metric") is not None:
            say(f"  final {row['final_metric']:.4f}, bytes to target {row['bytes_to_target']}")
    reached = [r for r in rows if r.get("bytes_to_target") is not None]
    kept = [
        r for r in reached if r.get("final_metric") is not None and better(task, r["final_metric"], target)
    ]
    best = min(kept, key=lambda r: r["bytes_to_target"]) if kept else None
    first = min(reached, key=lambda r: r["bytes_to_target"]) if reached else None
    reduction = None
    if best is not None and ref.get("bytes_to_target"):
        reduction = ref["bytes_to_target"] / best["bytes_to_target"]

    def gap(r: dict[str, Any]) -> float | None:
        if r.get("final_metric") is None:
            return None
        if task == "digits":
            return round(100 * (ref_final - r["final_metric"]), 3)  # accuracy points below the reference
        return round(100 * (r["final_metric"] / ref_final - 1), 3)  # % validation loss above it

    for r in rows:
        r["final_gap"] = gap(r)
    return {
        "metric": "accuracy" if task == "digits" else "test_loss",
        "gap_unit": "accuracy points below the reference"
        if task == "digits"
        else "% loss above the reference",
        "reference_final": ref_final,
        "target": target,
        "reduction": reduction,
        "best": None if best is None else {k: best[k] for k in ("H", "outer", "compress", "gamma")},
        "best_bytes_to_target": None if best is None else best["bytes_to_target"],
        "best_final_gap": None if best is None else best["final_gap"],
        "first_to_target": None
        if first is None
        else {k: first[k] for k in ("H", "outer", "compress", "gamma")},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits,text")
    ap.add_argument(
        "--steps", type=int, default=150, help="local steps per node, the same for every configuration"
    )
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--strategy", default="sync", choices=("sync", "pairwise"))
    ap.add_argument("--grid", default="", help='subset, e.g. "H=1,10 outer=none compress=none,int8"')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-steps", type=int, default=0, help="local steps between evaluations (0: per task)")
    ap.add_argument("--batch", type=int, default=TrainConfig().batch_size, help="batch per node and step")
    ap.add_argument("--context", type=int, default=64, help="bytes of context for text:stdlib")
    ap.add_argument(
        "--eval-samples", type=int, default=0, help="evaluate on the first N test samples (0: all)"
    )
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"--tasks: unknown task {t!r} (digits, text)")
    torch.set_num_threads(1)
    points = parse_grid(args.grid)
    say(
        f"efficiency: {args.nodes} nodes, {TOPOLOGY}, {args.strategy}, {args.steps} steps, "
        f"{len(points)} configurations per task"
    )
    results = {t: run_task(t, args, points) for t in tasks}

    def pick(task: str, key: str) -> Any:
        return results[task][key] if task in results else None

    print(
        json.dumps(
            {
                "digits_bytes_reduction": pick("digits", "reduction"),
                "text_bytes_reduction": pick("text", "reduction"),
                "digits_best": pick("digits", "best"),
                "text_best": pick("text", "best"),
                "digits_best_final_gap": pick("digits", "best_final_gap"),
                "text_best_final_gap": pick("text", "best_final_gap"),
                "steps": args.steps,
                "nodes": args.nodes,
                "topology": TOPOLOGY,
                "strategy": args.strategy,
                "seed": args.seed,
                "batch": args.batch,
                "context": args.context,
                "eval_samples": args.eval_samples,
                "tasks": results,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
