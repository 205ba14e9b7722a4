"""Evaluation batch size: the time of one evaluation at ``--batch`` against 1024, paired, under load.

    python bench/eval_batch.py [--dataset text:stdlib:16] [--model gpt:2:128:4] [--batch 256]
        [--processes 4] [--repeats 10]

``--processes`` evaluators run at once (a machine whose nodes evaluate together, as
they do in the benches of issue 11); each alternates the two batch sizes, which goes
first swapping every repeat, on one torch thread. The last line is JSON:
``ratio`` (the median of every per-repeat ``time at --batch / time at 1024``, all
processes pooled), its quartiles, and the seconds per evaluation at each size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import quartiles  # noqa: E402

BASELINE = 1024


def worker(args: argparse.Namespace, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch

    from gossip.train.data import load_dataset
    from gossip.train.models import build_model
    from gossip.train.trainer import evaluate

    torch.set_num_threads(1)
    ds = load_dataset(args.dataset, seed=0)
    model = build_model(args.model, ds.input_shape, ds.num_classes, target_shape=ds.target_shape)
    evaluate(model, ds.x_test, ds.y_test, args.batch)  # warm
    rows = []
    for i in range(args.repeats):
        seconds = {}
        for bs in (args.batch, BASELINE) if i % 2 == 0 else (BASELINE, args.batch):
            began = time.perf_counter()
            evaluate(model, ds.x_test, ds.y_test, bs)
            seconds[bs] = time.perf_counter() - began
        rows.append((seconds[args.batch], seconds[BASELINE]))
    out.put(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="text:stdlib:16")
    p.add_argument("--model", default="gpt:2:128:4")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=worker, args=(args, out)) for _ in range(args.processes)]
    for proc in procs:
        proc.start()
    print(f"{args.processes} evaluators, {args.repeats} paired repeats each ...", flush=True)
    rows = [r for _ in procs for r in out.get()]
    for proc in procs:
        proc.join()
    ratios = [a / b for a, b in rows]
    result = {
        "batch": args.batch,
        "baseline_batch": BASELINE,
        "ratio": statistics.median(ratios),
        "ratio_quartiles": quartiles(ratios),
        "pairs": len(ratios),
        "seconds_at_batch": statistics.median(a for a, _ in rows),
        "seconds_at_baseline": statistics.median(b for _, b in rows),
        "dataset": args.dataset,
        "model": args.model,
        "processes": args.processes,
    }
    print(
        f"evaluation at {args.batch}: {result['ratio']:.3f}x the time at {BASELINE} (median of {len(ratios)} pairs)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
