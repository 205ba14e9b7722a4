"""Ask one node for its view of the network (``gossip status``)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from gossip import rpc, wire
from gossip.proto import gossip_pb2 as pb
from gossip.security import Security
from gossip.store_rpc import StoreClient, store_status_to_dict


def status_to_dict(s: pb.StatusReply) -> dict[str, Any]:
    return {
        "node_id": s.node_id,
        "address": s.address,
        "phase": s.phase,
        "step": s.step,
        "rank": s.rank,
        "topology": s.topology,
        "strategy": s.strategy,
        "parameters": s.parameters,
        "fingerprint": s.fingerprint.hex(),
        "weight": s.weight,
        "uptime_seconds": round(s.uptime_seconds, 3),
        "members": [
            {
                "node_id": m.node_id,
                "address": m.address,
                "state": wire.STATE_NAMES.get(m.state, "unknown"),
                "rank": m.rank,
                "heartbeat": m.heartbeat,
                "seconds_since_heartbeat": round(m.seconds_since_heartbeat, 3),
            }
            for m in s.members
        ],
        "neighbours": list(s.neighbours),
        "exchanges_ok": s.exchanges_ok,
        "exchanges_failed": s.exchanges_failed,
        "exchanges_declined": s.exchanges_declined,
        "exchanges_served": s.exchanges_served,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
    }


async def fetch_status(address: str, timeout: float, sec: Security | None = None) -> dict[str, Any]:
    """The node's status as a plain dict; ConnectionError with one line when it cannot be asked."""
    sec = sec or Security()
    client = rpc.PeerClient(sec.channel_credentials, sec.metadata)
    t0 = time.monotonic()
    try:
        reply = await client.status(address, timeout)
        rtt = time.monotonic() - t0
        try:
            store: dict[str, Any] | None = store_status_to_dict(
                await StoreClient(client).status(address, timeout)
            )
        except rpc.PeerError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            store = None  # a node without the shard store
    except rpc.PeerError as exc:
        raise ConnectionError(
            f"cannot reach {address}: {exc.code.name} {exc.details[:200]}".strip()
        ) from None
    finally:
        await client.close()
    out = status_to_dict(reply)
    out["rtt_ms"] = round(rtt * 1000, 2)
    if store is not None:
        out["store"] = store
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = [
        f"node        {s['node_id']} at {s['address']} ({s['phase']})",
        f"rank        {s['rank']}  topology {s['topology']}  strategy {s['strategy']}",
        f"step        {s['step']}  parameters {s['parameters']}  weight {s['weight']:.4g}",
        f"exchanges   ok {s['exchanges_ok']}  served {s['exchanges_served']}  failed {s['exchanges_failed']}"
        f"  declined {s['exchanges_declined']}",
        f"bytes       in {s['bytes_in']}  out {s['bytes_out']}",
        f"neighbours  {', '.join(s['neighbours']) or '-'}",
        f"members     {len(s['members'])}",
    ]
    for m in s["members"]:
        lines.append(
            f"  {m['node_id']:<14} {m['address']:<22} {m['state']:<8} rank {m['rank']:>3}"
            f"  heartbeat {m['heartbeat']:>6} ({m['seconds_since_heartbeat']:.1f} s ago)"
        )
    st = s.get("store")
    if st is not None:
        under = st["under_replicated"]
        lines += [
            f"store       {st['model_id']}: versions {', '.join(f'v{v}' for v in st['versions']) or '-'}"
            f"  (R={st['replication']}, publish every {st['publish_every'] or '-'} steps)",
            f"ring        share {st['ring_share'] * 100:.1f} % of the keys, {st['ring_members']} members,"
            f" {st['vnodes']} points each",
            f"shards      {st['shards_held']} held ({st['bytes_held']:,} bytes), {st['shards_pending']} pending,"
            f" published {st['published']}, repaired {st['repaired']}, corrupt dropped {st['corrupt_dropped']}",
            f"under-replicated  {len(under)}" + (f": {', '.join(under[:8])}" if under else ""),
        ]
        for snap in st["snapshots"]:
            held = snap["shards_held"]
            lines.append(f"  {snap['model_id']} v{snap['version']}: {len(held)} shards held {held[:16]}")
    return "\n".join(lines)
