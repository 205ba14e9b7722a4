"""What the command line prints: progress, tables and reports, through rich.

rich draws a live progress bar on a terminal; when stdout or stderr is a file or
a pipe it prints plain lines instead (a line every few seconds for progress), so
logs of scripted runs stay readable.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class ProgressLine:
    """``progress(fraction, text)`` for long work: a live bar on a terminal, a line now and then otherwise."""

    def __init__(self, what: str) -> None:
        self.t0 = time.monotonic()
        self.last = -_PLAIN_EVERY
        self.last_text = ""
        self._bar: Progress | None = None
        if err.is_terminal:
            self._bar = Progress(
                TextColumn(f"[bold]{what}[/]"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=err,
                transient=False,
            )
            self._task = self._bar.add_task("", total=1.0)
            self._bar.start()

    def __call__(self, fraction: float, text: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if self._bar is not None:
            self._bar.update(self._task, completed=fraction, description=text)
            return
        now = time.monotonic()
        # Plain output: at most one line every few seconds, but every new phase at once.
        phase = text.split(",", 1)[0]
        if now - self.last < _PLAIN_EVERY and phase == self.last_text:
            return
        self.last, self.last_text = now, phase
        err.print(f"[{now - self.t0:6.1f} s] {fraction * 100:5.1f} %  {text}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def busy(text: str) -> contextlib.AbstractContextManager[Any]:
    """A transient spinner with ``text`` on a terminal (gone once done); nothing otherwise."""
    return err.status(text) if err.is_terminal else contextlib.nullcontext()


def print_error(command: str, message: str) -> None:
    """One line on stderr: ``gossip COMMAND: error: MESSAGE``."""
    print(f"gossip {command}: error: {message}", file=sys.stderr)


def print_failure(command: str, message: str) -> None:
    """One line on stderr for a run that could not be done (exit 1): ``gossip COMMAND: MESSAGE``."""
    print(f"gossip {command}: {message}", file=sys.stderr)


# --- reports -----------------------------------------------------------------------------


def simulate_table(s: dict[str, Any]) -> None:
    table = Table(box=None, pad_edge=False)
    for name in ("node", "accuracy", "bytes sent", "exchanges"):
        table.add_column(name, justify="right")
    for i, acc in enumerate(s["accuracies"]):
        rank = s["ranks"][i] if "ranks" in s else i
        table.add_row(str(rank), f"{acc:.4f}", f"{s['bytes_sent_per_node'][i]:,}", str(s["exchanges"][i]))
    out.print(table)
    cd = s["consensus_distance"]
    lines = [
        "",
        f"nodes               {s['nodes']} ({s['topology']}, {s['strategy']})",
        f"mean accuracy       {s['mean_accuracy']:.4f} (min {s['min_accuracy']:.4f})",
        f"consensus distance  {cd:.3e}" if cd is not None else "consensus distance  n/a",
        *(
            [f"bits per byte       {s['mean_bits_per_byte']:.3f} (validation; accuracy is next-byte)"]
            if "mean_bits_per_byte" in s
            else []
        ),
        f"bytes sent          {s['bytes_sent']:,}",
        f"wall time           {s['wall_seconds']:.1f} s",
    ]
    if s.get("interrupted"):
        lines.append("interrupted         yes: the figures are of the run until Ctrl-C")
    if "baseline_accuracy" in s:
        lines.append(f"baseline accuracy   {s['baseline_accuracy']:.4f} (gap {s['gap'] * 100:+.2f} points)")
    if s.get("killed"):
        lines.append(f"killed (SIGKILL)    nodes {', '.join(map(str, s['killed']))}")
    if "churn" in s:
        c = s["churn"]
        lines.append(
            f"churn               {c['kills']} kills, {c['restarts']} restarts, {c['skipped']} skipped "
            f"({c['rate_per_node_per_minute']:g}/node/min = {c['kills_per_second']:.2f}/s, "
            f"{c['downtime']:g} s down, restarts from {'the store' if c['init'] == 'network' else 'scratch'})"
        )
    if s.get("rebuilt"):
        line = f"rebuilt from store  v{s['rebuilt_version']} (step {s['rebuilt_step']}) in {s['rebuild_seconds']:.2f} s"
        if "rebuilt_accuracy" in s:
            line += f", test accuracy {s['rebuilt_accuracy']:.4f} -> {s['rebuilt_model']}"
        lines.append(line)
    elif "rebuilt" in s:
        lines.append(f"rebuilt from store  NO: {s.get('rebuild_error', '')}")
    lines.append(f"written to          {s['out']}/ (metrics.jsonl, summary.json, plot.png)")
    out.print("\n".join(lines))


def _figure(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _training_line(s: dict[str, Any]) -> str:
    return (
        f"training    epoch {s.get('epoch', 0):.2f}  loss {_figure(s.get('train_loss'))}"
        f"  eval loss {_figure(s.get('eval_loss'))}  accuracy {_figure(s.get('eval_accuracy'))}"
        f" ({s.get('evals', 0)} evals)"
    )


def _calls_line(calls: dict[str, int]) -> str:
    if not calls:
        return ""
    busiest = sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))
    return "\ncontrol     calls received: " + ", ".join(f"{m} {n:,}" for m, n in busiest)


def _exchange_line(s: dict[str, Any]) -> str:
    started = sum(s.get("exchange_seconds_buckets", ()))
    mean = s.get("exchange_seconds_sum", 0.0) / started * 1000 if started else None
    return (
        (
            f"averaging   mean exchange {_figure(mean, '.1f')} ms  last change norm {_figure(s.get('last_delta_norm'), '.4g')}"
            f"  rate-limited calls: refused {s.get('calls_refused', 0)}, held {s.get('calls_delayed', 0)}"
        )
        + _calls_line(s.get("control_calls") or {})
        + (
            f"\nsend limit  {s['max_send_rate'] * 8 / 1e6:g} Mbit/s: {s.get('paced_bytes', 0):,} bytes sent,"
            f" {s.get('paced_wait_seconds', 0.0):.2f} s waited"
            if s.get("max_send_rate")
            else ""
        )
    )


def status_text(s: dict[str, Any]) -> str:
    state = "resting" if s.get("resting") else "training" if s.get("training") else "serving"
    lines = [
        f"node        {s['node_id']} at {s['address']}"
        + (f", bulk port {s['bulk_port']}" if s.get("bulk_port") else ", no bulk port")
        + f" ({s['phase']}, {state})",
        f"rank        {s['rank']}  topology {s['topology']}  strategy {s['strategy']}"
        + (f"  pipeline {s['pipeline']}" if s.get("pipeline") else ""),
        f"step        {s['step']}  parameters {s['parameters']}  weight {s['weight']:.4g}",
        f"exchanges   ok {s['exchanges_ok']}  served {s['exchanges_served']}  failed {s['exchanges_failed']}"
        f"  declined {s['exchanges_declined']}",
        f"bytes       in {s['bytes_in']}  out {s['bytes_out']}",
        _training_line(s),
        _exchange_line(s),
        f"neighbours  {', '.join(s['neighbours']) or '-'}",
        f"members     {len(s['members'])}",
    ]
    for m in s["members"]:
        lines.append(
            f"  {m['node_id']:<14} {m['address']:<22} {m['state']:<8} rank {m['rank']:>3}"
            # heartbeat: the version's growth; swim: a direct answer (the version only refutes)
            f"  version {m['heartbeat']:>6}, heard {m['seconds_since_heartbeat']:.1f} s ago"
        )
    st = s.get("store")
    if st is not None:
        under = st["under_replicated"]
        lines += [
            f"store       {st['model_id']}: versions {', '.join(f'v{v}' for v in st['versions']) or '-'}"
            f"  (R={st['replication']}, publish every {st['publish_every'] or '-'} steps)",
            f"ring        share {st['ring_share'] * 100:.1f} % of the keys, {st['ring_members']} members,"
            f" {st['vnodes']} points each",
            f"shards      {st['shards_held']} held ({st['bytes_held']:,} bytes), {st['shards_pending']} pending,"
            f" published {st['published']}, repaired {st['repaired']}, corrupt dropped {st['corrupt_dropped']}",
            f"under-replicated  {len(under)}" + (f": {', '.join(under[:8])}" if under else ""),
        ]
        awaiting = st.get("awaiting") or []
        if awaiting or st.get("finished"):
            due = ", ".join(f"v{a['version']} from {a['publisher']}" for a in awaiting) or "-"
            lines.append(f"awaiting    {due}  (finished {st.get('finished', 0)} for silent publishers)")
        for snap in st["snapshots"]:
            held = snap["shards_held"]
            lines.append(f"  {snap['model_id']} v{snap['version']}: {len(held)} shards held {held[:16]}")
    return "\n".join(lines)


def rebuilt_text(info: dict[str, Any]) -> str:
    peers = ", ".join(f"{a} ({n:,} B)" for a, n in info["peers"].items())
    lines = [
        f"rebuilt     {info['model_id']} v{info['version']} (publisher {info['publisher']}, step {info['step']})",
        f"size        {info['parameters']:,} parameters, {info['bytes']:,} bytes in {info['shards']} shards",
        f"time        {info['seconds']:.3f} s ({info['mb_per_s']:.1f} MB/s)",
        f"sha256      {info['sha256']}",
        f"peers       {peers}",
        f"written     {info['out']} ({info['format']})",
    ]
    if info["bad_replicas"]:
        bad = info["bad_replicas"]
        lines.append(f"corrupt     {len(bad)} replicas skipped and reported: {', '.join(bad)}")
    return "\n".join(lines)


def topology_text(info: dict[str, Any], drawing: str | None) -> str:
    lines = [
        f"topology      {info['spec']}",
        f"nodes         {info['nodes']}",
        f"edges         {info['edges']}",
        f"degree        {info['degree_min']}..{info['degree_max']}",
        f"diameter      {info['diameter']}",
        f"mixing rule   {info['rule']}",
        f"|lambda2|     {info['lambda2']:.6f}",
        f"spectral gap  {info['spectral_gap']:.6f}",
    ]
    if drawing:
        lines.append(f"drawing       {drawing}")
    return "\n".join(lines)
