"""The ``gossip`` command: node, simulate, status, topology, consensus, experiment.

The CLI owns the terminal. Bad arguments or config files end with one line on
stderr and exit code 2; an unreachable peer with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NoReturn

from gossip.config import (
    ConfigError,
    GossipConfig,
    NodeConfig,
    SecurityConfig,
    StoreConfig,
    check_address,
    coerce,
    load_toml,
)
from gossip.membership import MembershipConfig
from gossip.train import TrainConfig

if TYPE_CHECKING:
    from gossip.security import Security

# knob -> (section, help). Sections: train, gossip, node, run, sim. One table feeds
# both the flags and the TOML keys, so the two cannot drift apart.
KNOBS: dict[str, tuple[str, str]] = {
    "dataset": ("train", "digits, synthetic[:N] or a path to an .npz file with X and y"),
    "model": ("train", "logreg, mlp, cnn or package.module:factory returning an nn.Module"),
    "partition": ("train", "iid or dirichlet:ALPHA (label skew)"),
    "epochs": ("train", "passes over the node's own data"),
    "batch_size": ("train", "minibatch size"),
    "lr": ("train", "SGD learning rate"),
    "momentum": ("train", "SGD momentum"),
    "weight_decay": ("train", "L2 penalty"),
    "seed": ("train", "seed of the model init, the partition and the shuffling"),
    "lr_schedule": ("train", "cosine (decay to zero over the run) or constant"),
    "eval_every": ("train", "epochs between evaluations (fractional allowed)"),
    "topology": (
        "gossip",
        "ring, torus, hypercube, exponential, one-peer-exponential, complete, star, "
        "random-regular:D, erdos-renyi:P, small-world, random, or a graph file",
    ),
    "strategy": ("gossip", "pairwise (push-pull) or push-sum"),
    "gossip_every": ("gossip", "local steps between exchanges"),
    "max_lag": ("gossip", "steps a node may run ahead of its own exchange in flight before waiting for it"),
    "codec": ("gossip", "raw, fp16 or bf16 on the wire"),
    "chunk_bytes": ("gossip", "stream chunk size in bytes"),
    "exchange_timeout": ("gossip", "base deadline of one exchange in seconds"),
    "listen": ("node", "HOST:PORT to serve on (port 0 picks a free port)"),
    "advertise": ("node", "HOST:PORT others dial, if not the listen address"),
    "peers": ("node", "comma-separated HOST:PORT seeds to join through"),
    "node_id": ("node", "this node's id (default: random)"),
    "rank": ("node", "this node's rank in the topology"),
    "world_size": ("node", "number of ranks in the topology; with --rank picks slice RANK of N of the data"),
    "join_timeout": ("node", "seconds to keep trying the seeds"),
    "suspect_after": ("node", "seconds of silence before a member is suspect (not picked)"),
    "dead_after": (
        "node",
        "seconds of silence before a member is declared dead (raise both on slow or lossy links)",
    ),
    "tls_cert": ("node", "PEM certificate to serve TLS with and to present to peers (with --tls-key)"),
    "tls_key": ("node", "PEM private key of --tls-cert"),
    "tls_ca": ("node", "PEM CA of the cluster: verifies peers and requires their certificates (mutual TLS)"),
    "token_file": ("node", "file holding the shared secret every call must carry"),
    "peer_call_rate": ("node", "control calls per second one peer connection gets; more wait (0 = no limit)"),
    "node_call_rate": (
        "node",
        "control calls per second all connections get together, shared among those calling "
        "(0 = per connection only; raise it for clusters of hundreds of nodes)",
    ),
    "metrics": ("run", "append metrics as JSON lines to this file"),
    "wait_for": ("run", "nodes (this one included) to wait for before training"),
    "exit_when_done": ("run", "exit after training instead of serving on"),
    "threads": ("run", "torch threads"),
    "dump_params": ("run", "save flat parameters at every evaluation into this folder"),
    "ready_file": ("run", "write the bound address to this file once serving"),
    "seed_file": ("run", "another node's --ready-file: wait for it, then join through that node"),
    "init_from_network": (
        "run",
        "start from the newest snapshot in the model store, not the initial weights",
    ),
    "replication": ("store", "copies of every snapshot shard, on its ring owners"),
    "publish_every": ("store", "steps between published snapshots (0: never)"),
    "shard_bytes": ("store", "snapshot shard size in bytes"),
    "keep_versions": ("store", "snapshot versions kept per model"),
    "model_id": ("store", "name snapshots are published under (default: the --model name)"),
    "nodes": ("sim", "number of node processes"),
    "out": ("sim", "output folder (default runs/<timestamp>)"),
    "baseline": ("sim", "also train centrally on the union of the data and report the gap"),
    "kill": ("sim", "N@STEP: SIGKILL N random nodes when rank 0 reaches STEP, then rebuild from survivors"),
    "reconstruct": (
        "sim",
        "after the run, rebuild the model from the store, save it and report its accuracy",
    ),
    "churn": (
        "sim",
        "kills per node per minute: while the nodes train, SIGKILL a random one at Poisson times "
        "(RATE x nodes / 60 per second, drawn from --seed; at most a quarter of the nodes down at once) "
        "and restart it on its address and rank after --churn-downtime, from the newest snapshot if "
        "the store publishes (--publish-every > 0), else from scratch; 0 = off",
    ),
    "churn_downtime": (
        "sim",
        "seconds a churned node stays down before it rejoins (longer if its process starts slower)",
    ),
}

NODE_KNOBS = [k for k, (sec, _) in KNOBS.items() if sec in ("train", "gossip", "node", "run", "store")]
SIM_KNOBS = [k for k, (sec, _) in KNOBS.items() if sec in ("train", "gossip", "sim", "store")] + ["threads"]

_BOOL_KNOBS = {"exit_when_done", "baseline", "init_from_network", "reconstruct"}


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in (TrainConfig, GossipConfig, NodeConfig, SecurityConfig, StoreConfig, MembershipConfig):
        obj = cls()
        for f in fields(cls):
            if f.name in KNOBS:
                out[f.name] = getattr(obj, f.name)
    out.update(
        metrics="",
        wait_for=0,
        exit_when_done=False,
        threads=1,
        dump_params="",
        ready_file="",
        seed_file="",
        nodes=8,
        out="",
        baseline=False,
        advertise="",
        node_id="",
        init_from_network=False,
        kill="",
        reconstruct=False,
        churn=0.0,
        churn_downtime=2.0,
    )
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the user sees what is wrong at once.
        self.exit(2, f"gossip: error: {message} (see --help)\n")


def _add_knobs(p: argparse.ArgumentParser, names: Sequence[str], overrides: dict[str, Any]) -> None:
    defaults = {**_defaults(), **overrides}
    for name in names:
        flag = "--" + name.replace("_", "-")
        help_text = KNOBS[name][1]
        default = defaults[name]
        if name in _BOOL_KNOBS:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            continue
        kind: Any = type(default) if default is not None and not isinstance(default, tuple) else str
        if default not in (None, "", ()):
            help_text += f" (default: {default})"
        p.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(), help=help_text)
    p.add_argument(
        "--config", dest="config", default=None, metavar="FILE.toml", help="the same knobs as a TOML file"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _resolve(args: argparse.Namespace, names: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """defaults < config file < flags; config keys are checked against this command's knobs."""
    defaults = {**_defaults(), **overrides}
    values = {n: defaults[n] for n in names}
    if args.config:
        for key, value in load_toml(args.config).items():
            if key not in values:
                raise ConfigError(f"config file {args.config}: unknown key {key!r}")
            values[key] = coerce(key, value, defaults[key])
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            values[n] = v
    if isinstance(values.get("peers"), str):
        values["peers"] = tuple(p.strip() for p in values["peers"].split(",") if p.strip())
    return values


def _train_config(v: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**{f.name: v[f.name] for f in fields(TrainConfig) if f.name in v})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _gossip_config(v: dict[str, Any]) -> GossipConfig:
    g = GossipConfig(**{f.name: v[f.name] for f in fields(GossipConfig) if f.name in v})
    g.validate()
    return g


def _store_config(v: dict[str, Any]) -> StoreConfig:
    st = StoreConfig(**{f.name: v[f.name] for f in fields(StoreConfig) if f.name in v})
    st.validate()
    return st


def add_client_security(p: argparse.ArgumentParser) -> None:
    """The options of a command that calls a node (status, reconstruct): TLS and the token."""
    p.add_argument("--tls-ca", default="", metavar="FILE", help="PEM CA to verify the node with (TLS)")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate to present (mutual TLS)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default="", metavar="FILE", help="file holding the cluster's token")


def client_security(args: argparse.Namespace) -> Security:
    """What :func:`add_client_security`'s options ask for; ConfigError (exit 2) on a bad file."""
    from gossip.security import load as load_security

    cfg = SecurityConfig(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, token_file=args.token_file
    )
    return load_security(cfg, serving=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gossip", description="Peer-to-peer gossip SGD over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "node", help="run one node for real", description="Run one node: join, train, gossip, serve."
    )
    _add_knobs(p, NODE_KNOBS, {})

    p = sub.add_parser("simulate", help="run N node processes on this machine")
    _add_knobs(p, SIM_KNOBS, {"topology": "exponential"})

    p = sub.add_parser("status", help="ask a node for its view of the network")
    p.add_argument("--peer", required=True, metavar="HOST:PORT")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--timeout", type=float, default=3.0)
    add_client_security(p)

    p = sub.add_parser(
        "reconstruct",
        help="rebuild the model from the shard store through one peer",
        description="Find the newest complete snapshot through one peer, fetch its shards from their "
        "owners in parallel, check every digest and write the state_dict. Exit 1 when no complete "
        "snapshot can be rebuilt.",
    )
    p.add_argument("--peer", required=True, metavar="HOST:PORT", help="any node of the network")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the state_dict")
    p.add_argument("--model-id", default="", help="model to rebuild (default: the peer's own)")
    p.add_argument("--version", default="latest", help="latest (newest complete) or a version number")
    p.add_argument(
        "--format", default=None, choices=("pt", "safetensors"), help="default: from --out's suffix"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--timeout", type=float, default=10.0, help="base deadline of each call in seconds")
    add_client_security(p)

    p = sub.add_parser("topology", help="describe a topology")
    p.add_argument("name", help="topology name or graph file")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--rule", default="metropolis", choices=("metropolis", "uniform"))
    p.add_argument("--draw", metavar="FILE.png", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "consensus",
        help="gossip averaging of random vectors: measured vs theoretical rate",
        description="Average random vectors by gossip (no training) and compare the measured "
        "per-round contraction of the consensus distance with |lambda2(W)|^2.",
    )
    p.add_argument("--topology", required=True, help="topology name or graph file")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (a graph file sets its own)")
    p.add_argument(
        "--rounds",
        type=int,
        default=100,
        help="rounds (default: 100); the rate is fitted over the last half, so a graph whose "
        "|lambda2|^2 is 1 - g wants about 5/g rounds",
    )
    p.add_argument("--strategy", default="sync", choices=("sync", "pairwise", "push-sum"))
    p.add_argument("--rule", default="metropolis", choices=("metropolis", "uniform"))
    p.add_argument("--dim", type=int, default=16, help="length of each node's random vector")
    p.add_argument("--seed", type=int, default=0, help="seed of the vectors, the matchings and random graphs")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a message is lost")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser(
        "experiment",
        help="run a grid of simulations from a TOML file",
        description="Run the grid of an experiment file on the vectorized simulator; write results.csv, "
        "summary.md and plots.",
    )
    p.add_argument("file", metavar="FILE.toml", help="experiment file, e.g. simulations/topologies.toml")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default runs/<name>-<timestamp>)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return parser


def _setup_logging(verbose: int, default: int = logging.WARNING) -> None:
    level = default if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def cmd_node(args: argparse.Namespace) -> int:
    from gossip.node import JoinError
    from gossip.runner import RunOptions, run_node
    from gossip.security import load as load_security

    v = _resolve(args, NODE_KNOBS, {})
    train = _train_config(v)
    config = NodeConfig(
        listen=v["listen"],
        advertise=v["advertise"] or None,
        peers=tuple(v["peers"]),
        node_id=v["node_id"] or None,
        rank=v["rank"],
        world_size=v["world_size"],
        join_timeout=v["join_timeout"],
        security=SecurityConfig(
            tls_cert=v["tls_cert"],
            tls_key=v["tls_key"],
            tls_ca=v["tls_ca"],
            token_file=v["token_file"],
            peer_call_rate=v["peer_call_rate"],
            node_call_rate=v["node_call_rate"],
            node_call_burst=max(1, round(2 * v["node_call_rate"])),
        ),
        gossip=_gossip_config(v),
        membership=MembershipConfig(suspect_after=v["suspect_after"], dead_after=v["dead_after"]),
        store=_store_config(v),
    )
    config.validate()
    if (config.rank >= 0) != (config.world_size > 0):
        raise ConfigError("--rank and --world-size go together")
    # Unreadable or unusable files: exit 2 now, not after the data has loaded.
    load_security(config.security, serving=True)
    opts = RunOptions(
        metrics=v["metrics"] or None,
        dump_params=v["dump_params"] or None,
        ready_file=v["ready_file"] or None,
        seed_file=v["seed_file"] or None,
        wait_for=v["wait_for"],
        exit_when_done=bool(v["exit_when_done"]),
        threads=v["threads"],
        init_from_network=bool(v["init_from_network"]),
    )
    _setup_logging(args.verbose, logging.INFO)
    try:
        return asyncio.run(run_node(train, config, opts))
    except JoinError as exc:
        print(f"gossip node: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gossip node: {exc}", file=sys.stderr)
        return 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from gossip.sim.cluster import SimulateConfig, SimulationError, run_simulation

    v = _resolve(args, SIM_KNOBS, {"topology": "exponential"})
    train = _train_config(v)
    gossip = _gossip_config(v)
    if v["nodes"] < 1:
        raise ConfigError("--nodes must be at least 1")
    if gossip.topology != "random":
        from gossip.topology import Topology, TopologyError

        try:
            Topology.parse(gossip.topology, v["nodes"])
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None
    from gossip.sim.churn import check_churn
    from gossip.sim.rebuild import parse_kill

    parse_kill(v["kill"], v["nodes"])
    check_churn(v["churn"], v["churn_downtime"], v["nodes"], v["kill"])
    sim = SimulateConfig(
        nodes=v["nodes"],
        out=v["out"] or None,
        baseline=bool(v["baseline"]),
        threads=v["threads"],
        store=_store_config(v),
        kill=v["kill"],
        reconstruct=bool(v["reconstruct"]),
        churn=v["churn"],
        churn_downtime=v["churn_downtime"],
    )
    _setup_logging(args.verbose)
    bar = _ProgressLine()
    try:
        summary = run_simulation(train, gossip, sim, progress=bar)
    except SimulationError as exc:
        bar.close()
        print(f"gossip simulate: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(_summary_table(summary))
    return 0


class _ProgressLine:
    """One updating line on a terminal; a line every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, fraction: float, text: str) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < 5.0:
            return
        self.last = now
        filled = int(fraction * 30)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}%  {now - self.t0:6.1f} s  {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _summary_table(s: dict[str, Any]) -> str:
    lines = [f"{'node':>4}  {'accuracy':>8}  {'bytes sent':>12}  {'exchanges':>9}"]
    for i, acc in enumerate(s["accuracies"]):
        rank = s["ranks"][i] if "ranks" in s else i
        lines.append(f"{rank:>4}  {acc:>8.4f}  {s['bytes_sent_per_node'][i]:>12,}  {s['exchanges'][i]:>9}")
    cd = s["consensus_distance"]
    lines += [
        "",
        f"nodes               {s['nodes']} ({s['topology']}, {s['strategy']})",
        f"mean accuracy       {s['mean_accuracy']:.4f} (min {s['min_accuracy']:.4f})",
        f"consensus distance  {cd:.3e}" if cd is not None else "consensus distance  n/a",
        f"bytes sent          {s['bytes_sent']:,}",
        f"wall time           {s['wall_seconds']:.1f} s",
    ]
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
    return "\n".join(lines)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from gossip.reconstruct import SnapshotUnavailable, fetch_snapshot, format_rebuilt, rebuilt_to_json, save
    from gossip.rpc import PeerClient

    check_address(args.peer, "--peer")
    if args.version != "latest" and not (args.version.isascii() and args.version.isdigit()):
        raise ConfigError(f"--version must be latest or a number, got {args.version!r}")
    version = None if args.version == "latest" else int(args.version)
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "pt")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be > 0")
    sec = client_security(args)

    async def rebuild() -> Any:
        client = PeerClient(sec.channel_credentials, sec.metadata)
        try:
            return await fetch_snapshot(args.peer, args.model_id, version, args.timeout, client)
        finally:
            await client.close()

    try:
        rebuilt = asyncio.run(rebuild())
        save(rebuilt, args.out, fmt)
    except (ConnectionError, SnapshotUnavailable, OSError) as exc:
        if args.json:
            missing = getattr(exc, "missing", {})
            print(json.dumps({"error": str(exc), "missing": {str(k): v for k, v in missing.items()}}))
        print(f"gossip reconstruct: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(rebuilt_to_json(rebuilt, args.out, fmt))
        if args.json
        else format_rebuilt(rebuilt, args.out, fmt)
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gossip.status import fetch_status, format_status

    check_address(args.peer, "--peer")
    try:
        status = asyncio.run(fetch_status(args.peer, args.timeout, client_security(args)))
    except ConnectionError as exc:
        print(f"gossip status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=None if args.json else 2) if args.json else format_status(status))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from gossip.topology import Topology, TopologyError, describe, draw

    try:
        top = Topology.parse(args.name, args.nodes, seed=args.seed)
        info = describe(top, args.rule)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    if args.draw:
        draw(top, args.draw)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"topology      {info['spec']}")
        print(f"nodes         {info['nodes']}")
        print(f"edges         {info['edges']}")
        print(f"degree        {info['degree_min']}..{info['degree_max']}")
        print(f"diameter      {info['diameter']}")
        print(f"mixing rule   {info['rule']}")
        print(f"|lambda2|     {info['lambda2']:.6f}")
        print(f"spectral gap  {info['spectral_gap']:.6f}")
        if args.draw:
            print(f"drawing       {args.draw}")
    return 0


def cmd_consensus(args: argparse.Namespace) -> int:
    from gossip.sim.consensus import format_result, run_consensus
    from gossip.topology import Topology, TopologyError

    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if args.dim < 1:
        raise ConfigError(f"--dim must be at least 1, got {args.dim}")
    if not 0.0 <= args.loss < 1.0:
        raise ConfigError(f"--loss must be in [0, 1), got {args.loss}")
    try:
        top = Topology.parse(args.topology, args.nodes, seed=args.seed)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    if top.n < 2:
        raise ConfigError(f"consensus needs at least 2 nodes, got {top.n}")
    result = run_consensus(top, args.rounds, args.strategy, args.rule, args.seed, args.dim, args.loss)
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from gossip.sim.experiment import load_experiment, run_experiment

    _setup_logging(args.verbose)
    exp = load_experiment(args.file)
    out = args.out or os.path.join("runs", f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"experiment {exp.name}: {len(exp.configs())} runs, writing to {out}/", file=sys.stderr)
    bar = _ProgressLine()
    try:
        run_experiment(exp, out, progress=bar)
    finally:
        bar.close()
    with open(os.path.join(out, "summary.md")) as fh:
        print(fh.read(), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "node": cmd_node,
        "simulate": cmd_simulate,
        "status": cmd_status,
        "reconstruct": cmd_reconstruct,
        "topology": cmd_topology,
        "consensus": cmd_consensus,
        "experiment": cmd_experiment,
    }
    from gossip.data import DataError
    from gossip.models import ModelError
    from gossip.params import LayoutError

    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, LayoutError) as exc:
        print(f"gossip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gossip: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point.

    A process that used grpc.aio spends seconds in gRPC's own shutdown at
    interpreter exit (grpc/grpc#38679), and ``gossip simulate`` stops N of them
    at once. Everything of ours is closed by the time ``main`` returns, so the
    node and status commands flush and leave with ``os._exit``.

    gRPC's core logs to stderr on its own (a failed bind, for one), beside our one
    line; it stays quiet unless GRPC_VERBOSITY asks otherwise.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in ("node", "status", "reconstruct"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
