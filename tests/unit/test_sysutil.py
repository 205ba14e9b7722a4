"""Process-level helpers, in real child processes (they change the process they run in)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

PROBE = (
    "import resource; from gossip.cluster.sysutil import raise_open_files; "
    "now = raise_open_files(); print(now, *resource.getrlimit(resource.RLIMIT_NOFILE))"
)


def _child(soft: int) -> list[int]:
    def lower() -> None:  # in the child: what a system with a low default gives a node
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        preexec_fn=lower,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [int(x) for x in out.stdout.split()]


def test_a_node_process_raises_its_open_files_limit_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)

    now, soft, after_hard = _child(256)

    assert now == soft
    if hard != resource.RLIM_INFINITY:
        assert soft == want  # all the way up to the hard limit
    else:  # as far as the system lets an unlimited hard limit go
        assert 256 < soft <= want
    assert after_hard == hard  # the hard limit is left as it was
