"""The command line's parsers: every option explained, every default real."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from gossip.cli.main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_a_help_text(command: str) -> None:
    parser = _subparsers()[command]

    silent = [a.option_strings or [a.dest] for a in parser._actions if not a.help]

    assert silent == []


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_no_placeholder_defaults(command: str) -> None:
    text = _subparsers()[command].format_help()

    assert "(default: -1)" not in text and "(default: None)" not in text


def test_every_command_has_a_description_or_help() -> None:
    parser = build_parser()

    assert parser.format_help().count("\n") > 5
    for name, sub in _subparsers().items():
        assert sub.description, f"{name} has no description"


def test_simulate_hands_every_gossip_knob_to_its_node_processes(tmp_path: Path) -> None:
    """A node's command line, read back by `gossip node`'s own parser, gives the same training and gossip."""
    from gossip.cli import knobs
    from gossip.cluster.procs import node_command
    from gossip.config import GossipConfig, SimulateConfig, StoreConfig, TrainConfig

    gossip = GossipConfig(gossip_every=10, outer="nesterov:0.7:0.9", max_lag=2, idle_pause=0.0)
    gossip = dataclasses.replace(gossip, compress="topk:0.01+int8", gamma=0.5)
    train = TrainConfig(epochs=3, lr=0.05, max_steps=7)
    sim = SimulateConfig(nodes=4, store=StoreConfig(data_dir=str(tmp_path / "data")))
    cmd = node_command(1, sim, train, gossip, tmp_path, None)
    args = _subparsers()["node"].parse_args(cmd[cmd.index("node") + 1 :])
    v = knobs.resolve(args, knobs.NODE_KNOBS, {})
    assert knobs.gossip_config(v) == gossip
    assert knobs.train_config(v) == train
    assert cmd[cmd.index("--data-dir") + 1] == str(tmp_path / "data" / "node1")  # a folder per rank
