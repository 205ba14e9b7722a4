from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_RAW: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_BF16: _ClassVar[Codec]

class ExchangeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[ExchangeOutcome]
    OUTCOME_ACCEPTED: _ClassVar[ExchangeOutcome]
    OUTCOME_BUSY: _ClassVar[ExchangeOutcome]
    OUTCOME_COMMIT: _ClassVar[ExchangeOutcome]

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[MemberState]
    STATE_ALIVE: _ClassVar[MemberState]
    STATE_SUSPECT: _ClassVar[MemberState]
    STATE_DEAD: _ClassVar[MemberState]
    STATE_LEFT: _ClassVar[MemberState]
CODEC_UNSPECIFIED: Codec
CODEC_RAW: Codec
CODEC_FP16: Codec
CODEC_BF16: Codec
OUTCOME_UNSPECIFIED: ExchangeOutcome
OUTCOME_ACCEPTED: ExchangeOutcome
OUTCOME_BUSY: ExchangeOutcome
OUTCOME_COMMIT: ExchangeOutcome
STATE_UNSPECIFIED: MemberState
STATE_ALIVE: MemberState
STATE_SUSPECT: MemberState
STATE_DEAD: MemberState
STATE_LEFT: MemberState

class Header(_message.Message):
    __slots__ = ("fingerprint", "sender", "step", "codec", "total_bytes", "weight", "chunk_bytes", "outcome", "pipeline", "pair_round")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    PAIR_ROUND_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    sender: str
    step: int
    codec: Codec
    total_bytes: int
    weight: float
    chunk_bytes: int
    outcome: ExchangeOutcome
    pipeline: str
    pair_round: int
    def __init__(self, fingerprint: _Optional[bytes] = ..., sender: _Optional[str] = ..., step: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., total_bytes: _Optional[int] = ..., weight: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., outcome: _Optional[_Union[ExchangeOutcome, str]] = ..., pipeline: _Optional[str] = ..., pair_round: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "address", "incarnation", "heartbeat", "state", "rank", "fingerprint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    incarnation: int
    heartbeat: int
    state: MemberState
    rank: int
    fingerprint: bytes
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., heartbeat: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., rank: _Optional[int] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class MemberTable(_message.Message):
    __slots__ = ("sender", "members", "full", "protocol")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    sender: Member
    members: _containers.RepeatedCompositeFieldContainer[Member]
    full: bool
    protocol: str
    def __init__(self, sender: _Optional[_Union[Member, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., full: _Optional[bool] = ..., protocol: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberView(_message.Message):
    __slots__ = ("node_id", "address", "state", "heartbeat", "seconds_since_heartbeat", "rank")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: MemberState
    heartbeat: int
    seconds_since_heartbeat: float
    rank: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[MemberState, str]] = ..., heartbeat: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "address", "step", "rank", "topology", "strategy", "members", "neighbours", "exchanges_ok", "exchanges_failed", "exchanges_declined", "bytes_in", "bytes_out", "weight", "phase", "parameters", "fingerprint", "uptime_seconds", "exchanges_served", "training", "resting", "epoch", "train_loss", "eval_loss", "eval_accuracy", "evals", "last_delta_norm", "exchange_seconds_bounds", "exchange_seconds_buckets", "exchange_seconds_sum", "exchanged_with", "calls_refused", "calls_delayed", "sample", "max_send_rate", "paced_bytes", "paced_wait_seconds", "pipeline", "control_calls", "bulk_port")
    class ExchangedWithEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ControlCallsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_OK_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FAILED_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_DECLINED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_SERVED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    RESTING_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    LAST_DELTA_NORM_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SECONDS_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SECONDS_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SECONDS_SUM_FIELD_NUMBER: _ClassVar[int]
    EXCHANGED_WITH_FIELD_NUMBER: _ClassVar[int]
    CALLS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    CALLS_DELAYED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_RATE_FIELD_NUMBER: _ClassVar[int]
    PACED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACED_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_CALLS_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    step: int
    rank: int
    topology: str
    strategy: str
    members: _containers.RepeatedCompositeFieldContainer[MemberView]
    neighbours: _containers.RepeatedScalarFieldContainer[str]
    exchanges_ok: int
    exchanges_failed: int
    exchanges_declined: int
    bytes_in: int
    bytes_out: int
    weight: float
    phase: str
    parameters: int
    fingerprint: bytes
    uptime_seconds: float
    exchanges_served: int
    training: bool
    resting: bool
    epoch: float
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    evals: int
    last_delta_norm: float
    exchange_seconds_bounds: _containers.RepeatedScalarFieldContainer[float]
    exchange_seconds_buckets: _containers.RepeatedScalarFieldContainer[int]
    exchange_seconds_sum: float
    exchanged_with: _containers.ScalarMap[str, int]
    calls_refused: int
    calls_delayed: int
    sample: _containers.RepeatedScalarFieldContainer[float]
    max_send_rate: float
    paced_bytes: int
    paced_wait_seconds: float
    pipeline: str
    control_calls: _containers.ScalarMap[str, int]
    bulk_port: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., topology: _Optional[str] = ..., strategy: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberView, _Mapping]]] = ..., neighbours: _Optional[_Iterable[str]] = ..., exchanges_ok: _Optional[int] = ..., exchanges_failed: _Optional[int] = ..., exchanges_declined: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., weight: _Optional[float] = ..., phase: _Optional[str] = ..., parameters: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., uptime_seconds: _Optional[float] = ..., exchanges_served: _Optional[int] = ..., training: _Optional[bool] = ..., resting: _Optional[bool] = ..., epoch: _Optional[float] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., evals: _Optional[int] = ..., last_delta_norm: _Optional[float] = ..., exchange_seconds_bounds: _Optional[_Iterable[float]] = ..., exchange_seconds_buckets: _Optional[_Iterable[int]] = ..., exchange_seconds_sum: _Optional[float] = ..., exchanged_with: _Optional[_Mapping[str, int]] = ..., calls_refused: _Optional[int] = ..., calls_delayed: _Optional[int] = ..., sample: _Optional[_Iterable[float]] = ..., max_send_rate: _Optional[float] = ..., paced_bytes: _Optional[int] = ..., paced_wait_seconds: _Optional[float] = ..., pipeline: _Optional[str] = ..., control_calls: _Optional[_Mapping[str, int]] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("reached",)
    REACHED_FIELD_NUMBER: _ClassVar[int]
    reached: bool
    def __init__(self, reached: _Optional[bool] = ...) -> None: ...
