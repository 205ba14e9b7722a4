"""The shard store without a network: manifests, digests, holdings, retention, files, publisher choice."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import struct
from pathlib import Path

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from gossip.config import ConfigError, StoreConfig
from gossip.core.layout import Layout
from gossip.core.params import FlatParams
from gossip.core.ring import Ring
from gossip.proto import store_pb2 as spb
from gossip.store import digests, files
from gossip.store.manifest import Manifest, StoreError, cut
from gossip.store.placement import Placement
from gossip.store.reconstruct import Rebuilt
from gossip.store.serde import (
    located_from_bytes,
    manifest_from_bytes,
    manifest_to_bytes,
    shard_header_frame,
    shard_header_from_frame,
)
from gossip.store.service import StoreService
from gossip.store.shards import ShardHeader, ShardStore, bitmap_has
from gossip.transport.channels import Channels


def flat_of(*named: tuple[str, torch.Tensor]) -> FlatParams:
    flat = FlatParams.zeros(Layout.from_named(named))
    for e, (_, t) in zip(flat.layout.entries, named, strict=True):
        flat.state_dict()[e.name].copy_(t)
    return flat


def small(seed: int = 0, n: int = 5000) -> FlatParams:
    g = torch.Generator().manual_seed(seed)
    return flat_of(("w", torch.randn(n, generator=g)), ("b", torch.randn(10, generator=g)))


def cut_flat(
    flat: FlatParams,
    model_id: str,
    version: int,
    publisher: str,
    step: int,
    shard_bytes: int,
    replication: int,
    algorithm: str = digests.DEFAULT,
) -> tuple[Manifest, list[memoryview]]:
    data = flat.concat_bytes()
    return cut(data, flat.layout, model_id, version, publisher, step, shard_bytes, replication, algorithm)


def snapshot(
    version: int = 1, seed: int = 0, shard_bytes: int = 4096, algorithm: str = digests.DEFAULT
) -> tuple[Manifest, list[memoryview]]:
    return cut_flat(small(seed), "m", version, "n0", version * 10, shard_bytes, 3, algorithm)


def header(m: Manifest, shards: list[memoryview], index: int = 0) -> ShardHeader:
    return ShardHeader(
        m.model_id, m.version, index, len(shards[index]), m.shard_digests[index], m.digest_algorithm
    )


def add(store: ShardStore, m: Manifest, shards: list[memoryview], index: int) -> bool:
    sid = (m.model_id, m.version, index, m.shard_digests[index])
    return store.add(sid, bytearray(shards[index]), m.digest_algorithm)


def old_wire_form(m: Manifest) -> bytes:
    """``m`` as a node from before the digest_algorithm field would send it."""
    msg = spb.Manifest()
    msg.ParseFromString(manifest_to_bytes(m))
    msg.ClearField("digest_algorithm")
    return msg.SerializeToString()


def identity_before_the_field(m: Manifest) -> bytes:
    """Manifest.digest as it was computed before manifests named their algorithm."""
    canon = json.dumps(
        [m.model_id, m.version, m.publisher, m.step, m.layout_json, m.shard_bytes, m.total_bytes,
         [d.hex() for d in m.shard_digests], m.sha256.hex(), m.replication, m.fingerprint.hex()],
        separators=(",", ":"),
    )  # fmt: skip
    return hashlib.blake2b(canon.encode(), digest_size=16).digest()


# --- manifests ---------------------------------------------------------------------


def test_cut_covers_the_buffer_with_blake3_digested_shards() -> None:
    flat = small()
    m, shards = cut_flat(flat, "m", 3, "n0", 30, 4096, 3)

    assert m.total_bytes == flat.nbytes == sum(len(s) for s in shards)
    assert m.num_shards == len(shards) == -(-flat.nbytes // 4096)
    assert m.digest_algorithm == "blake3"
    assert all(blake3.blake3(s).digest() == d for s, d in zip(shards, m.shard_digests, strict=True))
    assert m.sha256 == hashlib.sha256(b"blake3\0" + b"".join(m.shard_digests)).digest()
    assert [m.shard_length(i) for i in range(m.num_shards)] == [len(s) for s in shards]
    m.validate()


def test_manifest_survives_its_wire_form() -> None:
    m, _ = snapshot()

    back = manifest_from_bytes(manifest_to_bytes(m))

    assert back == m and back.digest == m.digest


def test_a_manifest_without_an_algorithm_is_sha256_and_keeps_its_identity() -> None:
    m, shards = snapshot(algorithm="sha256")

    back = manifest_from_bytes(old_wire_form(m))

    assert back == m and back.digest_algorithm == "sha256"
    assert all(hashlib.sha256(s).digest() == d for s, d in zip(shards, back.shard_digests, strict=True))
    assert back.digest == identity_before_the_field(m)


def test_the_root_pins_the_algorithm_so_a_relabelled_manifest_is_refused() -> None:
    m, _ = snapshot()

    relabelled = dataclasses.replace(m, digest_algorithm="sha256")

    with pytest.raises(StoreError, match="root"):
        manifest_from_bytes(manifest_to_bytes(relabelled))


def test_a_node_from_before_the_field_refuses_a_blake3_manifest() -> None:
    m, _ = snapshot()

    # What it checks: the root over the digests alone, as if they were sha256.
    assert hashlib.sha256(b"".join(m.shard_digests)).digest() != m.sha256


def test_a_manifest_naming_an_unknown_algorithm_is_refused() -> None:
    m, _ = snapshot()
    msg = spb.Manifest()
    msg.ParseFromString(manifest_to_bytes(m))
    msg.digest_algorithm = 7  # type: ignore[assignment]  # what a newer node might send

    with pytest.raises(StoreError, match="unknown digest algorithm 7") as err:
        manifest_from_bytes(msg.SerializeToString())

    assert err.value.kind == "invalid"


def test_a_peer_naming_only_manifests_of_unknown_algorithms_is_told_why() -> None:
    m, _ = snapshot()
    bad = spb.Manifest()
    bad.ParseFromString(manifest_to_bytes(m))
    bad.digest_algorithm = 3  # type: ignore[assignment]
    reply = spb.LocateReply(model_id="m", manifests=[bad], vnodes=1)

    located = located_from_bytes(reply.SerializeToString())

    assert located.manifests == []
    assert located.refused == [f"v{m.version}: unknown digest algorithm 3: this node checks sha256, blake3"]


@settings(max_examples=100, deadline=None)
@given(number=st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_a_shard_header_names_a_known_algorithm_or_is_refused(number: int) -> None:
    frame = spb.StoreFrame(
        header=spb.ShardHeader(model_id="m", version=1, index=0, length=10, digest=b"d" * 32)
    )
    frame.header.digest_algorithm = number  # type: ignore[assignment]

    if number in (spb.DIGEST_SHA256, spb.DIGEST_BLAKE3):
        h = shard_header_from_frame(frame.SerializeToString())
        assert h.digest_algorithm == ("sha256" if number == spb.DIGEST_SHA256 else "blake3")
        assert shard_header_from_frame(shard_header_frame(h)) == h
    else:
        with pytest.raises(StoreError, match=f"unknown digest algorithm {number}") as err:
            shard_header_from_frame(frame.SerializeToString())
        assert err.value.kind == "invalid"


@settings(max_examples=40, deadline=None)
@given(
    algorithm=st.sampled_from(digests.ALGORITHMS), seed=st.integers(0, 1000), shard=st.integers(4096, 9000)
)
def test_every_algorithms_manifest_survives_its_wire_form(algorithm: str, seed: int, shard: int) -> None:
    m, _ = snapshot(seed=seed, shard_bytes=shard, algorithm=algorithm)

    back = manifest_from_bytes(manifest_to_bytes(m))

    assert back == m and back.digest == m.digest


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_id": ""}, "model id"),
        ({"model_id": "a/b"}, "model id"),
        ({"publisher": ""}, "publisher"),
        ({"layout_json": "[{"}, "layout"),
        ({"layout_json": json.dumps([{"name": "w", "dtype": "int8", "shape": [3], "offset": 0}])}, "layout"),
        ({"total_bytes": 12}, "bytes"),
        ({"shard_bytes": 0}, "shard size"),
        ({"shard_bytes": 1 << 30}, "shard size"),
        ({"replication": 0}, "replication"),
        ({"fingerprint": b"x" * 16}, "fingerprint"),
        ({"sha256": b"short"}, "digests"),
        ({"sha256": bytes(32)}, "root"),
    ],
)
def test_a_bad_manifest_is_refused_with_a_reason(change: dict[str, object], words: str) -> None:
    m, _ = snapshot()

    with pytest.raises(StoreError, match=words) as err:
        manifest_from_bytes(manifest_to_bytes(dataclasses.replace(m, **change)))  # type: ignore[arg-type]

    assert err.value.kind == "invalid"


def with_state(seed: int = 0) -> tuple[Manifest, list[memoryview], FlatParams, FlatParams]:
    params = small(seed)
    g = torch.Generator().manual_seed(seed + 1)
    state = flat_of(
        ("momentum/w", torch.randn(5000, generator=g)), ("buffer/bn.mean", torch.randn(3, generator=g))
    )
    data = memoryview(b"".join([*params.byte_views(), *state.byte_views()]))
    m, shards = cut(data, params.layout, "m", 1, "n0", 10, 4096, 3, digests.DEFAULT, state.layout)
    return m, shards, params, state


def test_a_snapshot_carries_its_state_after_the_parameters() -> None:
    m, shards, params, state = with_state()
    back = manifest_from_bytes(manifest_to_bytes(m))

    assert back == m and back.digest == m.digest
    assert back.state_layout == state.layout and back.layout == params.layout
    assert (back.params_bytes, back.total_bytes) == (params.nbytes, params.nbytes + state.nbytes)
    assert m.digest != dataclasses.replace(m, state_layout_json="").digest  # the identity covers the state
    rebuilt = Rebuilt(m, memoryview(bytearray(b"".join(bytes(s) for s in shards))), 0.0)
    got = rebuilt.optimizer_state()
    assert torch.equal(got["momentum/w"], state.state_dict()["momentum/w"])
    # The model's state_dict: parameters and model buffers, never the momentum.
    assert set(rebuilt.state_dict()) == {"w", "b", "bn.mean"} == set(rebuilt.tensor_bytes())
    assert torch.equal(rebuilt.state_dict()["bn.mean"], state.state_dict()["buffer/bn.mean"])


def test_a_manifest_without_state_keeps_the_identity_it_had() -> None:
    m, _ = snapshot()

    assert m.state_layout is None and m.params_bytes == m.total_bytes
    assert manifest_from_bytes(manifest_to_bytes(m)).digest == m.digest


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"state_layout_json": "[{"}, "layout"),
        (
            {"state_layout_json": json.dumps([{"name": "w", "dtype": "float32", "shape": [3], "offset": 0}])},
            "state layout names must start with momentum/ or buffer/",
        ),
        (
            {
                "state_layout_json": json.dumps(
                    [{"name": "buffer/x", "dtype": "float32", "shape": [3], "offset": 0}]
                )
            },
            "bytes",
        ),
        ({"state_layout_json": "x" * ((2 << 20) + 1)}, "exceeds"),
        (
            {
                "state_layout_json": json.dumps(
                    [{"name": "buffer/w", "dtype": "float32", "shape": [5000], "offset": 0}]
                ),
                "total_bytes": 40_040,
            },
            "a parameter's name",
        ),
    ],
)
def test_a_manifest_with_bad_state_is_refused_with_a_reason(change: dict[str, object], words: str) -> None:
    m, _, _, _ = with_state()

    with pytest.raises(StoreError, match=words) as err:
        manifest_from_bytes(manifest_to_bytes(dataclasses.replace(m, **change)))  # type: ignore[arg-type]

    assert err.value.kind == "invalid"


def test_a_manifest_must_list_exactly_its_shards() -> None:
    m, _ = snapshot()

    with pytest.raises(StoreError, match="shards"):
        dataclasses.replace(m, shard_digests=m.shard_digests[:-1]).validate()


def test_a_manifest_must_name_an_algorithm_this_node_checks() -> None:
    m, _ = snapshot()

    with pytest.raises(StoreError, match="unknown digest algorithm 'md5'"):
        dataclasses.replace(m, digest_algorithm="md5").validate()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_never_become_a_manifest_silently(data: bytes) -> None:
    # Bytes that are not even a protobuf Manifest are refused the same way.
    with pytest.raises(StoreError):
        manifest_from_bytes(data)


# --- one node's holdings -----------------------------------------------------------


def test_store_keeps_the_newest_k_versions_and_refuses_older_ones() -> None:
    store = ShardStore(keep_versions=2)
    for v in (1, 2, 3):
        m, shards = snapshot(v, seed=v)
        add(store, m, shards, 0)
        assert store.add_manifest(m) == "new"

    assert [m.version for m in store.kept("m")] == [3, 2]
    assert {sid[1] for sid in store.shards} == {2, 3}
    assert store.retired("m", 1)
    old, old_shards = snapshot(1, seed=1)
    assert store.add_manifest(old) == "retired"
    with pytest.raises(StoreError) as err:
        store.check_incoming(header(old, old_shards))
    assert err.value.kind == "retired"


def test_a_conflict_between_two_manifests_of_one_version_is_settled_the_same_everywhere() -> None:
    a, _ = snapshot(5, seed=1)
    b, _ = snapshot(5, seed=2)
    first, second = ShardStore(), ShardStore()

    first.add_manifest(a)
    first.add_manifest(b)
    second.add_manifest(b)
    second.add_manifest(a)

    assert first.manifest("m", 5) == second.manifest("m", 5)
    assert first.add_manifest(a if first.manifest("m", 5) == b else b) == "lost"


def test_shards_that_do_not_match_the_manifest_are_refused_and_dropped() -> None:
    m, shards = snapshot(2)
    other, other_shards = snapshot(2, seed=9)
    store = ShardStore()
    add(store, other, other_shards, 0)  # arrived before the manifest

    store.add_manifest(m)

    assert store.pending() == [("m", 2, 0, other.shard_digests[0])]  # kept until orphan_ttl
    assert not store.holds(m, 0)
    with pytest.raises(StoreError) as err:
        store.check_incoming(header(other, other_shards))
    assert err.value.kind == "conflict"
    good = header(m, shards)
    with pytest.raises(StoreError, match="does not match"):
        store.check_incoming(dataclasses.replace(good, length=good.length + 1))
    with pytest.raises(StoreError, match="does not match"):
        store.check_incoming(dataclasses.replace(good, digest_algorithm="sha256"))
    store.check_incoming(good)


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (("", 1, 0, 10, b"d" * 32, "blake3"), "invalid"),
        (("m", 1, 0, 10, b"d" * 31, "blake3"), "invalid"),
        (("m", 1, 0, 10, b"d" * 32, "crc32"), "invalid"),
        (("m", 1, 0, 0, b"d" * 32, "blake3"), "invalid"),
        (("m", 1, 0, (64 << 20) + 1, b"d" * 32, "blake3"), "invalid"),
        (("m", 1, 1 << 40, 10, b"d" * 32, "blake3"), "invalid"),
        (("m", 1, 0, 5000, b"d" * 32, "sha256"), "full"),
    ],
)
def test_incoming_shards_are_bounded(args: tuple[str, int, int, int, bytes, str], kind: str) -> None:
    store = ShardStore(capacity_bytes=4096)

    with pytest.raises(StoreError) as err:
        store.check_incoming(ShardHeader(*args))

    assert err.value.kind == kind


def test_bitmap_scrub_and_orphans() -> None:
    now = [0.0]
    store = ShardStore(clock=lambda: now[0])
    m, shards = snapshot(1)
    for i in (0, 2):
        add(store, m, shards, i)
    store.add(("m", 7, 0, b"x" * 32), bytearray(b"abc"), "blake3")  # no manifest: a publish in progress
    store.add_manifest(m)

    bits = store.bitmap(m)
    assert [bitmap_has(bits, i) for i in range(4)] == [True, False, True, False]
    store.shards[("m", 1, 2, m.shard_digests[2])].data[5] ^= 0xFF
    now[0] = 30.0
    assert len(store.due_for_scrub(10.0)) == 3
    assert store.verify(("m", 1, 0, m.shard_digests[0])) is True
    assert store.verify(("m", 1, 2, m.shard_digests[2])) is False
    assert not store.holds(m, 2) and store.corrupt_dropped == 1
    now[0] = 100.0
    assert store.expire_orphans(60.0) == 1 and store.pending() == []
    assert store.bytes_held == len(shards[0])


@pytest.mark.parametrize("algorithm", digests.ALGORITHMS)
def test_a_held_shard_is_rechecked_by_the_algorithm_it_came_with(algorithm: str) -> None:
    store = ShardStore()
    m, shards = snapshot(1, algorithm=algorithm)
    for i in (0, 1):
        add(store, m, shards, i)
    store.shards[("m", 1, 1, m.shard_digests[1])].data[0] ^= 1

    assert store.verify(("m", 1, 0, m.shard_digests[0])) is True
    assert store.verify(("m", 1, 1, m.shard_digests[1])) is False


# --- tensors and files -------------------------------------------------------------------


def test_a_rebuilt_buffer_holds_every_dtype_at_its_place() -> None:
    flat = flat_of(
        ("h", torch.arange(3, dtype=torch.float16)),  # 6 bytes: the next segment starts unaligned
        ("w", torch.arange(5, dtype=torch.float32)),
        ("d", torch.arange(2, dtype=torch.float64)),
    )
    m, shards = cut_flat(flat, "m", 1, "n0", 1, 4096, 3)

    back = FlatParams.from_bytes(m.layout, bytearray(b"".join(shards)))

    for name, t in flat.state_dict().items():
        assert torch.equal(back.state_dict()[name], t) and back.state_dict()[name].dtype == t.dtype


def test_safetensors_file_follows_the_format(tmp_path: Path) -> None:
    flat = flat_of(("a.weight", torch.randn(3, 4)), ("a.bias", torch.randn(4)), ("h", torch.ones(2).half()))
    m, _ = cut_flat(flat, "m", 3, "n0", 30, 4096, 3)
    path = tmp_path / "m.safetensors"

    files.save(Rebuilt(m, flat.concat_bytes(), seconds=0.0), path, "safetensors")

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    assert header["__metadata__"]["version"] == "3"
    assert header["__metadata__"]["sha256"] == m.sha256.hex()
    assert header["__metadata__"]["digest_algorithm"] == "blake3"
    assert header["a.weight"]["dtype"] == "F32" and header["a.weight"]["shape"] == [3, 4]
    assert header["h"]["dtype"] == "F16" and header["h"]["shape"] == [2]
    # The tensors tile the data section (the writer picks their order), each holding its own bytes.
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] == 68
    data = raw[8 + n :]
    for name, t in flat.state_dict().items():
        lo, hi = header[name]["data_offsets"]
        assert data[lo:hi] == t.contiguous().view(torch.uint8).numpy().tobytes(), name
    assert len(raw) == 8 + n + 68
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no partial file left behind
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in flat.state_dict().items())


# --- who publishes -------------------------------------------------------------------------


def test_exactly_one_member_publishes_each_version() -> None:
    ids = [f"node{i}" for i in range(6)]
    services = []
    for node in ids:
        svc = StoreService(node, StoreConfig(publish_every=10, model_id="m"), Channels(), fingerprint=b"f")
        svc.placement.view = lambda: [(n, f"127.0.0.1:{i + 1}", b"f", True) for i, n in enumerate(ids)]
        svc.refresh()
        services.append(svc)

    publishers = {v: [s.node_id for s in services if s.publish_due(v * 10) == v] for v in range(1, 60)}

    assert all(len(p) == 1 for p in publishers.values())
    assert len({p[0] for p in publishers.values()}) == len(ids)  # the role rotates over the members
    assert all(s.publish_due(15) is None for s in services)  # not a publish step
    ring = Ring(ids)
    assert publishers[7] == [ring.owner("m/v7")]
    # The end of training publishes the round in progress, once.
    assert sum(s.publish_due(73, final=True) == 8 for s in services) == 1
    assert all(s.publish_due(70, final=True) is None for s in services)


def test_store_config_is_checked() -> None:
    StoreConfig().validate()
    for bad in ({"replication": 0}, {"shard_bytes": 100}, {"keep_versions": 0}, {"model_id": "a/b"}):
        with pytest.raises(ConfigError):
            StoreConfig(**bad).validate()  # type: ignore[arg-type]


def test_publishers_are_the_alive_members_running_this_model_whatever_the_order_of_changes() -> None:
    mine, other = b"m" * 16, b"o" * 16
    view: list[tuple[str, str, bytes, bool]] = [("a", "a:1", mine, True)]
    p = Placement("a", mine, vnodes=8)
    p.view = lambda: view
    steps = [
        [("b", "b:1", mine, True), ("c", "c:1", mine, True)],  # all publish: the shard ring itself
        [("b", "b:1", mine, True), ("c", "c:1", other, True)],  # c runs another model
        [("b", "b:1", mine, False), ("c", "c:1", other, True)],  # b suspect
        [("b", "b:1", mine, True), ("c", "c:1", mine, True)],  # all publish again
    ]
    for others in steps:
        view = [("a", "a:1", mine, True), *others]

        p.refresh()

        assert p.ring.nodes == tuple(sorted(m[0] for m in view))
        want = sorted(m[0] for m in view if m[2] == mine and m[3])
        assert p.publishers.nodes == tuple(want)
        assert p.publishers.preference_list("k", 3) == Ring(want, vnodes=8).preference_list("k", 3)
