"""Typed configuration for nodes and gossip, and strict TOML loading.

Every default carries its reason. A config file holds the same knobs as the
command line (flat keys, ``-`` or ``_``); an unknown key or a wrong type is an
error naming the key, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from gossip.membership import MembershipConfig
from gossip.ring import DEFAULT_VNODES

STRATEGIES = ("pairwise", "push-sum")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the culprit."""


@dataclass
class GossipConfig:
    # Any alive member: needs no ranks, so a bare `gossip node` works out of the box.
    topology: str = "random"
    # AD-PSGD push-pull: symmetric, preserves the sum of models exactly.
    strategy: str = "pairwise"
    # Local steps between exchanges; 1 = try after every step (an exchange already
    # in flight is never doubled, so a slow link just lowers the mixing rate).
    gossip_every: int = 1
    # Steps a node may run ahead of its own exchange in flight before it waits for
    # it: 1 overlaps one step of compute with the exchange, and a node whose steps
    # are much faster than its link still mixes every step or two.
    max_lag: int = 1
    # Raw float32 on the wire: exact; fp16/bf16 halve the bytes.
    codec: str = "raw"
    # 1 MiB chunks: the measured sweet spot of gRPC streaming on loopback.
    chunk_bytes: int = 1 << 20
    # Deadline of one exchange, plus payload / 20 MB/s: a dead peer costs one timeout.
    exchange_timeout: float = 5.0
    # Tries per exchange before giving up until the next step; a node stays free
    # for incoming exchanges while it backs off, so most collisions still mix.
    busy_retries: int = 6
    # Upper bound of the random back-off after a busy answer (seconds).
    backoff: float = 0.01
    # How long a peer that failed an exchange is left out of the picks (seconds).
    avoid_after_failure: float = 3.0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.gossip_every < 1:
            raise ConfigError(f"gossip_every must be >= 1, got {self.gossip_every}")
        if self.max_lag < 0:
            raise ConfigError(f"max_lag must be >= 0, got {self.max_lag}")
        if self.codec not in ("raw", "fp16", "bf16"):
            raise ConfigError(f"codec must be raw, fp16 or bf16, got {self.codec!r}")
        if not 4096 <= self.chunk_bytes <= 4 << 20:
            raise ConfigError(f"chunk_bytes must be between 4096 and {4 << 20}, got {self.chunk_bytes}")
        for name in ("exchange_timeout", "avoid_after_failure"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.backoff < 0 or self.busy_retries < 1:
            raise ConfigError("backoff must be >= 0 and busy_retries >= 1")


# Bounds of the shard store that configuration and the wire share.
MAX_SHARD_BYTES = 64 << 20  # a shard is held in memory whole while it is checked
MAX_STORE_ID_CHARS = 128
MAX_REPLICATION = 16


@dataclass
class StoreConfig:
    """The shard store every node runs (see ``gossip.store``)."""

    # Three copies survive any two simultaneous crashes: the usual choice of
    # Dynamo-style stores, and what the issue asks for.
    replication: int = 3
    # Steps between snapshots; 0 disables publishing. The default run (digits, mlp,
    # 8 nodes, 180 steps each) publishes 9 versions; a publish (40 KB to 3 owners,
    # the manifest to every member) costs the publisher a few ms of its event loop:
    # measured well under 5 % of training time (README, "Model store").
    publish_every: int = 20
    # 1 MiB shards: a 100 MiB model gives 100 shards, enough for the ring to spread
    # them evenly and for a rebuild to fetch from every peer at once.
    shard_bytes: int = 1 << 20
    # The newest two versions: a rebuild still finds a complete one while the newest
    # is being replicated, and memory stays at 2 x R / N of the model per node.
    keep_versions: int = 2
    # Seconds between repair rounds (one small Holdings call per peer); a membership
    # change, or a manifest naming a shard this node should hold but lacks, starts one
    # at once, so this only paces scrubbing and catching up on missed manifests.
    repair_interval: float = 5.0
    # Seconds after which a held shard is hashed again to catch silent corruption.
    scrub_interval: float = 10.0
    # Shards received without their manifest (a publish in progress) are dropped
    # after this long if none arrives.
    orphan_ttl: float = 60.0
    # Bytes of shards one node accepts: bounds the memory peers can make it spend.
    capacity_bytes: int = 4 << 30
    # Name the node publishes under; empty = the model's name (--model) for `gossip node`.
    model_id: str = ""
    # Virtual points per node on the ring (see gossip.ring for the measured balance).
    vnodes: int = DEFAULT_VNODES

    def validate(self) -> None:
        if not 1 <= self.replication <= MAX_REPLICATION:
            raise ConfigError(f"replication must be between 1 and {MAX_REPLICATION}, got {self.replication}")
        if self.publish_every < 0:
            raise ConfigError(f"publish_every must be >= 0 (0 disables it), got {self.publish_every}")
        if not 4096 <= self.shard_bytes <= MAX_SHARD_BYTES:
            raise ConfigError(
                f"shard_bytes must be between 4096 and {MAX_SHARD_BYTES}, got {self.shard_bytes}"
            )
        if self.keep_versions < 1:
            raise ConfigError(f"keep_versions must be >= 1, got {self.keep_versions}")
        for name in ("repair_interval", "scrub_interval", "orphan_ttl"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.capacity_bytes < self.shard_bytes:
            raise ConfigError("capacity_bytes must hold at least one shard")
        mid = self.model_id
        if mid and (len(mid) > MAX_STORE_ID_CHARS or not mid.isprintable() or "/" in mid):
            raise ConfigError(f"model_id must be 1-{MAX_STORE_ID_CHARS} printable characters without '/'")
        if self.vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1, got {self.vnodes}")


@dataclass
class SecurityConfig:
    """Files that secure a node's traffic (see ``gossip.security``); empty = not used."""

    # PEM certificate (chain) and its private key: the node serves TLS, and its own
    # calls present them. The advertised host must be one of the certificate's SANs.
    tls_cert: str = ""
    tls_key: str = ""
    # PEM CA that signs the cluster's certificates: verifies peers and, when set,
    # makes the server require a client certificate it signed (mutual TLS). Unset,
    # outgoing calls trust the system's roots and no client certificate is asked for.
    tls_ca: str = ""
    # A file holding the shared secret every RPC must carry; unset = no token.
    token_file: str = ""
    # Control calls (status, membership, store queries) one connection may make per
    # second, and at once; the rest wait their turn. Ordinary traffic is a few per
    # second per peer; at 50/s a flooding peer costs a training node of the default
    # MLP well under 10 % of its steps (README, "Security"). 0 = no limit (neither
    # this nor the node's below).
    peer_call_rate: float = 50.0
    peer_call_burst: int = 100
    # The same for all connections together, shared fairly among those calling: many
    # flooding connections get 100/s between them, not 50/s each, while a peer that
    # calls less than its share is never held. At 100 calls/s from one unlimited
    # flooder a training node kept 0.98 of its step rate (README, "Security"); a node
    # of a 100-node cluster gets ~25 control calls/s (member syncs, a store repair
    # round every 5 s). 0 = per connection only.
    node_call_rate: float = 100.0
    node_call_burst: int = 200

    def validate(self, serving: bool = True) -> None:
        """``serving``: a node, which needs its own certificate to use TLS at all."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if serving and self.tls_ca and not self.tls_cert:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: a node serves its own")
        if self.peer_call_rate < 0 or self.peer_call_burst < 1:
            raise ConfigError("peer_call_rate must be >= 0 (0 = no limit) and peer_call_burst >= 1")
        if self.node_call_rate < 0 or self.node_call_burst < 1:
            raise ConfigError(
                "node_call_rate must be >= 0 (0 = per connection only) and node_call_burst >= 1"
            )


@dataclass
class NodeConfig:
    # Loopback unless told otherwise: nothing is exposed by accident.
    listen: str = "127.0.0.1:0"
    # Address others dial; defaults to the bound listen address.
    advertise: str | None = None
    # Seeds to join through; empty = wait for others to join this node.
    peers: tuple[str, ...] = ()
    # A random id per process unless given; restarts get a new incarnation anyway.
    node_id: str | None = None
    # Topology rank and size; -1/0 when the topology needs none ('random').
    rank: int = -1
    world_size: int = 0
    # Seconds to keep trying the seeds before giving up with an error.
    join_timeout: float = 15.0
    # Deadline of the small control calls (join, sync, leave, status).
    rpc_timeout: float = 2.0
    gossip: GossipConfig = field(default_factory=GossipConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def validate(self) -> None:
        check_address(self.listen, "listen")
        if self.advertise is not None:
            check_address(self.advertise, "advertise")
        for p in self.peers:
            check_address(p, "peers")
        if self.world_size < 0 or self.rank < -1:
            raise ConfigError("rank must be >= 0 and world_size >= 1 when given")
        if self.rank >= 0 and self.world_size and self.rank >= self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.join_timeout <= 0 or self.rpc_timeout <= 0:
            raise ConfigError("join_timeout and rpc_timeout must be > 0")
        m = self.membership
        if not m.interval < m.suspect_after < m.dead_after < 1e6:
            raise ConfigError(
                f"suspect_after must be above the {m.interval} s gossip interval and dead_after above "
                f"suspect_after, got {m.suspect_after} and {m.dead_after}"
            )
        self.gossip.validate()
        self.store.validate()
        self.security.validate()


def check_address(addr: str, what: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {addr!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {addr!r} has an invalid port")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of knobs; keys are normalised to underscores."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {p}: section [{key}] not supported; use flat keys")
        out[key.replace("-", "_")] = value
    return out


def coerce(key: str, value: Any, default: Any) -> Any:
    """Check a config-file value against the type of the knob's default."""
    kind = type(default)
    if default is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list | str):
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(v).strip() for v in items if str(v).strip())
    raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")


def dataclass_defaults(cls: Any) -> dict[str, Any]:
    obj = cls()
    return {f.name: getattr(obj, f.name) for f in fields(cls)}
