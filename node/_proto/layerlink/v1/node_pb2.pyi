from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PREFILL: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
    PHASE_RELEASE: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PHASE_PREFILL: Phase
PHASE_DECODE: Phase
PHASE_RELEASE: Phase

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PcieInfo(_message.Message):
    __slots__ = ("gen", "width", "max_gen", "max_width")
    GEN_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_GEN_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    gen: int
    width: int
    max_gen: int
    max_width: int
    def __init__(self, gen: _Optional[int] = ..., width: _Optional[int] = ..., max_gen: _Optional[int] = ..., max_width: _Optional[int] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("index", "name", "kind", "mem_total_bytes", "mem_free_bytes", "pcie", "compute_dtype", "mem_source", "runs_stages", "grpc_port", "data_port")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PCIE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEM_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RUNS_STAGES_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    kind: str
    mem_total_bytes: int
    mem_free_bytes: int
    pcie: PcieInfo
    compute_dtype: str
    mem_source: str
    runs_stages: bool
    grpc_port: int
    data_port: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., mem_free_bytes: _Optional[int] = ..., pcie: _Optional[_Union[PcieInfo, _Mapping]] = ..., compute_dtype: _Optional[str] = ..., mem_source: _Optional[str] = ..., runs_stages: _Optional[bool] = ..., grpc_port: _Optional[int] = ..., data_port: _Optional[int] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("plan_id", "model", "start", "end", "first", "last", "active_requests", "weight_bytes", "next_address", "weights_id", "decode_steps", "decode_seconds", "batched_steps", "compute_dtype", "device")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    model: str
    start: int
    end: int
    first: bool
    last: bool
    active_requests: int
    weight_bytes: int
    next_address: str
    weights_id: str
    decode_steps: int
    decode_seconds: float
    batched_steps: int
    compute_dtype: str
    device: str
    def __init__(self, plan_id: _Optional[str] = ..., model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., first: _Optional[bool] = ..., last: _Optional[bool] = ..., active_requests: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., next_address: _Optional[str] = ..., weights_id: _Optional[str] = ..., decode_steps: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., batched_steps: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "protocol_version", "backend", "os", "cpu", "hostname", "mem_total_bytes", "mem_available_bytes", "devices", "stages", "grpc_port", "cluster", "mlx_active_bytes", "llama_rpc_port", "llama_rpc_version", "version", "data_port", "cpu_cores")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MLX_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LLAMA_RPC_PORT_FIELD_NUMBER: _ClassVar[int]
    LLAMA_RPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    protocol_version: int
    backend: str
    os: str
    cpu: str
    hostname: str
    mem_total_bytes: int
    mem_available_bytes: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    grpc_port: int
    cluster: str
    mlx_active_bytes: int
    llama_rpc_port: int
    llama_rpc_version: int
    version: str
    data_port: int
    cpu_cores: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., protocol_version: _Optional[int] = ..., backend: _Optional[str] = ..., os: _Optional[str] = ..., cpu: _Optional[str] = ..., hostname: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., grpc_port: _Optional[int] = ..., cluster: _Optional[str] = ..., mlx_active_bytes: _Optional[int] = ..., llama_rpc_port: _Optional[int] = ..., llama_rpc_version: _Optional[int] = ..., version: _Optional[str] = ..., data_port: _Optional[int] = ..., cpu_cores: _Optional[_Iterable[int]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("plan_id", "model_path", "start", "end", "next_address", "stage_index", "stage_count", "next_data_address", "ring_data_address", "weights_id", "owner", "device")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RING_DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    model_path: str
    start: int
    end: int
    next_address: str
    stage_index: int
    stage_count: int
    next_data_address: str
    ring_data_address: str
    weights_id: str
    owner: str
    device: str
    def __init__(self, plan_id: _Optional[str] = ..., model_path: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., next_address: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage_count: _Optional[int] = ..., next_data_address: _Optional[str] = ..., ring_data_address: _Optional[str] = ..., weights_id: _Optional[str] = ..., owner: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class LoadStageReply(_message.Message):
    __slots__ = ("stage", "load_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: StageStatus
    load_seconds: float
    def __init__(self, stage: _Optional[_Union[StageStatus, _Mapping]] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadStageRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class UnloadStageReply(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "has_seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    has_seed: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "plan_id", "phase", "tokens", "hidden", "sample", "sampling", "want_logits", "position", "step", "max_tokens", "stop_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    WANT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plan_id: str
    phase: Phase
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    sample: bool
    sampling: SamplingParams
    want_logits: bool
    position: int
    step: int
    max_tokens: int
    stop_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., want_logits: _Optional[bool] = ..., position: _Optional[int] = ..., step: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "code", "message", "step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    step: int
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("plan_id", "errors_only", "ack")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_ONLY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    errors_only: bool
    ack: bool
    def __init__(self, plan_id: _Optional[str] = ..., errors_only: _Optional[bool] = ..., ack: _Optional[bool] = ...) -> None: ...

class StageEvent(_message.Message):
    __slots__ = ("request_id", "step", "token", "logits", "code", "message", "stage_index", "compute_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    token: int
    logits: Tensor
    code: int
    message: str
    stage_index: int
    compute_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., token: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., stage_index: _Optional[int] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("plan_id", "request_id")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    request_id: str
    def __init__(self, plan_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class MeasureLinkRequest(_message.Message):
    __slots__ = ("target_address", "payload_bytes", "repeats", "warmup")
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    target_address: str
    payload_bytes: _containers.RepeatedScalarFieldContainer[int]
    repeats: int
    warmup: int
    def __init__(self, target_address: _Optional[str] = ..., payload_bytes: _Optional[_Iterable[int]] = ..., repeats: _Optional[int] = ..., warmup: _Optional[int] = ...) -> None: ...

class LinkSample(_message.Message):
    __slots__ = ("payload_bytes", "median_rtt_us")
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_RTT_US_FIELD_NUMBER: _ClassVar[int]
    payload_bytes: int
    median_rtt_us: float
    def __init__(self, payload_bytes: _Optional[int] = ..., median_rtt_us: _Optional[float] = ...) -> None: ...

class MeasureLinkReply(_message.Message):
    __slots__ = ("target_node_id", "samples", "latency_us", "bandwidth_gbs", "fit_residual", "same_host")
    TARGET_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBS_FIELD_NUMBER: _ClassVar[int]
    FIT_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_FIELD_NUMBER: _ClassVar[int]
    target_node_id: str
    samples: _containers.RepeatedCompositeFieldContainer[LinkSample]
    latency_us: float
    bandwidth_gbs: float
    fit_residual: float
    same_host: bool
    def __init__(self, target_node_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[LinkSample, _Mapping]]] = ..., latency_us: _Optional[float] = ..., bandwidth_gbs: _Optional[float] = ..., fit_residual: _Optional[float] = ..., same_host: _Optional[bool] = ...) -> None: ...

class MeasureDevicesRequest(_message.Message):
    __slots__ = ("dtypes", "buffer_bytes")
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    buffer_bytes: int
    def __init__(self, dtypes: _Optional[_Iterable[str]] = ..., buffer_bytes: _Optional[int] = ...) -> None: ...

class PcieMeasurement(_message.Message):
    __slots__ = ("link", "theoretical_gbs", "h2d_gbs", "d2h_gbs", "h2d_latency_us", "d2h_latency_us")
    LINK_FIELD_NUMBER: _ClassVar[int]
    THEORETICAL_GBS_FIELD_NUMBER: _ClassVar[int]
    H2D_GBS_FIELD_NUMBER: _ClassVar[int]
    D2H_GBS_FIELD_NUMBER: _ClassVar[int]
    H2D_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    D2H_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    link: PcieInfo
    theoretical_gbs: float
    h2d_gbs: float
    d2h_gbs: float
    h2d_latency_us: float
    d2h_latency_us: float
    def __init__(self, link: _Optional[_Union[PcieInfo, _Mapping]] = ..., theoretical_gbs: _Optional[float] = ..., h2d_gbs: _Optional[float] = ..., d2h_gbs: _Optional[float] = ..., h2d_latency_us: _Optional[float] = ..., d2h_latency_us: _Optional[float] = ...) -> None: ...

class StreamRate(_message.Message):
    __slots__ = ("dtype", "gbs")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GBS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    gbs: float
    def __init__(self, dtype: _Optional[str] = ..., gbs: _Optional[float] = ...) -> None: ...

class DeviceMeasurement(_message.Message):
    __slots__ = ("index", "name", "kind", "mem_total_bytes", "mem_free_bytes", "stream_gbs", "stream_by_dtype", "matmul_tflops", "pcie", "unified_memory", "note", "mem_source")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_GBS_FIELD_NUMBER: _ClassVar[int]
    STREAM_BY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MATMUL_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    PCIE_FIELD_NUMBER: _ClassVar[int]
    UNIFIED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    MEM_SOURCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    kind: str
    mem_total_bytes: int
    mem_free_bytes: int
    stream_gbs: float
    stream_by_dtype: _containers.RepeatedCompositeFieldContainer[StreamRate]
    matmul_tflops: float
    pcie: PcieMeasurement
    unified_memory: bool
    note: str
    mem_source: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., mem_free_bytes: _Optional[int] = ..., stream_gbs: _Optional[float] = ..., stream_by_dtype: _Optional[_Iterable[_Union[StreamRate, _Mapping]]] = ..., matmul_tflops: _Optional[float] = ..., pcie: _Optional[_Union[PcieMeasurement, _Mapping]] = ..., unified_memory: _Optional[bool] = ..., note: _Optional[str] = ..., mem_source: _Optional[str] = ...) -> None: ...

class MeasureDevicesReply(_message.Message):
    __slots__ = ("devices", "host_copy_gbs", "nvml_status")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOST_COPY_GBS_FIELD_NUMBER: _ClassVar[int]
    NVML_STATUS_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceMeasurement]
    host_copy_gbs: float
    nvml_status: str
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceMeasurement, _Mapping]]] = ..., host_copy_gbs: _Optional[float] = ..., nvml_status: _Optional[str] = ...) -> None: ...

class TensorRef(_message.Message):
    __slots__ = ("name", "sha256", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PrepareWeightsRequest(_message.Message):
    __slots__ = ("model", "model_path", "config_json", "tensors", "verify", "label")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_path: str
    config_json: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorRef]
    verify: bool
    label: str
    def __init__(self, model: _Optional[str] = ..., model_path: _Optional[str] = ..., config_json: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorRef, _Mapping]]] = ..., verify: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class PartialTensor(_message.Message):
    __slots__ = ("sha256", "have_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HAVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    have_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., have_bytes: _Optional[int] = ...) -> None: ...

class PrepareWeightsReply(_message.Message):
    __slots__ = ("weights_id", "missing", "partial", "local", "missing_bytes", "cached_bytes")
    WEIGHTS_ID_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    weights_id: str
    missing: _containers.RepeatedScalarFieldContainer[str]
    partial: _containers.RepeatedCompositeFieldContainer[PartialTensor]
    local: bool
    missing_bytes: int
    cached_bytes: int
    def __init__(self, weights_id: _Optional[str] = ..., missing: _Optional[_Iterable[str]] = ..., partial: _Optional[_Iterable[_Union[PartialTensor, _Mapping]]] = ..., local: _Optional[bool] = ..., missing_bytes: _Optional[int] = ..., cached_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorAck(_message.Message):
    __slots__ = ("sha256", "code", "message", "bytes_received")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    code: int
    message: str
    bytes_received: int
    def __init__(self, sha256: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...
