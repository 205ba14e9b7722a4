"""Two nodes in one script, each with its own training loop, averaging over gRPC.

Run: python examples/own_loop.py
"""

import threading

import torch
from torch import nn

import gossip
from gossip.train.data import load_dataset, node_data


def train(node: gossip.BackgroundNode, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(10):
        for i in range(0, len(x), 16):
            loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
            node.step()  # mixes in what neighbours sent, maybe starts an exchange
    node.finish_training()


def main() -> None:
    ds = load_dataset("digits")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    a = gossip.BackgroundNode(models[0], gossip.NodeConfig(listen="127.0.0.1:0"))
    b = gossip.BackgroundNode(models[1], gossip.NodeConfig(listen="127.0.0.1:0", peers=(a.address,)))
    with a, b:
        b.wait_for_members(2)
        threads = [
            threading.Thread(target=train, args=(node, m, *node_data(ds, rank, 2)))
            for rank, (node, m) in enumerate(((a, models[0]), (b, models[1])))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("exchanges:", a.status()["exchanges_ok"] + a.status()["exchanges_served"])
        for name, m in (("a", models[0]), ("b", models[1])):
            with torch.no_grad():
                acc = (m(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
            print(f"node {name}: test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
