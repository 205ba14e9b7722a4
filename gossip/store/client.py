"""The store's calls on other nodes, over a node's (or a client's) channels.

Shard bytes travel like parameters do: a header frame, then hand-encoded chunk
frames (``StoreFrame.chunk`` is field 2, like ``Frame.chunk``). A fetched shard
lands straight in its destination buffer and is hashed there before anyone uses
it. Every call has a deadline; a failure is a :class:`PeerError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gossip.core.errors import PeerError
from gossip.store import digests, serde
from gossip.store.manifest import Manifest, StoreError
from gossip.store.shards import Holding, Located, ShardHeader, StoreInfo
from gossip.transport.channels import STORE, Channels
from gossip.transport.frames import WireError, chunk_frame, chunk_from_frame

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """What one GetShards call brought: shards checked good, shards that did not hash, and why it ended."""

    ok: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    error: PeerError | None = None


class StoreClient:
    """Store calls over :class:`Channels`; every call has a deadline."""

    def __init__(self, channels: Channels) -> None:
        self.channels = channels

    async def _unary(self, address: str, name: str, request: bytes, timeout: float) -> bytes:
        return await self.channels.unary(address, STORE + name, request, timeout)

    def _decoded(self, address: str, decode: Callable[[bytes], Any], data: bytes) -> Any:
        try:
            return decode(data)
        except StoreError as exc:
            raise PeerError(address, "INTERNAL", f"bad answer: {exc}") from None

    async def put_shard(
        self, address: str, header: ShardHeader, data: memoryview, chunk_bytes: int, timeout: float
    ) -> bool:
        stream = self.channels.upload(address, STORE + "PutShard", timeout)
        try:
            await stream.write(serde.shard_header_frame(header))
            for start in range(0, len(data), chunk_bytes):
                await stream.write(chunk_frame(data[start : start + chunk_bytes]))
            await stream.done_writing()
            reply = await stream.response()
        finally:
            stream.cancel()
        return bool(self._decoded(address, serde.ack_from_bytes, reply))

    async def get_shards(
        self,
        address: str,
        m: Manifest,
        indices: list[int],
        place: Callable[[int], memoryview],
        timeout: float,
        on_ok: Callable[[int], None] | None = None,
    ) -> Fetched:
        """Stream shards ``indices`` of ``m`` from one peer, each into ``place(i)``, each checked.

        One call for them all. A shard that arrives and hashes to its digest (by the
        algorithm ``m`` names, which its header must name too) is
        ``ok`` (and ``on_ok(i)`` is called at once), one that does not is
        ``corrupt``; one the peer does not hold is in neither. A failed call ends
        the fetch with ``error`` set; the shards checked until then still count.
        """
        out = Fetched()
        wanted = set(indices)
        checks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        # Each chunk is copied into place and hashed by one worker thread, in arrival order,
        # while the event loop reads the next frames: numpy's copy and the hashes let go of
        # the GIL, so on two cores receiving and checking overlap, and the chunk is hashed
        # from the frame gRPC just wrote (warm) rather than from the buffer later.
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-in")

        def take(dest: np.ndarray, hasher: digests.Hasher, chunk: bytes | memoryview) -> None:
            src = np.frombuffer(chunk, dtype=np.uint8)
            dest[:] = src
            hasher.update(src)

        async def check(i: int, digest: asyncio.Future[bytes]) -> None:
            if await digest == m.shard_digests[i]:
                out.ok.append(i)
                if on_ok is not None:
                    on_ok(i)
            else:
                out.corrupt.append(i)

        stream = self.channels.download(
            address, STORE + "GetShards", serde.shards_request_to_bytes(m, indices), timeout
        )
        index, view, got = -1, memoryview(b""), 0
        dest = np.empty(0, dtype=np.uint8)
        hasher = digests.hasher(m.digest_algorithm)
        try:
            while (frame := await stream.read()) is not None:
                if index < 0:
                    h = serde.shard_header_from_frame(frame)
                    if h.index not in wanted or (
                        h.model_id,
                        h.version,
                        h.digest,
                        h.digest_algorithm,
                        h.length,
                    ) != (
                        m.model_id,
                        m.version,
                        m.shard_digests[h.index],
                        m.digest_algorithm,
                        m.shard_length(h.index),
                    ):
                        raise StoreError("invalid", f"unasked or mislabelled shard {h.index} from {address}")
                    wanted.discard(h.index)
                    index, view, got = h.index, place(h.index), 0
                    dest, hasher = np.frombuffer(view, dtype=np.uint8), digests.hasher(m.digest_algorithm)
                    continue
                chunk = chunk_from_frame(frame)
                if got + len(chunk) > len(view):
                    raise StoreError("invalid", f"{address} sent more than shard {index}'s {len(view)} bytes")
                loop.run_in_executor(worker, take, dest[got : got + len(chunk)], hasher, chunk)
                got += len(chunk)
                if got == len(view):
                    checks.append(
                        asyncio.ensure_future(check(index, loop.run_in_executor(worker, hasher.digest)))
                    )
                    index = -1
            await stream.finish()
            if index >= 0:
                out.error = PeerError(address, "DATA_LOSS", f"shard {index} ended early")
        except PeerError as exc:
            out.error = exc
        except (StoreError, WireError) as exc:
            out.error = PeerError(address, "INTERNAL", str(exc))
        finally:
            stream.cancel()  # a no-op once the call ended; a bulk call gives its connection back
            # Every copy queued has landed before the caller may refetch a shard elsewhere.
            await loop.run_in_executor(worker, _nothing)
            worker.shutdown(wait=False)
        await asyncio.gather(*checks)
        return out

    async def put_manifest(self, address: str, m: Manifest, timeout: float) -> bool:
        reply = await self._unary(address, "PutManifest", serde.manifest_to_bytes(m), timeout)
        return bool(self._decoded(address, serde.ack_from_bytes, reply))

    async def get_manifest(self, address: str, model_id: str, version: int, timeout: float) -> Manifest:
        reply = await self._unary(
            address, "GetManifest", serde.manifest_request_to_bytes(model_id, version), timeout
        )
        m: Manifest = self._decoded(address, serde.manifest_from_bytes, reply)
        return m

    async def locate(self, address: str, model_id: str, timeout: float) -> Located:
        reply = await self._unary(address, "Locate", serde.locate_request_to_bytes(model_id), timeout)
        loc: Located = self._decoded(address, serde.located_from_bytes, reply)
        return loc

    async def holdings(self, address: str, timeout: float) -> list[Holding]:
        reply = await self._unary(address, "Holdings", serde.EMPTY_REQUEST, timeout)
        held: list[Holding] = self._decoded(address, serde.holdings_from_bytes, reply)
        return held

    async def report(self, address: str, m: Manifest, index: int, timeout: float) -> None:
        await self._unary(address, "Report", serde.shard_ref_to_bytes(m, index), timeout)

    async def status(self, address: str, timeout: float) -> StoreInfo:
        reply = await self._unary(address, "Status", serde.EMPTY_REQUEST, timeout)
        info: StoreInfo = self._decoded(address, serde.info_from_bytes, reply)
        return info


def _nothing() -> None:
    """A no-op job: once it ran, every job queued before it on that worker has."""
