"""The knobs of ``gossip node`` and ``gossip simulate``: one table for flags, TOML keys and help.

Each knob names the config dataclass field it sets; its default is that field's
default (shown in ``--help``), so the flags, the config files and the code
cannot drift apart. Torch-free: ``--help`` loads nothing heavy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from gossip.config import (
    ConfigError,
    GossipConfig,
    NodeConfig,
    RunOptions,
    SecurityConfig,
    SimulateConfig,
    StoreConfig,
    TrainConfig,
)
from gossip.configfile import coerce, load_toml
from gossip.core.membership import MembershipConfig

# knob -> (section, help). Sections: train, gossip, node, link (node and sim), run, store, sim.
KNOBS: dict[str, tuple[str, str]] = {
    "dataset": (
        "train",
        "digits, synthetic[:N], text:stdlib[:CONTEXT] (next-byte prediction on this Python's standard "
        "library source) or a path to an .npz file with X and y",
    ),
    "model": (
        "train",
        "logreg, mlp, cnn, gpt:LAYERS:DIM:HEADS (a small causal transformer, for text:stdlib) or "
        "package.module:factory returning an nn.Module",
    ),
    "partition": ("train", "iid or dirichlet:ALPHA (label skew)"),
    "epochs": ("train", "passes over the node's own data"),
    "batch_size": ("train", "minibatch size"),
    "lr": ("train", "SGD learning rate"),
    "momentum": ("train", "SGD momentum"),
    "weight_decay": ("train", "L2 penalty"),
    "seed": ("train", "seed of the model init, the partition and the shuffling"),
    "lr_schedule": ("train", "cosine (decay to zero over the run) or constant"),
    "eval_every": ("train", "epochs between evaluations (fractional allowed)"),
    "max_steps": (
        "train",
        "stop after this many local steps if the epochs have not ended first (0: epochs decide)",
    ),
    "min_step_time": (
        "train",
        "seconds each local step takes at least: a slower device or a straggler emulated on one "
        "machine (0: as fast as it goes)",
    ),
    "topology": (
        "gossip",
        "ring, torus, hypercube, exponential, one-peer-exponential, complete, star, "
        "random-regular:D, erdos-renyi:P, small-world, random, or a graph file",
    ),
    "strategy": ("gossip", "pairwise (push-pull) or push-sum"),
    "gossip_every": ("gossip", "local steps between exchanges"),
    "outer": (
        "gossip",
        "outer optimizer at each own exchange: none, or nesterov:LR:MOMENTUM on the averaged pseudo-gradient "
        "(with --gossip-every H: DiLoCo-style local steps; nesterov:0.7:0.9 is DiLoCo's; pairwise only)",
    ),
    "compress": (
        "gossip",
        "compressed exchanges with error feedback (CHOCO-style, pairwise only): none, fp16, bf16, int8, int4, "
        "sign, topk:F, randk:F, or a sparsifier + a coder such as topk:0.01+int8 (two model copies per "
        "neighbour; see the docs' slow-links page)",
    ),
    "gamma": (
        "gossip",
        "with --compress: the consensus step per exchange, in (0, 1] (0: the compressor's default, fitted to "
        "pure consensus; while training, 0.6-1 did better for sign and topk:0.1+int8 on digits)",
    ),
    "max_lag": ("gossip", "steps a node may run ahead of its own exchange in flight before waiting for it"),
    "codec": ("gossip", "raw, fp16 or bf16 on the wire"),
    "chunk_bytes": (
        "gossip",
        "stream chunk size in bytes (0: auto, 4 MiB, or under --max-send-rate what that rate sends in 0.2 s)",
    ),
    "exchange_timeout": ("gossip", "base deadline of one exchange in seconds"),
    "idle_pause": ("gossip", "after training: seconds between averaging-only exchanges at first (0: none)"),
    "rest_pause": ("gossip", "after training: the longest pause once exchanges no longer move the model"),
    "listen": ("node", "HOST:PORT to serve on (port 0 picks a free port)"),
    "advertise": ("node", "HOST:PORT others dial (default: the listen address)"),
    "bulk_port": (
        "node",
        "plain-TCP port for exchanges, pushes and shard transfers on the listen host, faster than gRPC "
        "(0: any free port, which peers learn from the node's status; -1: everything over gRPC; "
        "with TLS everything stays on gRPC)",
    ),
    "peers": ("node", "comma-separated HOST:PORT seeds to join through (none: wait for others to join)"),
    "node_id": ("node", "this node's id (default: random)"),
    "rank": ("node", "this node's rank in the topology (default: none, for topology random)"),
    "world_size": ("node", "number of ranks; with --rank the node trains on slice RANK of N of the data"),
    "join_timeout": ("node", "seconds to keep trying the seeds"),
    "suspect_after": (
        "node",
        "heartbeat: seconds of silence before a member is suspect (not picked); swim: the most a probe "
        "may take below the 2 s call deadline (at least 1 s)",
    ),
    "dead_after": (
        "node",
        "heartbeat: seconds of silence before a member is declared dead; swim: dead_after - suspect_after "
        "is the shortest suspicion before a death (raise both on slow links)",
    ),
    "member_protocol": (
        "link",
        "swim (the default: probes and piggybacked news, traffic per node flat in the cluster size; a "
        "suspect is dead after dead_after - suspect_after s without refuting) or heartbeat (whole member "
        "tables swapped, silence judged: nodes from before 2026-12-02); every node of a cluster the same",
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
    "max_send_rate": (
        "link",
        "the most a node sends, all calls together, e.g. 50mbit (bits/s) or 5mbps (bytes/s), tc's units; "
        "keeps gossip off a shared link's capacity, and makes slow links reproducible on one machine "
        "(deadlines stretch to match; give every node the same rate)",
    ),
    "metrics": ("run", "append metrics as JSON lines to this file"),
    "wait_for": (
        "run",
        "nodes (this one included) to wait for before training (default: 2 without --peers, so the "
        "first node waits for a second one; 1 = start at once)",
    ),
    "wait_timeout": ("run", "seconds to wait for them before training anyway"),
    "exit_when_done": ("run", "exit after training instead of serving on"),
    "threads": ("run", "torch threads"),
    "dump_params": ("run", "save flat parameters at every evaluation into this folder"),
    "ready_file": ("run", "write the bound address to this file once serving"),
    "seed_file": ("run", "another node's --ready-file: wait for it, then join through that node"),
    "init_from_network": (
        "run",
        "start from the newest snapshot in the model store, not the initial weights",
    ),
    "prometheus": (
        "run",
        "serve Prometheus metrics at http://HOST:PORT/metrics (PORT or :PORT: on 127.0.0.1; port 0 "
        "picks a free one, logged and in --ready-file; see the docs' metrics page)",
    ),
    "replication": ("store", "copies of every snapshot shard, on its ring owners"),
    "publish_every": ("store", "steps between published snapshots (0: never)"),
    "shard_bytes": ("store", "snapshot shard size in bytes"),
    "keep_versions": ("store", "snapshot versions kept per model"),
    "model_id": ("store", "name snapshots are published under (default: the --model name)"),
    "data_dir": (
        "store",
        "folder that keeps this node's shards and manifests across restarts (default: memory only)",
    ),
    "nodes": ("sim", "number of node processes"),
    "out": ("sim", "output folder (default: runs/<timestamp>)"),
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
    "churn_downtime": ("sim", "seconds a churned node stays down before it rejoins"),
    "start_timeout": ("sim", "seconds the nodes may take to start (default: grows with --nodes)"),
}

NODE_KNOBS = [
    k for k, (sec, _) in KNOBS.items() if sec in ("train", "gossip", "node", "link", "run", "store")
]
SIM_KNOBS = [k for k, (sec, _) in KNOBS.items() if sec in ("train", "gossip", "link", "sim", "store")] + [
    "threads",
    "prometheus",
]
# gossip launch --ray: simulate's knobs less those that act on local processes by pid or port.
LAUNCH_KNOBS = [k for k in SIM_KNOBS if k not in ("kill", "churn", "churn_downtime", "prometheus")]
# Knobs whose help differs under simulate.
SIM_HELP = {
    "prometheus": "serve every node's Prometheus metrics: node i at http://HOST:PORT+i/metrics (PORT or "
    ":PORT: on 127.0.0.1; port 0: each node a free port); the endpoints are printed once the nodes serve",
}
SIM_DEFAULTS: dict[str, Any] = {"topology": "exponential"}

_BOOL_KNOBS = {"exit_when_done", "baseline", "init_from_network", "reconstruct"}
# Knobs whose default depends on others: None until resolved, and "none"/"auto" in --help.
_UNSET = {"advertise": None, "node_id": None, "rank": -1, "world_size": 0, "out": None, "wait_for": None}
_TYPES: dict[str, type] = {"rank": int, "world_size": int, "wait_for": int, "start_timeout": float}
_METAVARS = {"prometheus": "HOST:PORT"}
_UNSET_TEXT = {
    "rank": "none",
    "world_size": "none",
    "out": "runs/<timestamp>",
    "wait_for": "2 without --peers, else 1",
}


def defaults() -> dict[str, Any]:
    """Every knob's default, read from the dataclass that owns it."""
    out: dict[str, Any] = {}
    for cls in (
        TrainConfig,
        GossipConfig,
        NodeConfig,
        SecurityConfig,
        StoreConfig,
        MembershipConfig,
        RunOptions,
    ):
        obj = cls()
        for f in fields(cls):
            if f.name in KNOBS and f.name not in out:
                out[f.name] = getattr(obj, f.name)
    sim = SimulateConfig()
    for f in fields(SimulateConfig):
        if f.name in KNOBS and f.name not in out:
            out[f.name] = getattr(sim, f.name)
    out.update(_UNSET)
    return out


def add_knobs(
    p: argparse.ArgumentParser,
    names: Sequence[str],
    overrides: dict[str, Any],
    helps: dict[str, str] | None = None,
) -> None:
    values = {**defaults(), **overrides}
    for name in names:
        flag = "--" + name.replace("_", "-")
        help_text = (helps or {}).get(name) or KNOBS[name][1]
        default = values[name]
        if name in _BOOL_KNOBS:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            continue
        kind: Any = _TYPES.get(name) or (
            type(default) if default is not None and not isinstance(default, tuple) else str
        )
        shown = _UNSET_TEXT.get(name, default)
        if shown not in (None, "", ()) and "(default" not in help_text:
            help_text += f" (default: {shown})"
        p.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            metavar=_METAVARS.get(name, name.upper()),
            help=help_text,
        )
    p.add_argument(
        "--config", dest="config", default=None, metavar="FILE.toml", help="the same knobs as a TOML file"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def resolve(args: argparse.Namespace, names: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """defaults < config file < flags; config keys are checked against this command's knobs."""
    base = {**defaults(), **overrides}
    values = {n: base[n] for n in names}
    if args.config:
        for key, value in load_toml(args.config).items():
            if key not in values:
                raise ConfigError(f"config file {args.config}: unknown key {key!r}")
            values[key] = coerce(key, value, base[key]) if base[key] is not None else value
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            values[n] = v
    if isinstance(values.get("peers"), str):
        values["peers"] = tuple(p.strip() for p in values["peers"].split(",") if p.strip())
    return values


def _build(cls: Any, v: dict[str, Any]) -> Any:
    return cls(**{f.name: v[f.name] for f in fields(cls) if f.name in v})


def train_config(v: dict[str, Any]) -> TrainConfig:
    cfg: TrainConfig = _build(TrainConfig, v)
    return cfg


def gossip_config(v: dict[str, Any]) -> GossipConfig:
    g: GossipConfig = _build(GossipConfig, v)
    g.validate()
    return g


def store_config(v: dict[str, Any]) -> StoreConfig:
    st: StoreConfig = _build(StoreConfig, v)
    st.validate()
    return st


def node_config(v: dict[str, Any]) -> NodeConfig:
    config = NodeConfig(
        listen=v["listen"],
        advertise=v["advertise"] or None,
        bulk_port=v["bulk_port"],
        peers=tuple(v["peers"]),
        node_id=v["node_id"] or None,
        rank=v["rank"],
        world_size=v["world_size"],
        join_timeout=v["join_timeout"],
        max_send_rate=v["max_send_rate"],
        security=SecurityConfig(
            tls_cert=v["tls_cert"],
            tls_key=v["tls_key"],
            tls_ca=v["tls_ca"],
            token_file=v["token_file"],
            peer_call_rate=v["peer_call_rate"],
            node_call_rate=v["node_call_rate"],
            node_call_burst=max(1, round(2 * v["node_call_rate"])),
        ),
        gossip=gossip_config(v),
        membership=MembershipConfig(
            suspect_after=v["suspect_after"], dead_after=v["dead_after"], member_protocol=v["member_protocol"]
        ),
        store=store_config(v),
    )
    config.validate()
    if (config.rank >= 0) != (config.world_size > 0):
        raise ConfigError("--rank and --world-size go together")
    return config


def run_options(v: dict[str, Any]) -> RunOptions:
    wait_for = v["wait_for"]
    if wait_for is None:  # the first node of a network waits for a second one
        wait_for = 2 if not v["peers"] and not v["seed_file"] else 1
    opts = RunOptions(
        metrics=v["metrics"] or None,
        dump_params=v["dump_params"] or None,
        ready_file=v["ready_file"] or None,
        seed_file=v["seed_file"] or None,
        wait_for=wait_for,
        wait_timeout=v["wait_timeout"],
        exit_when_done=bool(v["exit_when_done"]),
        threads=v["threads"],
        init_from_network=bool(v["init_from_network"]),
        prometheus=v["prometheus"],
    )
    opts.validate()
    return opts


def simulate_config(v: dict[str, Any]) -> SimulateConfig:
    sim = SimulateConfig(
        nodes=v["nodes"],
        out=v["out"] or None,
        baseline=bool(v["baseline"]),
        threads=v["threads"],
        store=store_config(v),
        kill=v["kill"],
        reconstruct=bool(v["reconstruct"]),
        churn=v["churn"],
        churn_downtime=v["churn_downtime"],
        max_send_rate=v["max_send_rate"],
        member_protocol=v["member_protocol"],
        prometheus=v["prometheus"],
    )
    try:
        MembershipConfig(member_protocol=sim.member_protocol).validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if v["start_timeout"] is not None:
        sim = replace(sim, start_timeout=v["start_timeout"])
    sim.validate()
    return sim


def add_client_security(p: argparse.ArgumentParser) -> None:
    """The options of a command that calls a node (status, reconstruct): TLS and the token."""
    p.add_argument("--tls-ca", default="", metavar="FILE", help="PEM CA to verify the node with (TLS)")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate to present (mutual TLS)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default="", metavar="FILE", help="file holding the cluster's token")


def client_security_config(args: argparse.Namespace) -> SecurityConfig:
    return SecurityConfig(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, token_file=args.token_file
    )
