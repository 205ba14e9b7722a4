"""What a local cluster's run leaves: the merged metrics, the summary and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gossip.cluster.procs import params_folder
from gossip.config import GossipConfig, SimulateConfig, TrainConfig


def consensus_by_eval(out: Path, nodes: int) -> dict[int, dict[int, float]]:
    """eval index -> {rank: ||x_rank - mean||^2} over the nodes that reached that evaluation."""
    result: dict[int, dict[int, float]] = {}
    files: dict[int, dict[int, Path]] = {}
    for r in range(nodes):
        for f in sorted((out / "params" / str(r)).glob("eval*.npy")):
            files.setdefault(int(f.stem[4:]), {})[r] = f
    for k, by_rank in sorted(files.items()):
        xs = {r: np.load(f) for r, f in by_rank.items()}
        mean = np.mean(np.stack(list(xs.values())), axis=0)
        result[k] = {r: float(np.sum((x - mean) ** 2)) for r, x in xs.items()}
    return result


def final_distances(
    out: Path, ranks: list[int], incarnations: dict[int, int] | None = None
) -> dict[int, float]:
    """||x_r - mean||^2 over every node's last saved parameters (the model it left with)."""
    last = {}
    for r in ranks:
        files = sorted(params_folder(out, r, (incarnations or {}).get(r, 0)).glob("eval*.npy"))
        if files:
            last[r] = np.load(files[-1])
    if len(last) < 2:
        return {}
    mean = np.mean(np.stack(list(last.values())), axis=0)
    return {r: float(np.sum((x - mean) ** 2)) for r, x in last.items()}


def summarize(
    out: Path,
    records: dict[int, list[dict[str, Any]]],
    distances: dict[int, dict[int, float]],
    train: TrainConfig,
    gossip: GossipConfig,
    sim: SimulateConfig,
    wall: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    merged: list[dict[str, Any]] = []
    for rank, recs in records.items():
        for rec in recs:
            # Evaluation k of a restarted node is not the others' evaluation k.
            d = None if rec.get("incarnation") else distances.get(int(rec.get("eval", -1)), {}).get(rank)
            merged.append({**rec, "rank": rank, "consensus_distance": d})
    # unix_time: a restarted process counts its "time" from its own start.
    merged.sort(key=lambda r: (r.get("unix_time", r["time"]), r["rank"]))
    finals = {rank: recs[-1] for rank, recs in records.items() if recs}
    accs = [float(finals[r]["accuracy"]) for r in sorted(finals)]
    final_d = final_distances(
        out, sorted(finals), {r: int(rec.get("incarnation", 0)) for r, rec in finals.items()}
    )

    def total(rank: int, key: str) -> int:
        # Counters start again in a restarted process: add each incarnation's last value.
        last: dict[int, int] = {}
        for rec in records[rank]:
            last[int(rec.get("incarnation", 0))] = int(rec.get(key, 0))
        return sum(last.values())

    summary: dict[str, Any] = {
        "nodes": sim.nodes,
        "topology": gossip.topology,
        "strategy": gossip.strategy,
        "accuracies": accs,
        "mean_accuracy": float(np.mean(accs)),
        "min_accuracy": float(np.min(accs)),
        "consensus_distance": float(np.mean(list(final_d.values()))) if final_d else None,
        "bytes_sent": sum(total(r, "bytes_sent") for r in finals),
        "bytes_sent_per_node": [total(r, "bytes_sent") for r in sorted(finals)],
        "exchanges": [total(r, "exchanges") for r in sorted(finals)],
        "steps": [int(finals[r]["step"]) for r in sorted(finals)],
        "wall_seconds": round(wall, 2),
        "config": {"train": asdict(train), "gossip": asdict(gossip), "simulate": asdict(sim)},
    }
    if is_text(train.dataset):  # a label per byte: the loss is nats per byte, accuracy next-byte
        bpb = [float(finals[r]["loss"]) / math.log(2) for r in sorted(finals)]
        summary["bits_per_byte"] = bpb
        summary["mean_bits_per_byte"] = float(np.mean(bpb))
    return summary, merged


def is_text(dataset: str) -> bool:
    """Whether ``dataset`` has a label per byte (``text:...``): bits per byte and next-byte accuracy."""
    return dataset.startswith("text:")


def plot(
    merged: list[dict[str, Any]],
    nodes: int,
    path: Path,
    title: str,
    start: float,
    events: Sequence[dict[str, Any]] = (),
    text: bool = False,
) -> None:
    """Accuracy and consensus distance over time; with ``text``, next-byte accuracy, validation
    bits per byte and consensus distance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16 if text else 11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if text else 2)
    ax1, ax2 = axes[0], axes[-1]
    for r in range(nodes):
        recs = [m for m in merged if m["rank"] == r]
        xs = [m.get("unix_time", start) - start for m in recs]
        ax1.plot(xs, [m["accuracy"] for m in recs], lw=1, label=f"node {r}")
        if text:
            axes[1].plot(xs, [m["loss"] / math.log(2) for m in recs], lw=1, label=f"node {r}")
        pts = [
            (x, m["consensus_distance"]) for x, m in zip(xs, recs, strict=True) if m.get("consensus_distance")
        ]
        if pts:
            ax2.plot(*zip(*pts, strict=True), lw=1, label=f"node {r}")
    for e in events:  # churn: a dotted red line per kill, green per restart
        color = "tab:red" if e["event"] == "killed" else "tab:green"
        ax1.axvline(e["unix_time"] - start, color=color, ls=":", lw=0.8)
    ax1.set_xlabel("seconds since launch")
    ax1.set_ylabel("next-byte accuracy (validation)" if text else "test accuracy")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    if text:
        axes[1].set_xlabel("seconds since launch")
        axes[1].set_ylabel("validation bits per byte")
        axes[1].grid(alpha=0.3)
    ax2.set_xlabel("seconds since launch")
    ax2.set_ylabel("squared distance from the average model")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if nodes <= 16:
        ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
