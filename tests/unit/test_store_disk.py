"""The durable store (``--data-dir``): its files, what a restart reads back, what it refuses.

Each test writes through a :class:`DurableStore`, waits for its writer, and reads the
folder back with a fresh one, as a restarted node does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.config import ConfigError, StoreConfig
from gossip.store import disk
from gossip.store.disk import LOCK, MANIFEST, TMP_PREFIX, model_dir_name, shard_file_name
from gossip.store.durable import DurableStore
from gossip.store.manifest import Manifest
from tests.unit.test_store import cut_flat, small, snapshot

FLUSH = 10.0


_OPEN: dict[Path, DurableStore] = {}


def opened(root: Path, **kwargs: int) -> DurableStore:
    """A store on ``root``, loaded, as a node starts one; the one open there before is closed first
    (its process ended)."""
    if (before := _OPEN.pop(root, None)) is not None:
        before.close(wait=FLUSH)
    store = DurableStore(str(root), **kwargs)
    store.load_now()
    _OPEN[root] = store
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.popitem()[1].close(wait=FLUSH)


def fill(store: DurableStore, m: Manifest, shards: list[memoryview]) -> None:
    store.add_manifest(m)
    for i, s in enumerate(shards):
        assert store.add((m.model_id, m.version, i, m.shard_digests[i]), bytearray(s), m.digest_algorithm)
    assert store.flush(FLUSH)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != LOCK)


def shard_file(root: Path, m: Manifest, index: int) -> Path:
    folder = root / model_dir_name(m.model_id) / f"v{m.version}"
    return folder / shard_file_name(index, m.digest_algorithm, m.shard_digests[index])


def test_a_restart_reads_back_every_manifest_and_shard_byte_for_byte(tmp_path: Path) -> None:
    m, shards = snapshot(version=3)
    fill(opened(tmp_path), m, shards)

    again = opened(tmp_path)

    assert again.manifest("m", 3) == m
    assert [bytes(again.get("m", 3, i).data) for i in range(m.num_shards)] == [bytes(s) for s in shards]  # type: ignore[union-attr]
    assert again.bytes_held == m.total_bytes and not again.pending()
    assert again.loaded is not None and again.loaded.dropped == 0


def test_the_layout_is_one_folder_per_version_a_manifest_and_one_file_per_shard(tmp_path: Path) -> None:
    m, shards = snapshot(version=7)

    fill(opened(tmp_path), m, shards)

    folder = f"{model_dir_name('m')}/v7"
    expected = [f"{folder}/{MANIFEST}"] + [
        f"{folder}/{shard_file_name(i, 'blake3', m.shard_digests[i])}" for i in range(m.num_shards)
    ]
    assert files(tmp_path) == sorted(expected)
    assert (tmp_path / folder / shard_file_name(0, "blake3", m.shard_digests[0])).read_bytes() == shards[0]


def test_the_load_runs_off_the_event_loop_and_serves_what_it_read(tmp_path: Path) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)
    store = DurableStore(str(tmp_path))

    async def load_on_a_loop() -> str:
        found = await store.load()
        return f"{len(found.manifests)} {len(found.shards)}"

    _OPEN.pop(tmp_path).close(wait=FLUSH)

    assert asyncio.run(load_on_a_loop()) == f"1 {m.num_shards}"
    assert all(store.holds(m, i) for i in range(m.num_shards))
    store.close(wait=FLUSH)


def test_a_second_process_on_the_folder_keeps_its_store_in_memory_and_touches_no_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)
    before = {f: (tmp_path / f).read_bytes() for f in files(tmp_path)}
    second = DurableStore(str(tmp_path), keep_versions=1)

    with caplog.at_level(logging.ERROR, logger="gossip.store.durable"):
        found = asyncio.run(second.load())
    fill(second, *snapshot(version=2, seed=2))  # retires v1 in its memory, not on disk

    assert not found.shards and second.manifest("m", 1) is None and second.manifest("m", 2) is not None
    assert {f: (tmp_path / f).read_bytes() for f in files(tmp_path)} == before
    assert "in use by another process" in caplog.records[0].getMessage()
    second.close(wait=FLUSH)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "append"])
def test_a_damaged_shard_file_is_deleted_with_one_warning_and_never_served(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)
    bad = shard_file(tmp_path, m, 1)
    data = bytearray(bad.read_bytes())
    if damage == "flip a byte":
        data[100] ^= 0x01
    elif damage == "truncate":
        del data[-10:]
    else:
        data += b"\0"
    bad.write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="gossip.store.disk"):
        again = opened(tmp_path)

    assert not again.holds(m, 1) and again.get("m", 1, 1) is None
    assert all(again.holds(m, i) for i in range(m.num_shards) if i != 1)
    assert not bad.exists()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and bad.name in warnings[0].getMessage()


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "empty"])
def test_a_damaged_manifest_is_deleted_and_its_shards_with_it(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)
    path = tmp_path / model_dir_name("m") / "v1" / MANIFEST
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    elif damage == "flip a byte":
        data[-5] ^= 0x20
    else:
        data = bytearray()
    path.write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="gossip.store.disk"):
        again = opened(tmp_path)

    assert again.manifest("m", 1) is None and not again.shards
    assert files(tmp_path) == []
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_manifest_moved_to_another_versions_folder_is_refused(tmp_path: Path) -> None:
    m, shards = snapshot(version=1)
    fill(opened(tmp_path), m, shards)
    folder = tmp_path / model_dir_name("m")
    (folder / "v1").rename(folder / "v2")

    again = opened(tmp_path)

    assert again.manifest("m", 1) is None and again.manifest("m", 2) is None and not again.shards


def test_shards_without_a_manifest_and_crashed_writes_are_deleted_at_load(tmp_path: Path) -> None:
    m, shards = snapshot()
    store = opened(tmp_path)
    store.add(("m", 1, 0, m.shard_digests[0]), bytearray(shards[0]), m.digest_algorithm)  # no manifest yet
    assert store.flush(FLUSH)
    folder = tmp_path / model_dir_name("m") / "v1"
    (folder / f"{TMP_PREFIX}{MANIFEST}").write_bytes(b"half a manif")

    again = opened(tmp_path)

    assert not again.shards and files(tmp_path) == []


def test_versions_past_keep_versions_leave_the_disk_too(tmp_path: Path) -> None:
    store = opened(tmp_path, keep_versions=2)
    for v in (1, 2, 3):
        fill(store, *snapshot(version=v, seed=v))

    versions = sorted(p.name for p in (tmp_path / model_dir_name("m")).iterdir())
    assert versions == ["v2", "v3"]
    assert sorted(m.version for m in opened(tmp_path, keep_versions=2).kept("m")) == [2, 3]


def test_a_smaller_keep_versions_after_a_restart_deletes_the_older_versions(tmp_path: Path) -> None:
    store = opened(tmp_path, keep_versions=3)
    for v in (1, 2, 3):
        fill(store, *snapshot(version=v, seed=v))

    again = opened(tmp_path, keep_versions=1)
    assert again.flush(FLUSH)

    assert [m.version for m in again.kept("m")] == [3]
    assert sorted(p.name for p in (tmp_path / model_dir_name("m")).iterdir()) == ["v3"]


def test_dropped_and_expired_shards_leave_the_disk(tmp_path: Path) -> None:
    m, shards = snapshot()
    store = opened(tmp_path)
    fill(store, m, shards)
    store.drop(("m", 1, 0, m.shard_digests[0]))
    orphan, orphan_shards = snapshot(version=2, seed=5)
    store.add(("m", 2, 0, orphan.shard_digests[0]), bytearray(orphan_shards[0]), orphan.digest_algorithm)
    store.clock = lambda: 1e12  # far later: the orphan's time is up
    assert store.expire_orphans(ttl=60) == 1
    assert store.flush(FLUSH)

    assert not shard_file(tmp_path, m, 0).exists() and shard_file(tmp_path, m, 1).exists()
    assert not (tmp_path / model_dir_name("m") / "v2").exists() or not any(
        (tmp_path / model_dir_name("m") / "v2").iterdir()
    )


def test_a_restart_with_less_capacity_keeps_what_fits_and_deletes_the_rest(tmp_path: Path) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)

    again = opened(tmp_path, capacity_bytes=3 * 4096)
    assert again.flush(FLUSH)

    assert len(again.shards) == 3
    assert len(files(tmp_path)) == 1 + 3  # the manifest and the shards it kept


HOSTILE = [
    "..",
    ".",
    "..\\..\\etc\\passwd",
    "~root",
    "a\\..\\b",
    "con",
    "NUL",
    " ",
    "-",
    "x" * 128,
    "é" * 128,
    "a:b*c?",
]


@pytest.mark.parametrize("model_id", HOSTILE)
def test_a_hostile_model_id_stays_inside_the_data_dir_and_round_trips(tmp_path: Path, model_id: str) -> None:
    root = tmp_path / "data"
    m, shards = cut_flat(small(), model_id, 1, "n0", 10, 4096, 3)
    fill(opened(root), m, shards)

    (folder,) = [p for p in root.iterdir() if p.name != LOCK]
    assert folder.parent == root and folder.name == model_dir_name(model_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert opened(root).manifest(model_id, 1) == m


@given(st.text(min_size=1, max_size=200))
def test_every_model_id_names_one_safe_folder(model_id: str) -> None:
    name = model_dir_name(model_id)

    assert name not in (".", "..") and not name.startswith(".") and len(name) <= 80
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    assert name != model_dir_name(model_id + "_") and name == model_dir_name(model_id)


def test_two_ids_that_read_alike_get_two_folders() -> None:
    assert model_dir_name("a b") != model_dir_name("a_b") != model_dir_name("a/b")


def fail_writes_from_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if threading.current_thread().name == "store-writer":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(disk.os, "write", write)


def test_a_full_disk_is_logged_once_leaves_no_partial_file_and_the_shards_stay_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m, shards = snapshot()
    store = opened(tmp_path)
    fail_writes_from_the_writer(monkeypatch)

    with caplog.at_level(logging.WARNING, logger="gossip.store.disk"):
        fill(store, m, shards)

    assert all(store.holds(m, i) for i in range(m.num_shards))
    assert files(tmp_path) == []  # no temporary, no part of a file
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert store.writer.failed == 1 + m.num_shards

    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="gossip.store.disk"):
        fill(store, *snapshot(version=2, seed=2))
    assert any("writing again" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_really_full_disk_keeps_whole_files_only(tmp_path: Path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(root)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        m, shards = snapshot()  # 5 shards of 4 KiB and a manifest: more than 16 KiB
        store = opened(root)
        fill(store, m, shards)
        assert all(store.holds(m, i) for i in range(m.num_shards)) and store.writer.failed > 0
        assert not [p for p in root.rglob(TMP_PREFIX + "*")]

        again = opened(root)

        assert again.loaded is not None and again.loaded.dropped == 0  # nothing half written
        assert again.manifest("m", 1) == m and 0 < len(again.shards) < m.num_shards
    finally:
        while _OPEN:
            _OPEN.popitem()[1].close(wait=FLUSH)  # the lock file stays open until then
        if subprocess.run(["umount", str(root)], check=False).returncode:
            subprocess.run(["umount", "-l", str(root)], check=True)  # never leave a mount behind


def test_data_dir_that_is_a_file_or_under_one_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")

    with pytest.raises(ConfigError, match="is a file"):
        StoreConfig(data_dir=str(f)).validate()
    with pytest.raises(ConfigError, match="is a file"):
        StoreConfig(data_dir=str(f / "sub")).validate()


def test_a_data_dir_to_be_made_is_accepted_and_not_created_by_validation(tmp_path: Path) -> None:
    StoreConfig(data_dir=str(tmp_path / "a" / "b")).validate()

    assert not (tmp_path / "a").exists()


def test_an_unreadable_entry_costs_that_shard_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m, shards = snapshot()
    fill(opened(tmp_path), m, shards)
    bad = shard_file(tmp_path, m, 2)
    bad.unlink()
    bad.mkdir()  # a folder where a shard file should be: cannot be read or unlinked

    with caplog.at_level(logging.WARNING, logger="gossip.store.disk"):
        again = opened(tmp_path)

    assert [again.holds(m, i) for i in range(m.num_shards)] == [True, True, False, True, True]
    assert "skipped" in caplog.records[0].getMessage()
