"""``gossip launch --ray`` where Ray is not installed: one line naming the extra, exit 2.

Not skipped without Ray (unlike test_launch.py): Ray is hidden from the child
process, so this runs the same whether or not the ray extra is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HIDE = "import sys; sys.modules['ray'] = None; from gossip.cli.main import main; sys.exit(main())"


@pytest.mark.timeout(120)
def test_without_ray_installed_launch_names_the_extra_and_exits_2(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", HIDE, "launch", "--ray", "--nodes", "2"]

    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path, env=dict(os.environ), check=False
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gossip launch: error: gossip launch --ray needs Ray: pip install 'gossip-sgd[ray]'"
    ]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
