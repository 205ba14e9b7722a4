"""What each ``gossip`` subcommand does once its arguments parsed.

Every command checks its inputs (paths it will write, files and specs it will
load) before it starts any work; a bad one is a ConfigError: one line, exit 2,
nothing left behind. Heavy modules (torch, gRPC) load here, per command, so
``--help``, ``status``, ``topology`` and ``reconstruct`` never load torch.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip.cli import checks, knobs, output
from gossip.config import ConfigError
from gossip.core.addresses import check_address


def setup_logging(verbose: int, default: int = logging.WARNING) -> None:
    level = default if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _client_security(args: argparse.Namespace) -> Any:
    from gossip.transport.security import load

    return load(knobs.client_security_config(args), serving=False)


def node(args: argparse.Namespace) -> int:
    v = knobs.resolve(args, knobs.NODE_KNOBS, {})
    train = knobs.train_config(v)
    config = knobs.node_config(v)
    opts = knobs.run_options(v)
    for what, path in (("--metrics", opts.metrics), ("--ready-file", opts.ready_file)):
        if path:
            checks.output_file(path, what)
    if opts.dump_params:
        checks.output_folder(opts.dump_params, "--dump-params")
    from gossip.cluster.runner import run_node
    from gossip.node.members import JoinError
    from gossip.transport.security import load

    # Unreadable or unusable files: exit 2 now, not after the data has loaded.
    load(config.security, serving=True)
    setup_logging(args.verbose, logging.INFO)
    checks.training_specs(train.dataset, train.model, train.partition, max(config.world_size, 1), train.seed)
    try:
        return asyncio.run(run_node(train, config, opts))
    except (JoinError, OSError) as exc:
        output.print_failure("node", str(exc))
        return 1


def simulate(args: argparse.Namespace) -> int:
    v = knobs.resolve(args, knobs.SIM_KNOBS, knobs.SIM_DEFAULTS)
    train = knobs.train_config(v)
    gossip = knobs.gossip_config(v)
    sim = knobs.simulate_config(v)
    if sim.out:
        checks.output_folder(sim.out, "--out")
    else:
        checks.output_folder("runs", "the output folder")
    if args.dashboard:
        check_address(args.dashboard, "--dashboard")
    from gossip.cluster.churn import check_churn
    from gossip.cluster.rebuild import parse_kill

    parse_kill(sim.kill, sim.nodes)
    check_churn(sim.churn, sim.churn_downtime, sim.nodes, sim.kill)
    if gossip.topology != "random":
        from gossip.core.topology import Topology, TopologyError

        try:
            Topology.parse(gossip.topology, sim.nodes)
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None
    setup_logging(args.verbose)
    with output.busy(f"checking {train.dataset}, {train.model} and the {train.partition} partition"):
        checks.training_specs(train.dataset, train.model, train.partition, sim.nodes, train.seed)
    bar = output.ProgressLine("simulate")
    from gossip.cluster.board import DashboardProcess
    from gossip.cluster.local import output_folder, run_simulation

    sim = dataclasses.replace(sim, out=str(output_folder(sim)))
    boards: list[DashboardProcess] = []

    def serving(nodes: list[dict[str, Any]]) -> None:
        if sim.prometheus:
            lines = [f"  node {n['rank']}: http://{n['prometheus']}/metrics" for n in nodes]
            output.err.print("Prometheus metrics:\n" + "\n".join(lines), markup=False)
        if args.dashboard:
            boards.append(DashboardProcess(nodes[0]["address"], args.dashboard, Path(str(sim.out))))
            output.err.print(f"dashboard: {boards[-1].start()}", markup=False)

    try:
        return _run_cluster(
            "simulate", bar, lambda: run_simulation(train, gossip, sim, progress=bar, serving=serving)
        )
    finally:
        for board in boards:
            board.stop()


def _run_cluster(what: str, bar: output.ProgressLine, run: Callable[[], dict[str, Any]]) -> int:
    """Run a launcher behind its progress line: the summary table and 0, or one line for a failed run
    (1) or Ctrl-C (130, with the partial summary when the launcher wrote one)."""
    from gossip.cluster.procs import SimulationError

    try:
        summary = run()
    except SimulationError as exc:
        bar.close()
        output.print_failure(what, str(exc))
        return 1
    except KeyboardInterrupt as stop:
        bar.close()
        partial = stop.args[0] if stop.args and isinstance(stop.args[0], dict) else None
        if partial is not None:
            output.simulate_table(partial)
        output.print_failure(what, "interrupted" + (" (partial summary written)" if partial else ""))
        return 130
    bar.close()
    output.simulate_table(summary)
    return 0


def launch(args: argparse.Namespace) -> int:
    v = knobs.resolve(args, knobs.LAUNCH_KNOBS, knobs.SIM_DEFAULTS)
    v = {**knobs.defaults(), **knobs.SIM_DEFAULTS, **v}
    train = knobs.train_config(v)
    gossip = knobs.gossip_config(v)
    sim = knobs.simulate_config(v)
    if args.ray not in ("", "auto"):
        check_address(args.ray, "--ray")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not args.placement_timeout > 0:
        raise ConfigError(f"--placement-timeout must be > 0, got {args.placement_timeout}")
    checks.output_folder(sim.out or "runs", "--out" if sim.out else "the output folder")
    if gossip.topology != "random":
        from gossip.core.topology import Topology, TopologyError

        try:
            Topology.parse(gossip.topology, sim.nodes)
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None
    from gossip.cluster.ray_launch import RayMissing, import_ray

    try:
        import_ray()
    except RayMissing as exc:
        raise ConfigError(str(exc)) from None
    setup_logging(args.verbose)
    with output.busy(f"checking {train.dataset}, {train.model} and the {train.partition} partition"):
        checks.training_specs(train.dataset, train.model, train.partition, sim.nodes, train.seed)
    from gossip.cluster.local import output_folder
    from gossip.cluster.ray_launch import run_launch

    sim = dataclasses.replace(sim, out=str(output_folder(sim)))
    bar = output.ProgressLine("launch")
    return _run_cluster(
        "launch",
        bar,
        lambda: run_launch(
            train, gossip, sim, args.ray, args.max_restarts, args.placement_timeout, progress=bar
        ),
    )


def reconstruct(args: argparse.Namespace) -> int:
    check_address(args.peer, "--peer")
    if args.version != "latest" and not (args.version.isascii() and args.version.isdigit()):
        raise ConfigError(f"--version must be latest or a number, got {args.version!r}")
    version = None if args.version == "latest" else int(args.version)
    if not args.timeout > 0:
        raise ConfigError("--timeout must be > 0")
    from gossip.store.files import OutputError, output_format, save
    from gossip.store.reconstruct import SnapshotUnavailable, fetch_snapshot
    from gossip.transport.channels import Channels

    try:
        fmt = output_format(args.out, args.format)
    except OutputError as exc:
        raise ConfigError(str(exc)) from None
    checks.output_file(args.out, "--out")
    sec = _client_security(args)

    async def rebuild() -> Any:
        channels = Channels(sec.channel_credentials, sec.metadata)
        try:
            return await fetch_snapshot(args.peer, args.model_id, version, args.timeout, channels)
        finally:
            await channels.close()

    try:
        rebuilt = asyncio.run(rebuild())
        save(rebuilt, args.out, fmt)
    except (ConnectionError, SnapshotUnavailable, OSError) as exc:
        if args.json:
            missing = getattr(exc, "missing", {})
            print(json.dumps({"error": str(exc), "missing": {str(k): val for k, val in missing.items()}}))
        output.print_failure("reconstruct", str(exc))
        return 1
    info = {**rebuilt.to_json(), "out": str(args.out), "format": fmt}
    print(json.dumps(info) if args.json else output.rebuilt_text(info))
    return 0


def status(args: argparse.Namespace) -> int:
    check_address(args.peer, "--peer")
    if not args.timeout > 0:
        raise ConfigError("--timeout must be > 0")
    from gossip.observe.status import fetch_status

    try:
        found = asyncio.run(fetch_status(args.peer, args.timeout, _client_security(args)))
    except ConnectionError as exc:
        output.print_failure("status", str(exc))
        return 1
    print(json.dumps(found) if args.json else output.status_text(found))
    return 0


def dashboard(args: argparse.Namespace) -> int:
    check_address(args.peer, "--peer")
    check_address(args.listen, "--listen")
    if args.ready_file:
        checks.output_file(args.ready_file, "--ready-file")
    if not args.timeout > 0:
        raise ConfigError("--timeout must be > 0")
    if not 0.1 <= args.interval <= 3600:
        raise ConfigError(f"--interval must be between 0.1 and 3600 seconds, got {args.interval}")
    sec = _client_security(args)
    setup_logging(args.verbose)
    from gossip.observe.dashboard import serve_dashboard

    def ready(url: str) -> None:
        print(f"dashboard of the cluster of {args.peer} at {url} (Ctrl-C to stop)", flush=True)
        if args.ready_file:
            from gossip.cluster.sysutil import write_atomic

            write_atomic(Path(args.ready_file), json.dumps({"url": url}))

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await serve_dashboard(
            args.peer, args.listen, interval=args.interval, timeout=args.timeout, security=sec, on_ready=ready
        )

    try:
        asyncio.run(serve())
    except (ConnectionError, OSError) as exc:
        output.print_failure("dashboard", str(exc))
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: stopped, cleanly
        return 0
    return 0


def topology(args: argparse.Namespace) -> int:
    if args.draw:
        checks.output_file(args.draw, "--draw")
    from gossip.core.spectral import describe, draw
    from gossip.core.topology import Topology, TopologyError

    try:
        top = Topology.parse(args.name, args.nodes, seed=args.seed)
        info = describe(top, args.rule)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    if args.draw:
        draw(top, args.draw)
    print(json.dumps(info) if args.json else output.topology_text(info, args.draw))
    return 0


def consensus(args: argparse.Namespace) -> int:
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if args.dim < 1:
        raise ConfigError(f"--dim must be at least 1, got {args.dim}")
    if not 0.0 <= args.loss < 1.0:
        raise ConfigError(f"--loss must be in [0, 1), got {args.loss}")
    if args.gamma is not None and not 0 < args.gamma <= 1:
        raise ConfigError(f"--gamma must be in (0, 1], got {args.gamma}")
    if args.compress.strip().lower() not in ("", "none") and (args.strategy != "sync" or args.loss):
        raise ConfigError("--compress runs CHOCO-Gossip on sync rounds: use --strategy sync and no --loss")
    from gossip.core.topology import Topology, TopologyError
    from gossip.sim.consensus import format_result, run_consensus

    try:
        top = Topology.parse(args.topology, args.nodes, seed=args.seed)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    if top.n < 2:
        raise ConfigError(f"consensus needs at least 2 nodes, got {top.n}")
    from gossip.core.compress import CompressError, Compressor

    try:
        Compressor.parse(args.compress)
    except CompressError as exc:
        raise ConfigError(f"--compress: {exc}") from None
    try:
        result = run_consensus(
            top,
            args.rounds,
            args.strategy,
            args.rule,
            args.seed,
            args.dim,
            args.loss,
            args.compress,
            args.gamma,
        )
    except FloatingPointError as exc:
        print(f"gossip consensus: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0


def experiment(args: argparse.Namespace) -> int:
    checks.input_file(args.file, "experiment file")
    if args.out:
        checks.output_folder(args.out, "--out")
    from gossip.sim.experiment import load_experiment, run_experiment
    from gossip.sim.report import write_report

    setup_logging(args.verbose)
    exp = load_experiment(args.file)
    out = args.out or os.path.join("runs", f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.out:
        checks.output_folder(out, "the output folder")
    output.err.print(f"experiment {exp.name}: {len(exp.configs())} runs, writing to {out}/")
    bar = output.ProgressLine("experiment")
    try:
        results = run_experiment(exp, out, progress=bar)
    finally:
        bar.close()
    write_report(exp, results, Path(out))
    with open(os.path.join(out, "summary.md")) as fh:
        print(fh.read(), end="")
    return 0
