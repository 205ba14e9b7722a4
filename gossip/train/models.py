"""Small built-in models, and user models named by ``package.module:factory``.

Every model takes flat float input of shape (N, D) and returns logits (N, C), or
(N, T, C) for a dataset with a label per token (``text:stdlib``, ``gpt:...``), so
datasets, the simulator and the wire format only ever deal in flat samples.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gossip.config import ConfigError

log = logging.getLogger(__name__)

MODEL_NAMES = ("logreg", "mlp", "cnn")


class ModelError(ConfigError):
    """A model spec that cannot be built; the message is one line for the user."""


def build_model(
    spec: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    target_shape: tuple[int, ...] = (),
) -> nn.Module:
    """Build the model named by ``spec`` with weights drawn from ``seed``.

    The same spec, shapes and seed give bit-identical weights on every node,
    which is where decentralised SGD should start: averaging replicas that began
    apart wastes the first rounds on pulling them together. ``target_shape`` is the
    dataset's labels per sample: its logits must be (N, *target_shape, num_classes).
    """
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ModelError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")
    input_shape = tuple(int(d) for d in input_shape)

    factory: Callable[[], Any]
    if spec in _BUILTINS:
        factory = functools.partial(_BUILTINS[spec], input_shape, num_classes)
    elif spec.startswith("gpt:"):
        factory = functools.partial(_gpt, spec, input_shape, num_classes, target_shape)
    elif ":" in spec:
        factory = functools.partial(_call_factory, _resolve_factory(spec), input_shape, num_classes)
    else:
        raise ModelError(
            f"unknown model {spec!r}: use {', '.join(MODEL_NAMES)}, gpt:LAYERS:DIM:HEADS or package.module:factory"
        )

    # fork_rng scopes the seed to this construction: the caller's global RNG
    # stream is left as it was. devices=[] since models are built on the CPU.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    _check_logits(spec, model, input_shape, num_classes, target_shape)
    log.debug("model %s: %d parameters, seed %d", spec, sum(p.numel() for p in model.parameters()), seed)
    return model


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # One hidden layer of 128 is enough for 97 %+ on digits and keeps a gossip
    # message small (about 10k parameters there).
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(f"model 'cnn' needs an image input_shape (C, H, W), got {input_shape}")
    channels, height, width = input_shape
    # Pooling to at most 4x4 makes the head's size independent of the image
    # size (8x8 digits or 28x28 images alike) while keeping coarse layout.
    pooled = (min(height, 4), min(width, 4))
    return nn.Sequential(
        nn.Unflatten(1, input_shape),
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(pooled),
        nn.Flatten(),
        nn.Linear(32 * pooled[0] * pooled[1], num_classes),
    )


def _gpt(
    spec: str, input_shape: tuple[int, ...], num_classes: int, target_shape: tuple[int, ...]
) -> nn.Module:
    parts = spec.split(":")
    try:
        layers, dim, heads = (int(p) for p in parts[1:])
    except ValueError:
        raise ModelError(f"bad model {spec!r}: use gpt:LAYERS:DIM:HEADS, three whole numbers") from None
    if not (1 <= layers <= 48 and 1 <= heads <= dim <= 4096 and dim % heads == 0):
        raise ModelError(f"bad model {spec!r}: need 1-48 layers and DIM a multiple of HEADS, at most 4096")
    if len(input_shape) != 1 or target_shape != input_shape:
        raise ModelError(f"model {spec!r} needs a dataset with a label per byte, such as text:stdlib")
    return CausalLM(num_classes, input_shape[0], layers, dim, heads)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than scaled_dot_product_attention, whose backward the simulator's
        # vmap would run one node at a time; the mask is built per call (no buffer).
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return h + self.mlp(self.norm2(h))


class CausalLM(nn.Module):
    """A small GPT-style causal transformer over bytes: (N, T) byte values -> (N, T, vocab) logits.

    Pre-norm blocks, learned positions (a parameter, not a buffer: nothing the
    simulator refuses), causal attention with the mask built per call.
    """

    def __init__(self, vocab: int, context: int, layers: int, dim: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.long()) + self.position[: x.shape[-1]]
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.head(self.norm(h))
        return out


_BUILTINS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
}


def _resolve_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ModelError(f"bad model spec {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"model spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"model spec {spec!r}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory


def _call_factory(factory: Callable[..., Any], input_shape: tuple[int, ...], num_classes: int) -> Any:
    offered = {"input_shape": input_shape, "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        # Some builtins have no introspectable signature: call them bare.
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**offered)
    return factory(**{k: v for k, v in offered.items() if k in params})


def _check_logits(
    spec: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int, target_shape: tuple[int, ...]
) -> None:
    """Fail at build time, with the spec in the message, if the model cannot map (N, D) to (N, C)
    (or to (N, T, C) with a label per token)."""
    was_training = model.training
    model.eval()  # eval mode: a probe must not move BatchNorm statistics
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, math.prod(input_shape)))
    except RuntimeError as e:
        raise ModelError(
            f"model {spec!r} fails on flat input of shape (2, {math.prod(input_shape)}): {e}"
        ) from e
    finally:
        model.train(was_training)
    want = (2, *target_shape, num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {spec!r} maps input (2, {math.prod(input_shape)}) to {got}, expected logits {want}"
        )
