"""Typed configuration for nodes and gossip (strict TOML loading: :mod:`gossip.configfile`).

Every default carries its reason. A config file holds the same knobs as the
command line (flat keys, ``-`` or ``_``); an unknown key or a wrong type is an
error naming the key, never silently ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gossip.core.addresses import check_address, join_host_port, metrics_address, parse_rate
from gossip.core.errors import ConfigError
from gossip.core.membership import MembershipConfig
from gossip.core.ring import DEFAULT_VNODES

STRATEGIES = ("pairwise", "push-sum")


@dataclass(frozen=True)
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
    # Stream chunk size; 0: chosen by chunk_bytes_for (4 MiB, or less under a send limit).
    chunk_bytes: int = 0
    # Deadline of one exchange, plus payload / 20 MB/s: a dead peer costs one timeout.
    exchange_timeout: float = 5.0
    # Tries per exchange before giving up until the next step; a node stays free
    # for incoming exchanges while it backs off, so most collisions still mix.
    busy_retries: int = 6
    # Floor of the bound of the random back-off after a busy answer (seconds); the bound
    # grows to twice a declined call's round trip, to at most max(0.5 s, this) (Party.busy_backoff).
    backoff: float = 0.01
    # How long a peer that failed an exchange is left out of the picks (seconds).
    avoid_after_failure: float = 3.0
    # After training, a node keeps averaging with its neighbours so replicas that
    # finished at different times still meet: first every 20 ms (0 = not at all) ...
    idle_pause: float = 0.02
    # ... and once an exchange moves it by less than rest_tolerance of its norm, the
    # pause doubles up to rest_pause: each node of a settled pair then takes part in
    # one exchange every 7-8 s (its own and its neighbour's) and uses under 1 % of a
    # core (docs, "Measurements"). 1e-6 is near float32 resolution of the default
    # models' weights, so resting there loses no consensus.
    rest_pause: float = 15.0
    rest_tolerance: float = 1e-6
    # The outer optimizer of local-steps training (gossip.core.outer): none, or
    # nesterov:LR:MOMENTUM on the averaged pseudo-gradient at each own exchange (with
    # gossip_every = H, DiLoCo's 0.7:0.9); two more model copies, kept local.
    outer: str = "none"
    # Compressed exchanges with error feedback (gossip.core.choco): none, or a
    # gossip.core.compress spec such as topk:0.01+int8; each side keeps, per
    # neighbour, the two reference copies both know, and moves gamma of the way
    # between them per exchange (0: the compressor's default step). Pairwise only.
    compress: str = "none"
    gamma: float = 0.0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.gossip_every < 1:
            raise ConfigError(f"gossip_every must be >= 1, got {self.gossip_every}")
        if self.max_lag < 0:
            raise ConfigError(f"max_lag must be >= 0, got {self.max_lag}")
        if self.codec not in ("raw", "fp16", "bf16"):
            raise ConfigError(f"codec must be raw, fp16 or bf16, got {self.codec!r}")
        if self.chunk_bytes and not 4096 <= self.chunk_bytes <= 4 << 20:
            raise ConfigError(
                f"chunk_bytes must be 0 (auto) or between 4096 and {4 << 20}, got {self.chunk_bytes}"
            )
        for name in ("exchange_timeout", "avoid_after_failure", "rest_pause"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if not 0 <= self.idle_pause <= self.rest_pause:
            raise ConfigError(
                f"idle_pause must be between 0 and rest_pause ({self.rest_pause}), got {self.idle_pause}"
            )
        if not self.rest_tolerance >= 0:
            raise ConfigError(f"rest_tolerance must be >= 0, got {self.rest_tolerance}")
        if self.backoff < 0 or self.busy_retries < 1:
            raise ConfigError("backoff must be >= 0 and busy_retries >= 1")
        check_outer(self.outer, self.strategy)
        check_compress(self.compress, self.gamma, self.strategy, self.codec)


# A frame the send limit passes in about this long: on a link shaped to 50 Mbit/s,
# 4 MiB chunks (0.67 s each there) took a 16 MiB exchange to 0.76 of raw TCP, 1 MiB
# chunks to 0.98; on a 1 Gbit/s link 4 MiB chunks did best (0.92 against 0.80 with
# 1 MiB), and on loopback the two measured the same (docs, "Measurements").
AUTO_CHUNK_SECONDS = 0.2


def chunk_bytes_for(chunk_bytes: int, send_rate: float | None, bulk: bool = False) -> int:
    """The stream chunk size a node uses: ``chunk_bytes`` if set, else automatic.

    Automatic is the most one frame carries: 4 MiB over gRPC, 1 MiB over the bulk port
    (``bulk``; with 4 MiB frames there, 100 MiB exchanges on loopback stalled for
    hundreds of milliseconds in about one of four, in TCP's flow control, and with 1 MiB
    none did). Under a send limit it is the largest power of two the node sends in
    AUTO_CHUNK_SECONDS, from 64 KiB up to that most (50 Mbit/s: 1 MiB; 100 Mbit/s: 2 MiB;
    200 Mbit/s and above: 4 MiB).
    """
    if chunk_bytes:
        return chunk_bytes
    most = 1 << 20 if bulk else 4 << 20
    if not send_rate:
        return most
    n = 64 << 10
    while n < most and 2 * n <= send_rate * AUTO_CHUNK_SECONDS:
        n *= 2
    return n


def check_compress(spec: str, gamma: float, strategy: str, codec: str = "raw") -> None:
    """A compress spec that parses, with a step and a strategy it makes sense with (real nodes)."""
    from gossip.core.compress import CompressError, Compressor

    try:
        active = Compressor.parse(spec).spec != "none"
    except CompressError as exc:
        raise ConfigError(f"compress: {exc}") from None
    if not 0 <= gamma <= 1:
        raise ConfigError(f"gamma must be in [0, 1] (0: the compressor's default), got {gamma}")
    if active and strategy == "push-sum":
        raise ConfigError(
            "compress needs strategy pairwise: its error feedback keeps reference copies that both sides "
            "of an exchange update together, and a push-sum message goes one way (use --codec fp16/bf16)"
        )
    if active and codec != "raw":
        raise ConfigError(f"compress {spec!r} sets the values' coding itself: leave codec raw, not {codec!r}")


def check_outer(spec: str, strategy: str) -> None:
    """An outer-optimizer spec that parses, with a strategy it makes sense with."""
    from gossip.core.outer import Outer, OuterError

    try:
        active = Outer.parse(spec).active
    except OuterError as exc:
        raise ConfigError(f"outer: {exc}") from None
    if active and strategy == "push-sum":
        raise ConfigError(
            "outer needs strategy pairwise (or sync in the simulator): a push-sum sender keeps its own "
            "values, so its exchange gives no averaged pseudo-gradient to step on"
        )


# Bounds of the shard store that configuration and the wire share.
MAX_SHARD_BYTES = 64 << 20  # a shard is held in memory whole while it is checked
MAX_STORE_ID_CHARS = 128
MAX_REPLICATION = 16


@dataclass(frozen=True)
class StoreConfig:
    """The shard store every node runs (see ``gossip.store.shards``)."""

    # Three copies survive any two simultaneous crashes: the usual choice of
    # Dynamo-style stores, and what the issue asks for.
    replication: int = 3
    # Steps between snapshots; 0 disables publishing. The default run (digits, mlp,
    # 8 nodes, 180 steps each) publishes 9 versions; a publish (40 KB to 3 owners,
    # the manifest to every member) costs the publisher a few ms of its event loop:
    # measured well under 5 % of training time (docs, "Measurements").
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
    # Virtual points per node on the ring (see gossip.core.ring for the measured balance).
    vnodes: int = DEFAULT_VNODES
    # Folder that keeps the shards and manifests across restarts (gossip.store.disk);
    # empty = memory only, as a store that repair refills from peers is correct without it.
    data_dir: str = ""

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
        if self.data_dir:
            _check_data_dir(self.data_dir)


def _check_data_dir(path: str) -> None:
    """``path`` is, or can be made as, a folder this process can write (nothing is created)."""
    p = base = Path(path).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        where = "is a file" if base == p else f"{base} is a file, so no folder can be made under it"
        raise ConfigError(f"data_dir {path}: {where}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir {path}: {base} is not writable")


@dataclass(frozen=True)
class SecurityConfig:
    """Files that secure a node's traffic (see ``gossip.transport.security``); empty = not used."""

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
    # MLP well under 10 % of its steps (docs, "Measurements"). 0 = no limit (neither
    # this nor the node's below).
    peer_call_rate: float = 50.0
    peer_call_burst: int = 100
    # The same for all connections together, shared fairly among those calling: many
    # flooding connections get 100/s between them, not 50/s each, while a peer that
    # calls less than its share is never held. At 100 calls/s from one unlimited
    # flooder a training node kept 0.98 of its step rate (docs, "Measurements"); a node
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


@dataclass(frozen=True)
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
    # The most this node sends, all calls together (e.g. 50mbit); empty = no limit.
    max_send_rate: str = ""
    # Plain-TCP port of the bulk calls (exchanges, pushes, shard transfers) on the listen
    # host (gossip.transport.bulk): 0 picks a free port, -1 sends everything over gRPC.
    # Plaintext only: with TLS every call stays on gRPC.
    bulk_port: int = 0
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
        if not -1 <= self.bulk_port <= 65535:
            raise ConfigError(
                f"bulk_port must be a port (0: any free one) or -1 (none), got {self.bulk_port}"
            )
        self.send_rate  # noqa: B018  (a bad rate fails here)
        try:
            self.membership.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.gossip.validate()
        self.store.validate()
        self.security.validate()

    @property
    def bulk(self) -> bool:
        """Whether bulk calls go over plain TCP (gossip.transport.bulk): a bulk port, and no TLS."""
        return self.bulk_port >= 0 and not (self.security.tls_cert or self.security.tls_ca)

    @property
    def send_rate(self) -> float | None:
        """``max_send_rate`` in bytes per second, or None for no limit."""
        return parse_rate(self.max_send_rate) if self.max_send_rate.strip() else None


@dataclass(frozen=True)
class TrainConfig:
    """What a node trains and how; the defaults are tuned on digits + mlp (see each reason)."""

    dataset: str = "digits"  # ships with scikit-learn: runs offline, trains in seconds
    model: str = "mlp"  # reaches 97 %+ on digits, about 10k parameters: cheap to gossip
    partition: str = "iid"  # the case where gossip should match the centralised baseline
    # digits + mlp, 3 seeds, 8 IID nodes averaged exactly after every step: 10 epochs give
    # the nodes 0.961-0.967 against a 0.972-0.975 baseline, 15 epochs 0.967-0.972 against
    # 0.975: nodes take 8x fewer steps than the baseline, so they need the extra epochs.
    epochs: int = 15
    # A node with 1/8 of digits gets 12 steps per epoch: enough exchanges to mix between.
    # 32 halves them and cost the baseline 0.5 points.
    batch_size: int = 16
    # Averaged nodes act like one large-batch run and want a large rate; 0.3 with momentum
    # 0.5 was the best for both sides; 0.4 let one baseline seed drop below 0.97. The cnn
    # diverges at 0.3 on the union and wants about 0.1.
    lr: float = 0.3
    momentum: float = 0.5  # beat 0.9 at a smaller lr and 0 at the same lr (+0.5 points for nodes)
    weight_decay: float = 0.0  # 10 epochs on these datasets do not overfit; decay only slows them
    seed: int = 0  # same seed on every node: identical initial weights and one shared partition
    eval_every: float = 1.0  # epochs between evaluations; fractional for finer curves on short runs
    # Constant: with cosine decay the same runs ended ~0.8 points lower for the nodes
    # (their few large steps need the rate); cosine shrinks the consensus distance 10x.
    lr_schedule: str = "constant"
    # Stop after this many local steps if the epochs have not ended first (0: the epochs
    # decide): a short run over a large corpus, or one to a fixed step budget.
    max_steps: int = 0
    # Seconds each local step takes at least (0: as fast as the machine goes): a slower
    # device, or a straggler, emulated on one machine; it also leaves the cores to others.
    min_step_time: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {self.max_steps}")
        if not (math.isfinite(self.min_step_time) and 0 <= self.min_step_time <= 3600):
            raise ConfigError(f"min_step_time must be 0 to 3600 seconds, got {self.min_step_time}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_sgd(self.lr, self.momentum, self.weight_decay, self.lr_schedule)
        if not (math.isfinite(self.eval_every) and self.eval_every > 0):
            raise ConfigError(f"eval_every must be positive, got {self.eval_every}")


@dataclass(frozen=True)
class SimulateConfig:
    nodes: int = 8  # 8 processes share 2 cores fairly with one torch thread each
    out: str | None = None  # default runs/<timestamp>
    baseline: bool = False
    threads: int = 1
    host: str = "127.0.0.1"
    # Seconds the nodes may take to start; None = 60 + 3 per node: on 2 cores each process
    # imports torch and gRPC (~1.5 s of CPU) while all the others do too.
    start_timeout: float | None = None
    run_timeout: float = 1800.0
    store: StoreConfig = field(default_factory=StoreConfig)
    kill: str = ""  # N@STEP: SIGKILL N random nodes once rank 0 reaches STEP
    reconstruct: bool = False  # rebuild the model from the survivors, save and test it
    churn: float = 0.0  # kills per node per minute while the nodes train (gossip.cluster.churn); 0 = none
    # Seconds a churned node stays down: under the membership's 4 s suspicion, so the
    # others see a crash and a reboot (failed exchanges), not a departure.
    churn_downtime: float = 2.0
    max_send_rate: str = ""  # every node's --max-send-rate (empty: no limit)
    member_protocol: str = "swim"  # every node's --member-protocol
    # Node i serves Prometheus metrics on HOST:PORT+i (port 0: each a free port); empty = off.
    prometheus: str = ""

    @property
    def start_seconds(self) -> float:
        return self.start_timeout if self.start_timeout is not None else 60.0 + 3.0 * self.nodes

    def validate(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1, got {self.nodes}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.start_timeout is not None and not self.start_timeout > 0:
            raise ConfigError(f"--start-timeout must be > 0, got {self.start_timeout}")
        if self.max_send_rate.strip():
            parse_rate(self.max_send_rate)
        if self.prometheus:
            _, port = metrics_address(self.prometheus, "--prometheus")
            if port and port + self.nodes - 1 > 65535:
                raise ConfigError(f"--prometheus: ports {port}-{port + self.nodes - 1} run past 65535")

    def metrics_address(self, rank: int) -> str:
        """HOST:PORT of node ``rank``'s Prometheus endpoint ("" when off)."""
        if not self.prometheus:
            return ""
        host, port = metrics_address(self.prometheus, "--prometheus")
        return join_host_port(host, port + rank if port else 0)


@dataclass(frozen=True)
class RunOptions:
    """How ``gossip node`` runs one node process around its training (``gossip.cluster.runner``)."""

    metrics: str | None = None  # JSON lines, one object per evaluation
    dump_params: str | None = None  # folder for the flat parameters at every evaluation (consensus)
    ready_file: str | None = None  # written with the bound address once serving
    seed_file: str | None = None  # a seed's ready file: wait for it, then join through its address
    wait_for: int = 1  # nodes (this one included) to wait for before training; 1 = none
    wait_timeout: float = 60.0  # then train anyway, with a warning
    exit_when_done: bool = False
    threads: int = 1  # torch threads: N nodes share a small machine fairly
    init_from_network: bool = False  # start from the newest snapshot in the store, not the initial weights
    # HOST:PORT of the Prometheus endpoint (gossip.observe.metrics); empty = off, since
    # nothing should listen that was not asked for. A bare PORT binds loopback.
    prometheus: str = ""

    def validate(self) -> None:
        if self.prometheus:
            metrics_address(self.prometheus, "--prometheus")
        if self.wait_for < 0:
            raise ConfigError(f"--wait-for must be >= 0, got {self.wait_for}")
        if not self.wait_timeout > 0:
            raise ConfigError(f"--wait-timeout must be > 0, got {self.wait_timeout}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")


def check_sgd(lr: float, momentum: float, weight_decay: float, lr_schedule: str) -> None:
    """The SGD knobs a node and the simulator share; ConfigError names the first bad one."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be non-negative, got {weight_decay}")
    if lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"lr_schedule must be cosine or constant, got {lr_schedule!r}")
