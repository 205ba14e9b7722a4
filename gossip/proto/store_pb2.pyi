from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DigestAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIGEST_SHA256: _ClassVar[DigestAlgorithm]
    DIGEST_BLAKE3: _ClassVar[DigestAlgorithm]
DIGEST_SHA256: DigestAlgorithm
DIGEST_BLAKE3: DigestAlgorithm

class Manifest(_message.Message):
    __slots__ = ("model_id", "version", "publisher", "step", "layout_json", "shard_bytes", "total_bytes", "shard_digests", "sha256", "replication", "fingerprint", "digest_algorithm", "state_layout_json")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    STATE_LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    publisher: str
    step: int
    layout_json: str
    shard_bytes: int
    total_bytes: int
    shard_digests: _containers.RepeatedScalarFieldContainer[bytes]
    sha256: bytes
    replication: int
    fingerprint: bytes
    digest_algorithm: DigestAlgorithm
    state_layout_json: str
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., publisher: _Optional[str] = ..., step: _Optional[int] = ..., layout_json: _Optional[str] = ..., shard_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., shard_digests: _Optional[_Iterable[bytes]] = ..., sha256: _Optional[bytes] = ..., replication: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., digest_algorithm: _Optional[_Union[DigestAlgorithm, str]] = ..., state_layout_json: _Optional[str] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("model_id", "version", "index", "length", "digest", "digest_algorithm")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    index: int
    length: int
    digest: bytes
    digest_algorithm: DigestAlgorithm
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., index: _Optional[int] = ..., length: _Optional[int] = ..., digest: _Optional[bytes] = ..., digest_algorithm: _Optional[_Union[DigestAlgorithm, str]] = ...) -> None: ...

class StoreFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ShardRef(_message.Message):
    __slots__ = ("model_id", "version", "index", "digest")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    index: int
    digest: bytes
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., index: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class ShardsRequest(_message.Message):
    __slots__ = ("model_id", "version", "indices", "digests")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    digests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., digests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StoreAck(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ("model_id", "version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class StorePeer(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("model_id", "manifests", "members", "vnodes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    manifests: _containers.RepeatedCompositeFieldContainer[Manifest]
    members: _containers.RepeatedCompositeFieldContainer[StorePeer]
    vnodes: int
    def __init__(self, model_id: _Optional[str] = ..., manifests: _Optional[_Iterable[_Union[Manifest, _Mapping]]] = ..., members: _Optional[_Iterable[_Union[StorePeer, _Mapping]]] = ..., vnodes: _Optional[int] = ...) -> None: ...

class HoldingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionHoldings(_message.Message):
    __slots__ = ("model_id", "version", "manifest_digest", "held", "shards")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    manifest_digest: bytes
    held: bytes
    shards: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., manifest_digest: _Optional[bytes] = ..., held: _Optional[bytes] = ..., shards: _Optional[int] = ...) -> None: ...

class HoldingsReply(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionHoldings]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionHoldings, _Mapping]]] = ...) -> None: ...

class StoreStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AwaitedVersion(_message.Message):
    __slots__ = ("version", "publisher")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    version: int
    publisher: str
    def __init__(self, version: _Optional[int] = ..., publisher: _Optional[str] = ...) -> None: ...

class StoreStatusReply(_message.Message):
    __slots__ = ("replication", "vnodes", "ring_share", "ring_members", "versions", "shards_held", "bytes_held", "under_replicated", "published", "repaired", "corrupt_dropped", "model_id", "publish_every", "shards_pending", "awaiting", "finished")
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    RING_SHARE_FIELD_NUMBER: _ClassVar[int]
    RING_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_HELD_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PENDING_FIELD_NUMBER: _ClassVar[int]
    AWAITING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    replication: int
    vnodes: int
    ring_share: float
    ring_members: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionHoldings]
    shards_held: int
    bytes_held: int
    under_replicated: _containers.RepeatedScalarFieldContainer[str]
    published: int
    repaired: int
    corrupt_dropped: int
    model_id: str
    publish_every: int
    shards_pending: int
    awaiting: _containers.RepeatedCompositeFieldContainer[AwaitedVersion]
    finished: int
    def __init__(self, replication: _Optional[int] = ..., vnodes: _Optional[int] = ..., ring_share: _Optional[float] = ..., ring_members: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionHoldings, _Mapping]]] = ..., shards_held: _Optional[int] = ..., bytes_held: _Optional[int] = ..., under_replicated: _Optional[_Iterable[str]] = ..., published: _Optional[int] = ..., repaired: _Optional[int] = ..., corrupt_dropped: _Optional[int] = ..., model_id: _Optional[str] = ..., publish_every: _Optional[int] = ..., shards_pending: _Optional[int] = ..., awaiting: _Optional[_Iterable[_Union[AwaitedVersion, _Mapping]]] = ..., finished: _Optional[int] = ...) -> None: ...
