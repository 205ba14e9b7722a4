"""Several real nodes in one process, each training a tiny model: the dashboard's test and bench.

    python -m tests.support.nodehost --ids a,b,c --ready FILE [--peer HOST:PORT | --peer-file FILE]

Every node is a real :class:`~gossip.node.node.Node` (its own gRPC server on
127.0.0.1:0) around a logistic regression that trains on its own noisy blobs on
its own thread: a step every ``--step-every`` seconds, the training loss reported
after each step and the test accuracy every ``--eval-every`` steps
(``Node.report``), so loss, accuracy, steps and exchanges all move. The first node
joins through ``--peer``, or the first address in another nodehost's ready file
(``--peer-file``, waited for), or starts the cluster; the others join through the first.
Once all serve, ``{"addresses": {id: address}}`` goes to ``--ready``; then it runs
until SIGTERM, SIGINT or SIGKILL, or until its parent is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from gossip.config import GossipConfig, NodeConfig, StoreConfig
from gossip.core.membership import MembershipConfig
from gossip.node.node import Node

FEATURES, CLASSES = 16, 4


def blobs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 16 dimensions, the same centres for every node, noisy enough to learn slowly."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + 2.5 * torch.randn(n, FEATURES, generator=g), y


def train(
    node: Node, model: torch.nn.Module, seed: int, every: float, eval_every: int, stop: threading.Event
) -> None:
    torch.set_num_threads(1)
    x, y = blobs(seed, 512)
    xt, yt = blobs(10_000 + seed, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    while not stop.is_set():
        i = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()  # averaging lands between steps, in node.step()
        step += 1
        node.report(epoch=step * 32 / len(x), train_loss=loss.item())
        node.step()
        if step % eval_every == 0:
            with torch.no_grad():
                out = model(xt)
                acc = float((out.argmax(1) == yt).float().mean())
                node.report(eval_loss=float(torch.nn.functional.cross_entropy(out, yt)), eval_accuracy=acc)
        stop.wait(every)


async def main(args: argparse.Namespace) -> None:
    ids = args.ids.split(",")
    membership = MembershipConfig(
        interval=args.member_interval, suspect_after=args.suspect_after, dead_after=args.dead_after
    )
    nodes: list[Node] = []
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    threads = []
    peer = args.peer
    if args.peer_file:  # started beside the process it joins: wait for that one's ready file
        ready = Path(args.peer_file)
        deadline = time.monotonic() + 120.0
        while not ready.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{ready} did not appear")
            await asyncio.sleep(0.05)
        peer = next(iter(json.loads(ready.read_text())["addresses"].values()))
    try:
        for k, node_id in enumerate(ids):
            seed_peer = nodes[0].address if nodes else peer
            torch.manual_seed(args.seed + k)
            model = torch.nn.Linear(FEATURES, CLASSES)
            config = NodeConfig(
                node_id=node_id,
                peers=(seed_peer,) if seed_peer else (),
                membership=membership,
                gossip=GossipConfig(gossip_every=args.gossip_every),
                store=StoreConfig(publish_every=args.publish_every),
            )
            node = await Node.create(model, config, seed=args.seed + k)
            nodes.append(node)
            t = threading.Thread(
                target=train,
                args=(node, model, args.seed + k, args.step_every, args.eval_every, stop),
                daemon=True,
            )
            threads.append(t)
        for t in threads:
            t.start()
        tmp = Path(args.ready + ".tmp")
        tmp.write_text(json.dumps({"addresses": {n.node_id: n.address for n in nodes}, "pid": os.getpid()}))
        tmp.rename(args.ready)
        parent = os.getppid()
        while not done.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
    finally:
        stop.set()
        for t in threads:
            await loop.run_in_executor(None, t.join, 5.0)
        await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", required=True, help="node ids, comma-separated")
    p.add_argument("--ready", required=True, help="file to write the addresses to once all serve")
    p.add_argument("--peer", default="", help="a node of the cluster to join (default: start one)")
    p.add_argument("--peer-file", default="", help="or the ready file of another nodehost, once it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-every", type=float, default=0.05, help="seconds between two steps of a node")
    p.add_argument("--eval-every", type=int, default=10, help="steps between two evaluations")
    p.add_argument("--gossip-every", type=int, default=1, help="steps between two exchanges")
    p.add_argument("--publish-every", type=int, default=50, help="steps between two store snapshots")
    p.add_argument("--member-interval", type=float, default=0.2)
    p.add_argument("--suspect-after", type=float, default=1.0)
    p.add_argument("--dead-after", type=float, default=2.5)
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    torch.set_num_threads(1)
    asyncio.run(main(parse()))
    os._exit(0)  # grpc.aio's slow interpreter-exit shutdown (see gossip.cli.main.run)
