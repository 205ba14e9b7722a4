"""The bring-your-own-loop API: BackgroundNode and Node.around over real gRPC on port 0."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import nn

import gossip
from gossip.config import NodeConfig


def _model(value: float) -> nn.Module:
    m = nn.Linear(4, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


@pytest.mark.timeout(60)
def test_background_nodes_average_two_models_to_their_mean() -> None:
    a_model, b_model = _model(1.0), _model(3.0)
    a = gossip.BackgroundNode(a_model, NodeConfig())
    b = gossip.BackgroundNode(b_model, NodeConfig(peers=(a.address,)))
    with a, b:
        assert b.wait_for_members(2, timeout=20)
        b.step()  # b starts an exchange; never having trained, a applies its half at once
        for _ in range(200):
            if b.status()["exchanges_ok"]:
                break
            threading.Event().wait(0.02)
        b.finish_training()  # b applies its half now
        for p in (*a_model.parameters(), *b_model.parameters()):
            torch.testing.assert_close(p.detach(), torch.full_like(p, 2.0), rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_optimizer_built_before_binding_still_trains_the_bound_parameters() -> None:
    model = _model(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gossip.BackgroundNode(model, NodeConfig()) as node:
        before = node.flat.segments["float32"].clone()
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        node.step()
        assert not torch.equal(node.flat.segments["float32"], before)
        assert node.status()["step"] == 1


@pytest.mark.timeout(60)
def test_async_node_around_a_model_serves_status() -> None:
    async def main() -> dict[str, object]:
        async with gossip.Node.around(_model(1.0), NodeConfig()) as node:
            return {"address": node.address, "phase": node.phase}

    info = asyncio.run(main())
    assert str(info["address"]).startswith("127.0.0.1:")
    assert info["phase"] == "running"
