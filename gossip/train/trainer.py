"""Local SGD on one node's slice, evaluation, and the centralised baseline.

Nothing here knows about gossip: a node drives ``LocalTrainer.step()`` and, in
between steps, writes averaging results into the model's parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gossip.config import TrainConfig
from gossip.core.layout import STATE_BUFFER, STATE_MOMENTUM
from gossip.train.data import Dataset
from gossip.train.models import build_model

log = logging.getLogger(__name__)


def cross_entropy(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (N, C) against labels (N,), or of (N, T, C) against a label per
    token (N, T), where a sample's loss is the mean over its tokens (nats per token).

    ``reduction``: ``mean`` or ``sum`` over samples, or ``none`` for one loss per sample.
    """
    if y.dim() == 1:
        return F.cross_entropy(logits, y, reduction=reduction)
    per_sample = F.cross_entropy(logits.transpose(1, -1), y, reduction="none").flatten(1).mean(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """Per sample, the fraction of its labels the argmax gets right (0 or 1 for one label)."""
    hits = logits.argmax(dim=-1) == y
    return hits.reshape(len(y), -1).to(torch.float64).mean(dim=1)


class MomentumSGD:
    """``torch.optim.SGD`` (heavy ball, no dampening, no Nesterov), step for step.

    Not the torch class because building the first ``torch.optim`` optimizer in a
    process imports ``torch._dynamo``: about 1.5 s of CPU per node process, which
    ``gossip simulate`` pays N times on a 2-core machine. A test checks that both
    produce the same parameters.
    """

    def __init__(
        self, params: list[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._buf: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self._buf[i]
                if buf is None:
                    buf = self._buf[i] = d.clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-self.lr)

    @property
    def buffers(self) -> list[Tensor | None]:
        """The momentum buffer of each parameter, None before its first step (or without momentum)."""
        return list(self._buf)

    def set_buffer(self, index: int, value: Tensor) -> None:
        """Resume from a momentum buffer (a copy of ``value`` is kept)."""
        self._buf[index] = value.detach().clone()


class LocalTrainer:
    """Local SGD on one node's slice.

    It does not know about gossip: a node calls ``step()`` and, between steps,
    applies averaging results to ``model``'s parameters in place (the optimizer
    holds references to those same tensors, so it keeps working on them).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        cfg: TrainConfig,
        seed: int,
        *,
        total_steps: int | None = None,
    ) -> None:
        """``total_steps`` overrides ``cfg.epochs``, e.g. to match another run's sample visits."""
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")
        if len(x) == 0:
            raise ValueError("cannot train on an empty slice")
        self.model = model
        self.x = x
        self.y = y
        self.cfg = cfg
        self.optimizer = MomentumSGD(list(model.parameters()), cfg.lr, cfg.momentum, cfg.weight_decay)
        # The optimizer's parameters by name, in its order: how snapshots name momentum buffers.
        self._param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        # Its own generator: the shuffle order depends on this seed only, not on
        # whatever else in the process draws from the global RNG.
        self._generator = torch.Generator().manual_seed(seed)
        # The last batch of an epoch may be short: every sample is visited
        # exactly once per epoch, which is what makes sample visits comparable
        # between a node's slice and the baseline's union.
        self.steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch if total_steps is None else total_steps
        if cfg.max_steps and total_steps is None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        self._eval_interval = cfg.eval_every * self.steps_per_epoch  # in steps, may be fractional
        self._step_count = 0
        self._order = torch.empty(0, dtype=torch.int64)

    def snapshot_state(self) -> list[tuple[str, Tensor]]:
        """What a snapshot carries next to the parameters: each momentum buffer the steps so far
        made, and the model's floating-point buffers (views, not copies)."""
        out = [
            (STATE_MOMENTUM + n, b)
            for n, b in zip(self._param_names, self.optimizer.buffers, strict=True)
            if b is not None
        ]
        out += [(STATE_BUFFER + n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        return out

    def load_momentum(self, state: Mapping[str, Tensor]) -> int:
        """Resume the momentum buffers a snapshot's state holds (as ``snapshot_state`` names them,
        shapes already checked); returns how many were taken. Without momentum, none is."""
        if not self.optimizer.momentum:
            return 0
        taken = 0
        for i, n in enumerate(self._param_names):
            buf = state.get(STATE_MOMENTUM + n)
            if buf is not None:
                self.optimizer.set_buffer(i, buf)
                taken += 1
        return taken

    @property
    def step_count(self) -> int:
        return self._step_count

    @property
    def epoch(self) -> float:
        return self._step_count / self.steps_per_epoch

    def done(self) -> bool:
        return self._step_count >= self.total_steps

    def step(self) -> float:
        """One minibatch forward, backward and optimizer step; returns the minibatch loss."""
        if self.done():
            raise RuntimeError(f"training finished after {self.total_steps} steps")
        within = self._step_count % self.steps_per_epoch
        if within == 0:
            self._order = torch.randperm(len(self.x), generator=self._generator)
        idx = self._order[within * self.cfg.batch_size : (within + 1) * self.cfg.batch_size]
        self.model.train()
        loss = cross_entropy(self.model(self.x[idx]), self.y[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.lr_schedule == "cosine":
            self.optimizer.lr = (
                self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * self._step_count / self.total_steps))
            )
        self.optimizer.step()
        self._step_count += 1
        return loss.item()

    def evaluation_due(self) -> bool:
        """True right after the step that crosses an ``eval_every`` boundary, and after the last step."""
        s = self._step_count
        if s == 0:
            return False
        if s == self.total_steps:
            return True
        # The epsilon absorbs float error in eval_every * steps_per_epoch, so a
        # boundary that falls exactly on a step is not missed (e.g. 0.1 * 30).
        return math.floor(s / self._eval_interval + 1e-9) > math.floor((s - 1) / self._eval_interval + 1e-9)


# Samples per forward pass of an evaluation. On CPU a batch whose activations stay in cache
# wins: gpt:2:128:4 on text:stdlib:16's 8 191 windows, four processes on two cores, took
# 0.73x the time at 256 as at 1024 (bench/eval_batch.py, 40 pairs); the cnn on digits 0.97x.
EVAL_BATCH = 256


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y), computed in eval mode (per token
    for a label per token: nats per byte and next-byte accuracy on text)."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    right = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = model(x[start : start + batch_size])
                target = y[start : start + batch_size]
                total_loss += cross_entropy(logits, target, reduction="sum").item()
                right += float(correct(logits, target).sum())
    finally:
        model.train(was_training)
    return total_loss / len(x), right / len(x)


def train_baseline(
    ds: Dataset, cfg: TrainConfig, sample_visits: int | None = None
) -> tuple[nn.Module, float, float]:
    """The centralised reference: one model, same spec and seed, on the union of the training data.

    It trains for ``sample_visits`` samples (default ``cfg.epochs`` passes over
    the union, i.e. as many as all nodes of an IID run together), and returns
    (model, test loss, test accuracy).
    """
    n = len(ds.y_train)
    visits = cfg.epochs * n if sample_visits is None else sample_visits
    if visits < 1:
        raise ValueError(f"sample_visits must be at least 1, got {visits}")
    full_epochs, rest = divmod(visits, n)
    steps = full_epochs * math.ceil(n / cfg.batch_size) + math.ceil(rest / cfg.batch_size)

    model = build_model(
        cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed, target_shape=ds.target_shape
    )
    trainer = LocalTrainer(model, ds.x_train, ds.y_train, cfg, seed=cfg.seed, total_steps=steps)
    while not trainer.done():
        trainer.step()
    loss, acc = evaluate(model, ds.x_test, ds.y_test)
    log.info("baseline %s/%s: %d steps, test loss %.4f, accuracy %.4f", ds.name, cfg.model, steps, loss, acc)
    return model, loss, acc
