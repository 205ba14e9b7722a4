"""Helpers for tests that run nodes inside the test process (real gRPC on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import torch

from gossip.core.params import FlatParams, Layout
from gossip.node.node import Node


def vector(values: torch.Tensor | Sequence[float]) -> FlatParams:
    """A one-tensor model ``w`` holding ``values`` (float32)."""
    t = torch.as_tensor(values, dtype=torch.float32)
    flat = FlatParams.zeros(Layout.from_named([("w", torch.empty(len(t)))]))
    flat.segments["float32"].copy_(t)
    return flat


def vec(node: Node) -> torch.Tensor:
    return node.flat.segments["float32"]


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` until it holds; returns the seconds it took, fails after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0
