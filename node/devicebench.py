"""Time this node's devices: what a pipeline stage on them will actually get.

Per device (the MLX device stages run on):
- weight streaming: `x @ W.T` with x of shape (1, in) and W of shape (out, in), the
  operation `mlx.nn.Linear` performs in decode, over a weight buffer larger than any cache
  (256 MiB by default) in each requested dtype; q4/q8 use `mx.quantized_matmul` on packed
  weights (group size 64, float16 scales and biases). Figure: weight bytes (packed bytes,
  scales and biases included) / median time of one product, one untimed warm-up first,
  `mx.eval` before every clock read. A dtype too slow to stream the full buffer within the
  time budget (quantized kernels on a CPU) is timed on a smaller buffer: it is
  compute-bound there, so caches do not flatter it, and the note says so.
- matmul throughput: a square matmul in the first floating dtype requested, its size grown
  until one product takes >= 20 ms; 2 n^3 / median time.
- memory: total and free per device (node/hardware.py): NVML for a CUDA GPU (MLX's figure
  where NVML cannot read it), MLX's recommended working set and the OS's available memory
  for Metal, the OS for a CPU; `mem_source` says which.
- NVIDIA GPUs: NVML PCIe generation and width (current and maximum) and what they imply,
  plus host->device and device->host copies through MLX at sizes 4 KiB .. 64 MiB, fitted
  to time = latency + bytes / bandwidth (node/linkfit.py). NVML is read for each GPU right
  after its own copies, while its link is still trained up (an idle GPU drops to a lower
  PCIe generation to save power). Where MLX has no CUDA backend the NVML figures are
  reported and the copies are not measured (the note says so).
- Apple Silicon: one device with `unified_memory` set: there is no host<->device copy.
Per node: host memory copy bandwidth (numpy copy of the buffer; bytes copied per second).

Everything here runs on the node's compute thread (MLX is not thread-safe across streams).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from node import hardware, linkfit, nvml
from node._proto.layerlink.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_BITS = {"q4": 4, "q8": 8}
DTYPES = (*FLOAT_DTYPES, *QUANT_BITS)
DEFAULT_DTYPES = ("float16", "q4")
DEFAULT_BUFFER_BYTES = 256 << 20
MIN_BUFFER_BYTES = 1 << 20
MAX_BUFFER_BYTES = 16 << 30
QUANT_GROUP = 64
IN_FEATURES = 4096  # a typical hidden size: W is (out, 4096)
REPEATS = 3
# Longest single timed product before the buffer is shrunk, and the matmul's target time.
MAX_CALL_S = 0.35
MATMUL_TARGET_S = 0.02
MATMUL_MAX_N = 16384
COPY_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
NO_CUDA_NOTE = "copies not measured: MLX has no CUDA backend here"


class BenchError(ValueError):
    """A request this module cannot run (unknown dtype, absurd buffer size)."""


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    """One untimed warm-up, then the median of `repeats` timed calls (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class StreamResult:
    dtype: str
    gbs: float
    buffer_bytes: int
    note: str = ""


def _float_operands(
    dtype: mx.Dtype, nbytes: int
) -> tuple[Callable[[], mx.array], list[mx.array], int]:
    rows = max(1, nbytes // (IN_FEATURES * dtype.size))
    w = mx.full((rows, IN_FEATURES), 0.01, dtype=dtype)  # (out, in)
    x = mx.full((1, IN_FEATURES), 1.0, dtype=dtype)  # (1, in)
    mx.eval(w, x)
    return (lambda: x @ w.T), [w, x], w.nbytes


def _quant_operands(bits: int, nbytes: int) -> tuple[Callable[[], mx.array], list[mx.array], int]:
    # Bytes per row as stored: packed weights + float16 scale and bias per group. Scales and
    # activations are in the dtype a stage computes in here: a CPU node holds the scales of a
    # quantized model as float32 (node/computedtype.py; float16 arithmetic is ~30x slower).
    from node.computedtype import FLOAT32, policy

    act = mx.float32 if policy() == FLOAT32 else mx.float16
    groups = IN_FEATURES // QUANT_GROUP
    row_bytes = IN_FEATURES * bits // 8 + 2 * 2 * groups
    rows = max(1, nbytes // row_bytes)
    wq = mx.full((rows, IN_FEATURES * bits // 32), 0x5A5A5A5A, dtype=mx.uint32)
    scales = mx.full((rows, groups), 0.01, dtype=act)
    biases = mx.full((rows, groups), -0.5, dtype=act)
    x = mx.full((1, IN_FEATURES), 1.0, dtype=act)
    mx.eval(wq, scales, biases, x)

    def product() -> mx.array:
        return mx.quantized_matmul(
            x, wq, scales, biases, transpose=True, group_size=QUANT_GROUP, bits=bits
        )

    return product, [wq, scales, biases, x], wq.nbytes + rows * groups * 2 * 2


def _operands(dtype: str, nbytes: int) -> tuple[Callable[[], mx.array], list[mx.array], int]:
    if dtype in FLOAT_DTYPES:
        return _float_operands(FLOAT_DTYPES[dtype], nbytes)
    return _quant_operands(QUANT_BITS[dtype], nbytes)


def _time_product(dtype: str, nbytes: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one product over about nbytes of weights, and their exact size."""
    product, _keep, weight_bytes = _operands(dtype, nbytes)
    return _median_time(lambda: mx.eval(product()), repeats), weight_bytes


def stream_bandwidth(
    dtype: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES, repeats: int = REPEATS
) -> StreamResult:
    """Effective weight-streaming bandwidth of the default device in `dtype` (GB/s)."""
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    # Scout on a small buffer to learn whether the full one fits the time budget.
    scout_bytes = min(buffer_bytes, 4 << 20)
    scout_s, nbytes = _time_product(dtype, scout_bytes, 1)
    rate = nbytes / max(scout_s, 1e-9)
    note = ""
    target = buffer_bytes
    if buffer_bytes / rate > MAX_CALL_S:
        target = max(scout_bytes, int(rate * MAX_CALL_S))
        if target < buffer_bytes:
            note = (
                f"{dtype} is compute-bound here (about {rate / 1e9:.3g} GB/s): timed on "
                f"{target / 2**20:.0f} MiB instead of {buffer_bytes / 2**20:.0f} MiB"
            )
    seconds, nbytes = _time_product(dtype, target, repeats)
    mx.clear_cache()
    return StreamResult(dtype=dtype, gbs=nbytes / seconds / 1e9, buffer_bytes=nbytes, note=note)


def matmul_tflops(dtype: str = "float16") -> float:
    """Square-matmul throughput of the default device in a floating dtype (TFLOP/s)."""
    mdt = FLOAT_DTYPES.get(dtype, mx.float16)
    n = 256
    while True:
        seconds = _time_matmul(mdt, n, 1)
        if seconds >= MATMUL_TARGET_S or n >= MATMUL_MAX_N:
            seconds = _time_matmul(mdt, n, REPEATS)
            mx.clear_cache()
            return 2.0 * n**3 / seconds / 1e12
        # Grow by the cube root of the shortfall, at least x2, in multiples of 256.
        grow = max(2.0, (MATMUL_TARGET_S / max(seconds, 1e-9)) ** (1 / 3))
        n = min(MATMUL_MAX_N, int(math.ceil(n * grow / 256) * 256))


def _time_matmul(dtype: mx.Dtype, n: int, repeats: int) -> float:
    a = mx.full((n, n), 0.5, dtype=dtype)
    b = mx.full((n, n), 0.25, dtype=dtype)
    mx.eval(a, b)
    return _median_time(lambda: mx.eval(a @ b), repeats)


def host_copy_gbs(buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> float:
    """Host memory copy bandwidth: bytes copied per second between two host buffers."""
    src = np.full(buffer_bytes // 4, 1.0, dtype=np.float32)
    dst = np.empty_like(src)
    seconds = _median_time(lambda: np.copyto(dst, src), REPEATS)
    return src.nbytes / seconds / 1e9


@dataclass(frozen=True)
class CopyRates:
    """Host<->device copies through MLX, fitted to time = latency + bytes / bandwidth."""

    h2d_gbs: float
    d2h_gbs: float
    h2d_latency_us: float
    d2h_latency_us: float


def _copy_fit(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    fit = linkfit.fit_affine([(n, s * 1e6) for n, s in samples])  # us
    gbs = 1e-3 / fit.slope if fit.resolved else 0.0
    return gbs, fit.intercept


def copy_rates(device: mx.Device, sizes: Sequence[int] = COPY_SIZES) -> CopyRates:
    """Time host->device (numpy -> MLX array -> first op on `device`) and device->host
    (fresh result on `device` -> numpy) copies, as a stage's hop does them."""
    h2d: list[tuple[int, float]] = []
    d2h: list[tuple[int, float]] = []
    for n in sizes:
        host = np.full(n // 4, 1.0, dtype=np.float32)

        def upload(host: np.ndarray = host) -> None:
            arr = mx.array(host)
            mx.eval(mx.sum(arr, stream=device))

        h2d.append((n, _median_time(upload, REPEATS)))
        src = mx.full((n // 4,), 2.0, dtype=mx.float32, stream=device)
        mx.eval(src)
        times = []
        for i in range(REPEATS + 1):
            fresh = mx.add(src, 0.0, stream=device)  # a new array produced on the device
            mx.eval(fresh)
            t0 = time.perf_counter()
            np.array(fresh, copy=True)
            if i:  # the first one is the warm-up
                times.append(time.perf_counter() - t0)
        d2h.append((n, statistics.median(times)))
    mx.clear_cache()
    h2d_gbs, h2d_lat = _copy_fit(h2d)
    d2h_gbs, d2h_lat = _copy_fit(d2h)
    return CopyRates(h2d_gbs=h2d_gbs, d2h_gbs=d2h_gbs, h2d_latency_us=h2d_lat,
                     d2h_latency_us=d2h_lat)  # fmt: skip


def _pcie_message(gpu: nvml.GpuInfo, rates: CopyRates | None) -> pb.PcieMeasurement:
    msg = pb.PcieMeasurement(
        link=pb.PcieInfo(
            gen=gpu.pcie_gen,
            width=gpu.pcie_width,
            max_gen=gpu.pcie_max_gen,
            max_width=gpu.pcie_max_width,
        ),  # fmt: skip
        theoretical_gbs=gpu.pcie_theoretical_gbs,
    )
    if rates is not None:
        msg.h2d_gbs = rates.h2d_gbs
        msg.d2h_gbs = rates.d2h_gbs
        msg.h2d_latency_us = rates.h2d_latency_us
        msg.d2h_latency_us = rates.d2h_latency_us
    return msg


def _pcie_note(gpu: nvml.GpuInfo) -> str:
    if (
        gpu.pcie_max_gen
        and gpu.pcie_gen
        and (gpu.pcie_gen < gpu.pcie_max_gen or gpu.pcie_width < gpu.pcie_max_width)
    ):
        return (
            f"PCIe link at gen {gpu.pcie_gen} x{gpu.pcie_width}, below its maximum gen "
            f"{gpu.pcie_max_gen} x{gpu.pcie_max_width} (slot, riser or idle power saving)"
        )
    return ""


def _timed_device(
    request_dtypes: Sequence[str], buffer_bytes: int, msg: pb.DeviceMeasurement
) -> list[str]:
    """Fill the timing fields of `msg` for the default MLX device; return notes."""
    notes = []
    for dtype in request_dtypes:
        result = stream_bandwidth(dtype, buffer_bytes)
        msg.stream_by_dtype.append(pb.StreamRate(dtype=dtype, gbs=result.gbs))
        if result.note:
            notes.append(result.note)
    msg.stream_gbs = msg.stream_by_dtype[0].gbs
    float_dtype = next((d for d in request_dtypes if d in FLOAT_DTYPES), "float16")
    msg.matmul_tflops = matmul_tflops(float_dtype)
    return notes


def _check(request: pb.MeasureDevicesRequest) -> tuple[list[str], int]:
    dtypes = list(dict.fromkeys(request.dtypes)) or list(DEFAULT_DTYPES)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise BenchError(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    buffer_bytes = request.buffer_bytes or DEFAULT_BUFFER_BYTES
    if not MIN_BUFFER_BYTES <= buffer_bytes <= MAX_BUFFER_BYTES:
        raise BenchError(f"buffer_bytes must lie in {MIN_BUFFER_BYTES} .. {MAX_BUFFER_BYTES} bytes")
    return dtypes, buffer_bytes


def _fit_buffer(buffer_bytes: int, free_bytes: int) -> int:
    """Never take more than a third of the free memory for the streamed buffer."""
    if free_bytes and buffer_bytes > free_bytes // 3:
        return max(MIN_BUFFER_BYTES, free_bytes // 3)
    return buffer_bytes


# How long a node waits for one device worker's measurement (it measures one device).
WORKER_TIMEOUT_S = 240.0


def measure_devices(
    request: pb.MeasureDevicesRequest, first_only: bool = False
) -> pb.MeasureDevicesReply:
    """Time every device this node runs stages on (`first_only`: MLX's default device alone,
    for a node whose other devices have worker processes of their own). Raises BenchError
    on a bad request."""
    dtypes, buffer_bytes = _check(request)
    t0 = time.perf_counter()
    backend = hardware.mlx_backend()
    total, avail = hardware.memory()
    reply = pb.MeasureDevicesReply(host_copy_gbs=host_copy_gbs(_fit_buffer(buffer_bytes, avail)))
    if backend == "metal":
        _measure_metal(reply, dtypes, buffer_bytes, total, avail)
    elif backend == "cuda":
        _measure_cuda(reply, dtypes, buffer_bytes, first_only)
    else:
        _measure_cpu(reply, dtypes, buffer_bytes, total, avail, first_only)
    log.info("devices measured in %.2fs", time.perf_counter() - t0)
    return reply


def _cpu_name() -> str:
    return hardware.probe().cpu


def _measure_cpu(
    reply: pb.MeasureDevicesReply,
    dtypes: list[str],
    buffer_bytes: int,
    total: int,
    avail: int,
    first_only: bool = False,
) -> None:
    msg = pb.DeviceMeasurement(index=0, name=_cpu_name(), kind="cpu", mem_total_bytes=total,
                               mem_free_bytes=avail, mem_source=hardware.MEM_OS)  # fmt: skip
    with _on(mx.cpu):
        notes = _timed_device(dtypes, _fit_buffer(buffer_bytes, avail), msg)
    gpus, status = ([], "") if first_only else nvml.read_gpus()
    if gpus:
        # NVIDIA GPUs MLX cannot drive from this install: report what NVML knows.
        reply.nvml_status = status or f"{len(gpus)} NVIDIA GPU(s); {NO_CUDA_NOTE}"
        msg.note = "; ".join(notes)
        reply.devices.append(msg)
        for gpu in gpus:
            reply.devices.append(pb.DeviceMeasurement(
                index=gpu.index, name=gpu.name, kind="cuda", mem_total_bytes=gpu.mem_total_bytes,
                mem_free_bytes=gpu.mem_free_bytes, mem_source=hardware.MEM_NVML,
                pcie=_pcie_message(gpu, None),
                note="; ".join(x for x in (NO_CUDA_NOTE, _pcie_note(gpu)) if x),
            ))  # fmt: skip
        return
    reply.nvml_status = f"no NVIDIA GPU on this node ({status})" if status else "no NVIDIA GPU"
    msg.note = "; ".join(notes)
    reply.devices.append(msg)


def _on(device: mx.Device | mx.DeviceType) -> Any:
    """The MLX stream context for `device` (a seam: tests without a GPU replace it)."""
    return mx.stream(device)


def _measure_metal(
    reply: pb.MeasureDevicesReply, dtypes: list[str], buffer_bytes: int, total: int, avail: int
) -> None:
    info = dict(mx.device_info())
    ws_total, free = hardware.metal_memory(avail, info, int(mx.get_active_memory()))
    msg = pb.DeviceMeasurement(
        index=0, name=f"Apple {info.get('architecture', hardware.probe().cpu)}", kind="metal",
        mem_total_bytes=ws_total, mem_free_bytes=free, unified_memory=True,
        mem_source=hardware.MEM_METAL,
    )  # fmt: skip
    with _on(mx.gpu):
        notes = _timed_device(dtypes, _fit_buffer(buffer_bytes, free), msg)
    msg.note = "; ".join(["unified memory: CPU and GPU share it, no host<->device copy", *notes])
    reply.devices.append(msg)
    reply.nvml_status = "no NVIDIA GPU (Apple Silicon)"


def _measure_cuda(
    reply: pb.MeasureDevicesReply, dtypes: list[str], buffer_bytes: int, first_only: bool = False
) -> None:
    """Each GPU in MLX's order: its timings, its copies, then NVML for that GPU at once (the
    link has just been busy, so it shows its working speed; its memory is the driver's)."""
    count = 1 if first_only else int(mx.device_count(mx.gpu))
    matched: set[str] = set()
    problems: list[str] = []
    for i in range(count):
        device = mx.Device(mx.gpu, i)
        info = dict(mx.device_info(device))
        free = int(info.get("free_memory", 0))
        msg = pb.DeviceMeasurement(
            index=i, name=str(info.get("device_name", f"CUDA GPU {i}")), kind="cuda",
            mem_total_bytes=int(info.get("total_memory", info.get("memory_size", 0))),
            mem_free_bytes=free, mem_source=hardware.MEM_MLX,
        )  # fmt: skip
        with _on(device):
            notes = _timed_device(dtypes, _fit_buffer(buffer_bytes, free), msg)
        rates = copy_rates(device)
        uuid = str(info.get("uuid", ""))
        gpu, why = nvml.read_gpu(uuid, str(info.get("pci_bus_id", "")))
        if gpu is not None:
            matched.add(gpu.uuid)
            msg.name = gpu.name
            msg.mem_total_bytes = gpu.mem_total_bytes
            msg.mem_free_bytes = gpu.mem_free_bytes
            msg.mem_source = hardware.MEM_NVML
            msg.pcie.CopyFrom(_pcie_message(gpu, rates))
            notes = [*notes, _pcie_note(gpu)]
        else:
            msg.pcie.CopyFrom(_pcie_message(nvml.GpuInfo(i, msg.name, uuid, 0, 0), rates))
            notes = [*notes, f"not matched to an NVML GPU ({why})"]
            problems.append(f"GPU {i}: {why}")
        msg.note = "; ".join(n for n in notes if n)
        reply.devices.append(msg)
    status = "; ".join(problems)
    reply.nvml_status = (
        status or f"{len(matched)} NVIDIA GPU(s) read by NVML, {count} visible to MLX"
    )
