"""The command line's parsers: every option explained, every default real."""

from __future__ import annotations

import argparse

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
