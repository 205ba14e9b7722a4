"""Shared test settings."""

from __future__ import annotations

import torch

# One torch thread for every test: on a 2-core machine that also runs node processes,
# torch's default of one thread per core makes small ops stall behind each other
# (a 2-epoch digits run measured 5 s with 2 threads against 0.12 s with one).
torch.set_num_threads(1)
