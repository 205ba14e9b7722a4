"""The lab's hosts take the TCP congestion control a bench asks for (root only)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.netns import NetLab, congestion_control, congestion_control_problem, missing_requirements

REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host lab unavailable: {REASON}")


def test_hosts_use_the_congestion_control_asked_for_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    why = congestion_control_problem("no-such-cc")
    assert why is not None and "not available" in why and "reno" in why
    with pytest.raises(ValueError, match="not available"):
        NetLab(1, tmp_path, cc="no-such-cc")
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    cc = next(c for c in allowed if c != congestion_control()) if len(allowed) > 1 else allowed[0]
    assert congestion_control_problem(cc) is None
    with NetLab(1, tmp_path, cc=cc, rate="", delay=0.0, loss=0.0) as lab:
        inside = subprocess.run(
            ["ip", "netns", "exec", lab.hosts[0].ns, "cat", "/proc/sys/net/ipv4/tcp_congestion_control"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert inside == cc
