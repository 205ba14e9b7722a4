"""Shared test settings: one torch thread, and a marker per tier from the test's folder.

Tiers: ``unit`` (pure code, no sockets), ``node`` (nodes and servers inside the
test process, real gRPC on loopback), ``cluster`` (real node processes), ``lab``
(network namespaces; root only). ``pytest -m "not cluster and not lab"`` runs the
first two in under two minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One torch thread for every test: on a 2-core machine that also runs node processes,
# torch's default of one thread per core makes small ops stall behind each other
# (a 2-epoch digits run measured 5 s with 2 threads against 0.12 s with one).
torch.set_num_threads(1)

TIERS = ("unit", "node", "cluster", "lab")
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.path).relative_to(_HERE).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("cluster", "lab"):
            # Meant to run the tests that start node processes one after another on one
            # worker (-n 2 --dist loadgroup). In effect it does not: xdist's loadgroup reads
            # the marks in its own collection hook, before this one, so they spread over both
            # workers, as every CI run so far has had them. With @pytest.hookimpl(tryfirst=True)
            # the group holds, but CI then took 10 min 35 s (tests 8:20) against 8:46-9:03:
            # left so until the process tests are cut enough to run serially within budget.
            item.add_marker(pytest.mark.xdist_group("processes"))
