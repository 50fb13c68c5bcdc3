"""The machine's floor for a split: the least a pipeline of processes can cost here.

`make bench` runs, beside LayerLink, the same layer split as a bare ring of worker
processes: each holds its slice (the node's own `ModelStage`), reads its input with a
blocking socket read, computes, and writes raw bytes to the next (the last stage's token goes
straight back to stage 0), with no framing beyond two integers, no validation, no gRPC, no
threads. It cannot serve anything; it measures what splitting costs on this machine before
any framework: separate processes waking up for each token, each computing its slice on its
own. A ring of one looks ahead (it queues the next step before reading this step's token
back), as LayerLink's one-stage pipeline and mlx_lm's loop do; a split stage cannot, and what
that costs belongs to the split. LayerLink's split is compared with it (docs/performance.md).

    python -m coordinator.lab.ringfloor --model DIR --start A --end B --index K --count N
        --listen PORT --next PORT [--cpus LIST]

Worker 0 also reads commands on stdin, one per line: `gen MAX_TOKENS ID ID ...` runs a
greedy generation from that prompt and prints one JSON line: {"tokens", "ttft_s",
"decode_s", "ids"} (the generated token ids). Every worker prints `RINGFLOOR_READY` once its ring is connected. With LAYERLINK_TRACE set,
the workers log `compute`, `done` and `sent` per step as the nodes do (node/trace.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from pathlib import Path

READY = "RINGFLOOR_READY"
_HEAD = struct.Struct(">iii")  # kind, position (or request number), count (or token id)
START, HIDDEN, TOKEN, END = 1, 2, 3, 4


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise EOFError("ring connection closed")
        buf += piece
    return bytes(buf)


def _connect(port: int, timeout_s: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.lab.ringfloor")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--end", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--next", type=int, required=True)
    p.add_argument("--cpus", default=None, help="CPU cores to run on (as cluster-node up)")
    args = p.parse_args(argv)
    if args.cpus:
        from node import cpus

        cpus.pin(cpus.parse(args.cpus))

    import mlx.core as mx
    import numpy as np

    from node import trace
    from node.stage import ModelStage, Sampling, StageSpec

    last = args.index == args.count - 1
    stage = ModelStage(
        StageSpec(
            "floor",
            args.model,
            args.start,
            args.end,
            args.index,
            args.count,
            next_address="" if last else "ring",
        )
    )
    greedy = Sampling()
    listener = socket.create_server(("127.0.0.1", args.listen))
    down = _connect(args.next)
    up, _ = listener.accept()
    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    width = stage.hidden_size
    # Activations travel as their raw bytes (bfloat16 as its 16-bit pattern: numpy has none).
    wire = {mx.float16: np.float16, mx.bfloat16: np.uint16}.get(stage.dtype, np.float32)
    dtype = np.dtype(wire)

    def to_bytes(h: mx.array) -> bytes:
        return np.asarray(h.view(mx.uint16) if h.dtype == mx.bfloat16 else h).tobytes()

    def from_bytes(data: bytes) -> mx.array:
        h = mx.array(np.frombuffer(data, dtype=dtype).reshape(1, -1, width))
        return h.view(mx.bfloat16) if stage.dtype == mx.bfloat16 else h

    def run(
        rid: str,
        pos: int,
        prefill: bool,
        tokens: list[int] | None,
        hidden: bytes,
        lookahead: bool = False,
    ) -> None:
        h = from_bytes(hidden) if hidden else None
        trace.mark("compute", rid, pos)
        r = stage.step(rid, pos, prefill, greedy, tokens, h, True, False, lookahead)
        trace.mark("done", rid, pos)
        if last:
            down.sendall(_HEAD.pack(TOKEN, pos, int(r.token or 0)))
        else:
            assert r.hidden is not None
            down.sendall(_HEAD.pack(HIDDEN, pos, r.hidden.shape[1]) + to_bytes(r.hidden))
        trace.mark("sent", rid, pos)

    if args.index == 0:
        rounds = 0
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] != "gen":
                continue
            max_tokens, prompt = int(words[1]), [int(w) for w in words[2:]]
            rounds += 1
            rid = f"g{rounds}"
            down.sendall(_HEAD.pack(START, rounds, 0))
            t0 = time.perf_counter()
            # A ring of one looks ahead as a node holding the whole model does (and mlx_lm's
            # loop): it builds the next step before reading this one's token back.
            solo = args.count == 1
            run(rid, 0, True, prompt, b"", solo and max_tokens > 1)
            pos, tokens = len(prompt), []
            t_first = t_end = t0
            while True:
                kind, _, token = _HEAD.unpack(_recv_exact(up, _HEAD.size))
                if kind != TOKEN:  # a ring of one reads its own START and END
                    continue
                tokens.append(token)
                t_end = time.perf_counter()
                if len(tokens) == 1:
                    t_first = t_end
                if len(tokens) >= max_tokens:
                    break
                run(rid, pos, False, [token], b"", solo and len(tokens) + 1 < max_tokens)
                pos += 1
            stage.release(rid)
            trace.flush()  # workers are killed at the end, without exit handlers
            down.sendall(_HEAD.pack(END, rounds, 0))
            sys.stdout.write(json.dumps({"tokens": len(tokens), "ttft_s": t_first - t0,
                                         "decode_s": t_end - t_first, "ids": tokens}) + "\n")  # fmt: skip
            sys.stdout.flush()
        return 0
    rid = ""
    while True:
        try:
            kind, pos, count = _HEAD.unpack(_recv_exact(up, _HEAD.size))
        except EOFError:
            return 0
        if kind == START:
            rid = f"g{pos}"
            if not last:
                down.sendall(_HEAD.pack(START, pos, 0))
        elif kind == END:
            stage.release(rid)
            trace.flush()
            if not last:
                down.sendall(_HEAD.pack(END, pos, 0))
        elif kind == HIDDEN:
            hidden = _recv_exact(up, count * width * dtype.itemsize)
            run(rid, pos, count > 1 or pos == 0, None, hidden)


if __name__ == "__main__":
    sys.exit(main())
