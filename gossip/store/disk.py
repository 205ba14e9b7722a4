"""A node's shards and manifests as files (``--data-dir``), so a restarted node serves them at once.

Under the data folder::

    <model>/v<version>/manifest                              the manifest, checksummed
    <model>/v<version>/<index>.<algorithm>.<digest in hex>   one shard's bytes, nothing else

``<model>`` is the model id made safe for a path: its letters, digits, ``-`` and
``_`` (anything else becomes ``_``, 40 at most), then ``-`` and 32 hex digits of
the id's blake2b. No id a peer sends can name ``..``, a slash, a device or a name
too long for the file system, and two ids never share a folder. The rest of every
name is numbers, hex and an algorithm from :data:`~gossip.store.digests.ALGORITHMS`.

Every file is written to a temporary name (``.tmp-...``) in its folder, fsynced,
renamed into place and its folder fsynced: a crash leaves the old file or the new
one, never a part of one, and :meth:`DataDir.scan` deletes the temporaries a crash
left. The manifest file is a magic line, the sha256 of the encoded manifest and
the encoded manifest (``serde``), so a truncated or altered one is told apart
before it is decoded.

:meth:`DataDir.scan` reads everything back and checks it: each manifest against its
checksum, its own rules (:meth:`Manifest.validate`) and the folder it sits in; each
shard against its manifest (index, digest, algorithm, length) and its bytes against
that digest. A file that fails is deleted, with one warning line: repair fetches a
good copy. Shards without a manifest (a publish cut short, the losing side of a
conflict) are deleted too, as the in-memory store drops orphans.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

from gossip.config import MAX_SHARD_BYTES
from gossip.core.membership import MAX_ID_CHARS
from gossip.store import digests, serde
from gossip.store.manifest import Manifest, StoreError
from gossip.store.shards import ShardId

log = logging.getLogger(__name__)

MANIFEST = "manifest"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"  # held (flock) by the one process that uses the folder
_MAGIC = b"gossip-manifest 1\n"
_SUM = digests.DIGEST_BYTES  # sha256 of the encoded manifest
_MAX_MANIFEST_FILE = 8 << 20  # well above the 4 MiB a manifest may take on the wire
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_MODEL_DIR = re.compile(r"[A-Za-z0-9_-]{0,40}-[0-9a-f]{32}")
_VERSION_DIR = re.compile(r"v(0|[1-9][0-9]{0,18})")
_SHARD_FILE = re.compile(r"(0|[1-9][0-9]{0,5})\.(" + "|".join(digests.ALGORITHMS) + r")\.([0-9a-f]{64})")


def model_dir_name(model_id: str) -> str:
    """The folder of ``model_id``'s snapshots: readable, and safe whatever the id holds."""
    tag = hashlib.blake2b(model_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{_SAFE.sub('_', model_id)[:40]}-{tag}"


def shard_file_name(index: int, algorithm: str, digest: bytes) -> str:
    return f"{index}.{algorithm}.{digest.hex()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create ``path`` and the folders above it that are missing, each made durable in its parent."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        _fsync_dir(d.parent)


def write_atomic(path: Path, *parts: bytes | bytearray | memoryview) -> None:
    """Write ``parts`` to ``path``: a temporary file in its folder, fsync, rename, fsync the folder.

    On any error (ENOSPC included) the temporary is removed and the error raised:
    ``path`` is then what it was before, absent or whole.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def manifest_file_bytes(m: Manifest) -> bytes:
    body = serde.manifest_to_bytes(m)
    return _MAGIC + hashlib.sha256(body).digest() + body


def manifest_from_file_bytes(data: bytes) -> Manifest:
    """The manifest a file holds; StoreError('invalid') if it is cut short, altered or malformed."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _SUM:
        raise StoreError("invalid", "not a manifest file (or cut short)")
    checksum, body = data[len(_MAGIC) : len(_MAGIC) + _SUM], data[len(_MAGIC) + _SUM :]
    if hashlib.sha256(body).digest() != checksum:
        raise StoreError("invalid", "manifest checksum does not match (cut short or altered)")
    return serde.manifest_from_bytes(body)


@dataclass
class Loaded:
    """What :meth:`DataDir.scan` found and checked: manifests, and shards with their bytes."""

    manifests: list[Manifest] = field(default_factory=list)
    shards: list[tuple[ShardId, bytearray, str]] = field(default_factory=list)  # id, bytes, algorithm
    dropped: int = 0  # files deleted: failed a check, or shards without a manifest
    bytes: int = 0


NODE_ID = "node_id"  # the id of the node that uses the folder, kept across restarts


def remembered_node_id(root: str | Path, fresh: str) -> str:
    """The node id a data folder keeps (``DIR/node_id``), else ``fresh``, written there first.

    A node restarted on its folder without ``--node-id`` comes back under the same id,
    so the ring still gives it the shards it reloads. ValueError for a file that holds
    no valid id (one line, 1 to MAX_ID_CHARS printable characters).
    """
    path = Path(root).absolute() / NODE_ID
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        _make_dirs(path.parent)
        write_atomic(path, fresh.encode())
        return fresh
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the node id in {path}: {exc}") from None
    if not 0 < len(text) <= MAX_ID_CHARS or not text.isprintable():
        raise ValueError(f"{path} does not hold a node id (1 to {MAX_ID_CHARS} printable characters)")
    return text


class DataDirBusy(OSError):
    """Another process holds the data folder's lock."""


class DataDir:
    """The files under one data folder. Its methods do blocking I/O: call them off the event loop."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self._lock: int | None = None  # the lock file's descriptor while this process holds it

    def lock(self) -> None:
        """Take the folder for this process (creating it); DataDirBusy if another one has it.

        Two nodes on one folder would delete each other's files; the lock (an flock,
        let go when the process ends, however it ends) makes the second one say so.
        """
        if self._lock is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(f"{self.root} is in use by another process (it holds {LOCK})") from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def version_dir(self, model_id: str, version: int) -> Path:
        return self.root / model_dir_name(model_id) / f"v{version}"

    def shard_path(self, sid: ShardId, algorithm: str) -> Path:
        return self.version_dir(sid[0], sid[1]) / shard_file_name(sid[2], algorithm, sid[3])

    def write_shard(self, sid: ShardId, algorithm: str, data: bytearray | memoryview) -> None:
        folder = self.version_dir(sid[0], sid[1])
        _make_dirs(folder)
        write_atomic(folder / shard_file_name(sid[2], algorithm, sid[3]), data)

    def remove_shard(self, sid: ShardId, algorithm: str) -> None:
        self.shard_path(sid, algorithm).unlink(missing_ok=True)

    def write_manifest(self, m: Manifest) -> None:
        folder = self.version_dir(m.model_id, m.version)
        _make_dirs(folder)
        write_atomic(folder / MANIFEST, manifest_file_bytes(m))

    def remove_version(self, model_id: str, version: int) -> None:
        folder = self.version_dir(model_id, version)
        self._remove_tree(folder)
        with contextlib.suppress(OSError):  # the model's folder, once its last version is gone
            folder.parent.rmdir()

    @staticmethod
    def _remove_tree(folder: Path) -> None:
        if not folder.is_dir():
            return
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()

    # --- reading back -----------------------------------------------------------------------

    def scan(self) -> Loaded:
        """Every manifest and shard under the folder that passes its checks; the rest is deleted.
        Takes the folder's lock first (DataDirBusy if another process holds it)."""
        self.lock()
        out = Loaded()
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name in (LOCK, NODE_ID):
                continue
            if not (model_dir.is_dir() and _MODEL_DIR.fullmatch(model_dir.name)):
                log.warning("data dir: ignoring %s (not a folder this node writes)", model_dir)
                continue
            for version_dir in sorted(model_dir.iterdir()):
                found = _VERSION_DIR.fullmatch(version_dir.name)
                if found is None or not version_dir.is_dir():
                    log.warning("data dir: ignoring %s (not a folder this node writes)", version_dir)
                    continue
                self._scan_version(model_dir.name, int(found[1]), version_dir, out)
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only if empty
        return out

    def _scan_version(self, model_dir: str, version: int, folder: Path, out: Loaded) -> None:
        names = sorted(os.listdir(folder))
        for tmp in names:
            if tmp.startswith(TMP_PREFIX):  # a write a crash cut short
                (folder / tmp).unlink(missing_ok=True)
        m = self._read_manifest(folder / MANIFEST, model_dir, version, out)
        orphans = 0
        for file_name in names:
            if file_name == MANIFEST or file_name.startswith(TMP_PREFIX):
                continue
            path = folder / file_name
            name = _SHARD_FILE.fullmatch(file_name)
            if name is None:
                log.warning("data dir: ignoring %s (not a file this node writes)", path)
                continue
            index, algorithm, digest = int(name[1]), name[2], bytes.fromhex(name[3])
            if m is None or index >= m.num_shards or m.shard_digests[index] != digest:
                path.unlink(missing_ok=True)
                orphans += 1
                continue
            try:
                problem = self._check_shard(path, m, index, algorithm, out)
                if problem:
                    log.warning("data dir: deleted %s: %s; repair fetches a good copy", path, problem)
                    path.unlink(missing_ok=True)
                    out.dropped += 1
            except OSError as exc:  # one file it cannot read (or delete) costs that file, not the load
                log.warning("data dir: skipped %s: %s; repair fetches a good copy", path, exc.strerror or exc)
        if orphans:
            log.info("data dir: deleted %d shards of %s without their manifest", orphans, folder)
            out.dropped += orphans
        if m is None:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty

    def _read_manifest(self, path: Path, model_dir: str, version: int, out: Loaded) -> Manifest | None:
        if not path.exists():
            return None
        try:
            if path.stat().st_size > _MAX_MANIFEST_FILE:
                raise StoreError("invalid", f"{path.stat().st_size} bytes, too large for a manifest")
            m = manifest_from_file_bytes(path.read_bytes())
            if model_dir_name(m.model_id) != model_dir or m.version != version:
                raise StoreError("invalid", f"names {m.key}, which belongs elsewhere")
        except StoreError as exc:
            log.warning("data dir: deleted %s: %s; repair fetches a good copy", path, exc)
            path.unlink(missing_ok=True)
            out.dropped += 1
            return None
        out.manifests.append(m)
        return m

    @staticmethod
    def _check_shard(path: Path, m: Manifest, index: int, algorithm: str, out: Loaded) -> str:
        """Read and check one shard of ``m`` (kept in ``out``); the problem, or '' if it is good."""
        if algorithm != m.digest_algorithm:
            return f"digested by {algorithm}, its manifest says {m.digest_algorithm}"
        want = m.shard_length(index)
        size = path.stat().st_size
        if size != want or size > MAX_SHARD_BYTES:
            return f"{size} bytes, its manifest says {want} (cut short?)"
        data = bytearray(size)
        with path.open("rb") as f:
            got = f.readinto(data)
        if got != size:
            return f"read {got} of {size} bytes"
        if digests.digest(data, algorithm) != m.shard_digests[index]:
            return "bytes do not match the manifest's digest (altered)"
        out.shards.append(((m.model_id, m.version, index, m.shard_digests[index]), data, algorithm))
        out.bytes += size
        return ""


class Writer:
    """Runs file operations in the order they were asked, on one thread, off the event loop.

    A failed operation (a full disk, a folder gone) is logged and skipped: what it
    wrote is served from memory still, and the store stays as durable as the disk
    lets it. One error line when writes start failing, one when they succeed again.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.failed = 0  # operations that raised OSError
        self._failing = 0  # failures since the last success
        self._queue: SimpleQueue[tuple[str, Callable[[], None]] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def submit(self, what: str, op: Callable[[], None]) -> None:
        """Queue ``op`` (it runs once :meth:`start` was called); ``what`` names it in errors."""
        self._queue.put((what, op))

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far ran; False if that took over ``timeout``."""
        done = threading.Event()
        self.submit("flush", done.set)
        return done.wait(timeout) if self._thread is not None else False

    def close(self, wait: float = 0.0) -> None:
        """Run what is queued, then end the thread; wait up to ``wait`` seconds for that."""
        self._queue.put(None)
        if wait and self._thread is not None:
            self._thread.join(wait)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            what, op = item
            try:
                op()
            except OSError as exc:
                self.failed += 1
                self._failing += 1
                if self._failing == 1:
                    log.error(
                        "data dir %s: %s failed (%s); the store keeps serving it from memory, "
                        "and a restart will not find it",
                        self.root,
                        what,
                        exc.strerror or exc,
                    )
                continue
            if self._failing:
                log.warning("data dir %s: writing again after %d failed operations", self.root, self._failing)
                self._failing = 0
