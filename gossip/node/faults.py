"""Failpoints: named places in the exchange protocols where a test can kill the process.

``GOSSIP_FAILPOINTS`` arms them, read once when this module is imported::

    GOSSIP_FAILPOINTS="pairwise.callee.applied=kill"         # SIGKILL at the first hit
    GOSSIP_FAILPOINTS="push.caller.mid_stream=kill@3,..."    # ... at the third hit

A process whose armed point is reached logs one line, ``failpoint {json}`` (the
point, the hit, and what the node passed: its peer, counters, push-sum weight),
and sends itself SIGKILL: no ``finally``, no goodbye, exactly what a crash or an
OOM kill does to its peers. Unset, a failpoint is one dict lookup.

An unknown point or action is a :class:`FailpointError` at import, naming the
valid ones; a typo must not leave a fault test that never injects anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from gossip.config import ConfigError

log = logging.getLogger(__name__)

ENV = "GOSSIP_FAILPOINTS"

# Every point, with the phase it marks. "caller" is the node that opened the call.
POINTS: dict[str, str] = {
    "pairwise.caller.before_send": "call not opened yet",
    "pairwise.caller.mid_stream": "first chunk of its snapshot sent, the rest not",
    "pairwise.caller.accepted": "the peer's accepting header checked (compressing: own payload not made yet)",
    "pairwise.caller.reply_mid": "first chunk of the answer received, the rest not",
    "pairwise.caller.before_commit": "whole answer received and checked, commit frame not sent",
    "pairwise.caller.after_commit": "peer confirmed the commit (it took its half), own half not applied",
    "pairwise.callee.before_send": "exchange accepted, reply header not sent",
    "pairwise.callee.mid_stream": "first chunk of the caller's snapshot received, the rest not",
    "pairwise.callee.answering": "first chunk of its answer sent, the rest not",
    "pairwise.callee.answered": "whole answer sent, commit frame not read",
    "pairwise.callee.applied": "commit read and its half delivered, OK status not sent",
    "push.caller.before_send": "call not opened yet",
    "push.caller.mid_stream": "first chunk sent, the rest not",
    "push.caller.sent": "every chunk sent, stream not closed",
    "push.caller.acked": "acknowledgement received, own half not yet given up",
    "push.callee.header": "header accepted, no chunk read",
    "push.callee.mid_stream": "first chunk received, the rest not",
    "push.callee.applied": "merge delivered, acknowledgement not sent",
}
ACTIONS = ("kill",)


class FailpointError(ConfigError):
    """``GOSSIP_FAILPOINTS`` names a point or an action that does not exist."""


def parse(spec: str) -> dict[str, int]:
    """``"name=kill[@N],..."`` → {name: N}: the hit (1-based) at which ``name`` kills."""
    armed: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, action = item.partition("=")
        name = name.strip()
        action, _, count = action.strip().partition("@")
        if name not in POINTS:
            raise FailpointError(f"{ENV}: unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        if not sep or action not in ACTIONS:
            raise FailpointError(f"{ENV}: {item!r}: the action must be one of {', '.join(ACTIONS)}")
        if count and not (count.isascii() and count.isdigit() and int(count) >= 1):
            raise FailpointError(f"{ENV}: {item!r}: the hit count after '@' must be an integer >= 1")
        if name in armed:
            raise FailpointError(f"{ENV}: {name!r} is armed twice")
        armed[name] = int(count) if count else 1
    return armed


_ARMED = parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def rearm() -> None:
    """Read ``GOSSIP_FAILPOINTS`` again: a node forked from a process that imported this
    module (gossip.cluster.zygote) with another environment arms its own points."""
    global _ARMED
    _ARMED = parse(os.environ.get(ENV, ""))
    _hits.clear()


def armed() -> dict[str, int]:
    """The armed points and the hit each kills at (empty in a normal run)."""
    return dict(_ARMED)


_Detail = Callable[[], dict[str, Any]]


def failpoint(name: str, detail: _Detail | None = None) -> None:
    """Kill this process here if ``name`` is armed and this is its fatal hit.

    ``detail`` is called only then; what it returns goes into the log line, so a
    test can compare the survivor's bookkeeping with the victim's at its death.
    """
    if name not in _ARMED:
        return
    hit = _hits[name] = _hits.get(name, 0) + 1
    if hit < _ARMED[name]:
        return
    record = {"point": name, "hit": hit, "pid": os.getpid(), **(detail() if detail else {})}
    log.warning("failpoint %s", json.dumps(record))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


T = TypeVar("T")


def _tapped(items: Iterable[T], first: str, last: str | None, detail: _Detail | None) -> Iterator[T]:
    """``items``, passing ``first`` after item 0 went out and ``last`` after the last.

    The senders (``gossip.node.pairwise`` and ``pushsum``) iterate the chunks and ask for the next one
    only once the previous one was written, which is what puts the points between
    two chunks on the wire.
    """
    for i, item in enumerate(items):
        if i == 1:
            failpoint(first, detail)
        yield item
    if last is not None:
        failpoint(last, detail)


def tap(
    chunks: Iterable[T], first: str, last: str | None = None, detail: _Detail | None = None
) -> Iterable[T]:
    """``chunks`` with the failpoints ``first`` and ``last`` between them (``chunks`` itself if unarmed)."""
    if first not in _ARMED and last not in _ARMED:
        return chunks
    return _tapped(chunks, first, last, detail)
