"""The vectorized simulator: N replicas in one stacked tensor, trained and mixed in lockstep.

Row i of ``Simulator.params`` (n, d) is node i's flat model. One round is

    mixed = mix(params)                      # the strategy, on the round's snapshot
    outer step (if any): mixed <- anchor - lr * nesterov(anchor - mixed), anchor <- mixed
    mixed -= lr * d_i(params)                # the first step: its gradient at the snapshot
    params = mixed
    repeat local_steps - 1: params -= lr * d_i(params)

where d_i is from node i's own minibatch. This is the order of a real node whose
exchange is shorter than a step (or with ``--max-lag 1``, the default): its
exchange runs beside the training step after its snapshot, and the result is
applied between that step and the next, so that one step's gradient is taken at
the snapshot and the other local_steps - 1 at the averaged model. With one local
step, synchronous mixing is D-PSGD, x <- W x - lr g(x), and every strategy has
the delta semantics of the real nodes (an exchange moves a node by
mixed(snapshot) - snapshot, on top of what training did meanwhile).
Per-node gradients come from ``torch.func`` (functional_call + grad + vmap)
over all rows at once; momentum follows :class:`gossip.train.trainer.MomentumSGD`
(buffers stay local, never mixed), and each node walks its own partition in
epochs like :class:`gossip.train.trainer.LocalTrainer`, the last batch of an epoch
short (a masked mean). Faults are described in :mod:`gossip.sim.mixing`;
a dead node or a straggler in a round neither trains nor mixes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from gossip.config import ConfigError, TrainConfig, check_outer, check_sgd
from gossip.core.averaging import consensus_distance
from gossip.core.compress import CompressError, Compressor
from gossip.core.outer import Outer
from gossip.core.topology import MIXING_RULES, Topology, TopologyError
from gossip.sim.mixing import (
    STRATEGIES,
    ChocoMixer,
    Mixer,
    PairwiseChocoMixer,
    PairwiseMixer,
    bytes_per_message,
    make_mixer,
)
from gossip.train.data import DataError, Dataset, load_dataset, partition
from gossip.train.models import build_model
from gossip.train.trainer import cross_entropy, evaluate

log = logging.getLogger(__name__)

_TRAIN = TrainConfig()
# Per-node test evaluation runs this many (node, test sample, position) rows at once:
# bounds memory (a text sample is a window of positions, each a row of activations;
# counting samples alone took 32 nodes of gpt:2:128:4 on text:stdlib past 22 GB).
_EVAL_ROWS = 1 << 16


@dataclass
class SimConfig:
    """One simulated run. Training defaults are TrainConfig's, so a run matches `gossip simulate`."""

    nodes: int = 16  # enough for topologies to differ, small enough for seconds per run
    topology: str = "ring"  # the slowest-mixing common graph: where the strategy matters most
    strategy: str = "sync"  # D-PSGD: the case with a closed-form rate, |λ2(W)|^2
    rule: str = "metropolis"  # doubly stochastic on any undirected graph, as the real nodes use
    dataset: str = _TRAIN.dataset
    model: str = _TRAIN.model
    partition: str = _TRAIN.partition
    rounds: int = 100  # about 8 epochs for 16 nodes on digits: past the knee of the curve
    local_steps: int = 1  # one gradient step per mixing, like D-PSGD and the real nodes
    batch_size: int = _TRAIN.batch_size
    lr: float = _TRAIN.lr
    momentum: float = _TRAIN.momentum
    weight_decay: float = _TRAIN.weight_decay
    lr_schedule: str = _TRAIN.lr_schedule
    seed: int = _TRAIN.seed  # model init, partition, batches, matchings and faults
    graph_seed: int = 0  # random graphs: real nodes build theirs with seed 0
    message_loss: float = 0.0  # probability that one message is lost
    crash_fraction: float = 0.0  # nodes that stop for good at crash_round
    crash_round: int = -1  # -1: half-way through the run
    stragglers: float = 0.0  # fraction of nodes that are slow ...
    straggler_skip: float = 0.5  # ... and miss each round with this probability
    eval_every: int = 10  # rounds between evaluations (and the last round)
    # CHOCO-Gossip: each node sends Q(x - x_hat) to its neighbours through this compressor
    # (gossip.core.compress) and mixes the public copies with consensus step gamma (0: the
    # compressor's default step): sync rounds (one public copy per node), or pairwise
    # exchanges with per-pair copies exactly as real nodes keep them (gossip.core.choco).
    # Bytes are the real payloads' sizes.
    compress: str = "none"
    gamma: float = 0.0
    # The outer optimizer of local-steps training (gossip.core.outer): none, or
    # nesterov:LR:MOMENTUM applied to each node's averaged pseudo-gradient every round.
    outer: str = "none"

    def validate(self) -> None:
        """Check ranges and names; one-line ConfigError naming the knob."""
        ints = {"nodes": 1, "rounds": 1, "local_steps": 1, "batch_size": 1, "eval_every": 1}
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.rule not in MIXING_RULES:
            raise ConfigError(f"rule must be one of {', '.join(MIXING_RULES)}, got {self.rule!r}")
        check_sgd(self.lr, self.momentum, self.weight_decay, self.lr_schedule)
        if not 0 <= self.message_loss < 1:
            raise ConfigError(f"message_loss must be in [0, 1), got {self.message_loss}")
        for name in ("crash_fraction", "stragglers", "straggler_skip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if round(self.crash_fraction * self.nodes) >= self.nodes:
            raise ConfigError("crash_fraction must leave at least one node alive")
        if self.crash_round < -1 or self.crash_round > self.rounds:
            raise ConfigError(f"crash_round must be -1 or in 0..rounds, got {self.crash_round}")
        try:
            compressed = Compressor.parse(self.compress).spec != "none"
        except CompressError as exc:
            raise ConfigError(f"compress: {exc}") from None
        check_outer(self.outer, self.strategy)
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma must be in [0, 1] (0: the compressor's default), got {self.gamma}")
        if compressed and (
            self.strategy == "push-sum"
            or self.message_loss
            or (self.strategy == "sync" and (self.crash_fraction or self.stragglers))
        ):
            raise ConfigError(
                "compress runs CHOCO-Gossip on sync rounds (without message_loss, crash_fraction or "
                "stragglers) or on pairwise exchanges (without message_loss), not push-sum"
            )

    def build_topology(self) -> Topology:
        try:
            return Topology.parse(self.topology, self.nodes, seed=self.graph_seed)
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None

    def knobs(self) -> dict[str, Any]:
        return asdict(self)


SIM_KNOBS: tuple[str, ...] = tuple(f.name for f in fields(SimConfig))


@dataclass
class RoundMetrics:
    round: int
    step: int
    loss: float | None  # mean training loss of the active nodes since the previous record
    test_loss: float  # of the average model
    accuracy: float  # test accuracy of the average model
    worst_accuracy: float  # of the worst alive node
    mean_accuracy: float  # over alive nodes, what `gossip simulate` reports
    consensus_distance: float  # mean_i ||x_i - xbar||^2 over alive nodes
    bytes_sent: int  # payload bytes sent so far, all nodes together
    alive: int


class Batches:
    """Per-node minibatch indices, epoch by epoch over each node's own slice, for all nodes at once."""

    def __init__(self, parts: list[np.ndarray], batch_size: int, generator: torch.Generator):
        n = len(parts)
        self.lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        width = int(self.lengths.max())
        self.index = torch.zeros(n, width, dtype=torch.int64)
        for i, p in enumerate(parts):  # setup only
            self.index[i, : len(p)] = torch.from_numpy(p)
        self.steps_per_epoch = (self.lengths + batch_size - 1) // batch_size
        self.order = torch.zeros(n, width, dtype=torch.int64)
        self.offsets = torch.arange(batch_size)
        self.batch_size = batch_size
        self.gen = generator
        self.count = 0

    def next(self) -> tuple[Tensor, Tensor]:
        """(sample indices (n, B), valid mask (n, B)); a node's last batch of an epoch may be short."""
        within = self.count % self.steps_per_epoch
        fresh = torch.nonzero(within == 0).flatten()
        if fresh.numel():
            keys = torch.rand(fresh.numel(), self.index.shape[1], generator=self.gen)
            pad = torch.arange(self.index.shape[1]) >= self.lengths[fresh, None]
            self.order[fresh] = torch.argsort(keys.masked_fill_(pad, 2.0), dim=1)
        pos = within[:, None] * self.batch_size + self.offsets
        valid = pos < self.lengths[:, None]
        local = self.order.gather(1, pos.clamp_(max=self.index.shape[1] - 1))
        self.count += 1
        return self.index.gather(1, local), valid


ModelSource = nn.Module | Callable[[], nn.Module]


class Simulator:
    """N replicas of one model on one topology, stepped a round at a time.

    ``dataset``, ``model`` (a module or a factory; its weights are every node's
    start) and ``topology`` override what ``cfg`` names.
    """

    def __init__(
        self,
        cfg: SimConfig,
        *,
        dataset: Dataset | None = None,
        model: ModelSource | None = None,
        topology: Topology | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dataset = dataset if dataset is not None else load_dataset(cfg.dataset, seed=cfg.seed)
        ds = self.dataset
        if model is None:
            module = build_model(
                cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed, target_shape=ds.target_shape
            )
        else:
            module = model if isinstance(model, nn.Module) else model()
        if any(True for _ in module.buffers()):
            raise ConfigError("the simulator needs a model without buffers (no BatchNorm running stats)")
        self.module = module
        self.topology = topology if topology is not None else cfg.build_topology()
        if self.topology.n != cfg.nodes:
            raise ConfigError(f"topology has {self.topology.n} nodes but nodes = {cfg.nodes}")
        n = self.n = cfg.nodes
        # Separate streams: a fault knob changes neither the batches nor the matchings.
        self._data_gen = torch.Generator().manual_seed(cfg.seed)
        self._mix_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self._fault_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.mixer: Mixer = make_mixer(cfg.strategy, self.topology, self._mix_gen, cfg.rule, cfg.message_loss)
        compressor = Compressor.parse(cfg.compress)
        gamma, choco_seed = cfg.gamma or compressor.default_step(), cfg.seed * 7919 + 3
        self._choco: ChocoMixer | PairwiseChocoMixer | None = None
        if compressor.spec != "none" and isinstance(self.mixer, PairwiseMixer):
            self._choco = PairwiseChocoMixer(self.mixer, compressor, gamma, choco_seed)
        elif compressor.spec != "none":
            self._choco = ChocoMixer(self.topology, compressor, gamma, cfg.rule, choco_seed)

        named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
        self.names = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.dim = sum(self.sizes)
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for _, p in named])
        self.params = flat.repeat(n, 1)
        self._momentum = torch.zeros_like(self.params) if cfg.momentum else None
        outer = Outer.parse(cfg.outer)
        # The outer optimizer's anchors and momentum: local to each node, never mixed.
        self._outer = (outer, self.params.clone(), torch.zeros_like(self.params)) if outer.active else None
        try:
            parts = partition(ds.y_train, n, cfg.partition, seed=cfg.seed)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        self.batches = Batches(parts, cfg.batch_size, self._data_gen)
        self._grad = vmap(grad_and_value(self._loss))
        self._forward = vmap(self._logits, in_dims=(0, None))

        self.dead = torch.zeros(n, dtype=torch.bool)
        order = torch.randperm(n, generator=self._fault_gen)
        self._crashing = order[: round(cfg.crash_fraction * n)]
        self._crash_round = cfg.rounds // 2 if cfg.crash_round < 0 else cfg.crash_round
        self._slow = torch.zeros(n, dtype=torch.bool)
        self._slow[order[n - round(cfg.stragglers * n) :]] = True
        self.round = 0
        self.steps = 0
        self.bytes_sent = 0
        self.history: list[RoundMetrics] = []
        self._loss_sum = 0.0
        self._loss_rounds = 0
        log.debug("simulator: %d nodes x %d parameters, %s on %s", n, self.dim, cfg.strategy, cfg.topology)

    # --- the model as a function of one flat row ------------------------------------

    def views(self, x: Tensor) -> dict[str, Tensor]:
        """Parameter views into stacked rows x (n, d), or into one flat row (d,)."""
        lead = tuple(x.shape[:-1])
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            out[name] = x[..., offset : offset + size].view(*lead, *shape)
            offset += size
        return out

    def _logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.module, params, (x,))
        return out

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        per_sample = cross_entropy(self._logits(params, x), y, reduction="none")
        return (per_sample * mask).sum() / mask.sum()

    # --- one round -------------------------------------------------------------------

    def _active(self) -> Tensor | None:
        """Nodes that take part in this round; None when all do (the fast path)."""
        if self.round == self._crash_round and self._crashing.numel():
            self.dead[self._crashing] = True
            log.info("round %d: %d nodes crashed", self.round, self._crashing.numel())
        missing = self.dead
        if self.cfg.stragglers:
            skip = torch.rand(self.n, generator=self._fault_gen) < self.cfg.straggler_skip
            missing = missing | (self._slow & skip)
        return None if not bool(missing.any()) else ~missing

    def _lr(self) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        total = self.cfg.rounds * self.cfg.local_steps
        return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * self.steps / total))

    def _local_step(self, target: Tensor, active: Tensor | None) -> Tensor:
        """One SGD step of every active node, at ``params``, added to ``target``; returns the losses.

        ``target`` is the round's mixed models or ``params`` itself (each block of a
        step's update is formed before it is added)."""
        cfg = self.cfg
        sample, valid = self.batches.next()
        xb, yb = self.dataset.x_train[sample], self.dataset.y_train[sample]
        grads, losses = self._grad(self.views(self.params), xb, yb, valid.to(xb.dtype))
        lr = self._lr()
        mask = None if active is None else active.to(target.dtype)[:, None]
        offset = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            cols = slice(offset, offset + size)
            offset += size
            d = grads[name].reshape(self.n, size)
            if cfg.weight_decay:
                d = d + cfg.weight_decay * self.params[:, cols]
            if self._momentum is not None:
                buf = self._momentum[:, cols]
                if mask is None:
                    # buf <- momentum * buf + d in one pass over memory (out= may be a strided view).
                    torch.add(d, buf, alpha=cfg.momentum, out=buf)
                    d = buf
                else:
                    # Skipping nodes keep their buffer as it was.
                    buf.mul_(torch.where(mask > 0, cfg.momentum, 1.0)).add_(d * mask)
                    d = buf * mask
            elif mask is not None:
                d = d * mask
            target[:, cols].add_(d, alpha=-lr)
        self.steps += 1
        return losses if active is None else losses[active]

    def step(self) -> None:
        """One round: mix the snapshot, add local_steps SGD steps, advance the round."""
        active = self._active()
        if self._choco is not None:
            mixed, nbytes = self._choco.mix(self.params, self.round, active)
            self.bytes_sent += nbytes
        else:
            mixed, messages = self.mixer.mix(self.params, self.round, active)
            self.bytes_sent += messages * bytes_per_message(self.dim)
        if self._outer is not None:
            self._outer_step(mixed, active)
        for s in range(self.cfg.local_steps):
            # The first step runs while the exchange is in flight: its gradient is at the
            # snapshot, added to the mixed models; the rest start from the mixed models.
            losses = self._local_step(mixed if s == 0 else self.params, active)
            if s == 0:
                self.params = mixed
            if losses.numel():
                self._loss_sum += float(losses.mean())
                self._loss_rounds += 1
        self.round += 1

    def _outer_step(self, mixed: Tensor, active: Tensor | None) -> None:
        """Every active node's outer step on what the averaging made of its snapshot (in place)."""
        assert self._outer is not None
        outer, anchor, buf = self._outer
        if active is None:
            outer.step_(mixed, anchor, buf)
            return
        rows = active.nonzero().squeeze(1)  # a node that sat the round out keeps its state
        m, a, b = mixed[rows], anchor[rows], buf[rows]
        outer.step_(m, a, b)
        mixed[rows], anchor[rows], buf[rows] = m, a, b

    # --- metrics ---------------------------------------------------------------------

    def average_model(self) -> nn.Module:
        """A copy of the model holding the network's average (push-sum: weighted) over alive nodes."""
        alive = None if not bool(self.dead.any()) else ~self.dead
        return self._module_with(self.mixer.average(self.params, alive))

    def node_model(self, rank: int) -> nn.Module:
        """A copy of the model holding node ``rank``'s parameters."""
        return self._module_with(self.params[rank])

    def _module_with(self, flat: Tensor) -> nn.Module:
        module = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, view in self.views(flat).items():
                module.get_parameter(name).copy_(view)
        return module

    def node_accuracies(self) -> Tensor:
        """Test accuracy of every node (n,), in chunks of nodes."""
        ds = self.dataset
        per_sample = math.prod(ds.target_shape)  # positions with a label in one sample
        samples = max(1, min(len(ds.y_test), _EVAL_ROWS // per_sample))  # test samples at once
        nodes = max(1, _EVAL_ROWS // (samples * per_sample))  # ... for this many nodes at once
        out = []
        with torch.no_grad():
            for rows in self.params.split(nodes):
                hits = torch.zeros(len(rows), dtype=torch.float64)
                for first in range(0, len(ds.y_test), samples):
                    x, y = ds.x_test[first : first + samples], ds.y_test[first : first + samples]
                    logits = self._forward(self.views(rows), x)
                    hits += (logits.argmax(dim=-1) == y).to(torch.float64).flatten(1).sum(dim=1)
                out.append(hits / (len(ds.y_test) * per_sample))
        return torch.cat(out)

    def evaluate(self) -> RoundMetrics:
        alive = ~self.dead
        test_loss, accuracy = evaluate(self.average_model(), self.dataset.x_test, self.dataset.y_test)
        accs = self.node_accuracies()[alive]
        rows = self.params[alive] if bool(self.dead.any()) else self.params
        metrics = RoundMetrics(
            round=self.round,
            step=self.steps,
            loss=self._loss_sum / self._loss_rounds if self._loss_rounds else None,
            test_loss=test_loss,
            accuracy=accuracy,
            worst_accuracy=float(accs.min()),
            mean_accuracy=float(accs.mean()),
            consensus_distance=consensus_distance(rows),
            bytes_sent=self.bytes_sent,
            alive=int(alive.sum()),
        )
        self._loss_sum, self._loss_rounds = 0.0, 0
        self.history.append(metrics)
        return metrics

    def run(self, progress: Callable[[RoundMetrics], None] | None = None) -> list[RoundMetrics]:
        """Evaluate at round 0, then step to ``cfg.rounds``, evaluating every ``eval_every`` and at the end."""
        if not self.history:
            self._report(self.evaluate(), progress)
        while self.round < self.cfg.rounds:
            self.step()
            if self.round % self.cfg.eval_every == 0 or self.round == self.cfg.rounds:
                self._report(self.evaluate(), progress)
        return self.history

    @staticmethod
    def _report(m: RoundMetrics, progress: Callable[[RoundMetrics], None] | None) -> None:
        log.debug("round %d: accuracy %.4f, consensus %.3e", m.round, m.accuracy, m.consensus_distance)
        if progress is not None:
            progress(m)
