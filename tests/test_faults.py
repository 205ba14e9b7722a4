"""Faults of whole processes: a node paused with SIGSTOP past the failure timeout, then resumed.

The paused node is a child process (so it can be stopped) running a node with
fast failure detection; the observer runs in this process. The child is ended by
its PID in a ``finally``, also when an assertion fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from gossip.config import NodeConfig
from gossip.membership import MembershipConfig
from gossip.node import Node
from gossip.params import FlatParams, Layout

FAST = MembershipConfig(interval=0.1, suspect_after=0.6, dead_after=1.5, left_ttl=60.0)

CHILD = """
import asyncio, sys
import torch
from gossip.config import NodeConfig
from gossip.membership import MembershipConfig
from gossip.node import Node
from gossip.params import FlatParams, Layout

async def main() -> None:
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(4))]))
    membership = MembershipConfig(interval=0.1, suspect_after=0.6, dead_after=1.5, left_ttl=60.0)
    cfg = NodeConfig(node_id="paused", peers=(sys.argv[1],), membership=membership)
    node = await Node.create(flat, cfg)
    print(node.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP and SIGCONT")
def test_a_paused_node_is_declared_dead_then_rejoins_when_resumed() -> None:
    async def main() -> list[str]:
        flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(4))]))
        observer = await Node.create(flat, NodeConfig(node_id="observer", membership=FAST))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, observer.address], stdout=subprocess.PIPE, text=True
        )
        seen: list[str] = []
        try:
            assert observer.membership is not None
            members = observer.membership.members

            def state() -> str:
                m = members.get("paused")
                s = m.state if m is not None else "absent"
                if not seen or seen[-1] != s:
                    seen.append(s)
                return s

            await wait_until(lambda: state() == "alive", 60.0, "the child to join")
            os.kill(child.pid, signal.SIGSTOP)
            await wait_until(lambda: state() == "dead", 15.0, "the paused node to be declared dead")
            assert "paused" not in {m.node_id for m in observer.neighbours()}
            os.kill(child.pid, signal.SIGCONT)
            await wait_until(lambda: state() == "alive", 15.0, "the resumed node to rejoin")

            assert "paused" in {m.node_id for m in observer.neighbours()}
            assert observer.phase == "running"
            return seen
        finally:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
            await observer.stop(leave=False)

    seen = asyncio.run(asyncio.wait_for(main(), 90.0))
    # e.g. absent, alive, (suspect,) dead, alive
    assert "dead" in seen and "alive" in seen[: seen.index("dead")] and seen[-1] == "alive"
