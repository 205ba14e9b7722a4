"""The dashboard's aggregation without sockets: readings bounded, rounds turned into what the page shows.

Each round is built from decoded answers like ``ask_node`` returns; times are passed in.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from gossip.core.status import MemberView, NodeStatus
from gossip.observe.aggregate import ClusterState, merged_state
from gossip.observe.readings import MAX_ID_CHARS, MAX_TEXT, MalformedStatus, Reading, dialable, reading_from
from gossip.observe.status import Answer
from gossip.proto import gossip_pb2 as pb
from gossip.store.shards import Holding, StoreInfo
from gossip.transport.serde import status_from_bytes

FP = "ab" * 16


def status(node_id: str, port: int, store: StoreInfo | None = None, **kw: Any) -> Answer:
    """A node's decoded answer, every field set; ``kw`` overrides (members as dicts, lists as lists)."""
    fields: dict[str, Any] = {
        "node_id": node_id,
        "address": f"127.0.0.1:{port}",
        "phase": "running",
        "step": 10,
        "rank": -1,
        "topology": "random",
        "strategy": "pairwise",
        "parameters": 1000,
        "fingerprint": FP,
        "weight": 1.0,
        "uptime_seconds": 3.0,
        "exchanges_ok": 0,
        "exchanges_failed": 0,
        "exchanges_declined": 0,
        "exchanges_served": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "members": [],
        "neighbours": [],
        "training": True,
        "epoch": 0.5,
        "train_loss": 1.0,
        "eval_loss": 1.1,
        "eval_accuracy": 0.5,
        "evals": 1,
        "sample": [0.0, 0.0],
    }
    fields.update(kw)
    fields["fingerprint"] = bytes.fromhex(fields["fingerprint"])
    fields["members"] = tuple(MemberView(**m) for m in fields["members"])
    fields["neighbours"] = tuple(fields["neighbours"])
    fields["sample"] = tuple(fields["sample"])
    return Answer(NodeStatus(**fields), store, 1.0)


def store_info(versions: list[int], shards_held: int, under: tuple[str, ...] = ()) -> StoreInfo:
    return StoreInfo(
        model_id="m",
        replication=3,
        publish_every=20,
        vnodes=64,
        ring_share=0.3,
        ring_members=3,
        holdings=[Holding("m", v, b"", b"\x01", 1) for v in versions] + [Holding("other", 99, b"", b"", 1)],
        shards_held=shards_held,
        bytes_held=100 * shards_held,
        shards_pending=0,
        under_replicated=list(under),
        published=1,
        repaired=0,
        corrupt_dropped=0,
    )


def member(node_id: str, port: int, state: str = "alive") -> dict[str, Any]:
    return {
        "node_id": node_id,
        "address": f"127.0.0.1:{port}",
        "state": state,
        "rank": -1,
        "heartbeat": 5,
        "seconds_since_heartbeat": 0.1,
    }


PORTS = {"a": 9001, "b": 9002, "c": 9003}


def table(me: str, states: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``me``'s member table: everyone in PORTS, alive unless ``states`` says otherwise."""
    states = states or {}
    return [member(n, p, states.get(n, "alive")) for n, p in PORTS.items()]


def answer(node_id: str, **kw: Any) -> tuple[str | None, str, Reading | str]:
    kw.setdefault("members", table(node_id))
    return node_id, f"127.0.0.1:{PORTS[node_id]}", reading_from(status(node_id, PORTS[node_id], **kw))


def silent(node_id: str) -> tuple[str | None, str, Reading | str]:
    return node_id, f"127.0.0.1:{PORTS[node_id]}", "cannot reach it: UNAVAILABLE"


# --- readings ----------------------------------------------------------------------------------


def test_an_answer_becomes_a_reading() -> None:
    got = status("a", 1, exchanged_with={"b": 3}, sample=[0.5, 1.5], store=store_info([2, 3], 4, ("k",)))
    r = reading_from(got)
    assert (r.node_id, r.step, r.eval_accuracy, r.fingerprint) == ("a", 10, 0.5, FP)
    assert (r.exchanged_with, r.sample) == ({"b": 3}, (0.5, 1.5))
    assert r.store is not None
    assert (r.store.versions, r.store.shards_held, r.store.under_replicated) == ((3, 2), 4, ("k",))


def test_an_old_node_without_the_new_fields_reads_with_defaults() -> None:
    old = pb.StatusReply(node_id="a", address="127.0.0.1:1", phase="running", step=4, parameters=10)
    r = reading_from(Answer(status_from_bytes(old.SerializeToString()), None, 1.0))
    assert (r.node_id, r.step, r.epoch, r.train_loss, r.eval_accuracy) == ("a", 4, 0.0, None, None)
    assert (r.exchanged_with, r.sample, r.store) == ({}, (), None)


def test_an_answer_without_a_node_id_is_refused() -> None:
    with pytest.raises(MalformedStatus):
        reading_from(status("", 1))


def test_what_a_peer_controls_is_bounded_and_finite() -> None:
    got = status(
        "x" * 10_000,
        1,
        phase="p" * 10_000,
        members=[member(str(i), 2) | {"state": "zombie"} for i in range(5000)],
        exchanged_with={f"{i:05d}" + "x" * 300: i for i in range(5000)},
        train_loss=math.nan,
        eval_accuracy=math.inf,
        sample=[0.0, math.nan],
    )
    r = reading_from(got)
    assert len(r.node_id) == MAX_ID_CHARS and len(r.phase) == MAX_TEXT
    assert len(r.members) == len(r.exchanged_with) == 1024
    assert {m.state for m in r.members} == {"unknown"}
    assert max(len(p) for p in r.exchanged_with) == MAX_ID_CHARS
    assert r.train_loss is None and r.eval_accuracy is None
    assert r.sample == ()  # a sample with a hole is no sample


@pytest.mark.parametrize("address", ["127.0.0.1:80", "node-3.example.org:50051", "[::1]:8080", "n_1:1"])
def test_dialable_addresses(address: str) -> None:
    assert dialable(address)


@pytest.mark.parametrize(
    "address",
    [
        "evil<script>:80",
        "unix:/tmp/socket",
        "dns:///host:80",
        "ipv4:1.2.3.4:80",
        "host:0",
        "host:65536",
        ":80",
        "host",
        "a b:80",
        "host:80\n",
        "x" * 300 + ":80",
    ],
)
def test_hostile_addresses_are_not_dialable(address: str) -> None:
    assert not dialable(address)


# --- member states and events ---------------------------------------------------------------------


def test_merged_state_is_the_majority_with_ties_to_the_worse() -> None:
    assert merged_state(["alive", "alive", "suspect"]) == "alive"
    assert merged_state(["alive", "suspect"]) == "suspect"
    assert merged_state(["suspect", "dead"]) == "dead"
    assert merged_state(["dead", "dead", "alive"]) == "dead"


def three_answering(state: ClusterState, t: float, **per_node: dict[str, Any]) -> None:
    state.update(t, [answer(n, **per_node.get(n, {})) for n in PORTS], 0.01)


def test_the_seed_s_table_brings_every_member_without_events() -> None:
    state = ClusterState("127.0.0.1:9001")
    state.update(0.0, [answer("a")], 0.01)
    assert set(state.nodes) == {"a", "b", "c"}
    assert not state.events
    assert sorted(a for _, a in state.targets()) == ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]


def test_suspect_dead_and_rejoined_are_events_as_they_happen() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0)
    state.update(1.0, [answer("a"), answer("b"), silent("c")], 0.01)
    suspects = {"members": table("x", {"c": "suspect"})}
    state.update(2.0, [answer("a", **suspects), answer("b", **suspects), silent("c")], 0.01)
    dead = {"members": table("x", {"c": "dead"})}
    state.update(3.0, [answer("a", **dead), answer("b", **dead)], 0.01)
    three_answering(state, 4.0)
    assert [(e["t"], e["node_id"], e["what"]) for e in state.events] == [
        (1.0, "c", "stopped answering the dashboard"),
        (2.0, "c", "suspect"),
        (3.0, "c", "declared dead"),
        (4.0, "c", "answers again"),
        (4.0, "c", "rejoined"),
    ]


def test_a_dead_node_is_shown_grey_with_its_last_values_and_not_asked() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0, c={"step": 77})
    dead = {"members": table("x", {"c": "dead"})}
    state.update(1.0, [answer("a", **dead), answer("b", **dead), silent("c")], 0.01)
    assert "127.0.0.1:9003" not in [a for _, a in state.targets()]
    c = next(n for n in state.snapshot()["nodes"] if n["node_id"] == "c")
    assert (c["reachable"], c["state"], c["step"]) == (False, "dead", 77)
    assert "UNAVAILABLE" in c["error"]


def test_a_hostile_address_in_a_table_is_shown_but_never_asked() -> None:
    state = ClusterState("127.0.0.1:9001")
    bad = [*table("a"), member("<img src=x onerror=alert(1)>", 1) | {"address": "evil<script>:80"}]
    state.update(0.0, [answer("a", members=bad)], 0.01)
    assert "evil<script>:80" not in [a for _, a in state.targets()]
    shown = next(n for n in state.snapshot()["nodes"] if n["node_id"].startswith("<img"))
    assert shown["reachable"] is False and "not HOST:PORT" in shown["error"]


def test_a_node_that_joins_later_appears_and_is_asked() -> None:
    state = ClusterState("127.0.0.1:9001")
    state.update(0.0, [answer("a", members=[member("a", 9001)])], 0.01)
    assert set(state.nodes) == {"a"}
    state.update(1.0, [answer("a", members=[member("a", 9001), member("b", 9002)])], 0.01)
    assert "127.0.0.1:9002" in [a for _, a in state.targets()]
    assert [e["what"] for e in state.events] == ["joined"]


# --- edges, throughput, spread ----------------------------------------------------------------------


def edges(state: ClusterState) -> dict[tuple[str, str], dict[str, bool]]:
    return {(e["a"], e["b"]): {"current": e["current"], "lit": e["lit"]} for e in state.snapshot()["edges"]}


def test_an_edge_lights_up_when_an_exchange_on_it_completed_since_the_last_poll() -> None:
    state = ClusterState("127.0.0.1:9001")
    nbs = {"a": {"neighbours": ["b", "c"]}, "b": {"neighbours": ["a"]}, "c": {"neighbours": ["a"]}}
    three_answering(state, 0.0, **nbs)
    assert edges(state) == {
        ("a", "b"): {"current": True, "lit": False},
        ("a", "c"): {"current": True, "lit": False},
    }
    with_c = {"neighbours": ["b", "c"], "exchanged_with": {"c": 2}}
    three_answering(state, 1.0, a=with_c, b=nbs["b"], c=nbs["c"])
    assert edges(state)[("a", "c")]["lit"] and not edges(state)[("a", "b")]["lit"]
    three_answering(state, 2.0, a=with_c, b=nbs["b"], c=nbs["c"])
    assert not any(e["lit"] for e in edges(state).values())  # no new exchange: dark again


def test_throughput_is_the_counters_growth_over_time_summed_over_nodes() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0)
    grown = {"exchanges_ok": 10, "bytes_out": 4000}
    three_answering(state, 2.0, a=grown, b=grown, c={"exchanges_ok": 4, "bytes_out": 1000})
    last = state.series[-1]
    assert last["exchanges_per_s"] == pytest.approx((10 + 10 + 4) / 2.0)
    assert last["bytes_per_s"] == pytest.approx((4000 + 4000 + 1000) / 2.0)


def test_a_counter_that_went_back_counts_nothing() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0, a={"exchanges_ok": 50})
    three_answering(state, 1.0, a={"exchanges_ok": 3})
    assert state.series[-1]["exchanges_per_s"] == 0.0


def test_the_spread_estimate_matches_numpy_over_the_largest_group_of_one_model() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 64))
    state = ClusterState("127.0.0.1:9001")
    per_node = {n: {"sample": list(samples[i]), "parameters": 6400} for i, n in enumerate(PORTS)}
    per_node["c"]["fingerprint"] = "cd" * 16  # another model: left out
    three_answering(state, 0.0, **per_node)
    two = samples[:2]
    expected = math.sqrt(6400 / 64 * np.mean(np.sum((two - two.mean(0)) ** 2, axis=1)))
    assert state.series[-1]["spread"] == pytest.approx(expected, rel=1e-9)


def test_the_sampled_estimate_is_unbiased_for_the_whole_models_consensus_distance() -> None:
    rng = np.random.default_rng(1)
    models = rng.normal(size=(len(PORTS), 2000)) * rng.uniform(0.1, 3.0, size=2000)  # uneven coordinates
    exact = np.sqrt(np.mean(np.sum((models - models.mean(0)) ** 2, axis=1)))
    estimates = []
    for _ in range(400):
        coords = rng.choice(2000, size=64, replace=False)
        state = ClusterState("127.0.0.1:9001")
        per_node = {n: {"sample": list(models[i, coords]), "parameters": 2000} for i, n in enumerate(PORTS)}
        three_answering(state, 0.0, **per_node)
        estimates.append(state.series[-1]["spread"] ** 2)
    assert math.sqrt(np.mean(estimates)) == pytest.approx(exact, rel=0.05)


# --- history and the JSON the page gets ------------------------------------------------------------


def test_history_is_bounded_and_sent_from_a_round_on() -> None:
    state = ClusterState("127.0.0.1:9001", history=5)
    for t in range(12):
        three_answering(state, float(t), a={"step": t})
    a = next(n for n in state.snapshot()["nodes"] if n["node_id"] == "a")
    assert [h[2] for h in a["history"]] == [7, 8, 9, 10, 11]
    newer = next(n for n in state.snapshot(since=10)["nodes"] if n["node_id"] == "a")
    assert [h[0] for h in newer["history"]] == [11, 12]
    assert [p["round"] for p in state.snapshot(since=10)["series"]] == [11, 12]


def test_the_snapshot_is_strict_json_and_colours_by_accuracy_or_step() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0, a={"train_loss": math.nan})
    snap = state.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["color_by"] == "accuracy"
    nothing = ClusterState("127.0.0.1:9001")
    nothing.update(0.0, [answer("a", eval_accuracy=None, members=[])], 0.01)
    assert nothing.snapshot()["color_by"] == "step"


def test_the_layout_puts_nodes_on_a_circle_by_rank() -> None:
    state = ClusterState("127.0.0.1:9001")
    ranks = {"a": {"rank": 2}, "b": {"rank": 0}, "c": {"rank": 1}}
    members = [member(n, p) | {"rank": ranks[n]["rank"]} for n, p in PORTS.items()]
    three_answering(state, 0.0, **{n: {**r, "members": members} for n, r in ranks.items()})
    pos = {n["node_id"]: (n["x"], n["y"]) for n in state.snapshot()["nodes"]}
    assert pos["b"] == pytest.approx((0.0, -1.0))  # rank 0 at the top
    assert all(math.hypot(x, y) == pytest.approx(1.0, abs=1e-3) for x, y in pos.values())


def test_a_restart_under_a_new_id_at_the_same_address_is_asked_once_and_takes_over() -> None:
    state = ClusterState("127.0.0.1:9001")
    three_answering(state, 0.0)
    restarted = [*table("a", {"c": "dead"}), member("c2", PORTS["c"])]  # c came back as c2
    state.update(1.0, [answer("a", members=restarted), answer("b", members=restarted), silent("c")], 0.01)
    asked = [a for _, a in state.targets()]
    assert asked.count("127.0.0.1:9003") == 1
    assert ("c2", "127.0.0.1:9003") in state.targets()
    c2 = parse_as("c2", PORTS["c"], members=restarted)
    state.update(2.0, [answer("a", members=restarted), answer("b", members=restarted), c2], 0.01)
    shown = {n["node_id"]: n for n in state.snapshot()["nodes"]}
    assert shown["c2"]["reachable"] and not shown["c"]["reachable"]


def parse_as(node_id: str, port: int, **kw: Any) -> tuple[str | None, str, Reading | str]:
    return node_id, f"127.0.0.1:{port}", reading_from(status(node_id, port, **kw))
