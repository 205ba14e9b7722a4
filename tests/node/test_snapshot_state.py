"""Snapshots carry the optimizer state and model buffers (real nodes, gRPC on loopback).

A node whose trainer hands it ``snapshot_state`` publishes its momentum buffers
and floating-point model buffers after the parameters; a node that loads the
snapshot resumes them: its next step is the step the publisher would have taken.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch
from torch import nn

from gossip.config import NodeConfig, StoreConfig, TrainConfig
from gossip.core.layout import LayoutError
from gossip.core.membership import MembershipConfig
from gossip.node.node import Node
from gossip.store.reconstruct import fetch_snapshot, load_into
from gossip.train.trainer import LocalTrainer, cross_entropy
from tests.support.inproc import wait_until

STORE = StoreConfig(shard_bytes=4096, model_id="m", publish_every=3, scrub_interval=60.0)
SLOW = MembershipConfig(interval=0.1, suspect_after=60.0, dead_after=120.0)
TRAIN = TrainConfig(lr=0.1, momentum=0.5, batch_size=8)


def model(seed: int, track: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=track))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)


def one_step(trainer: LocalTrainer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on the batch (x, y): the same gradients for any two equal models."""
    trainer.model.train()
    loss = cross_entropy(trainer.model(x), y)
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()


async def publish_version_1(node: Node, trainer: LocalTrainer) -> dict[str, Any]:
    """Train 3 steps with the trainer's state in the node's snapshots; what version 1 was cut from."""
    node.state_source = trainer.snapshot_state
    at_publish: dict[str, Any] = {}

    def train() -> None:
        for _ in range(3):
            trainer.step()
            if trainer.step_count == 3:
                at_publish["model"] = copy.deepcopy(trainer.model)
                at_publish["momentum"] = [b.clone() for b in trainer.optimizer.buffers if b is not None]
            node.step()

    await asyncio.to_thread(train)
    await wait_until(lambda: node.store.store.manifest("m", 1) is not None, 20, "version 1")
    return at_publish


def run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_node_started_from_a_snapshot_resumes_the_publishers_momentum_and_buffers() -> None:
    async def main() -> None:
        x, y = data()
        a = model(0)
        trainer = LocalTrainer(a, x, y, TRAIN, seed=0)
        cfg = NodeConfig(node_id="n0", membership=SLOW, store=STORE)
        async with Node.around(a, cfg, seed=0) as node:
            at_publish = await publish_version_1(node, trainer)
            rebuilt = await fetch_snapshot(node.address, "m", version=1)
            state = rebuilt.optimizer_state()
            names = {n for n, p in a.named_parameters()}
            assert set(state) == {f"momentum/{n}" for n in names} | {
                "buffer/1.running_mean",
                "buffer/1.running_var",
            }
            # A model file (gossip reconstruct) is the model's state_dict, buffers included.
            assert set(rebuilt.state_dict()) == set(a.state_dict()) - {"1.num_batches_tracked"}

            b = model(1)
            resumed = LocalTrainer(b, x, y, TRAIN, seed=1)
            await load_into(b, [node.address], "m")
            assert resumed.load_momentum(rebuilt.optimizer_state()) == len(names)

        publisher = at_publish["model"]
        for (name, want), got in zip(publisher.state_dict().items(), b.state_dict().values(), strict=True):
            if name != "1.num_batches_tracked":
                assert torch.equal(want, got), name
        for want, got in zip(at_publish["momentum"], resumed.optimizer.buffers, strict=True):
            assert got is not None and torch.equal(want, got)
        # The next step from the snapshot is the publisher's next step; a fresh optimizer's is not.
        original = LocalTrainer(publisher, x, y, TRAIN, seed=0)
        for i, buf in enumerate(at_publish["momentum"]):
            original.optimizer.set_buffer(i, buf)
        fresh = LocalTrainer(copy.deepcopy(publisher), x, y, TRAIN, seed=0)
        for t in (original, resumed, fresh):
            one_step(t, x[:8], y[:8])
        for p, q in zip(publisher.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
        assert not all(
            torch.equal(p, r) for p, r in zip(publisher.parameters(), fresh.model.parameters(), strict=True)
        )

    run(main())


def test_state_the_model_cannot_hold_is_refused_and_the_model_is_left_as_it_was() -> None:
    async def main() -> None:
        x, y = data()
        a = model(0)
        trainer = LocalTrainer(a, x, y, TRAIN, seed=0)
        cfg = NodeConfig(node_id="n0", membership=SLOW, store=STORE)
        async with Node.around(a, cfg, seed=0) as node:
            await publish_version_1(node, trainer)
            # The same parameters, but no running statistics to put the snapshot's into.
            c = model(2, track=False)
            before = copy.deepcopy(c.state_dict())
            with pytest.raises(LayoutError, match=r"carries buffer/1\.running_mean"):
                await load_into(c, [node.address], "m")
            for name, t in c.state_dict().items():
                assert torch.equal(t, before[name]), name

    run(main())
