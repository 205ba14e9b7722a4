"""summary.md and plots of an experiment's runs.

Runs that differ only in ``seed`` form one configuration: the table shows
the mean (± the standard deviation over seeds) and the plots the mean curve.
Plots are drawn on bare Agg canvases (no pyplot), like ``gossip.core.spectral.draw``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gossip.sim.experiment import Experiment, RunResult


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def groups(exp: Experiment, results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Results keyed by a label of their varying knobs, seed left out, in run order."""
    knobs = [k for k in exp.varying() if k != "seed"]
    out: dict[str, list[RunResult]] = {}
    for r in results:
        label = " ".join(f"{k}={getattr(r.config, k)}" for k in knobs) or exp.name
        out.setdefault(label, []).append(r)
    return out


def _stat(values: Sequence[float], fmt: str) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(float(np.std(values, ddof=1)), fmt)}"


def write_summary(exp: Experiment, results: Sequence[RunResult], path: Path) -> None:
    knobs = [k for k in exp.varying() if k != "seed"]
    seeds = sorted({r.config.seed for r in results})
    fixed = {k: v for k, v in asdict(exp.base).items() if k not in exp.axes}
    fixed.update({k: v[0] for k, v in exp.axes.items() if len(v) == 1})
    lines = [f"# Experiment {exp.name}", ""]
    if exp.description:
        lines += [exp.description, ""]
    lines += [
        f"Reproduce with `gossip experiment {exp.source}`.",
        "",
        "Fixed knobs: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ".",
        "",
        f"Final figures after the last round; seeds {', '.join(map(str, seeds))}"
        + (" (mean ± standard deviation over seeds)." if len(seeds) > 1 else "."),
        "Accuracy is on the test set: of the average model, of the worst alive node, and the mean over",
        "alive nodes. Consensus distance is mean_i ||x_i - x̄||² over alive nodes.",
        "",
    ]
    head = [*knobs, "spectral gap", "accuracy", "worst node", "mean node", "consensus", "MB sent", "s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for runs in groups(exp, results).values():
        finals = [r.final for r in runs]
        cells = [str(getattr(runs[0].config, k)) for k in knobs]
        cells += [
            f"{runs[0].spectral_gap:.4g}",
            _stat([m.accuracy for m in finals], ".4f"),
            _stat([m.worst_accuracy for m in finals], ".4f"),
            _stat([m.mean_accuracy for m in finals], ".4f"),
            _stat([m.consensus_distance for m in finals], ".3g"),
            _stat([m.bytes_sent / 1e6 for m in finals], ".1f"),
            _stat([r.seconds for r in runs], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plots: accuracy.png, consensus.png, gap.png; every evaluated round: results.csv.", ""]
    path.write_text("\n".join(lines))


def _curve(runs: Sequence[RunResult], metric: str) -> tuple[np.ndarray, np.ndarray]:
    rounds = np.array([m.round for m in runs[0].history])
    values = np.array([[getattr(m, metric) for m in r.history] for r in runs], dtype=np.float64)
    return rounds, values.mean(axis=0)


def _figure(width: float = 11.0, height: float = 5.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _legend(fig: Any, ax: Any, count: int) -> None:
    if count <= 1:
        return
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + count // 25)
    fig.tight_layout()


def _style(i: int) -> dict[str, Any]:
    # 20 colours, then the same colours dashed, dotted...: lines stay apart in big grids.
    return {"color": _colour(i % 20), "linestyle": ("-", "--", ":", "-.")[(i // 20) % 4]}


def write_plots(exp: Experiment, results: Sequence[RunResult], folder: Path) -> None:
    grouped = groups(exp, results)

    fig = _figure(14.0, 5.0)
    axes = fig.subplots(1, 2, sharey=True)
    for i, (label, runs) in enumerate(grouped.items()):
        for ax, metric in zip(axes, ("accuracy", "worst_accuracy"), strict=True):
            ax.plot(*_curve(runs, metric), label=label, **_style(i))
    axes[0].set_title("test accuracy of the average model")
    axes[1].set_title("test accuracy of the worst node")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    _legend(fig, axes[1], len(grouped))
    fig.savefig(folder / "accuracy.png", dpi=100)

    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, runs) in enumerate(grouped.items()):
        rounds, values = _curve(runs, "consensus_distance")
        keep = values > 0  # round 0 starts in consensus: nothing to draw on a log scale
        ax.plot(rounds[keep], values[keep], label=label, **_style(i))
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance")
    ax.set_title(f"{exp.name}: consensus distance")
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(grouped))
    fig.savefig(folder / "consensus.png", dpi=100)

    fig = _figure(12.0, 5.5)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.07, right=0.66)
    # One colour per size when sizes vary (the gap shrinks with n), circles for the average
    # model, triangles for the worst node. Points carry a number and the key beside the
    # plot names their knobs: labels written at the points overlapped wherever gaps met.
    by_size = "nodes" in exp.varying()
    sizes = sorted({runs[0].config.nodes for runs in grouped.values()})
    keys = []
    # Points that would print over each other share one label: "13,16".
    labels: dict[tuple[float, float], tuple[float, float, list[str]]] = {}
    for k, (label, runs) in enumerate(grouped.items(), 1):
        gap = max(runs[0].spectral_gap, 1e-6)
        colour = _colour(2 * sizes.index(runs[0].config.nodes) % 20) if by_size else _colour(0)
        acc = float(np.mean([r.final.accuracy for r in runs]))
        worst = float(np.mean([r.final.worst_accuracy for r in runs]))
        ax.scatter([gap], [acc], marker="o", color=colour)
        ax.scatter([gap], [worst], marker="v", color=colour, alpha=0.6)
        spot = (round(float(np.log10(gap)), 1), round(acc / 0.006))
        labels.setdefault(spot, (gap, acc, []))[2].append(str(k))
        keys.append(f"{k:>2}  {label}")
    for gap, acc, ks in labels.values():
        ax.annotate(",".join(ks), (gap, acc), fontsize=7, xytext=(3, 2), textcoords="offset points")
    fig.text(0.68, 0.95, "\n".join(keys), va="top", ha="left", fontsize=7, family="monospace")
    handles = [ax.scatter([], [], marker="o", color="grey", label="average model")]
    handles.append(ax.scatter([], [], marker="v", color="grey", alpha=0.6, label="worst node"))
    if by_size:
        handles += [
            ax.scatter([], [], marker="s", color=_colour(2 * k % 20), label=f"n={n}")
            for k, n in enumerate(sizes)
        ]
    gaps = np.array([runs[0].spectral_gap for runs in grouped.values()])
    if gaps.size and gaps.max() / max(gaps.min(), 1e-6) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("spectral gap 1 - |λ2|")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{exp.name}: final accuracy vs spectral gap")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    fig.savefig(folder / "gap.png", dpi=100)


def write_report(exp: Experiment, results: Sequence[RunResult], folder: Path) -> None:
    """summary.md and the plots of a finished experiment, next to its results.csv."""
    write_summary(exp, results, folder / "summary.md")
    write_plots(exp, results, folder)
