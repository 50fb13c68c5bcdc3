"""Every RPC of `layerlink.v1.Node`, callable with raw request bytes (auth and fuzz tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from node._proto.layerlink.v1 import node_pb2 as pb


@dataclass(frozen=True)
class Rpc:
    name: str
    path: str
    request_type: Any  # the generated message class
    client_streaming: bool
    server_streaming: bool


RPCS: tuple[Rpc, ...] = tuple(
    Rpc(
        name=m.name,
        path=f"/{m.containing_service.full_name}/{m.name}",
        request_type=getattr(pb, m.input_type.name),
        client_streaming=m.client_streaming,
        server_streaming=m.server_streaming,
    )
    for m in pb.DESCRIPTOR.services_by_name["Node"].methods
)


async def call_raw(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    payloads: Sequence[bytes],
    timeout: float = 5.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[grpc.StatusCode, str]:
    """Send `payloads` (one for a unary request) as the request bytes; the call's status
    and details. Responses are read and dropped; a streaming call that outlives `timeout`
    ends with DEADLINE_EXCEEDED."""
    md = tuple(metadata) or None
    try:
        if rpc.client_streaming:
            it = iter(list(payloads))
            if rpc.server_streaming:
                ss = channel.stream_stream(rpc.path)
                async for _ in ss(it, timeout=timeout, metadata=md):
                    pass
            else:
                await channel.stream_unary(rpc.path)(it, timeout=timeout, metadata=md)
        else:
            body = payloads[0] if payloads else b""
            if rpc.server_streaming:
                async for _ in channel.unary_stream(rpc.path)(body, timeout=timeout, metadata=md):
                    pass
            else:
                await channel.unary_unary(rpc.path)(body, timeout=timeout, metadata=md)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    except TimeoutError:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "client-side timeout"
    return grpc.StatusCode.OK, ""
