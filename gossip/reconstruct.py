"""Rebuild a model from the shard store through one reachable peer (``gossip reconstruct``).

The peer names the complete snapshots it knows (newest first) and its ring. For
the chosen snapshot every shard is fetched from one of its owners (the least
busy first, so the load spreads over all of them), streamed straight into one
preallocated buffer and checked against the manifest's digest; a copy that does
not match is reported to its holder and fetched from another owner. Only when
every shard matches is a model returned: never a partial or a mixed one. The
manifest's sha256 is the root of its shard digests (checked when the manifest
arrives), so matching shards pin every byte without a second pass. Tensors are built from the raw
bytes and the manifest's layout; nothing received is ever unpickled.

    state_dict = reconstruct("10.0.0.1:7070")          # the newest complete snapshot
    model.load_state_dict(state_dict)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gossip.params import FlatParams, Layout
from gossip.ring import Ring
from gossip.rpc import PeerClient, PeerError
from gossip.store import Manifest, describe, flat_from_bytes, root_digest
from gossip.store_rpc import StoreClient, transfer_timeout

FORMATS = ("pt", "safetensors")
_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}


class SnapshotUnavailable(RuntimeError):
    """No complete snapshot could be rebuilt; ``missing`` maps each version tried to its missing shards."""

    def __init__(self, message: str, missing: dict[int, list[str]] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or {}


@dataclass
class Rebuilt:
    manifest: Manifest
    flat: FlatParams
    seconds: float
    peers: dict[str, int] = field(default_factory=dict)  # address -> bytes it served
    bad_replicas: list[str] = field(default_factory=list)  # "address shard-key" that did not hash

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.flat.state_dict()


async def fetch_snapshot(
    peer: str,
    model_id: str = "",
    version: int | None = None,
    timeout: float = 10.0,
    client: PeerClient | None = None,
    concurrency: int = 16,
) -> Rebuilt:
    """The newest complete snapshot (or ``version``) known to ``peer``, every byte checked.

    Raises ConnectionError when ``peer`` cannot be asked, SnapshotUnavailable
    when no snapshot can be rebuilt (the message names the missing shards).
    ``timeout`` is the base deadline of each call; transfers add 20 MB/s to it.
    """
    own = client is None
    peers = client or PeerClient()
    store = StoreClient(peers)
    t0 = time.monotonic()
    try:
        try:
            located = await store.locate(peer, model_id, timeout)
        except PeerError as exc:
            if exc.code.name == "NOT_FOUND":
                raise SnapshotUnavailable(exc.details) from None
            raise ConnectionError(f"cannot ask {peer}: {exc.code.name} {exc.details[:200]}".strip()) from None
        ring = Ring([n for n, _ in located.members], located.vnodes)
        addresses = dict(located.members)
        name = located.model_id
        candidates = [
            m for m in located.manifests if m.model_id == name and (version is None or m.version == version)
        ]
        if not candidates:
            kept = ", ".join(f"v{m.version}" for m in located.manifests) or "none"
            want = f"version {version}" if version is not None else "a complete snapshot"
            raise SnapshotUnavailable(f"{peer} knows no {want} of {name} (kept: {kept})")
        missing: dict[int, list[str]] = {}
        for m in sorted(candidates, key=lambda m: m.version, reverse=True):
            rebuilt = await _fetch(store, m, ring, addresses, timeout, concurrency, missing)
            if rebuilt is not None:
                rebuilt.seconds = time.monotonic() - t0
                return rebuilt
        detail = "; ".join(f"v{v} misses {describe(keys)}" for v, keys in missing.items())
        raise SnapshotUnavailable(
            f"no complete snapshot of {name} can be rebuilt: {detail} (no live owner holds a valid copy)",
            missing,
        )
    finally:
        if own:
            await peers.close()


async def _fetch(
    store: StoreClient,
    m: Manifest,
    ring: Ring,
    addresses: dict[str, str],
    timeout: float,
    concurrency: int,
    missing: dict[int, list[str]],
) -> Rebuilt | None:
    # Uninitialised: every byte is written by a checked shard before anyone reads it.
    buf = torch.empty(m.total_bytes, dtype=torch.uint8)
    view = buf.numpy().data.cast("B") if m.total_bytes else memoryview(b"")
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
    if root_digest(m.shard_digests) != m.sha256:  # checked on arrival too; costs microseconds
        missing[m.version] = ["(the manifest's sha256 is not the root of its shard digests)"]
        return None
    return Rebuilt(m, flat_from_bytes(m.layout, view), 0.0, dict(served), bad)


def reconstruct(
    peer: str, model_id: str = "", version: int | None = None, timeout: float = 10.0
) -> dict[str, torch.Tensor]:
    """The state_dict of the newest complete snapshot (or ``version``) through ``peer`` (blocking)."""
    return asyncio.run(fetch_snapshot(peer, model_id, version, timeout)).state_dict()


def rebuilt_to_json(r: Rebuilt, out: str, fmt: str) -> dict[str, Any]:
    m = r.manifest
    return {
        "model_id": m.model_id,
        "version": m.version,
        "publisher": m.publisher,
        "step": m.step,
        "bytes": m.total_bytes,
        "parameters": r.flat.numel,
        "shards": m.num_shards,
        "seconds": round(r.seconds, 4),
        "mb_per_s": round(m.total_bytes / 1e6 / max(r.seconds, 1e-9), 2),
        "sha256": m.sha256.hex(),
        "peers": {address: r.peers[address] for address in sorted(r.peers)},
        "bad_replicas": r.bad_replicas,
        "out": str(out),
        "format": fmt,
    }


def format_rebuilt(r: Rebuilt, out: str, fmt: str) -> str:
    info = rebuilt_to_json(r, out, fmt)
    peers = ", ".join(f"{a} ({n:,} B)" for a, n in info["peers"].items())
    lines = [
        f"rebuilt     {info['model_id']} v{info['version']} (publisher {info['publisher']}, step {info['step']})",
        f"size        {info['parameters']:,} parameters, {info['bytes']:,} bytes in {info['shards']} shards",
        f"time        {info['seconds']:.3f} s ({info['mb_per_s']:.1f} MB/s)",
        f"sha256      {info['sha256']}",
        f"peers       {peers}",
        f"written     {out} ({fmt})",
    ]
    if r.bad_replicas:
        lines.append(
            f"corrupt     {len(r.bad_replicas)} replicas skipped and reported: {', '.join(r.bad_replicas)}"
        )
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------


def save(rebuilt: Rebuilt, path: str | Path, fmt: str) -> None:
    """Write the state_dict as ``pt`` (torch.save) or ``safetensors``."""
    if fmt == "pt":
        torch.save(rebuilt.state_dict(), str(path))
    elif fmt == "safetensors":
        m = rebuilt.manifest
        meta = {
            "model_id": m.model_id,
            "version": str(m.version),
            "publisher": m.publisher,
            "step": str(m.step),
            "sha256": m.sha256.hex(),
        }
        write_safetensors(path, rebuilt.flat, meta)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def write_safetensors(path: str | Path, flat: FlatParams, metadata: dict[str, str] | None = None) -> None:
    """The safetensors format: u64 little-endian header length, JSON header, then the raw bytes.

    The flat buffer already is that byte section: its dtype segments in order,
    every tensor contiguous inside its segment, no holes.
    """
    header: dict[str, Any] = {}
    base: dict[str, int] = {}
    size = 0
    for dt, n in flat.layout.segments.items():
        base[dt] = size
        size += n * flat.segments[dt].element_size()
    for e in flat.layout.entries:
        item = flat.segments[e.dtype].element_size()
        start = base[e.dtype] + e.offset * item
        header[e.name] = {
            "dtype": _SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [start, start + e.numel * item],
        }
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for view in flat.byte_views():
            fh.write(view)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (float dtypes only), checked against the header's offsets."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: {name} lies outside the data")
        layout = Layout.from_json(
            [{"name": name, "dtype": names[info["dtype"]], "shape": info["shape"], "offset": 0}]
        )
        t = flat_from_bytes(layout, bytearray(body[begin:end]))
        out[name] = t.state_dict()[name]
    return out
