"""``gossip simulate --kill N@STEP [--reconstruct]``: crash nodes mid-run, then rebuild from survivors.

The launcher SIGKILLs N random node processes once rank 0 reaches STEP, lets the
survivors finish, and then asks one survivor to rebuild the newest complete
snapshot from the shard store, as ``gossip reconstruct`` would. The summary says
whether that worked (and which shards were missing if not); with
``--reconstruct`` the rebuilt model is also saved and evaluated on the test set.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

from gossip.config import ConfigError, TrainConfig
from gossip.core.layout import Layout, LayoutError
from gossip.observe.status import fetch_status
from gossip.store.files import save
from gossip.store.reconstruct import SnapshotUnavailable, check_state, fetch_snapshot

log = logging.getLogger(__name__)


def parse_kill(spec: str, nodes: int) -> tuple[int, int] | None:
    """``N@STEP`` -> (N, STEP); None for an empty spec. At least one node must survive."""
    if not spec:
        return None
    count, sep, step = spec.partition("@")
    if not (sep and count.isdigit() and step.isdigit()):
        raise ConfigError(f"--kill must be N@STEP (e.g. 2@100), got {spec!r}")
    n, s = int(count), int(step)
    if not 1 <= n < nodes:
        raise ConfigError(f"--kill {spec}: N must be between 1 and {nodes - 1} (one node must survive)")
    return n, s


def pick_victims(nodes: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(nodes), count))


def node_step(address: str, timeout: float = 5.0) -> int | None:
    """A node's training step through its status RPC, or None when it does not answer."""
    try:
        return int(asyncio.run(fetch_status(address, timeout))["step"])
    except ConnectionError:
        return None


def rebuild_from(
    address: str, model_id: str, train: TrainConfig, out: Path, evaluate: bool, timeout: float = 10.0
) -> dict[str, Any]:
    """Rebuild the newest snapshot through ``address``; summary fields (``rebuilt`` True or False)."""
    try:
        rebuilt = asyncio.run(fetch_snapshot(address, model_id, timeout=timeout))
    except (SnapshotUnavailable, ConnectionError) as exc:
        log.warning("could not rebuild the model from the survivors: %s", exc)
        return {"rebuilt": False, "rebuild_error": str(exc)}
    m = rebuilt.manifest
    result: dict[str, Any] = {
        "rebuilt": True,
        "rebuilt_version": m.version,
        "rebuilt_step": m.step,
        "rebuilt_publisher": m.publisher,
        "rebuilt_sha256": m.sha256.hex(),
        "rebuild_seconds": round(rebuilt.seconds, 3),
        "rebuild_peers": sorted(rebuilt.peers),
    }
    if evaluate:
        import torch

        from gossip.train.data import load_dataset
        from gossip.train.models import build_model
        from gossip.train.trainer import evaluate as test

        ds = load_dataset(train.dataset, seed=train.seed)
        model = build_model(
            train.model, ds.input_shape, ds.num_classes, seed=train.seed, target_shape=ds.target_shape
        )
        if Layout.of_model(model).fingerprint() != m.fingerprint:
            return {**result, "rebuild_error": f"snapshot {m.key} is not a {train.model} model"}
        try:
            check_state(rebuilt, model)
        except LayoutError as exc:
            return {**result, "rebuild_error": str(exc)}
        # strict=False: a snapshot holds the trainable parameters and float buffers, not every buffer.
        model.load_state_dict(rebuilt.state_dict(), strict=False)
        with torch.no_grad():
            _, acc = test(model, ds.x_test, ds.y_test)
        save(rebuilt, out / "model.pt", "pt")
        result["rebuilt_accuracy"] = acc
        result["rebuilt_model"] = str(out / "model.pt")
    return result
