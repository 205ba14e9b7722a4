"""SIGKILL a node at every phase of a pairwise exchange and of a push-sum send.

Each case is two real ``python -m gossip node`` processes on loopback: a survivor
and a victim started with ``GOSSIP_FAILPOINTS`` (see ``gossip.node.faults``), which
kills itself at the chosen phase of its ``hit``-th exchange. Only one side starts
exchanges (the other runs with ``--gossip-every`` beyond its run), so every
exchange is between the two of them and the survivor's books can be predicted
exactly from the victim's, which it logs as it dies. Then the survivor:

- is alive, answers ``Status`` and keeps training (its step advances);
- has finite parameters (its evaluations after the kill have finite loss and
  accuracy; push-sum: its weight is finite and positive);
- has the counters and push-sum weight the docs' crash semantics page says, to the
  last bit;
- ended its side of the broken call within its deadline (from its log);
- logged no traceback.

With ``--compress`` (a subset of the points), the survivor's reference copies of the
victim must also have moved exactly when it took its half.

One survivor serves all cases of a (strategy, victim role), one after the other;
the victims are ranked so their only neighbour is the survivor. The seed picks the
victim's training seed and which exchange it dies in (its 1st, 2nd or 3rd). CI runs
each phase once, seeds 0 and 1 in turn along the phases, so every role dies both in
its first exchange and after one it completed; ``GOSSIP_FAULT_SEEDS=0,1,2`` runs every
phase with each seed given.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.api import BackgroundNode
from gossip.config import GossipConfig, NodeConfig
from gossip.core.choco import Offer
from gossip.node import faults
from gossip.train.data import load_dataset
from gossip.train.models import build_model
from tests.support.procs import START_TIMEOUT, Launcher, NodeProc, log_time, wait_for

SEEDS = [int(s) for s in os.environ.get("GOSSIP_FAULT_SEEDS", "").split(",") if s.strip()]

# The victim's role in the exchange it dies in -> its phases, in protocol order.
PHASES: dict[tuple[str, str], list[str]] = {
    ("pairwise", "caller"): [
        "before_send",
        "mid_stream",
        "accepted",
        "reply_mid",
        "before_commit",
        "after_commit",
    ],
    ("pairwise", "callee"): ["before_send", "mid_stream", "answering", "answered", "applied"],
    ("push-sum", "caller"): ["before_send", "mid_stream", "sent", "acked"],
    ("push-sum", "callee"): ["header", "mid_stream", "applied"],
}
# Phases at which the survivor (the callee) took the exchange: its half, or the push merged.
TAKEN = {"pairwise.caller.after_commit", "push.caller.sent", "push.caller.acked"}
# Of those, the phase where the victim has handed its last chunk to gRPC, not necessarily to
# the socket: a kill that overtakes gRPC's write buffer leaves the survivor a short payload,
# refused whole as mid-stream (seen once in CI). Its log says which of the two happened.
MAYBE_TAKEN = {"push.caller.sent"}
# Phases before the victim opened the call: the survivor never hears of that exchange.
NOT_OPENED = {"pairwise.caller.before_send", "push.caller.before_send"}
# Phases the victim (the callee) had already counted as served when it died.
VICTIM_COUNTED = {"pairwise.callee.applied"}

COMMON = ["--topology", "complete", "--world-size", "2", "--chunk-bytes", "4096", "--publish-every", "0"]
NEVER = ["--gossip-every", "1000000"]  # starts no exchange of its own during the test
# 38 440 bytes of parameters (the mlp on digits): 10 chunks of 4 KiB, so "mid-stream" is.
PAYLOAD_BYTES = 38_440
DEADLINE = 5.0 + 2 * PAYLOAD_BYTES / 20e6  # Party.deadline with the default exchange_timeout
SLACK = 2.0  # a loaded 2-core machine: scheduling, log flushing
VICTIM_TIMEOUT = 90.0  # start (imports, data), join, train to the fatal exchange
SURVIVOR_STEP = 0.02  # seconds per step at least: 100 steps in 2 s, an evaluation every 1.8 s


@dataclass(frozen=True)
class Case:
    strategy: str
    role: str  # the victim's
    phase: str
    seed: int

    @property
    def point(self) -> str:
        return f"{'push' if self.strategy == 'push-sum' else 'pairwise'}.{self.role}.{self.phase}"

    @property
    def hit(self) -> int:
        """The victim dies in its 1st, 2nd or 3rd exchange that reaches the phase."""
        return 1 + self.seed % 3

    def __str__(self) -> str:
        return f"{self.point}-seed{self.seed}"


# Grouped by survivor, so each survivor process serves a run of cases.
CASES = [
    Case(st, role, ph, seed)
    for (st, role), phases in PHASES.items()
    for seed_of_all in SEEDS or [None]
    for i, ph in enumerate(phases)
    for seed in [i % 2 if seed_of_all is None else seed_of_all]
]


class Survivors:
    """The processes of the matrix: one survivor per (strategy, victim role), and the victims.

    The survivor of a group lives through all its cases; it is killed when the next
    group starts. Each victim is started one case ahead and waits (``--seed-file``)
    until its case tells it where the survivor is: its imports and data load, the
    bulk of a case's CPU, overlap the case before.
    """

    def __init__(self, launcher: Launcher, order: list[Case]) -> None:
        self.launcher = launcher
        self.order = order  # the cases in the order this session runs them
        self.current: tuple[tuple[str, str], NodeProc] | None = None
        self.spare: tuple[Case, NodeProc] | None = None

    def get(self, strategy: str, role: str) -> NodeProc:
        key = (strategy, role)
        if self.current is not None:
            (old_key, old) = self.current
            if old_key == key and old.popen.poll() is None:
                return old
            if old.popen.poll() is None:
                old.kill()
        name = f"survivor-{strategy}-{role}-{len(self.launcher.procs)}"
        args = ["--strategy", strategy, *COMMON, "--rank", "0", "--epochs", "100000", "--eval-every", "1"]
        # It trains through every case of its group; paced, it leaves the cores to the victims.
        args += ["--min-step-time", str(SURVIVOR_STEP)]
        # The victim's role decides who starts exchanges: the survivor only answers a caller.
        p = self.launcher.start(name, *args, *(NEVER if role == "caller" else []))
        self.launcher.wait_ready(p)
        self.current = (key, p)
        return p

    def victim(self, case: Case, survivor: NodeProc) -> NodeProc:
        """``case``'s victim, joining ``survivor`` now; the next case's victim starts loading."""
        spare, self.spare = self.spare, None
        if spare is not None and (spare[0] != case or spare[1].popen.poll() is not None):
            if spare[1].popen.poll() is None:
                spare[1].kill()
            spare = None
        v = spare[1] if spare is not None else self._start(case)
        seed_file = self.launcher.workdir / f"{v.name}.seed"
        tmp = seed_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": survivor.address}))
        os.replace(tmp, seed_file)
        upcoming = self.order[self.order.index(case) + 1 :] if case in self.order else []
        if upcoming:
            self.spare = (upcoming[0], self._start(upcoming[0]))
        return v

    def _start(self, case: Case) -> NodeProc:
        name = f"victim-{case}"
        args = ["--strategy", case.strategy, *COMMON, "--rank", "1", "--epochs", "1000"]
        args += ["--seed", str(case.seed), *(NEVER if case.role == "callee" else [])]
        # Waits for its seed file as long as the case before it may take.
        args += ["--seed-file", str(self.launcher.workdir / f"{name}.seed"), "--join-timeout", "300"]
        return self.launcher.start(name, *args, env={faults.ENV: f"{case.point}=kill@{case.hit}"})


@pytest.fixture(scope="module")
def survivors(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Survivors]:
    order = []  # the matrix cases this session runs, in order (a -k selection included)
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if (
            callspec is None
            or getattr(item, "originalname", "") != "test_sigkill_mid_exchange_leaves_the_survivor_sound"
        ):
            continue
        case = callspec.params.get("case")
        if isinstance(case, Case):
            order.append(case)
    launcher = Launcher(tmp_path_factory.mktemp("faults"))
    try:
        yield Survivors(launcher, order)
    finally:
        launcher.cleanup()


def failpoint_record(victim: NodeProc) -> tuple[float, dict[str, Any]]:
    for line in victim.log_lines():
        if "gossip.node.faults: failpoint " in line:
            return log_time(line), json.loads(line.split("failpoint ", 1)[1])
    raise AssertionError(f"{victim.name} died without logging its failpoint\n{victim.tail()}")


def line_time(p: NodeProc, t0: float, *needles: str) -> float | None:
    """Time of the first line of ``p``'s log at or after ``t0`` that holds every needle."""
    for line in p.log_lines():
        if all(n in line for n in needles) and line[:4].isdigit() and log_time(line) >= t0 - 0.002:
            return log_time(line)
    return None


def wait_for_line(p: NodeProc, t0: float, needles: tuple[str, ...], timeout: float) -> float:
    found: list[float] = []

    def logged() -> bool:
        t = line_time(p, t0, *needles)
        found.extend([] if t is None else [t])
        return t is not None

    wait_for(logged, timeout, f"{p.name} to log {needles}", p)
    return found[0]


def books(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st[k] for k in ("exchanges_ok", "exchanges_served", "exchanges_failed", "weight")}


def expected_books(
    case: Case, before: dict[str, Any], fp: dict[str, Any], taken: bool | None = None
) -> dict[str, Any]:
    """The survivor's counters and weight after the kill, from its own before and the victim's
    last words (``taken``: whether the survivor took the fatal exchange, if the phase leaves it open)."""
    want = books(before)
    taken = case.point in TAKEN if taken is None else taken
    if case.role == "caller":
        # Every exchange the victim completed, the survivor answered; plus the fatal one if taken.
        want["exchanges_served"] += fp["ok"] + taken
        if case.strategy == "push-sum":
            # The victim receives nothing, so 1 - its weight is exactly what it handed over.
            want["weight"] += (1.0 - fp["weight"]) + (fp["w_send"] if taken else 0.0)
    else:
        completed = fp["served"] - (case.point in VICTIM_COUNTED)
        want["exchanges_ok"] += completed
        if case.strategy == "push-sum":
            # Halved once per acknowledged push; the fatal push was never acknowledged.
            want["weight"] *= 0.5**completed
    return want


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sigkill_mid_exchange_leaves_the_survivor_sound(case: Case, survivors: Survivors) -> None:
    s = survivors.get(case.strategy, case.role)
    before = s.status()

    v = survivors.victim(case, s)
    try:
        code = v.popen.wait(VICTIM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{case.point} was not reached\n{v.tail()}\n{s.tail()}") from None

    assert code == -signal.SIGKILL, f"victim exited with {code}\n{v.tail()}"
    t_kill, fp = failpoint_record(v)
    assert (fp["point"], fp["hit"], fp["peer"]) == (case.point, case.hit, s.name), fp
    assert s.popen.poll() is None, s.tail()

    # Its books: exactly what the docs' crash semantics page says, once it applied what it took.
    want = expected_books(case, before, fp)
    seen: list[dict[str, Any]] = []
    short = (f"push from {v.name} ended before it was whole",)
    refused: list[bool] = [False]

    def settled() -> bool:
        seen.append(books(s.status()))
        if case.point in MAYBE_TAKEN and line_time(s, t_kill, *short) is not None:
            refused[0] = True
            want.update(expected_books(case, before, fp, taken=False))
        same = all(seen[-1][k] == want[k] for k in want if k != "exchanges_failed")
        # A caller survivor counts its broken call as failed once its side of it ended,
        # which may be after the books above already read right: wait for that too.
        return same and (case.role != "callee" or seen[-1]["exchanges_failed"] > before["exchanges_failed"])

    wait_for(
        settled, 30.0, f"the survivor's books to read {want} (victim's: {fp}; last seen: {seen[-1:]})", s
    )
    after = seen[-1]
    if case.role == "callee":
        assert after["exchanges_failed"] > before["exchanges_failed"]  # its call to the victim
    else:
        assert after["exchanges_failed"] == before["exchanges_failed"]  # it called no one

    # Its side of the broken call ended within its deadline (or was never open, or completed).
    if case.role == "callee":
        needles: tuple[str, ...] = (f"exchange with {v.name} (", "failed")
    elif case.strategy == "pairwise":
        needles = (f"exchange from {v.name} ended without a commit",)
    else:
        needles = (f"push from {v.name} ended before it was whole",)
    # A pairwise caller streams its payload before it reads the answer, so it may die
    # mid-stream in a call the survivor declined as busy (its slot still held by the last
    # exchange until its next step). Only the two of them talk in this case: the survivor
    # declined one more call (since the case began: earlier victims of its group had their
    # own) than the victim had read busy answers for exactly then; nothing was opened.
    declined_now = s.status()["exchanges_declined"] - before["exchanges_declined"]
    declined = case.strategy == "pairwise" and declined_now > fp["busy_replies"]
    if case.role == "callee" or (case.point not in TAKEN | NOT_OPENED and not declined):
        ended = wait_for_line(s, t_kill, needles, DEADLINE + SLACK + 10.0)
        assert ended - t_kill <= DEADLINE + SLACK, (ended - t_kill, s.tail())
    elif not refused[0]:
        assert line_time(s, 0.0, *needles) is None, s.tail()

    # It goes on training, with finite numbers, and takes nothing more from the dead.
    st = s.status()
    assert st["phase"] == "running"
    assert math.isfinite(st["weight"]) and st["weight"] > 0, st
    wait_for(lambda: s.status()["step"] >= st["step"] + 100, 30.0, "the survivor to train on", s)
    wait_for(
        lambda: any(r["unix_time"] > t_kill for r in s.records()), 30.0, "an evaluation after the kill", s
    )
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["accuracy"]) for r in s.records())
    final = books(s.status())
    assert {**final, "exchanges_failed": 0} == {**after, "exchanges_failed": 0}
    assert not any("Traceback" in line for line in s.log_lines()), s.tail(60)


# --- compressed exchanges: the reference copies ---------------------------------------
# With --compress each side keeps, per neighbour, the two reference copies both know and
# the pair's count (gossip.core.choco); they move on the commit, with the half, and the
# crash rows above are unchanged. What is added: the survivor's copies of the dead peer
# moved exactly when it took its half. The survivor runs in this process (a node on port 0
# with the victim's layout, stepping without training) so the test reads its pair; the
# victim is a real process, killed as above. A topk:0.01+int8 payload of the mlp is one
# chunk of about 250 bytes, so the points between two chunks are not reached: of the five
# cases three end in an exchange nobody applied (the caller dies before its payload or its
# commit, the callee before the commit), two in one only one side applied.

COMPRESS = "topk:0.01+int8"
COMPRESSED_CASES = [
    Case("pairwise", role, phase, seed=2)  # dies in its 3rd exchange: the pair has copies
    for role, phase in [
        ("caller", "accepted"),  # before its second header: it asks first
        ("caller", "before_commit"),
        ("caller", "after_commit"),
        ("callee", "answered"),
        ("callee", "applied"),
    ]
]


class Stepper:
    """A node in this process with the mlp's layout, stepping (no training) on a thread; its pair
    with the victim is recorded each time it settles (the copies move only there)."""

    def __init__(self, name: str, role: str, monkeypatch: pytest.MonkeyPatch) -> None:
        ds = load_dataset("digits")
        model = build_model("mlp", ds.input_shape, ds.num_classes, target_shape=ds.target_shape)
        g = GossipConfig(
            topology="complete",
            chunk_bytes=4096,
            compress=COMPRESS,
            idle_pause=0.0,
            gossip_every=1 if role == "callee" else int(NEVER[1]),  # it calls a callee victim
        )
        self.bg = BackgroundNode(model, NodeConfig(node_id=name, rank=0, world_size=2, gossip=g), seed=0)
        choco = self.bg.node.party.pipeline.choco
        assert choco is not None
        self.choco = choco
        self.settled: list[tuple[str, int, bytes]] = []
        settle = choco.settle

        def recorded(peer: str, offer: Offer, received: torch.Tensor) -> torch.Tensor:
            diff = settle(peer, offer, received)
            self.settled.append((peer, *self.pair(peer)))
            return diff

        monkeypatch.setattr(choco, "settle", recorded)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pair(self, peer: str) -> tuple[int, bytes]:
        """The pair's count and both copies' bits (read only: no pair is made)."""
        p = self.choco._pairs.get(peer)
        return (0, b"") if p is None else (p.rounds, p.own.numpy().tobytes() + p.peer.numpy().tobytes())

    def run_until(self, victim: NodeProc) -> None:
        def steps() -> None:
            while not self._stop.is_set() and victim.popen.poll() is None:
                self.bg.step()
                time.sleep(0.002)

        self._thread = threading.Thread(target=steps, name="stepper", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)

    def books(self) -> dict[str, Any]:
        return books(self.bg.status())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", COMPRESSED_CASES, ids=str)
def test_sigkill_mid_compressed_exchange_moves_the_survivors_copies_iff_it_took_its_half(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = Launcher(tmp_path)
    s = Stepper(f"survivor-{case}", case.role, monkeypatch)
    try:
        args = ["--strategy", "pairwise", *COMMON, "--rank", "1", "--epochs", "1000"]
        args += ["--seed", str(case.seed)]
        args += ["--compress", COMPRESS, *(NEVER if case.role == "callee" else [])]
        env = {faults.ENV: f"{case.point}=kill@{case.hit}"}
        v = launcher.start(f"victim-{case}", *args, peers=s.bg.address, env=env)
        before = s.books()
        s.run_until(v)
        try:
            code = v.popen.wait(VICTIM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{case.point} was not reached\n{v.tail()}") from None
        s.halt()

        assert code == -signal.SIGKILL, f"victim exited with {code}\n{v.tail()}"
        _, fp = failpoint_record(v)
        assert (fp["point"], fp["hit"], fp["peer"]) == (case.point, case.hit, s.bg.node_id), fp
        # The books, as in the dense matrix: the survivor's side of the broken call ended.
        want = expected_books(case, before, fp)
        slot = s.bg.node.slot
        seen: list[dict[str, Any]] = []

        def ended() -> bool:
            seen.append(s.books())
            same = all(seen[-1][k] == want[k] for k in want if k != "exchanges_failed")
            failed = case.role == "caller" or seen[-1]["exchanges_failed"] > before["exchanges_failed"]
            return same and failed and not slot.own_in_flight and not slot.incoming_in_flight

        wait_for(ended, 30.0, f"the survivor's books to read {want} (victim's: {fp}; seen: {seen[-1:]})")

        # Every exchange the victim completed was one commit of the pair on its side; the
        # survivor's count is that, plus the fatal one if it took its half, less it if only
        # the victim did.
        victim_rounds = fp["ok"] + fp["served"]
        rounds = victim_rounds + (case.point in TAKEN) - (case.point in VICTIM_COUNTED)
        mine = [(r, bits) for peer, r, bits in s.settled if peer == v.name]
        assert rounds >= 2  # the 3rd exchange: copies that had moved before
        assert [r for r, _ in mine] == list(range(1, rounds + 1)), (fp, [r for r, _ in mine])
        assert s.bg.node.stats.exchanged_with.get(v.name, 0) == rounds
        # ... and its copies are exactly those of its last commit: the broken exchange moved none.
        assert len({bits for _, bits in mine}) == rounds  # each commit moved them
        assert s.pair(v.name) == mine[-1]
        assert all(math.isfinite(float(x.abs().max())) for x in s.bg.node.flat)
    finally:
        s.halt()
        s.bg.close()
        launcher.cleanup()


@pytest.mark.timeout(180)
def test_gossip_status_json_answers_on_a_survivor(survivors: Survivors) -> None:
    s = survivors.get("push-sum", "callee")

    out = subprocess.run(
        [sys.executable, "-m", "gossip", "status", "--peer", s.address, "--json", "--timeout", "10"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )

    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["node_id"] == s.name and st["phase"] == "running" and st["strategy"] == "push-sum"
    assert math.isfinite(st["weight"]) and st["weight"] > 0


# --- the failpoint switch itself --------------------------------------------------------


def test_every_failpoint_is_in_the_matrix() -> None:
    assert {c.point for c in CASES} == set(faults.POINTS)


def test_failpoint_spec_names_points_and_the_fatal_hit() -> None:
    spec = " pairwise.callee.applied=kill , push.caller.mid_stream=kill@3,"
    assert faults.parse(spec) == {"pairwise.callee.applied": 1, "push.caller.mid_stream": 3}
    assert faults.parse("") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pairwise.caller.midstream=kill", "unknown failpoint 'pairwise.caller.midstream'"),
        ("push.callee.applied", "the action must be"),
        ("push.callee.applied=exit", "the action must be"),
        ("push.callee.applied=kill@0", "integer >= 1"),
        ("push.callee.applied=kill@x", "integer >= 1"),
        ("push.callee.applied=kill,push.callee.applied=kill@2", "armed twice"),
    ],
)
def test_a_bad_failpoint_spec_is_an_error_naming_what_is_valid(spec: str, message: str) -> None:
    with pytest.raises(faults.FailpointError, match=message) as err:
        faults.parse(spec)
    if "unknown" in message:
        assert all(name in str(err.value) for name in faults.POINTS)


def test_unarmed_failpoints_change_nothing() -> None:
    chunks = [memoryview(b"ab"), memoryview(b"cd")]
    assert faults.armed() == {}
    assert faults.tap(chunks, "push.caller.mid_stream", "push.caller.sent") is chunks
    faults.failpoint("push.caller.acked")  # returns: this process is not armed


@pytest.mark.timeout(120)
def test_a_node_with_a_misspelt_failpoint_exits_2_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, **{faults.ENV: "pairwise.callee.aplied=kill"})
    out = subprocess.run(
        [sys.executable, "-m", "gossip", "node", "--listen", "127.0.0.1:0", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        env=env,
        cwd=tmp_path,
    )

    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "unknown failpoint 'pairwise.callee.aplied'" in out.stderr
    assert "pairwise.callee.applied" in out.stderr
