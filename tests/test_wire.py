"""The wire relay (coordinator/lab/wire.py): bytes keep their order under jitter, every byte
waits at least its delay, a peer from the relay's own address is not delayed, and bad
arguments are refused."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coordinator.lab import wire

REPO = Path(__file__).resolve().parents[1]


def _relay_pair(delay: wire.Delay) -> tuple[socket.socket, socket.socket, threading.Thread]:
    """writer -> (relay) -> reader, over two socket pairs."""
    writer, relay_in = socket.socketpair()
    relay_out, reader = socket.socketpair()
    t = threading.Thread(target=wire.pump, args=(relay_in, relay_out, delay), daemon=True)
    t.start()
    return writer, reader, t


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "the relay closed early"
        got += chunk
    return bytes(got)


def test_jitter_keeps_byte_order_and_never_undercuts_the_delay() -> None:
    # 2 ms +/- 1.5 ms per read: without the "never before the previous read" rule, later
    # messages would overtake earlier ones.
    writer, reader, t = _relay_pair(wire.Delay(2_000_000, 1_500_000, seed=1))
    messages = [i.to_bytes(4, "big") * 64 for i in range(60)]
    sent_at = []
    for m in messages:
        sent_at.append(time.monotonic())
        writer.sendall(m)
        time.sleep(0.0003)  # separate reads, each with its own random delay
    writer.shutdown(socket.SHUT_WR)
    body = _read_exactly(reader, sum(len(m) for m in messages))
    assert body == b"".join(messages)
    assert reader.recv(1) == b""  # the relay passed the end of stream on
    t.join(timeout=10)
    writer.close()
    reader.close()


def test_each_message_waits_at_least_the_delay() -> None:
    writer, reader, _t = _relay_pair(wire.Delay(3_000_000))
    for _ in range(5):
        t0 = time.monotonic()
        writer.sendall(b"x" * 100)
        _read_exactly(reader, 100)
        assert time.monotonic() - t0 >= 0.003
    writer.close()
    reader.close()


def test_delay_samples_stay_within_the_jitter_and_above_zero() -> None:
    d = wire.Delay(1_000_000, 400_000, seed=3)
    samples = [d.sample_ns() for _ in range(2000)]
    assert min(samples) >= 600_000 and max(samples) <= 1_400_000
    assert len(set(samples)) > 100
    assert all(x >= 0 for x in (wire.Delay(100, 1_000, seed=0).sample_ns() for _ in range(500)))
    with pytest.raises(ValueError):
        wire.Delay(-1)


def test_relay_process_delays_other_addresses_only() -> None:
    """On loopback: a peer at 127.0.0.1 reaching the relay on 127.0.0.2 is "another machine"
    and waits at least the delay both ways; one reaching it on 127.0.0.1 itself goes
    through (its delay is none: `peer_delay`)."""
    echo = socket.create_server(("127.0.0.1", 0))
    port = echo.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()  # fmt: skip

    threading.Thread(target=serve, daemon=True).start()
    procs = []
    try:
        for host in ("127.0.0.2", "127.0.0.1"):
            with socket.socket() as s:
                s.bind((host, 0))
                listen_port = s.getsockname()[1]
            p = subprocess.Popen(
                [sys.executable, "-m", "coordinator.lab.wire", "--listen", f"{host}:{listen_port}",
                 "--target", f"127.0.0.1:{port}", "--delay-us", "50000"],
                stdout=subprocess.PIPE, text=True, cwd=REPO,
            )  # fmt: skip
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().startswith("WIRE_READY")
            c = socket.create_connection((host, listen_port), source_address=("127.0.0.1", 0))
            t0 = time.monotonic()
            c.sendall(b"ping")
            assert _read_exactly(c, 4) == b"ping"
            rtt = time.monotonic() - t0
            c.close()
            if host == "127.0.0.2":
                assert rtt >= 0.1  # 50 ms each way, counted from the bytes' arrival
    finally:
        echo.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()


def test_peers_on_the_relays_own_address_are_not_delayed() -> None:
    assert wire.peer_delay("10.0.0.1", "10.0.0.1", 5_000, 1_000, 7, 0).delay_ns == 0
    remote = wire.peer_delay("10.0.0.2", "10.0.0.1", 5_000, 1_000, 7, 0)
    assert (remote.delay_ns, remote.jitter_ns) == (5_000, 1_000)
    # The two directions of a connection draw different jitter.
    a = [wire.peer_delay("b", "a", 5_000, 1_000, 7, 0).sample_ns() for _ in range(1)]
    b = [wire.peer_delay("b", "a", 5_000, 1_000, 7, 1).sample_ns() for _ in range(1)]
    assert a != b


def test_bad_arguments_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.lab.wire", "--listen", "127.0.0.1:1", "--target",
         "127.0.0.1:2", "--delay-us", "-5"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and "--delay-us" in done.stderr
