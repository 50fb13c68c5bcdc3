"""A thin async client for one node's gRPC service, with a deadline on every call."""

from __future__ import annotations

from types import TracebackType

from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc
from node.auth import ClusterKey, secure_channel
from node.service import CHANNEL_OPTIONS

DEFAULT_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 600.0


class NodeClient:
    def __init__(self, address: str, key: ClusterKey | None = None) -> None:
        """Every call proves `key` (default: the process's cluster key, node.auth.use_key)."""
        self.address = address
        self.channel = secure_channel(address, CHANNEL_OPTIONS, key)
        self.stub = pb_grpc.NodeStub(self.channel)

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def get_info(self, timeout: float = DEFAULT_TIMEOUT_S) -> pb.NodeInfo:
        info: pb.NodeInfo = await self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)
        return info

    async def load_stage(
        self, request: pb.LoadStageRequest, timeout: float = LOAD_TIMEOUT_S
    ) -> pb.LoadStageReply:
        reply: pb.LoadStageReply = await self.stub.LoadStage(request, timeout=timeout)
        return reply

    async def unload_stage(self, plan_id: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        await self.stub.UnloadStage(pb.UnloadStageRequest(plan_id=plan_id), timeout=timeout)

    async def release(
        self, plan_id: str, request_id: str, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        await self.stub.Release(
            pb.ReleaseRequest(plan_id=plan_id, request_id=request_id), timeout=timeout
        )

    async def measure_link(
        self,
        target_address: str,
        payload_bytes: list[int] | None = None,
        repeats: int = 0,
        warmup: int = 0,
        timeout: float = 60.0,
    ) -> pb.MeasureLinkReply:
        req = pb.MeasureLinkRequest(
            target_address=target_address,
            payload_bytes=payload_bytes or [],
            repeats=repeats,
            warmup=warmup,
        )
        reply: pb.MeasureLinkReply = await self.stub.MeasureLink(req, timeout=timeout)
        return reply

    async def measure_devices(
        self, dtypes: list[str] | None = None, buffer_bytes: int = 0, timeout: float = 120.0
    ) -> pb.MeasureDevicesReply:
        req = pb.MeasureDevicesRequest(dtypes=dtypes or [], buffer_bytes=buffer_bytes)
        reply: pb.MeasureDevicesReply = await self.stub.MeasureDevices(req, timeout=timeout)
        return reply
