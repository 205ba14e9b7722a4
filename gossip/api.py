"""Bring your own training loop: a node around an existing ``nn.Module``.

Async::

    async with Node.around(model, NodeConfig(peers=("10.0.0.2:7070",))) as node:
        await asyncio.to_thread(train_loop, node)      # calls node.step() after each optimizer step

Sync (the node runs its event loop on a background thread)::

    with BackgroundNode(model, NodeConfig(peers=("10.0.0.2:7070",))) as node:
        for x, y in loader:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            node.step()
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import torch

from gossip.config import NodeConfig
from gossip.core.params import FlatParams
from gossip.node.node import Node


class BackgroundNode:
    """A :class:`Node` whose event loop runs on a daemon thread; every method is synchronous.

    The model's parameters are re-pointed at one flat buffer (the Parameter
    objects stay the same, so an optimizer built before keeps working). Call
    :meth:`step` after each optimizer step, :meth:`close` (or leave the ``with``
    block) to leave the network.
    """

    def __init__(
        self, model: torch.nn.Module, config: NodeConfig | None = None, seed: int | None = None
    ) -> None:
        self.flat = FlatParams.bind(model)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gossip-node", daemon=True)
        self._thread.start()
        self.node = Node(self.flat, config, seed)
        try:
            self._call(self.node.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def step(self, n: int = 1) -> None:
        """After each optimizer step: mixes in arrived averaging results, maybe starts an exchange."""
        self.node.step(n)

    def finish_training(self) -> None:
        """No more steps will come; the node applies averaging results itself while it keeps serving."""
        self.node.finish_training()

    def wait_for_members(self, count: int, timeout: float = 30.0) -> bool:
        return bool(self._call(self.node.wait_for_members(count, timeout)))

    def status(self) -> dict[str, Any]:
        """What ``gossip status --json`` shows of this node (without the store part)."""
        status: dict[str, Any] = self._call(self._status())
        return status

    async def _status(self) -> dict[str, Any]:
        return self.node.status().to_json()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.node.stop(), timeout=30)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BackgroundNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
