"""`cluster-node` command line: the composition root of the node.

`cluster-node up` probes the hardware, starts the gRPC server (with the standard health
service), advertises the node over mDNS and serves until SIGINT/SIGTERM, when it
unregisters from mDNS before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from node.workers import ready_line

log = logging.getLogger("node")

WORKER_START_S = 180.0  # loading MLX in a fresh process on a busy machine takes a while


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster-node", description="LayerLink node: serve model layers to a coordinator."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser(
        "up", help="probe the hardware, advertise over mDNS and serve layers over gRPC"
    )
    up.add_argument("--name", default=None, help="node name (default: the host name)")
    up.add_argument(
        "--host", default="0.0.0.0", help="address to bind and advertise (default: all interfaces)"
    )
    up.add_argument(
        "--port", type=int, default=50151, help="gRPC port; 0 picks a free one (default: 50151)"
    )
    up.add_argument(
        "--data-port",
        type=int,
        default=None,
        help="TCP port of the activation data path; 0 picks a free one (default: the gRPC "
        "port + 1, 50152; a free one when --port is 0)",
    )
    up.add_argument(
        "--model-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="folder the node may load models from (repeatable); default: any path",
    )
    up.add_argument(
        "--cluster",
        default=os.environ.get("LAYERLINK_CLUSTER", "default"),
        help="cluster name announced over mDNS (default: $LAYERLINK_CLUSTER or 'default')",
    )
    up.add_argument("--no-advertise", action="store_true", help="do not announce over mDNS")
    up.add_argument(
        "--devices",
        type=int,
        default=0,
        metavar="N",
        help="serve stages on N devices, one process per device (a PC with several GPUs: "
        "one node, its GPUs as pipeline stages; device K's process listens on the gRPC port "
        "+ 2K and + 2K + 1). On the CPU, N devices share the processor (tests, demos). "
        "Default: every GPU MLX drives, else 1",
    )
    # Internal: a device worker of the node with id --worker-of (node/workers.py).
    up.add_argument("--worker-device", default=None, help=argparse.SUPPRESS)  # K/N
    up.add_argument("--worker-of", default="", help=argparse.SUPPRESS)  # the node's id
    up.add_argument(
        "--cpus",
        default=None,
        metavar="LIST",
        help="run on these CPU cores only (Linux; e.g. 0, 0,2 or 0-3): for nodes that share a "
        "machine, whose MLX processes otherwise slow each other down (docs/performance.md)",
    )
    up.add_argument(
        "--token",
        default=None,
        help="the cluster token (`coordinator up` prints it); every call must prove it "
        "(default: --token-file, else $LAYERLINK_TOKEN; visible to `ps`: prefer those)",
    )
    up.add_argument(
        "--token-file", type=Path, default=None, metavar="FILE", help="read the token from FILE"
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        help="allow running without a token on a non-loopback address (anyone who can reach "
        "the port can drive the node)",
    )
    up.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="free a request's KV cache after this long without traffic (default: 600)",
    )
    up.add_argument(
        "--llama-rpc",
        action="store_true",
        help="also serve llama.cpp's RPC backend (unauthenticated: off by default)",
    )
    up.add_argument(
        "--llama-rpc-port",
        type=int,
        default=0,
        metavar="P",
        help="port of the llama.cpp RPC server (default: a free one)",
    )
    _add_cache_dir(up)
    up.add_argument(
        "--cache-max-gb",
        type=float,
        default=0.0,
        metavar="GB",
        help="cap of the weight cache; least recently used tensors are evicted beyond it "
        "(default: 80%% of the disk that holds it)",
    )
    cache = sub.add_parser("cache", help="the weight cache of shipped tensors: ls | clear")
    cache.add_argument("action", choices=("ls", "clear"), help="list the cache, or delete it")
    _add_cache_dir(cache)
    return parser


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="weight cache folder (default: $XDG_CACHE_HOME/layerlink/weights)",
    )


def data_port_for(port: int, data_port: int | None) -> int:
    """The data path's port: --data-port as given, else the gRPC port + 1 (a fixed port a
    firewall rule can name), else 0 (a free one) when the gRPC port is a free one too."""
    if data_port is not None:
        return data_port
    return port + 1 if port else 0


def _check_ports(port: int, data_port: int) -> str:
    """Why these ports cannot be served ("" when they can)."""
    if not 0 <= port <= 65535:
        return f"--port {port} is not a TCP port (0-65535)"
    if not 0 <= data_port <= 65535:
        return f"--data-port {data_port} is not a TCP port (0-65535)"
    if port and data_port == port:
        return f"--data-port {data_port} is the gRPC port: the data path needs a port of its own"
    return ""


def _advertised_host(host: str) -> str:
    if host not in ("0.0.0.0", "", "::"):
        return host
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    return "127.0.0.1"


async def serve(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from node import PROTOCOL_VERSION, auth, devices, hardware
    from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc
    from node.datapath import DataServer
    from node.identity import node_id_for
    from node.mdns import Advertiser, NodeRecord, mdns_interfaces
    from node.rpccheck import MalformedRequests
    from node.service import SERVER_OPTIONS, NodeConfig, NodeService
    from node.shipping import add_push_handler

    name = args.name or socket.gethostname().split(".")[0]
    try:
        key = auth.node_key(auth.token_from(args.token, args.token_file), args.host, args.insecure)
    except auth.TokenError as e:
        log.error("%s", e)
        return 2
    auth.use_key(key)  # node-to-node calls (next stage, link measurement) carry it too
    for d in args.model_dir:
        if not d.is_dir():
            log.error("--model-dir %s is not a folder", d)
            return 2
    if args.cache_max_gb < 0:
        log.error("--cache-max-gb must be >= 0")
        return 2
    from node.memtune import keep_large_buffers

    keep_large_buffers()  # weight shipping moves bulk bytes: no mmap churn per piece
    hw = hardware.probe()
    try:
        serving = _serving(args, hw)
    except devices.DeviceError as e:
        log.error("%s", e)
        return 2
    node_id = args.worker_of if serving.is_worker else node_id_for(name)
    rpc_server = None
    rpc_port = rpc_version = 0
    if args.llama_rpc:
        try:
            from node.llama_rpc import LlamaRpcServer
        except ImportError as e:
            log.error(
                "--llama-rpc needs the baseline extra (pip install 'layerlink[baseline]'): %s", e
            )
            return 2
        # Bound to the node's own address: the RPC server has no authentication.
        rpc_server = LlamaRpcServer(host=_advertised_host(args.host), port=args.llama_rpc_port)
        try:
            await asyncio.to_thread(rpc_server.start)
        except Exception as e:  # the child's own error text says what went wrong
            log.error("llama.cpp RPC server did not start: %s", e)
            return 1
        rpc_port, rpc_version = rpc_server.port, rpc_server.protocol_version
        log.warning(
            "llama.cpp RPC server (no authentication) on %s, protocol v%d",
            rpc_server.endpoint,
            rpc_version,
        )
    # Calls without the cluster's proof are refused before anything is parsed; requests that
    # are not valid protobuf get INVALID_ARGUMENT.
    interceptors = [*auth.server_interceptors(key), MalformedRequests()]
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        log.error("cannot bind %s:%s (port in use?)", args.host, args.port)
        return 1
    # The activation data path (raw TCP frames) beside the gRPC control plane.
    holder: list[NodeService] = []
    data_server = DataServer(
        lambda msg: holder[0].on_data_forward(msg),
        lambda req, push: holder[0].on_data_subscribe(req, push),
        key,
    )
    wanted = data_port_for(args.port, args.data_port)
    try:
        data_port = await data_server.start(args.host, wanted)
    except OSError as e:
        log.error(
            "cannot bind the data path on %s:%s (%s): %s; choose another with --data-port "
            "(0: a free one)",
            args.host,
            wanted,
            "--data-port" if args.data_port is not None else "the default, gRPC port + 1",
            e,
        )
        return 1
    stop = asyncio.Event()  # set by SIGINT/SIGTERM (handlers below) or a worker's exit
    loop = asyncio.get_running_loop()

    def worker_gone(device: int, code: int) -> None:
        log.error(
            "the worker of device %d exited (code %d): stopping the node, so that "
            "coordinators re-plan without it",
            device,
            code,
        )
        stop.set()

    def on_worker_exit(device: int, code: int) -> None:  # (a reader thread calls it)
        loop.call_soon_threadsafe(worker_gone, device, code)

    workers = None
    if serving.count > 1 and not serving.is_worker:
        workers, started = await _start_workers(args, hw, serving, name, node_id, on_worker_exit)
        if workers is None:
            await data_server.close()
            return 1
        serving = replace(serving, workers=started)
    config = NodeConfig(
        node_id=node_id,
        name=name,
        host=args.host,
        port=port,
        cluster=args.cluster,
        model_dirs=tuple(d.resolve() for d in args.model_dir),
        idle_timeout_s=args.idle_timeout,
        llama_rpc_port=rpc_port,
        llama_rpc_version=rpc_version,
        cache_dir=args.cache_dir,
        cache_max_bytes=int(args.cache_max_gb * 1e9),
        data_port=data_port,
        serving=serving,
    )
    service = NodeService(config, hw)
    holder.append(service)
    pb_grpc.add_NodeServicer_to_server(service, server)
    add_push_handler(server, service)  # PushTensors without protobuf's data copies
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    service.start_background()
    await health_servicer.set("layerlink.v1.Node", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    # Handle SIGINT/SIGTERM from here on: a signal that arrived between the READY line and
    # the handler would kill the node with its default action, without the mDNS goodbye,
    # leaving its record listed until the TTL ran out (a test caught this race).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    advertiser = None
    advertising: asyncio.Task[None] | None = None
    adv_host = _advertised_host(args.host)
    served = devices.served_devices(hw.devices, serving)
    if not args.no_advertise:
        record = NodeRecord(
            node_id=node_id,
            name=name,
            host=adv_host,
            port=port,
            protocol_version=PROTOCOL_VERSION,
            backend=hw.backend,
            device_count=len(served),
            mem_bytes=sum(d.mem_total_bytes for d in served),
            cluster=args.cluster,
            llama_rpc_port=rpc_port,
            llama_rpc_version=rpc_version,
            cluster_id=key.cluster_id if key is not None else "",
        )
        advertiser = Advertiser(record, mdns_interfaces(args.host))
        # Announced in the background: mDNS probing and announcing take ~1.5 s, and the
        # node serves from now on (coordinators that name it with --node need no record).
        advertising = asyncio.create_task(advertiser.start(), name="mdns-register")
        advertising.add_done_callback(_report_mdns)
    log.info(
        "node %s (%s) serving on %s:%d (data path :%d), backend %s, %s",
        name,
        node_id[:8],
        adv_host,
        port,
        data_port,
        hw.backend,
        f"device {serving.own} of {serving.count}"
        if serving.is_worker
        else f"{serving.count} device(s)",
    )
    if key is None:
        log.warning(
            "no cluster token: anyone who can reach %s:%d can drive this node%s",
            args.host,
            port,
            "" if auth.is_loopback(args.host) else " (--insecure)",
        )
    print(ready_line(f"{adv_host}:{port}", node_id, data_port), flush=True)

    await stop.wait()
    log.info("shutting down")
    if advertiser is not None and advertising is not None:
        with contextlib.suppress(Exception):  # (logged when it failed)
            await advertising  # a record still being announced is withdrawn, not left
        await advertiser.close()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=1.0)
    await data_server.close()
    await service.close()
    if rpc_server is not None:
        rpc_server.stop()
    if workers is not None:
        await asyncio.to_thread(workers.stop)
    return 0


def _report_mdns(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "mDNS announcement failed (%s): coordinators must name this node with --node",
            task.exception(),
        )


def _serving(args: argparse.Namespace, hw: Any) -> Any:
    """The devices this process serves (node/devices.py); raises DeviceError."""
    from node import devices

    if args.worker_device:
        own, _, count = str(args.worker_device).partition("/")
        try:
            serving = devices.Serving(own=int(own), count=int(count))
        except ValueError:
            raise devices.DeviceError(
                f"--worker-device {args.worker_device!r}: expected K/N"
            ) from None
        if not args.worker_of:
            raise devices.DeviceError("--worker-device needs --worker-of (the node's id)")
        if not 0 < serving.own < serving.count:
            raise devices.DeviceError(f"--worker-device {args.worker_device!r}: expected 0 < K < N")
        return serving
    return devices.Serving(count=devices.check_count(args.devices, hw.devices, hw.backend))


async def _start_workers(
    args: argparse.Namespace,
    hw: Any,
    serving: Any,
    name: str,
    node_id: str,
    on_exit: Callable[[int, int], None],
) -> tuple[Any, tuple[Any, ...]]:
    """Start the node's device workers and wait until each serves: (the DeviceWorkers and
    their servers), or (None, ()) after logging why they did not start."""
    from node import auth
    from node.weightcache import default_root
    from node.workers import DeviceWorkers, WorkerError, WorkerSpec, worker_argv

    token = auth.token_from(args.token, args.token_file)
    cache_root = args.cache_dir or default_root()
    uuids = {d.index: d.uuid for d in hw.devices if d.kind == "cuda"}
    specs = []
    for k in range(1, serving.count):
        env: list[tuple[str, str]] = [("LAYERLINK_TOKEN", token)] if token else []
        if hw.backend == "cuda":  # the worker sees its GPU alone (by UUID: no ordering doubt)
            env.append(("CUDA_VISIBLE_DEVICES", uuids.get(k) or str(k)))
        argv = worker_argv(
            k, serving.count, node_id, host=args.host, port=args.port, name=name,
            cluster=args.cluster,
            model_dirs=[str(d) for d in args.model_dir], cache_dir=str(cache_root / f"device-{k}"),
            cache_max_gb=args.cache_max_gb, idle_timeout_s=args.idle_timeout,
            insecure=args.insecure, verbose=args.verbose,
        )  # fmt: skip
        specs.append(WorkerSpec(k, argv, tuple(env)))
    workers = DeviceWorkers(specs, on_exit)
    workers.launch()  # from the main thread (node/workers.py says why)
    try:
        started = await asyncio.to_thread(workers.wait_ready, WORKER_START_S)
    except WorkerError as e:
        log.error("%s", e)
        return None, ()
    log.info(
        "device workers serving: %s",
        ", ".join(f"device {w.device} on :{w.grpc_port}" for w in started),
    )
    return workers, started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "up":
        problem = _check_ports(args.port, data_port_for(args.port, args.data_port))
        if problem:
            given = "" if args.data_port is not None else " (by default, the gRPC port + 1)"
            print(f"error: {problem}{given}", file=sys.stderr)
            return 2
    if args.command == "up" and args.cpus:
        from node import cpus

        try:
            cores = cpus.parse(args.cpus)
            cpus.pin(cores)
        except cpus.CpuError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log.info("pinned to CPU cores %s", ",".join(map(str, sorted(cores))))
    if args.command == "up" and args.worker_device:
        from node.workers import die_with_parent

        die_with_parent()
    if args.command == "up":
        return asyncio.run(serve(args))
    if args.command == "cache":
        from node.cachecli import run_cache

        return run_cache(args.action, args.cache_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
