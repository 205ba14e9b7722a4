"""Simulator throughput against a bare vmap loop, and peak memory by size.

    python bench/simulator.py [--nodes 1024] [--rounds 100] [--memory 1024,4096]

1024 nodes each train the default MLP on their slice of digits, in 100
synchronous rounds (D-PSGD, Metropolis-Hastings weights) on a random 4-regular
graph. The simulator (``Simulator.step``: batches epoch by epoch, momentum,
the fault checks, mixing with the topology's sparse W, byte counting) is timed
against a bare reference loop in this same process: per-node gradients of the
same model by ``vmap(grad(...))`` on random batches of the same shape, one
sparse matrix product, and the SGD update, nothing else. Both run the same
number of rounds in alternating blocks, so load from other processes falls on
both alike; ratio = simulator seconds per round / bare seconds per round.
Evaluation (every node on the test set) is timed once, apart.

Peak RSS is measured per size in a child process of its own (VmHWM after
building a simulator, 5 rounds and one evaluation). Digits has 1437 training
samples; sizes above that train on digits repeated, so that every node still
gets a non-empty slice of the same model and input.

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gossip.sim.engine import SimConfig, Simulator
from gossip.train.data import Dataset, load_dataset

TOPOLOGY = "random-regular:4"
BLOCKS = 4  # alternating blocks per method
WARMUP = 3  # rounds per method before timing


def _dataset(nodes: int) -> Dataset:
    ds = load_dataset("digits")
    copies = math.ceil(nodes / len(ds.y_train))
    if copies == 1:
        return ds
    return Dataset(
        name=f"digits x{copies}",
        x_train=ds.x_train.repeat(copies, 1),
        y_train=ds.y_train.repeat(copies),
        x_test=ds.x_test,
        y_test=ds.y_test,
        num_classes=ds.num_classes,
        input_shape=ds.input_shape,
    )


def _config(nodes: int, rounds: int) -> SimConfig:
    return SimConfig(nodes=nodes, topology=TOPOLOGY, strategy="sync", rounds=rounds, eval_every=rounds)


class Bare:
    """vmap'd gradients + one sparse product + the SGD step: the floor the simulator is held to."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.model = sim.module
        self.x = sim.params.clone()
        rows, cols, values = sim.topology.mixing_entries(0)
        index = torch.stack([torch.from_numpy(rows), torch.from_numpy(cols)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            w = torch.sparse_coo_tensor(
                index, torch.from_numpy(values).float(), (sim.n, sim.n), check_invariants=False
            )
            self.w = w.coalesce().to_sparse_csr()
        self.grad = vmap(grad(self._loss))
        self.lr = sim.cfg.lr

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.model, params, (x,)), y)

    def step(self) -> None:
        ds, n, b = self.sim.dataset, self.sim.n, self.sim.cfg.batch_size
        idx = torch.randint(len(ds.y_train), (n, b))
        grads = self.grad(self.sim.views(self.x), ds.x_train[idx], ds.y_train[idx])
        y = torch.sparse.mm(self.w, self.x)
        offset = 0
        for name, size in zip(self.sim.names, self.sim.sizes, strict=True):
            y[:, offset : offset + size].add_(grads[name].reshape(n, size), alpha=-self.lr)
            offset += size
        self.x = y


def _time(step: Any, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    return time.perf_counter() - start


def throughput(nodes: int, rounds: int) -> dict[str, Any]:
    sim = Simulator(_config(nodes, rounds + WARMUP), dataset=_dataset(nodes))
    bare = Bare(sim)
    _time(bare.step, WARMUP)
    _time(sim.step, WARMUP)
    sim_s = bare_s = 0.0
    per_block = [rounds // BLOCKS + (1 if k < rounds % BLOCKS else 0) for k in range(BLOCKS)]
    for k, count in enumerate(per_block):
        # Alternate which goes first, so neither always follows the other's cache state.
        if k % 2:
            sim_s += _time(sim.step, count)
            bare_s += _time(bare.step, count)
        else:
            bare_s += _time(bare.step, count)
            sim_s += _time(sim.step, count)
    start = time.perf_counter()
    metrics = sim.evaluate()
    eval_s = time.perf_counter() - start
    return {
        "nodes": nodes,
        "parameters_per_node": sim.dim,
        "rounds": rounds,
        "sim_s_per_round": sim_s / rounds,
        "bare_s_per_round": bare_s / rounds,
        "ratio": sim_s / bare_s,
        "eval_s": eval_s,
        "accuracy_after": metrics.accuracy,
        "threads": torch.get_num_threads(),
    }


def _peak_rss_kib() -> int:
    """Peak RSS of this process's memory (VmHWM).

    Not ru_maxrss: Linux carries that across fork and exec, so a child started
    by a large parent reports at least the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe(nodes: int) -> dict[str, Any]:
    """Run in a child process: peak RSS of a simulator of ``nodes`` nodes."""
    ds = _dataset(nodes)
    base = _peak_rss_kib()
    sim = Simulator(_config(nodes, 5), dataset=ds)
    for _ in range(5):
        sim.step()
    sim.evaluate()
    peak = _peak_rss_kib()
    return {
        "nodes": nodes,
        "dataset": ds.name,
        "parameters_per_node": sim.dim,
        "stack_mib": sim.params.numel() * 4 / 2**20,
        "peak_rss_mib": peak / 1024,
        "rss_before_simulator_mib": base / 1024,
    }


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        proc = subprocess.run(
            [sys.executable, __file__, "--probe", str(n)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe for {n} nodes failed:\n{proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--memory", default="1024,4096", help="sizes for the peak-RSS probes ('' to skip)")
    parser.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        print(json.dumps(probe(args.probe)))
        return

    result = throughput(args.nodes, args.rounds)
    print(
        f"{args.nodes} nodes x {result['parameters_per_node']} parameters, {args.rounds} rounds on {TOPOLOGY}: "
        f"simulator {result['sim_s_per_round'] * 1e3:.1f} ms/round, bare loop "
        f"{result['bare_s_per_round'] * 1e3:.1f} ms/round, ratio {result['ratio']:.3f}; "
        f"one evaluation of every node {result['eval_s']:.2f} s"
    )
    sizes = [int(s) for s in args.memory.split(",") if s.strip()]
    result["memory"] = memory(sizes)
    for m in result["memory"]:
        print(
            f"{m['nodes']:>5} nodes ({m['dataset']}): peak RSS {m['peak_rss_mib']:.0f} MiB "
            f"(stacked parameters {m['stack_mib']:.0f} MiB, process before the simulator "
            f"{m['rss_before_simulator_mib']:.0f} MiB)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
