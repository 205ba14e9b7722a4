"""The ``gossip`` command: node, simulate, launch, status, dashboard, reconstruct, topology, consensus, experiment.

The CLI owns the terminal. Bad arguments, config files or paths end with one
line on stderr, ``gossip COMMAND: error: ...``, and exit code 2, before any work
starts; a peer that cannot be reached or a run that fails, with one line and
exit code 1. Only argparse and the config dataclasses load before a command
runs, so ``gossip --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gossip import __version__
from gossip.cli import knobs
from gossip.config import ConfigError

__all__ = ["build_parser", "main", "run"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump, with the subcommand's own prefix.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gossip", description="Peer-to-peer gossip SGD over gRPC, with a sharded model store."
    )
    parser.add_argument("--version", action="version", version=f"gossip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser(
        "node", help="run one node for real", description="Run one node: join, train, gossip, serve."
    )
    knobs.add_knobs(p, knobs.NODE_KNOBS, {})

    p = sub.add_parser(
        "simulate",
        help="run N node processes on this machine",
        description="Start N real node processes on 127.0.0.1, train, and write metrics, a summary and a plot.",
    )
    knobs.add_knobs(p, knobs.SIM_KNOBS, knobs.SIM_DEFAULTS, knobs.SIM_HELP)
    p.add_argument(
        "--dashboard",
        nargs="?",
        const="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="also serve the live page of the cluster (gossip dashboard) while it runs, at HOST:PORT "
        "(no value: 127.0.0.1:8080; port 0: a free port); the URL is printed once the nodes serve",
    )

    p = sub.add_parser(
        "launch",
        help="run N nodes as actors on a Ray cluster",
        description="Place N real nodes on a Ray cluster, one actor with one CPU each in a placement "
        "group spread over the Ray nodes, each serving gRPC on its Ray node's IP; train, and write the "
        "same metrics, summary and plot as gossip simulate. Ray restarts an actor whose process dies "
        "and its node rejoins. Needs the ray extra: pip install 'gossip-sgd[ray]'.",
    )
    p.add_argument(
        "--ray",
        required=True,
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="the Ray cluster: HOST:PORT of its head (ray start --head prints it), or auto / no "
        "value: the one running on this machine, started with a CPU per node if none is",
    )
    knobs.add_knobs(p, knobs.LAUNCH_KNOBS, knobs.SIM_DEFAULTS, knobs.SIM_HELP)
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times Ray restarts one node's actor after its process dies (default: 3)",
    )
    p.add_argument(
        "--placement-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for the cluster to hold one CPU per node before giving up (default: 60)",
    )

    p = sub.add_parser(
        "status",
        help="ask a node for its view of the network",
        description="Show one node's state, its member table, its counters and its shard store.",
    )
    p.add_argument("--peer", required=True, metavar="HOST:PORT", help="the node to ask")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline of each call in seconds (default: 3)")
    knobs.add_client_security(p)

    p = sub.add_parser(
        "dashboard",
        help="a live web page of the whole cluster",
        description="Find the cluster through one node, ask every member for its status every "
        "--interval seconds and serve a live page: the graph, loss and accuracy curves, consensus "
        "spread, throughput, member events and store health. Plain HTTP without authentication: "
        "it listens on loopback unless told otherwise.",
    )
    p.add_argument("--peer", required=True, metavar="HOST:PORT", help="any node of the cluster")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where to serve the page (default: 127.0.0.1:8080)",
    )
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between two polls of every node (default: 1)"
    )
    p.add_argument("--timeout", type=float, default=2.0, help="deadline of each call in seconds (default: 2)")
    p.add_argument(
        "--ready-file", metavar="PATH", help='write {"url": ...} here, atomically, once the page serves'
    )
    knobs.add_client_security(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")

    p = sub.add_parser(
        "reconstruct",
        help="rebuild the model from the shard store through one peer",
        description="Find the newest complete snapshot through one peer, fetch its shards from their "
        "owners in parallel, check every digest and write the state_dict. Exit 1 when no complete "
        "snapshot can be rebuilt.",
    )
    p.add_argument("--peer", required=True, metavar="HOST:PORT", help="any node of the network")
    p.add_argument(
        "--out", required=True, metavar="FILE", help="where to write the state_dict (.pt or .safetensors)"
    )
    p.add_argument("--model-id", default="", help="model to rebuild (default: the peer's own)")
    p.add_argument(
        "--version", default="latest", help="latest (newest complete) or a version number (default: latest)"
    )
    p.add_argument(
        "--format",
        default=None,
        choices=("pt", "safetensors"),
        help="file format (default: from --out's suffix)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="base deadline of each call in seconds (default: 10)"
    )
    knobs.add_client_security(p)

    p = sub.add_parser(
        "topology",
        help="describe a topology",
        description="Size, degrees, diameter and the spectral gap of a topology's mixing matrix.",
    )
    p.add_argument("name", help="topology name (ring, exponential, ...) or graph file")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (a graph file sets its own)")
    p.add_argument(
        "--rule",
        default="metropolis",
        choices=("metropolis", "uniform"),
        help="mixing weights (default: metropolis)",
    )
    p.add_argument("--draw", metavar="FILE.png", default=None, help="also save a drawing of the graph")
    p.add_argument("--seed", type=int, default=0, help="seed of random graphs (default: 0)")
    p.add_argument("--json", action="store_true", help="one JSON object")

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
        default=None,
        help="rounds to run (default: until the rate fitted over the last half of the rounds is stable, "
        "which on graphs with nearly equal top eigenvalues takes far more than 5/(1 - |lambda2|^2))",
    )
    p.add_argument(
        "--strategy", default="sync", choices=("sync", "pairwise", "push-sum"), help="(default: sync)"
    )
    p.add_argument(
        "--rule", default="metropolis", choices=("metropolis", "uniform"), help="(default: metropolis)"
    )
    p.add_argument("--dim", type=int, default=16, help="length of each node's random vector (default: 16)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the vectors, matchings and random graphs (default: 0)"
    )
    p.add_argument("--loss", type=float, default=0.0, help="probability that a message is lost (default: 0)")
    p.add_argument(
        "--compress",
        default="none",
        metavar="SPEC",
        help="run CHOCO-Gossip (sync rounds) sending each node's change through this compressor: "
        "fp16, bf16, int8, int4, sign, topk:F, randk:F or a sparsifier + a coder, e.g. topk:0.01+int8 "
        "(default: none)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="CHOCO-Gossip's consensus step in (0, 1] (default: one that converged on a ring of 16 "
        "for that compressor)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser(
        "experiment",
        help="run a grid of simulations from a TOML file",
        description="Run the grid of an experiment file on the vectorized simulator; write results.csv, "
        "summary.md and plots.",
    )
    p.add_argument("file", metavar="FILE.toml", help="experiment file, e.g. simulations/topologies.toml")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: runs/<name>-<timestamp>)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gossip.cli import commands, output
    from gossip.core.layout import LayoutError

    handler = getattr(commands, args.command)
    try:
        code: int = handler(args)
        return code
    except (ConfigError, LayoutError) as exc:
        output.print_error(args.command, str(exc))
        return 2
    except KeyboardInterrupt:
        output.print_failure(args.command, "interrupted")
        return 130


def run() -> None:
    """Console-script entry point.

    A process that used grpc.aio spends seconds in gRPC's own shutdown at
    interpreter exit (grpc/grpc#38679), and ``gossip simulate`` stops N of them
    at once. Everything of ours is closed by the time ``main`` returns, so the
    node and client commands flush and leave with ``os._exit``.

    gRPC's core logs to stderr on its own (a failed bind, for one), beside our one
    line; it stays quiet unless GRPC_VERBOSITY asks otherwise.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in ("node", "status", "reconstruct", "dashboard"):
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
