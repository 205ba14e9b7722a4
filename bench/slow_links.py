"""Real nodes over slow links: wall time to a validation-loss target, dense every step against compressed.

    sudo python bench/slow_links.py [--hosts 8] [--rate 50mbit] [--delay-ms 20]
        [--configs "H=1:none,H=1:topk:0.1+int8"] [--gamma 0] [--loopback-rate 50mbit]
        [--model gpt:2:128:4] [--dataset text:stdlib:16] [--batch-size 1] [--steps 400] [--evals 10] [--lr-schedule constant]
        [--lab-send-rate 50mbit] [--shaped-send-rate 45mbit] [--keep DIR]

Every run starts ``--hosts`` ``gossip node`` processes, one per host of the tests'
network lab (``tests/support/netns.py``: network namespaces on one switch, every
host's link shaped to ``--rate`` with tc tbf, ``--delay-ms`` each way through the
lab's delaying relay, no loss), exponential topology, pairwise, the same seed. A
configuration is ``H=<gossip every>[/lag=<max lag>]:<compress spec>`` (``none``: dense;
the max lag, ``--max-lag``, 1 unless given); the first one is the reference. Each node evaluates at its start and ``--evals`` times during its
run; an evaluation's time is when the *last* node made it (seconds since the last node
made its first, so start-up is not counted), its metric the mean validation loss over
nodes. The target is the
reference's final mean loss plus 1 %; time to target is the first evaluation that
meets it. ``--loopback-rate`` repeats the reference on loopback with every node's
``--max-send-rate`` set to that rate (the user-space limit against the shaped link);
``--lab-send-rate`` repeats it in the lab with the same relays and delay but links not
shaped, every node at that ``--max-send-rate``: the limit against tbf with everything
else equal (the relays' CPU, which loopback does not pay, included).

Every node trains ``--steps`` local steps (``--max-steps``). The defaults keep the
link the bottleneck on a small machine: byte-level text with 16 bytes of context and
batches of 1 make a step cheap, while gpt:2:128:4 (470 784 parameters, 1.9 MB a dense
message) takes about 0.3 s per direction at 50 Mbit/s.

The last line printed is JSON: ``speedup`` (reference time to target / the best
compressed configuration's), ``speedup_without_evals`` (the same with each node's
clock leaving out its own evaluations: one of gpt:2:128:4 on 8 192 windows takes a
node 2-3 s of a core, and when the 8 nodes evaluate together, as runs bound by the
cores do, about 7 s of a 2-core machine), and per configuration its time to target
(both clocks), final loss
and gap, bytes sent per node, wall time, the packets each host's tbf dropped
(``tbf_dropped_packets``) and the CPU seconds of the nodes and of the lab's relays
(``nodes_cpu_s``, ``relays_cpu_s``: on one machine the relays, which a real network
does not have, share the cores with the nodes); with ``--lab-send-rate``/``--loopback-rate``, those runs and
their training time (first to last evaluation) over the reference's
(``lab_paced_train_ratio``, ``loopback_train_ratio``); with ``--shaped-send-rate``, the
reference on the shaped links with every node paced at that rate, below the link's, so
its own bursts do not overflow the tbf queue (``shaped_paced_train_ratio``). Root only
(namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import _lab, cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.netns import node_argv  # noqa: E402
from tests.support.procs import read_records  # noqa: E402


def say(msg: str) -> None:
    print(msg, flush=True)


def steps_per_epoch(args: argparse.Namespace) -> int:
    from gossip.train.data import load_dataset, partition

    ds = load_dataset(args.dataset, seed=args.seed)
    parts = partition(ds.y_train, args.hosts, "iid", seed=args.seed)
    return max(math.ceil(len(p) / args.batch_size) for p in parts)


def node_args(args: argparse.Namespace, pace: tuple[int, int], compress: str) -> list[str]:
    """A node's training options; ``pace`` is (gossip every, max lag)."""
    h, lag = pace
    every = args.steps / args.evals / args.steps_per_epoch  # in epochs, as --eval-every takes it
    out = ["--dataset", args.dataset, "--model", args.model, "--batch-size", str(args.batch_size)]
    out += [
        "--epochs",
        "1",
        "--max-steps",
        str(args.steps),
        "--eval-every",
        f"{every:.6g}",
        "--lr",
        str(args.lr),
    ]
    out += ["--topology", "exponential", "--seed", str(args.seed), "--threads", "1", "--publish-every", "0"]
    out += [
        "--gossip-every",
        str(h),
        "--max-lag",
        str(lag),
        "--compress",
        compress,
        "--gamma",
        str(args.gamma),
    ]
    out += ["--wait-for", str(args.hosts), "--exit-when-done", "--lr-schedule", args.lr_schedule]
    return out


def curve(records: list[list[dict[str, Any]]], without_evals: bool = False) -> list[tuple[float, float]]:
    """(seconds from the first evaluation to when the last node made evaluation k, mean loss over
    nodes) for each k, from each node's metrics records: the clock starts once every node has
    loaded and begins training. ``without_evals``: each node's clock leaves out the time its
    own evaluations since the first took (``eval_s``; its training thread waits for them), so
    the seconds are those spent training and exchanging."""
    per_node = []
    for recs in records:
        evals: dict[int, dict[str, Any]] = {}
        for r in recs:
            if "eval" in r and r.get("loss") is not None:
                evals[int(r["eval"])] = r
        per_node.append(evals)
    common = sorted(set.intersection(*(set(e) for e in per_node)))
    t0 = max(e[common[0]]["unix_time"] for e in per_node)

    def clock(e: dict[int, dict[str, Any]], k: int) -> float:
        paused = (
            sum(r.get("eval_s", 0.0) for j, r in e.items() if common[0] < j <= k) if without_evals else 0.0
        )
        return e[k]["unix_time"] - paused

    return [
        (max(clock(e, k) for e in per_node) - t0, sum(e[k]["loss"] for e in per_node) / len(per_node))
        for k in common
    ]


def run_lab(
    args: argparse.Namespace,
    pace: tuple[int, int],
    compress: str,
    work: Path,
    send_rate: str = "",
    shaped: bool = True,
) -> dict[str, Any]:
    """One run in the lab: links shaped to ``--rate`` (or not, ``shaped=False``), every node at
    ``--max-send-rate send_rate`` if given (the relays and their delay the same)."""
    work.mkdir(parents=True)
    with _lab(args.hosts, str(work), delay=args.delay_ms / 1e3, rate=args.rate if shaped else "") as lab:
        procs = []
        t0 = time.time()
        before = _children_cpu_s()
        for host in lab.hosts:
            name = f"n{host.index}"
            argv = [*node_argv(host, lab.hosts), "--metrics", str(work / f"{name}.jsonl")]
            argv += ["--max-send-rate", send_rate] if send_rate else []
            procs.append(lab.start(host, name, [*argv, *node_args(args, pace, compress)]))
        result = _finish(procs, work, t0, args, lambda p: p.popen, lambda p: p.tail())
        result["nodes_cpu_s"] = _children_cpu_s() - before  # the nodes, reaped by _finish
        result["relays_cpu_s"] = sum(_cpu_or_0(p.popen.pid) for p in lab.procs if p.name.startswith("relay"))
        if shaped:
            result["tbf_dropped_packets"] = [tbf_dropped(lab, host) for host in lab.hosts]
        return result


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_or_0(pid: int) -> float:
    """A relay's CPU seconds; 0 for one already gone."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def tbf_dropped(lab: Any, host: Any) -> int | None:
    """Packets the tbf qdisc on ``host``'s link dropped (its queue full) since the lab began."""
    try:
        out = lab.run(host, ["tc", "-s", "qdisc", "show", "dev", "eth0"], timeout=10).stdout
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"dropped (\d+)", out)
    return int(m.group(1)) if m else None


def run_loopback(
    args: argparse.Namespace, pace: tuple[int, int], compress: str, work: Path
) -> dict[str, Any]:
    work.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.time()
    try:
        for i in range(args.hosts):
            argv = [sys.executable, "-m", "gossip", "node", "--node-id", f"l{i}", "--rank", str(i)]
            argv += ["--world-size", str(args.hosts), "--metrics", str(work / f"n{i}.jsonl")]
            argv += ["--ready-file", str(work / f"l{i}.ready"), "--max-send-rate", args.loopback_rate]
            if i:
                argv += ["--seed-file", str(work / "l0.ready")]
            log = (work / f"l{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [*argv, *node_args(args, pace, compress)], stdout=log, stderr=subprocess.STDOUT
                )
            )
        return _finish(procs, work, t0, args, lambda p: p, lambda p: "")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


def _finish(
    procs: list[Any], work: Path, t0: float, args: argparse.Namespace, popen: Any, tail: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + args.run_timeout
    last = time.monotonic()
    for p in procs:
        while popen(p).poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"a node did not finish within {args.run_timeout:.0f} s\n{tail(p)}")
            if time.monotonic() - last > 15:
                last = time.monotonic()
                evals = [
                    sum(1 for r in read_records(f) if "eval" in r) for f in sorted(work.glob("n*.jsonl"))
                ]
                say(f"    {time.time() - t0:.0f} s, evaluations per node {evals}")
            time.sleep(0.5)
        if popen(p).returncode != 0:
            raise SystemExit(f"a node failed ({popen(p).returncode})\n{tail(p)}")
    records = [read_records(work / f"n{i}.jsonl") for i in range(args.hosts)]  # each file read once
    c = curve(records)
    return {
        "curve": c,
        "curve_without_evals": curve(records, without_evals=True),
        "final_loss": c[-1][1],
        "bytes_per_node": sum(r[-1].get("bytes_sent", 0) for r in records) / len(records),
        "wall_s": time.time() - t0,
    }


def train_ratio(run: dict[str, Any] | None, ref: dict[str, Any]) -> float | None:
    """``run``'s training time (first to last evaluation) over the reference's."""
    return run["curve"][-1][0] / ref["curve"][-1][0] if run and ref["curve"][-1][0] > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--configs", default="H=1:none,H=1:topk:0.1+int8")
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument(
        "--loopback-rate", default="", help="also run the reference on loopback at this --max-send-rate"
    )
    ap.add_argument(
        "--lab-send-rate",
        default="",
        help="also run the reference in the lab with unshaped links and every node at this --max-send-rate",
    )
    ap.add_argument(
        "--shaped-send-rate",
        default="",
        help="also run the reference on the shaped links with every node at this --max-send-rate",
    )
    ap.add_argument("--dataset", default="text:stdlib:16")
    ap.add_argument("--model", default="gpt:2:128:4")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--evals", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-timeout", type=float, default=1800.0)
    ap.add_argument("--keep", default="", help="keep every run's metrics and logs under this folder")
    args = ap.parse_args()
    args.steps_per_epoch = steps_per_epoch(args)
    if args.steps > args.steps_per_epoch:
        raise SystemExit(f"--steps {args.steps} is more than an epoch ({args.steps_per_epoch} steps) here")
    configs = []
    for part in args.configs.split(","):
        head, _, spec = part.partition(":")
        m = re.fullmatch(r"H=([0-9]+)(?:/lag=([0-9]+))?", head)
        if m is None or not spec:
            raise SystemExit(f"--configs: expected H=<n>[/lag=<m>]:<compress spec>, got {part!r}")
        configs.append((int(m[1]), int(m[2] or 1), spec))
    rows = []
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise SystemExit(f"--keep {keep}: the folder is not empty")
    with (
        contextlib.nullcontext(str(keep))
        if keep
        else tempfile.TemporaryDirectory(prefix="slow-links-") as tmp
    ):
        for i, (h, lag, spec) in enumerate(configs):
            say(
                f"[{i + 1}/{len(configs)}] H={h} max-lag={lag} compress={spec}: "
                f"{args.hosts} hosts at {args.rate}, {args.delay_ms:g} ms"
            )
            r = run_lab(args, (h, lag), spec, Path(tmp) / f"run{i}")
            rows.append({"H": h, "max_lag": lag, "compress": spec, **r})
            say(
                f"    final loss {r['final_loss']:.4f}, {r['bytes_per_node'] / 1e6:.1f} MB per node, "
                f"{r['wall_s']:.0f} s, CPU seconds: nodes {r['nodes_cpu_s']:.0f}, relays {r['relays_cpu_s']:.0f}"
            )

        def paced_reference(name: str, rate: str, shaped: bool) -> dict[str, Any] | None:
            """The reference again, every node at ``--max-send-rate rate``, links shaped or not."""
            if not rate:
                return None
            say(
                f"reference in the lab, links {'shaped' if shaped else 'not shaped'}, every node at --max-send-rate {rate}"
            )
            run = run_lab(args, configs[0][:2], configs[0][2], Path(tmp) / name, rate, shaped=shaped)
            say(f"    final loss {run['final_loss']:.4f}, {run['bytes_per_node'] / 1e6:.1f} MB per node")
            return run

        paced = paced_reference("lab-paced", args.lab_send_rate, shaped=False)
        under = paced_reference("shaped-paced", args.shaped_send_rate, shaped=True)
        loop = None
        if args.loopback_rate:
            say(f"reference on loopback at --max-send-rate {args.loopback_rate}")
            loop = run_loopback(args, configs[0][:2], configs[0][2], Path(tmp) / "loopback")
            say(f"    final loss {loop['final_loss']:.4f}, {loop['wall_s']:.0f} s")
    target = rows[0]["final_loss"] * 1.01
    for r in rows + [x for x in (paced, under, loop) if x]:
        r["time_to_target_s"] = next((t for t, m in r["curve"] if m <= target), None)
        r["train_time_to_target_s"] = next((t for t, m in r["curve_without_evals"] if m <= target), None)
        r["gap_pct"] = round(100 * (r["final_loss"] / rows[0]["final_loss"] - 1), 3)
    ref_t = rows[0]["time_to_target_s"]
    ok = [r for r in rows[1:] if r["time_to_target_s"] is not None and r["final_loss"] <= target]
    best = min(ok, key=lambda r: r["time_to_target_s"]) if ok else None
    ref_train = rows[0]["train_time_to_target_s"]
    for r in rows:
        say(
            f"H={r['H']} lag {r['max_lag']} {r['compress']}: time to target {r['time_to_target_s']} "
            f"({r['train_time_to_target_s']} without evaluations), final {r['final_loss']:.4f} "
            f"(gap {r['gap_pct']:+.2f} %), {r['bytes_per_node'] / 1e6:.2f} MB/node, wall {r['wall_s']:.0f} s"
        )
    print(
        json.dumps(
            {
                "speedup": (ref_t / best["time_to_target_s"]) if best and ref_t else None,
                "speedup_without_evals": (ref_train / best["train_time_to_target_s"])
                if best and ref_train and best["train_time_to_target_s"]
                else None,
                "best": None if best is None else {k: best[k] for k in ("H", "max_lag", "compress")},
                "target_loss": target,
                "rate": args.rate,
                "delay_ms": args.delay_ms,
                "hosts": args.hosts,
                "model": args.model,
                "dataset": args.dataset,
                "runs": rows,
                "loopback_reference": loop,
                "loopback_wall_ratio": (loop["wall_s"] / rows[0]["wall_s"]) if loop else None,
                "lab_paced_reference": paced,
                "lab_paced_train_ratio": train_ratio(paced, rows[0]),
                "shaped_paced_reference": under,
                "shaped_paced_train_ratio": train_ratio(under, rows[0]),
                "loopback_train_ratio": train_ratio(loop, rows[0]),
            }
        ),
        flush=True,
    )


def _unwind(signum: int, frame: object) -> None:
    """SIGTERM: unwind, so the lab's exit ends the nodes and relays and removes the namespaces
    (a second signal must not cut that short)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("bench/slow_links.py builds network namespaces: run it as root")
    signal.signal(signal.SIGTERM, _unwind)
    signal.signal(signal.SIGINT, _unwind)  # also when started in the background
    main()
