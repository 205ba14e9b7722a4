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


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.path).relative_to(_HERE).parts
        tier = parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("cluster", "lab", "ray"):
            # One worker runs a whole module of process tests (-n 2 --dist loadgroup), so its
            # module fixtures (a simulate run, a churn run, the fault matrix's survivors and the
            # victims it starts one case ahead) run once, not once on each worker; the two
            # workers still run two such modules at once.
            item.add_marker(pytest.mark.xdist_group("/".join(parts)))
