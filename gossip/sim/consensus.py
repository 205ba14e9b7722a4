"""Pure gossip averaging from random vectors, measured against the theory.

No training: every node starts from a random vector and the strategy of
:mod:`gossip.sim.mixing` averages them round after round. The consensus
distance (mean squared distance to the average, relative to the start) should
shrink by |λ2(W)|² per round for synchronous averaging; the measured rate is a
geometric fit over the last half of the rounds, after the faster modes have
died out, and before rounding noise: distances at or below ``FLOOR`` (float64
rounding, relative) end the usable stretch.

How many rounds that takes depends on more than |λ2|: where the next eigenvalues
nearly coincide with it (small-world graphs), their modes fade only as
(|λ3|/|λ2|)^2t and bend the fit long after 5/(1 - |λ2|²) rounds. So by default the
rounds are not fixed: the run goes on, in blocks that grow with it, until the
fitted gap 1 - r agrees with the previous fit to ``STABLE`` twice in a row (or the
distance reaches the rounding floor, or ``MAX_ROUNDS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from gossip.core.averaging import consensus_distance
from gossip.core.compress import Compressor
from gossip.core.spectral import describe, second_eigenvalue
from gossip.core.topology import Topology
from gossip.sim.mixing import STRATEGIES, ChocoMixer, expected_pairwise_matrix, make_mixer

# Relative squared distances this small are float64 rounding, not signal: values of
# size 1 carry errors near 1e-16, i.e. squared distances near 1e-32.
FLOOR = 1e-24
# A fall to the floor this far below the fitted trend is an exact collapse, not decay.
_COLLAPSE = 1e6
# Matchings drawn to estimate E[W] of pairwise gossip.
PAIRWISE_SAMPLES = 512
# Rounds chosen by the run itself: the fitted gap must change by less than this
# (relative) between two successive fits, twice; a first block of MIN_ROUNDS, then
# blocks of half the rounds so far, up to MAX_ROUNDS.
STABLE = 0.002
MIN_ROUNDS = 40
# A distance this many times the start's: a compressed run whose step is too large diverges.
DIVERGED = 1e6
MAX_ROUNDS = 100_000


@dataclass
class ConsensusResult:
    topology: str
    spec: str
    nodes: int
    strategy: str
    rule: str
    rounds: int
    dim: int
    seed: int
    loss: float
    distances: list[float]
    measured_rate: float
    # None where no closed form applies (push-sum to random out-peers).
    theoretical_rate: float | None
    theory: str
    spectral_gap: float
    lambda2: float
    # Rounds [first, last] the rate was fitted over.
    fit_rounds: tuple[int, int] = field(default=(0, 0))
    # CHOCO-Gossip with a compressor (sync rounds only): its spec, step size, and the mean
    # payload a node sent per round (to each neighbour), against the dense float64 one.
    compress: str = "none"
    gamma: float = 1.0
    payload_bytes: float = 0.0

    @property
    def ratio(self) -> float | None:
        """measured / theoretical rate; None when the theory is 0 or missing."""
        if not self.theoretical_rate:
            return None
        return self.measured_rate / self.theoretical_rate

    @property
    def gap_ratio(self) -> float | None:
        """(1 - measured) / (1 - theoretical): the comparison that matters when rates are near 1."""
        if self.theoretical_rate is None or self.theoretical_rate >= 1.0:
            return None
        return (1.0 - self.measured_rate) / (1.0 - self.theoretical_rate)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit_rounds"] = list(self.fit_rounds)
        out["ratio"] = self.ratio
        out["gap_ratio"] = self.gap_ratio
        return out


def fit_rate(distances: Sequence[float], floor: float = FLOOR) -> tuple[float, int, int]:
    """Per-round contraction r of ``distances`` (d_0 first) and the rounds it was fitted over.

    A least-squares line through log d_t over the last half of the rounds
    before the first one at or below ``floor``. Averaging that is exact within
    one round (complete graph: W = 11^T/n), or that falls to the floor far
    faster than its trend (one-peer exponential on 2^k nodes), gives r = 0.
    """
    d = np.asarray(distances, dtype=np.float64)
    if len(d) < 2 or d[0] <= floor:
        return 0.0, 0, 0
    below = np.flatnonzero(d <= floor)
    usable = int(below[0]) if len(below) else len(d)
    if usable < 2:
        return 0.0, 0, 0
    first = min(usable // 2, usable - 2)
    t = np.arange(first, usable, dtype=np.float64)
    rate = min(1.0, math.exp(np.polyfit(t, np.log(d[first:usable]), 1)[0]))
    if usable < len(d) and d[usable - 1] * rate > _COLLAPSE * floor:
        # The trend says the distance should still be far above the floor, yet it
        # fell through it in one round: exact averaging (one-peer exponential on
        # 2^k nodes), whose asymptotic rate is 0.
        return 0.0, first, usable
    return rate, first, usable - 1


def theoretical_rate(
    top: Topology, strategy: str, rule: str = "metropolis", seed: int = 0
) -> tuple[float | None, str]:
    """The rate theory predicts for ``strategy`` on ``top``, and where it comes from."""
    info = describe(top, rule)
    lam = float(info["lambda2"])
    if lam * lam < FLOOR:
        lam = 0.0  # W = 11^T/n up to rounding: exact in one round
    if strategy == "sync" or (strategy == "push-sum" and top.time_varying):
        # On one-peer exponential, push-sum moves no weight (each node gets exactly one
        # half back), so it is W_t = (I + P_t)/2 exactly, like sync.
        how = "per-round |λ2|^2 over a period of W_t" if top.time_varying else f"|λ2(W)|^2, W by {rule}"
        return lam * lam, how
    if strategy == "pairwise":
        gen = torch.Generator().manual_seed(seed + 1)
        w = expected_pairwise_matrix(top, gen, PAIRWISE_SAMPLES)
        return second_eigenvalue(w), f"λ2(E[W]) of random matchings ({PAIRWISE_SAMPLES} sampled), a bound"
    return None, "none: push-sum to a random out-peer has no closed-form rate"


def run_consensus(
    top: Topology,
    rounds: int | None = None,
    strategy: str = "sync",
    rule: str = "metropolis",
    seed: int = 0,
    dim: int = 16,
    loss: float = 0.0,
    compress: str = "none",
    gamma: float | None = None,
) -> ConsensusResult:
    """Average random vectors (n, dim) and fit the contraction rate.

    ``rounds``: that many rounds; None: until the fitted rate is stable (see the module).
    ``compress``: run CHOCO-Gossip with this compressor (sync rounds; ``gamma`` is its
    consensus step, default ``Compressor.default_step``); the theory column stays the
    uncompressed |λ2|², the fastest compressed gossip could go.
    """
    compressor = Compressor.parse(compress)
    choco = compressor.spec != "none"
    if choco and (strategy != "sync" or loss):
        raise ValueError("--compress runs CHOCO-Gossip on sync rounds, without message loss")
    step = (compressor.default_step() if choco else 1.0) if gamma is None else gamma
    if not 0 < step <= 1:
        raise ValueError(f"the consensus step must be in (0, 1], got {step}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if top.n < 2:
        raise ValueError("consensus needs at least 2 nodes")
    if (rounds is not None and rounds < 1) or dim < 1:
        raise ValueError(f"rounds and dim must be at least 1, got {rounds} and {dim}")
    theory, how = theoretical_rate(top, strategy, rule, seed)
    info = describe(top, rule)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(top.n, dim, generator=gen, dtype=torch.float64)
    mixer = make_mixer(strategy, top, gen, rule, loss)
    start = consensus_distance(x)
    distances = [1.0]
    choco_mixer = ChocoMixer(top, compressor, step, rule, seed * 1_000_003) if choco else None

    def advance(count: int) -> None:
        nonlocal x
        for _ in range(count):
            t = len(distances) - 1
            x, _ = choco_mixer.mix(x, t) if choco_mixer is not None else mixer.mix(x, t)
            d = consensus_distance(x) / start
            if not d < DIVERGED:
                raise FloatingPointError(
                    f"consensus diverged at round {t + 1}: the distance grew {d:.1e}-fold (try a smaller --gamma)"
                )
            distances.append(d)

    if rounds is not None:
        advance(rounds)
        rate, first, last = fit_rate(distances)
    else:
        rate, first, last = _until_stable(advance, distances)
    if choco_mixer is not None and distances[-1] > 1.0:
        raise FloatingPointError(
            f"consensus diverged: after {len(distances) - 1} rounds the distance is {distances[-1]:.1e} times "
            "the start's (try a smaller --gamma)"
        )
    return ConsensusResult(
        topology=top.name,
        spec=top.spec,
        nodes=top.n,
        strategy=strategy,
        rule=str(info["rule"]),
        rounds=len(distances) - 1,
        dim=dim,
        seed=seed,
        loss=loss,
        distances=distances,
        measured_rate=rate,
        theoretical_rate=theory,
        theory=how,
        spectral_gap=float(info["spectral_gap"]),
        lambda2=float(info["lambda2"]),
        fit_rounds=(first, last),
        compress=compressor.spec,
        gamma=step,
        payload_bytes=float(np.mean(choco_mixer.payloads)) if choco_mixer is not None else 8.0 * dim,
    )


def _until_stable(advance: Callable[[int], None], distances: list[float]) -> tuple[float, int, int]:
    """Run rounds in growing blocks until the fitted gap is stable; the last fit."""
    previous: float | None = None
    agreed = 0
    advance(MIN_ROUNDS)
    while True:
        rate, first, last = fit_rate(distances)
        gap = 1.0 - rate
        if last < len(distances) - 1 or rate == 0.0:
            return rate, first, last  # reached the rounding floor: nothing more to learn
        if previous is not None and abs(gap - previous) <= STABLE * max(gap, 1e-300):
            agreed += 1
            if agreed == 2:
                return rate, first, last
        else:
            agreed = 0
        previous = gap
        done = len(distances) - 1
        if done >= MAX_ROUNDS:
            return rate, first, last
        advance(min(max(MIN_ROUNDS, done // 2), MAX_ROUNDS - done))


def format_result(r: ConsensusResult, max_rows: int = 100) -> str:
    """A table of distances per round (every k-th beyond ``max_rows``), then the rates side by side."""
    step = max(1, math.ceil(len(r.distances) / max_rows))
    lines = [
        f"topology {r.spec} (n={r.nodes}), strategy {r.strategy}, mixing rule {r.rule}, "
        f"dim {r.dim}, seed {r.seed}"
        + (f", message loss {r.loss:g}" if r.loss else "")
        + (
            f", CHOCO-Gossip {r.compress} with step {r.gamma:g}: {r.payload_bytes:.0f} bytes per node per round "
            f"against {8 * r.dim} dense"
            if r.compress != "none"
            else ""
        ),
        f"{'round':>6}  distance (relative to round 0)" + (f", every {step}th round" if step > 1 else ""),
    ]
    shown = [*range(0, len(r.distances), step)]
    if shown[-1] != len(r.distances) - 1:
        shown.append(len(r.distances) - 1)
    lines += [f"{t:>6}  {r.distances[t]:.6e}" for t in shown]

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.6f}"

    theory = r.theoretical_rate
    lines += [
        "",
        f"measured rate     {r.measured_rate:.6f}  (fit over rounds {r.fit_rounds[0]}..{r.fit_rounds[1]})",
        f"theoretical rate  {num(theory)}  ({r.theory})",
        f"ratio             {num(r.ratio)}",
        f"gap 1 - rate      {1 - r.measured_rate:.6f} measured, "
        f"{num(None if theory is None else 1 - theory)} theoretical (ratio {num(r.gap_ratio)})",
        f"spectral gap      {r.spectral_gap:.6f}  (1 - |λ2|, mixing rule {r.rule})",
    ]
    return "\n".join(lines)
