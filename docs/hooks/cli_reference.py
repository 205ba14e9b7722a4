"""mkdocs hook: the command reference, generated from the ``gossip`` command's own argparse parsers.

A page that holds the marker below gets, in its place, every subcommand of
``gossip.cli.main.build_parser()`` with its description and a table of its
options (flags, value, help text with the default). The flags are read from the
parser objects, so the reference cannot drift from ``gossip COMMAND --help``.
Importing ``gossip.cli.main`` is cheap: argparse and the config dataclasses, no torch.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- gossip-cli-reference -->"


def _parser() -> argparse.ArgumentParser:
    # The checkout's code, not whatever copy of gossip is installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from gossip.cli.main import build_parser

    return build_parser()


def _cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:  # a switch: --json, --baseline, -v
        return ""
    if action.choices:
        return ", ".join(f"`{c}`" for c in action.choices)
    return f"`{action.metavar or action.dest.upper()}`"


def _help(action: argparse.Action) -> str:
    text = (action.help or "") % {**vars(action), "prog": "gossip"}  # argparse's %(default)s and %%
    default = action.default
    shown = default not in (None, False, "", argparse.SUPPRESS) and action.nargs != 0
    if shown and "(default" not in text:
        text += f" (default: {default})"
    if action.required and action.option_strings:
        text = "required; " + text
    return _cell(text)


def _command(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## gossip {name}", "", f"*{_cell(summary)}*", "", _cell(parser.description or ""), ""]
    lines += ["| option | value | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest}` (positional)"
        lines.append(f"| {flags} | {_value(action)} | {_help(action)} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help or "" for a in sub._choices_actions}
    return "\n".join(_command(name, summaries[name], p) for name, p in sub.choices.items())


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
