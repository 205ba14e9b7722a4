"""Rebuild a model from the shard store through one reachable peer (``gossip reconstruct``).

The peer names the complete snapshots it knows (newest first) and its ring. For
the chosen snapshot every shard is fetched from one of its owners (the least
busy first, so the load spreads over all of them), streamed straight into one
buffer and checked against the manifest's digest (by the algorithm it names); a
copy that does not match is reported to its holder and fetched from another
owner. Only when every shard matches is a model returned: never a partial or a
mixed one. The manifest's sha256 is the root of its shard digests (checked when
the manifest arrives), so matching shards pin every byte without a second pass.
Tensors are built from the raw bytes and the manifest's layout; nothing received
is ever unpickled.

The buffer is allocated once per rebuild (for the largest snapshot it may try),
in 2 MiB pages where the kernel has transparent huge pages: fresh memory costs a
page fault per page, paid by the thread that copies the shards in, and copying
100 MiB into 4 KiB pages took 67 ms here against 20 ms into huge ones and 11 ms
into a warm buffer. Faulting the pages in beforehand (MADV_POPULATE_WRITE) saved
nothing more once the pages were huge, in a thread beside the copies or before
them. A caller that rebuilds again can hand back a result it is done with
(``reuse=``): its warm buffer is filled instead.

    state_dict = reconstruct("10.0.0.1:7070")          # the newest complete snapshot
    model.load_state_dict(state_dict)
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gossip.core.errors import PeerError
from gossip.core.layout import ITEMSIZE, STATE_BUFFER, STATE_MOMENTUM, Layout
from gossip.core.ring import Ring
from gossip.store import digests
from gossip.store.client import StoreClient
from gossip.store.manifest import Manifest
from gossip.store.shards import describe
from gossip.transport.channels import Channels, transfer_timeout

if TYPE_CHECKING:  # torch only for callers that want tensors; the rebuild itself never needs it
    import torch


class SnapshotUnavailable(RuntimeError):
    """No complete snapshot could be rebuilt; ``missing`` maps each version tried to its missing shards."""

    def __init__(self, message: str, missing: dict[int, list[str]] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or {}


@dataclass
class Rebuilt:
    """A snapshot rebuilt and checked: its manifest and its bytes (the flat buffer)."""

    manifest: Manifest
    data: memoryview
    seconds: float
    peers: dict[str, int] = field(default_factory=dict)  # address -> bytes it served
    bad_replicas: list[str] = field(default_factory=list)  # "address shard-key" that did not hash
    buffer: memoryview | None = field(default=None, repr=False)  # what ``data`` views, for ``reuse=``

    @property
    def parameters(self) -> int:
        return self.manifest.layout.numel

    def tensor_bytes(self) -> dict[str, tuple[str, tuple[int, ...], memoryview]]:
        """name -> (dtype name, shape, a view of its bytes in the buffer), in layout order: the
        model's state_dict, i.e. the parameters, then the model buffers the snapshot carries."""
        out = _entry_bytes(self.manifest.layout, self.data[: self.manifest.params_bytes])
        state = self.manifest.state_layout
        if state is not None:
            for name, item in _entry_bytes(state, self.data[self.manifest.params_bytes :]).items():
                if name.startswith(STATE_BUFFER):
                    out[name.removeprefix(STATE_BUFFER)] = item
        return out

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model_id": m.model_id,
            "version": m.version,
            "publisher": m.publisher,
            "step": m.step,
            "bytes": m.total_bytes,
            "parameters": self.parameters,
            "shards": m.num_shards,
            "seconds": round(self.seconds, 4),
            "mb_per_s": round(m.total_bytes / 1e6 / max(self.seconds, 1e-9), 2),
            "sha256": m.sha256.hex(),
            "digest_algorithm": m.digest_algorithm,
            "peers": {address: self.peers[address] for address in sorted(self.peers)},
            "bad_replicas": self.bad_replicas,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's tensors: parameters and the model buffers the snapshot carries (views into
        the rebuilt buffer; loads torch)."""
        from gossip.core.params import FlatParams

        m = self.manifest
        out = FlatParams.from_bytes(m.layout, self.data[: m.params_bytes]).state_dict()
        state = self.optimizer_state()
        # Copies: a view would take the whole state buffer, momentum included, into a torch.save.
        out.update(
            (n.removeprefix(STATE_BUFFER), t.clone()) for n, t in state.items() if n.startswith(STATE_BUFFER)
        )
        return out

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Everything after the parameters, by its prefixed name (``momentum/<parameter>``,
        ``buffer/<buffer>``); empty for a snapshot without state (views; loads torch)."""
        from gossip.core.params import FlatParams

        m = self.manifest
        state = m.state_layout
        if state is None:
            return {}
        return FlatParams.from_bytes(state, self.data[m.params_bytes :]).state_dict()


def _entry_bytes(layout: Layout, data: memoryview) -> dict[str, tuple[str, tuple[int, ...], memoryview]]:
    base, start = {}, 0
    for dt, n in layout.segments.items():
        base[dt] = start
        start += n * ITEMSIZE[dt]
    out = {}
    for e in layout.entries:
        begin = base[e.dtype] + e.offset * ITEMSIZE[e.dtype]
        out[e.name] = (e.dtype, e.shape, data[begin : begin + e.numel * ITEMSIZE[e.dtype]])
    return out


async def fetch_snapshot(
    peer: str,
    model_id: str = "",
    version: int | None = None,
    timeout: float = 10.0,
    channels: Channels | None = None,
    concurrency: int = 16,
    reuse: Rebuilt | None = None,
) -> Rebuilt:
    """The newest complete snapshot (or ``version``) known to ``peer``, every byte checked.

    Raises ConnectionError when ``peer`` cannot be asked, SnapshotUnavailable
    when no snapshot can be rebuilt (the message names the missing shards).
    ``timeout`` is the base deadline of each call; transfers add 20 MB/s to it.
    ``reuse``: an earlier result the caller is done with; its buffer is rebuilt
    into when it is large enough, so its ``data`` and tensors change.
    """
    own = channels is None
    peers = channels or Channels()
    store = StoreClient(peers)
    t0 = time.monotonic()
    try:
        try:
            located = await store.locate(peer, model_id, timeout)
        except PeerError as exc:
            if exc.code == "NOT_FOUND":
                raise SnapshotUnavailable(exc.details) from None
            raise ConnectionError(f"cannot ask {peer}: {exc.code} {exc.details[:200]}".strip()) from None
        addresses = dict(located.members)
        asked = {peer}
        name = located.model_id
        candidates = [
            m for m in located.manifests if m.model_id == name and (version is None or m.version == version)
        ]
        if not candidates:
            kept = ", ".join(f"v{m.version}" for m in located.manifests) or "none"
            want = f"version {version}" if version is not None else "a complete snapshot"
            refused = f"; refused: {describe(located.refused, 4)}" if located.refused else ""
            raise SnapshotUnavailable(f"{peer} knows no {want} of {name} (kept: {kept}{refused})")
        nbytes = max(m.total_bytes for m in candidates)
        if reuse is not None and reuse.buffer is not None and len(reuse.buffer) >= nbytes:
            buffer = reuse.buffer
        else:
            buffer = _allocate(nbytes)
        missing: dict[int, list[str]] = {}
        for m in sorted(candidates, key=lambda m: m.version, reverse=True):
            while True:
                ring = Ring(list(addresses), located.vnodes)
                rebuilt = await _fetch(store, m, buffer, ring, addresses, timeout, concurrency, missing)
                if rebuilt is not None:
                    rebuilt.seconds = time.monotonic() - t0
                    return rebuilt
                # The peer's view of the members may be short (it joined a moment ago): the
                # owners of what is missing may be members it has not heard of yet.
                if not await _widen(store, addresses, asked, name, timeout):
                    break
        detail = "; ".join(f"v{v} misses {describe(keys)}" for v, keys in missing.items())
        raise SnapshotUnavailable(
            f"no complete snapshot of {name} can be rebuilt: {detail} (no live owner holds a valid copy)",
            missing,
        )
    finally:
        if own:
            await peers.close()


WIDEN_PEERS = 3  # members asked at once for the members they know, when shards are missing
WIDEN_ROUNDS = 2  # at most this many such rounds per rebuild: truly lost shards fail soon


async def _widen(
    store: StoreClient, addresses: dict[str, str], asked: set[str], model_id: str, timeout: float
) -> bool:
    """Ask members not asked yet for the members they know, into ``addresses``; True if any is new."""
    for _ in range(WIDEN_ROUNDS):
        ask = [a for a in addresses.values() if a not in asked][:WIDEN_PEERS]
        if not ask:
            return False
        asked.update(ask)
        replies = await asyncio.gather(
            *(store.locate(a, model_id, timeout) for a in ask), return_exceptions=True
        )
        before = len(addresses)
        for reply in replies:
            if isinstance(reply, Exception):  # gone, or knows no snapshot yet: others may
                continue
            if isinstance(reply, BaseException):
                raise reply
            for node, address in reply.members:
                addresses.setdefault(node, address)
        if len(addresses) > before:
            return True
    return False


async def _fetch(
    store: StoreClient,
    m: Manifest,
    buffer: memoryview,
    ring: Ring,
    addresses: dict[str, str],
    timeout: float,
    concurrency: int,
    missing: dict[int, list[str]],
) -> Rebuilt | None:
    # Every byte is written by a checked shard before anyone reads it.
    view = buffer[: m.total_bytes]
    served: Counter[str] = Counter()
    bad: list[str] = []
    lost: list[str] = []
    streams = asyncio.Semaphore(concurrency)

    def place(i: int) -> memoryview:
        start, stop = m.shard_range(i)
        return view[start:stop]

    async def batch(node: str, indices: list[int]) -> list[int]:
        address = addresses[node]
        async with streams:
            nbytes = sum(m.shard_length(i) for i in indices)
            got = await store.get_shards(address, m, indices, place, transfer_timeout(timeout, nbytes))
        if got.ok:
            served[address] += sum(m.shard_length(i) for i in got.ok)
        for i in got.corrupt:
            bad.append(f"{address} {m.shard_key(i)}")
            with contextlib.suppress(PeerError):  # a hint only
                await store.report(address, m, i, timeout)
        return got.ok

    owners = {
        i: [n for n in ring.preference_list(m.shard_key(i), m.replication) if n in addresses]
        for i in range(m.num_shards)
    }
    tried: dict[int, set[str]] = {i: set() for i in range(m.num_shards)}
    pending = set(range(m.num_shards))
    # Each owner is called about once: learn their bulk ports first (one round trip, together).
    await store.channels.learn_bulk({addresses[n] for ns in owners.values() for n in ns}, timeout)
    while pending:
        # One stream per peer: each shard goes to its least loaded untried owner, then to
        # anyone else (a copy may still sit on a former owner during a handoff).
        batches: dict[str, list[int]] = {}
        load: Counter[str] = Counter()
        for i in sorted(pending):
            left = [n for n in owners[i] if n not in tried[i]]
            left = left or [n for n in ring.nodes if n in addresses and n not in tried[i]]
            if not left:
                pending.discard(i)
                lost.append(m.shard_key(i))
                continue
            pick = min(left, key=lambda n: load[n])
            load[pick] += m.shard_length(i)
            tried[i].add(pick)
            batches.setdefault(pick, []).append(i)
        for done in await asyncio.gather(*(batch(n, idx) for n, idx in batches.items())):
            pending -= set(done)
    if lost:
        missing[m.version] = sorted(lost, key=lambda k: int(k.rpartition("/s")[2]))
        return None
    # Checked on arrival too; costs microseconds.
    if digests.root(m.shard_digests, m.digest_algorithm) != m.sha256:
        missing[m.version] = ["(the manifest's sha256 is not the root of its shard digests)"]
        return None
    return Rebuilt(m, view, 0.0, dict(served), bad, buffer)


def _allocate(nbytes: int) -> memoryview:
    """Memory for a rebuild: anonymous, in 2 MiB pages where the kernel has
    them (100 MiB in 4 KiB pages is 25 600 faults; in huge pages, 50)."""
    if not sys.platform.startswith("linux"):
        return np.empty(nbytes, dtype=np.uint8).data.cast("B")
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages
        mem.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(mem)[:nbytes]


def reconstruct(
    peer: str, model_id: str = "", version: int | None = None, timeout: float = 10.0
) -> dict[str, torch.Tensor]:
    """The state_dict of the newest complete snapshot (or ``version``) through ``peer`` (blocking)."""
    return asyncio.run(fetch_snapshot(peer, model_id, version, timeout)).state_dict()


async def load_into(
    model: torch.nn.Module,
    peers: list[str],
    model_id: str = "",
    timeout: float = 10.0,
    channels: Channels | None = None,
) -> Rebuilt:
    """Rebuild the newest snapshot of ``model_id`` through the first of ``peers`` that answers,
    and copy it into ``model``'s trainable parameters and the floating-point buffers it carries.
    The momentum buffers it carries (``Rebuilt.optimizer_state``) are the caller's to take.

    ConnectionError when no peer could be asked, SnapshotUnavailable when none can
    be rebuilt, LayoutError when the snapshot is of another architecture or carries
    state that does not fit the model (the model is then left as it was).
    """
    import torch

    from gossip.core.layout import LayoutError

    errors = []
    for peer in peers:
        try:
            rebuilt = await fetch_snapshot(peer, model_id, timeout=timeout, channels=channels)
        except ConnectionError as exc:
            errors.append(str(exc))
            continue
        if rebuilt.manifest.fingerprint != Layout.of_model(model).fingerprint():
            raise LayoutError(f"snapshot {rebuilt.manifest.key} has another parameter layout than this model")
        check_state(rebuilt, model)
        state = rebuilt.state_dict()
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state[name])
            for name, t in state.items():
                if name in buffers:
                    buffers[name].copy_(t)
        return rebuilt
    raise ConnectionError("; ".join(errors) or "no peer to ask")


def check_state(rebuilt: Rebuilt, model: torch.nn.Module) -> None:
    """Every tensor of the snapshot's state must be one of ``model``'s, of the same shape and dtype."""
    from gossip.core.layout import LayoutError

    state = rebuilt.manifest.state_layout
    if state is None:
        return
    params: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers: dict[str, torch.Tensor] = dict(model.named_buffers())
    for e in state.entries:
        if e.name.startswith(STATE_MOMENTUM):
            like = params.get(e.name.removeprefix(STATE_MOMENTUM))
        else:
            like = buffers.get(e.name.removeprefix(STATE_BUFFER))
        if like is None or tuple(like.shape) != e.shape or str(like.dtype).removeprefix("torch.") != e.dtype:
            raise LayoutError(
                f"snapshot {rebuilt.manifest.key} carries {e.name} {e.dtype}{list(e.shape)}, which this model lacks"
            )
