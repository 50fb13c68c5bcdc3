"""Which devices a node process serves stages on, and which process serves each.

A node runs one stage process per device (`cluster-node up --devices N`): the node's own
process serves device 0 (MLX's default device) and starts one *device worker* for each
further device (node/workers.py). A worker is a node server of its own — same name, node id,
token and model folders, no mDNS record, its own gRPC and data-path ports — that drives one
device: on CUDA it sees only its GPU (CUDA_VISIBLE_DEVICES), on the CPU (tests, demos) every
device is the same processor and host memory is shared out evenly.

The node's GetInfo lists every device with the ports of the process that serves it, so the
coordinator addresses each stage at its own server; activations between two devices of one
node go from one process to the other through host memory (a loopback TCP socket: device ->
host -> device), never through the LAN or the coordinator.

Everything here is pure: the figures come from node/hardware.py, the device bench and the
worker table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from node._proto.layerlink.v1 import node_pb2 as pb
from node.hardware import Device


class DeviceError(ValueError):
    """A --devices request this machine cannot serve; the message says why."""


@dataclass(frozen=True)
class DeviceServer:
    """A device worker: the process that serves one device's stages."""

    device: int
    grpc_port: int
    data_port: int
    pid: int = 0


@dataclass(frozen=True)
class Serving:
    """What one node process serves. `own`: the label of the device its stages run on;
    `count`: the node's devices that run stages (all processes together); `workers`: the
    node's device workers (in the node's own process; empty in a worker)."""

    own: int = 0
    count: int = 1
    workers: tuple[DeviceServer, ...] = ()

    @property
    def is_worker(self) -> bool:
        return self.own != 0

    def worker_for(self, device: int) -> DeviceServer | None:
        return next((w for w in self.workers if w.device == device), None)


def check_count(requested: int, devices: Sequence[Device], backend: str) -> int:
    """The number of stage devices for `--devices N` (0: every GPU MLX drives, one CPU or
    Metal device). Raises DeviceError."""
    gpus = sum(1 for d in devices if d.kind == "cuda")
    if requested < 0:
        raise DeviceError(f"--devices {requested}: expected a count >= 1 (0: every GPU)")
    if requested == 0:
        return max(1, gpus) if backend == "cuda" else 1
    if backend == "cuda" and requested > gpus:
        raise DeviceError(f"--devices {requested}: MLX drives {gpus} CUDA GPU(s) here")
    if backend == "metal" and requested > 1:
        raise DeviceError(
            f"--devices {requested}: an Apple GPU is one device (run one node per Mac)"
        )
    return requested


def served_devices(live: Sequence[Device], serving: Serving) -> tuple[Device, ...]:
    """The devices a process reports (GetInfo, MeasureDevices), memory read just before.

    - a worker: its one device, labelled as the node labels it;
    - the node's own process with CPU devices: the processor once per device, each with an
      even share of host memory (they share it);
    - otherwise the devices as probed, the node's process and its workers' marked as running
      stages.
    """
    if not live:
        return ()
    if serving.is_worker:
        own = next((d for d in live if d.runs_stages), live[0])
        return (_share(replace(own, index=serving.own, runs_stages=True), serving.count),)
    first = live[0]
    if first.kind == "cpu" and serving.count > 1:
        return tuple(
            _share(replace(first, index=i, runs_stages=True), serving.count)
            for i in range(serving.count)
        )
    workers = {w.device for w in serving.workers}
    return tuple(replace(d, runs_stages=d.runs_stages or d.index in workers) for d in live)


def _share(device: Device, count: int) -> Device:
    if device.kind != "cpu" or count <= 1:
        return device
    return replace(
        device,
        mem_total_bytes=device.mem_total_bytes // count,
        mem_free_bytes=device.mem_free_bytes // count,
    )


def check_stage_device(requested: str, serving: Serving, host: str) -> str:
    """Why a LoadStage planned for device `requested` cannot run in this process ("" when
    it can: empty means this process's own device)."""
    if not requested or requested == str(serving.own):
        return ""
    try:
        index = int(requested)
    except ValueError:
        return f"device {requested!r} is not a device label (expected its index, e.g. '0')"
    worker = serving.worker_for(index)
    if worker is not None:
        return (
            f"device {index} is served by its own process at {host}:{worker.grpc_port}; "
            f"this server runs device {serving.own}'s stages"
        )
    return f"this node has no device {index} that runs stages (it serves device {serving.own})"


def keep_own_measurement(reply: pb.MeasureDevicesReply, serving: Serving) -> None:
    """A MeasureDevices reply of a process of a multi-device node: its own device only (the
    bench timed MLX's default device), under the node's label, a CPU device with its share
    of host memory."""
    del reply.devices[1:]
    for d in reply.devices:
        d.index = serving.own
        if d.kind == "cpu":
            d.mem_total_bytes //= serving.count
            d.mem_free_bytes //= serving.count
