r"""A TCP relay that adds a fixed one-way delay for traffic that crosses the emulated wire.

The namespace LAN's veth pairs have no latency of their own (netem, the kernel's way to add
some, is not available here), so a node's LAN path is only ~10 us slower than loopback:
below the jitter of a Python gRPC round trip. For latency tests, run this relay in a node's
namespace in front of its gRPC port:

    python -m coordinator.lab.wire --listen 10.213.0.3:50251 --target 10.213.0.3:50151 \
        --delay-us 500

Peers connecting from another address (another namespace: another "machine") get every
byte delayed by delay_us in each direction; peers connecting from the relay's own address
(the same "machine") get no delay. Bytes keep their order and the relay pipelines them, so
bandwidth is what the relay's threads can copy (hundreds of MB/s), not chunk / delay.

Prints WIRE_READY once listening; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _pump(src: socket.socket, dst: socket.socket, delay_ns: int) -> None:
    """Copy src -> dst, each chunk leaving delay_ns after it arrived."""
    pending: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while data := src.recv(CHUNK):
                pending.put((time.monotonic_ns() + delay_ns, data))
        except OSError:
            pass
        pending.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while (item := pending.get()) is not None:
            due, data = item
            wait = due - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _serve_one(client: socket.socket, peer_ip: str, listen_ip: str, target: tuple[str, int],
               delay_ns: int) -> None:  # fmt: skip
    delay = 0 if peer_ip == listen_ip else delay_ns
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a = threading.Thread(target=_pump, args=(client, upstream, delay), daemon=True)
    b = threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True)
    a.start()
    b.start()
    a.join()
    b.join()
    client.close()
    upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="IP:PORT")
    parser.add_argument("--target", required=True, metavar="IP:PORT")
    parser.add_argument("--delay-us", type=float, required=True)
    args = parser.parse_args(argv)
    listen = _split(args.listen)
    target = _split(args.target)
    delay_ns = int(args.delay_us * 1e3)
    server = socket.create_server(listen)
    sys.stdout.write(f"WIRE_READY {args.listen}\n")
    sys.stdout.flush()
    while True:
        client, (peer_ip, _) = server.accept()
        threading.Thread(
            target=_serve_one, args=(client, peer_ip, listen[0], target, delay_ns), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
