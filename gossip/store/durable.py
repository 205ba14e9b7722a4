"""The shard store kept on disk as well as in memory (``--data-dir``; the files: :mod:`~gossip.store.disk`).

:class:`DurableStore` is a :class:`~gossip.store.shards.ShardStore` whose every
change (a shard or manifest kept, a shard dropped, a version forgotten) is also
queued for its :class:`~gossip.store.disk.Writer`, which applies them in order on
its own thread. Memory stays the truth: a shard is served as soon as it is kept,
a write that fails (a full disk) is logged and the shard served still, and only
a restart loses what the disk missed, which repair then brings back.

:meth:`DurableStore.load` runs once at start, before the first repair round (which
would otherwise pull what the disk holds): it reads and hashes the folder on a
worker thread (:meth:`~gossip.store.disk.DataDir.scan`) and folds in what passed
its checks under the rules anything a peer sends meets: ``keep_versions``, the
model limit, the capacity. What those rules refuse is deleted, so the folder
holds what memory holds. Writes queued while it loads run after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

from gossip.store.disk import DataDir, DataDirBusy, Loaded, Writer
from gossip.store.manifest import Manifest, shard_key, snapshot_key
from gossip.store.shards import ShardId, ShardStore

log = logging.getLogger(__name__)

_FOLD_BATCH = 1024  # shards folded in per turn of the event loop: about 5 ms each


class DurableStore(ShardStore):
    """A :class:`ShardStore` mirrored under ``data_dir``; :meth:`load` it before use."""

    def __init__(
        self,
        data_dir: str,
        keep_versions: int = 2,
        capacity_bytes: int = 4 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(keep_versions, capacity_bytes, clock)
        self.disk = DataDir(data_dir)
        self.writer = Writer(self.disk.root)
        self.loaded: Loaded | None = None  # what the last load found
        self.mirrored = True  # False once the folder turned out to be another process's

    def _submit(self, what: str, op: Callable[[], None]) -> None:
        if self.mirrored:
            self.writer.submit(what, op)

    # --- every change, mirrored ------------------------------------------------------------

    def add_manifest(self, m: Manifest) -> str:
        outcome = super().add_manifest(m)
        if outcome in ("new", "replaced"):
            self._submit(f"writing the manifest of {m.key}", partial(self.disk.write_manifest, m))
        return outcome

    def forget_version(self, model_id: str, version: int) -> None:
        super().forget_version(model_id, version)
        self._submit(
            f"removing {snapshot_key(model_id, version)}",
            partial(self.disk.remove_version, model_id, version),
        )

    def add(self, sid: ShardId, data: bytearray, algorithm: str) -> bool:
        if not super().add(sid, data, algorithm):
            return False
        self._submit(f"writing {shard_key(*sid[:3])}", partial(self.disk.write_shard, sid, algorithm, data))
        return True

    def drop(self, sid: ShardId) -> None:
        held = self.shards.get(sid)
        super().drop(sid)
        if held is not None:
            self._submit(
                f"removing {shard_key(*sid[:3])}", partial(self.disk.remove_shard, sid, held.algorithm)
            )

    # --- start and stop -------------------------------------------------------------------

    async def load(self) -> Loaded:
        """Read the folder back (hashing on a worker thread), keep what passes, then start writing."""
        t0 = time.monotonic()
        try:
            found = await asyncio.to_thread(self.disk.scan)
        except DataDirBusy as exc:
            log.error("data dir %s; this node keeps its store in memory only", exc)
            self.mirrored, found = False, Loaded()
        except OSError as exc:
            log.error(
                "data dir %s cannot be read (%s): starting with an empty store; repair refills it",
                self.disk.root,
                exc.strerror or exc,
            )
            found = Loaded()
        self._fold_manifests(found)
        for start in range(0, len(found.shards), _FOLD_BATCH):
            self._fold_shards(found.shards[start : start + _FOLD_BATCH])
            await asyncio.sleep(0)  # let the loop breathe between batches
        self.writer.start()
        self.loaded = found
        log.info(
            "data dir %s: %d manifests and %d shards (%d bytes) served again in %.3f s; %d files deleted",
            self.disk.root,
            len(found.manifests),
            len(found.shards),
            found.bytes,
            time.monotonic() - t0,
            found.dropped,
        )
        return found

    def load_now(self) -> Loaded:
        """:meth:`load` on the calling thread (tools and tests, outside an event loop)."""
        found = self.disk.scan()
        self._fold_manifests(found)
        self._fold_shards(found.shards)
        self.writer.start()
        self.loaded = found
        return found

    def _fold_manifests(self, found: Loaded) -> None:
        for m in sorted(found.manifests, key=lambda m: m.version):
            outcome = ShardStore.add_manifest(self, m)  # on disk already: not written again
            if outcome in ("retired", "full"):
                self._submit(f"removing {m.key}", partial(self.disk.remove_version, m.model_id, m.version))

    def _fold_shards(self, shards: list[tuple[ShardId, bytearray, str]]) -> None:
        for sid, data, algorithm in shards:
            if self.manifest(sid[0], sid[1]) is None or self.bytes_held + len(data) > self.capacity_bytes:
                # Its version was refused above, or the store is full: the disk keeps what memory does.
                self._submit(
                    f"removing {shard_key(*sid[:3])}", partial(self.disk.remove_shard, sid, algorithm)
                )
                continue
            ShardStore.add(self, sid, data, algorithm)

    def flush(self, timeout: float) -> bool:
        """Wait (blocking) until every change so far is on disk or failed; False on timeout."""
        return self.writer.flush(timeout)

    def close(self, wait: float = 0.0) -> None:
        """Write what is queued, let go of the folder, end the writer's thread (waiting up to
        ``wait`` seconds for all that)."""
        if self.writer.started:
            self.writer.submit("letting go of the folder", self.disk.unlock)
        else:
            self.disk.unlock()
        self.writer.close(wait)
