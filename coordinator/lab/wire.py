r"""A TCP relay that adds a one-way delay (and optional jitter) for traffic that crosses the
emulated wire.

The namespace LAN's veth pairs have no latency of their own (netem, the kernel's way to add
some, is not available here), so a node's LAN path is only ~10 us slower than loopback:
below the jitter of a Python gRPC round trip. For latency, run this relay in a node's
namespace on its LAN address, in front of a port the node (or a llama.cpp RPC server) serves
on 127.0.0.1 there:

    python -m coordinator.lab.wire --listen 10.213.0.3:50251 --target 127.0.0.1:50151 \
        --delay-us 500 [--jitter-us 200]

Peers connecting from another address (another namespace: another "machine") get every
byte delayed by delay_us in each direction; peers connecting from the relay's own address
(the same "machine") get none. With jitter, each chunk read is held delay_us plus a uniform
random value in [-jitter_us, +jitter_us] (never below zero), but never leaves before the
chunk read before it: bytes keep their order, as on a real link.

Each direction of a connection is one thread with a blocking socket: read (the kernel's
receive timestamp, SO_TIMESTAMPNS, says when the bytes arrived), sleep until arrival + delay,
send. No hand-off between threads and a 1 ns timer slack keep the relay's own cost per
message to a few tens of microseconds; `coordinator experiment split-penalty` measures it
(the "relay 0 ms" condition against the direct link). Reads coalesce what arrived while the
thread slept, and the whole read leaves at the due time of its last bytes, so a bulk transfer
gets at most one receive buffer per delay (hundreds of MB/s at a few ms), a window limit as a
real link with that round trip has one.

Prints WIRE_READY once listening; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import random
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux (asm-generic, x86, arm)
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
PR_SET_TIMERSLACK = 29
# The last stretch of each wait is spent spinning, not sleeping: a sleeping thread wakes
# 20-40 us late on a busy host, which would add that much to every emulated delay.
SPIN_NS = 60_000


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _tight_timer() -> None:
    """1 ns timer slack for this thread (Linux defaults to 50 us, which would add ~50 us to
    every sleep); ignored where prctl is not available."""
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class Delay:
    """One direction's delay: fixed, or fixed plus uniform jitter."""

    def __init__(self, delay_ns: int, jitter_ns: int = 0, seed: int | None = None) -> None:
        if delay_ns < 0 or jitter_ns < 0:
            raise ValueError("delay and jitter must be >= 0")
        self.delay_ns = delay_ns
        self.jitter_ns = jitter_ns
        self._rng = random.Random(seed)

    def sample_ns(self) -> int:
        if not self.jitter_ns:
            return self.delay_ns
        return max(0, self.delay_ns + self._rng.randint(-self.jitter_ns, self.jitter_ns))


def _arrival_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time of the last bytes read (CLOCK_REALTIME), else now."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return time.time_ns()


def _wait_until(due_ns: int) -> None:
    """Sleep until SPIN_NS before due_ns (a thread wakes tens of us late), then spin."""
    wait = due_ns - time.time_ns()
    if wait > SPIN_NS:
        time.sleep((wait - SPIN_NS) / 1e9)
    while time.time_ns() < due_ns:
        pass


def pump(src: socket.socket, dst: socket.socket, delay: Delay) -> None:
    """Copy src -> dst, each read leaving its delay after it arrived, in order."""
    _tight_timer()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    last_due = 0
    with contextlib.suppress(OSError):
        src.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    try:
        while True:
            n, ancillary, _flags, _addr = src.recvmsg_into([buf], _ANCILLARY)
            if n == 0:
                break
            if delay.delay_ns or delay.jitter_ns:
                due = max(_arrival_ns(ancillary) + delay.sample_ns(), last_due)
                last_due = due
                _wait_until(due)
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def peer_delay(peer_ip: str, listen_ip: str, delay_ns: int, jitter_ns: int, seed: int | None,
               direction: int) -> Delay:  # fmt: skip
    """The delay of one direction of a connection: none for a peer on the relay's own address
    (the same "machine"), else the wire's."""
    if peer_ip == listen_ip:
        return Delay(0)
    return Delay(delay_ns, jitter_ns, None if seed is None else 2 * seed + direction)


def _serve_one(client: socket.socket, peer_ip: str, listen_ip: str, target: tuple[str, int],
               delay_ns: int, jitter_ns: int, seed: int | None) -> None:  # fmt: skip
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    delays = [peer_delay(peer_ip, listen_ip, delay_ns, jitter_ns, seed, i) for i in range(2)]
    a = threading.Thread(target=pump, args=(client, upstream, delays[0]), daemon=True)
    b = threading.Thread(target=pump, args=(upstream, client, delays[1]), daemon=True)
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
    parser.add_argument("--delay-us", type=float, required=True, help="one-way delay")
    parser.add_argument("--jitter-us", type=float, default=0.0,
                        help="uniform jitter, +/- this much per chunk (default: 0)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="jitter's random seed")
    args = parser.parse_args(argv)
    if args.delay_us < 0 or args.jitter_us < 0:
        parser.error("--delay-us and --jitter-us must be >= 0")
    listen = _split(args.listen)
    target = _split(args.target)
    delay_ns, jitter_ns = int(args.delay_us * 1e3), int(args.jitter_us * 1e3)
    server = socket.create_server(listen)
    sys.stdout.write(f"WIRE_READY {args.listen}\n")
    sys.stdout.flush()
    n = 0
    while True:
        client, (peer_ip, _) = server.accept()
        seed = None if args.seed is None else args.seed + n
        n += 1
        threading.Thread(
            target=_serve_one,
            args=(client, peer_ip, listen[0], target, delay_ns, jitter_ns, seed),
            daemon=True,
        ).start()


if __name__ == "__main__":
    sys.exit(main())
