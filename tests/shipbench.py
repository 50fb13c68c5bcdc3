"""Shipping throughput against the link it runs on (run in the coordinator's namespace).

    python -m tests.shipbench --node HOST:PORT --model DIR [--repeats N]

Measures the link to the node with the same echo sweep the cluster probe uses
(node/linkprobe.py), then ships the whole model to the node as one stage, and prints one JSON
object: the link's fitted bandwidth, the shipment's throughput and their ratio. The node's
cache must not hold the model yet (give each repeat a node with a fresh --cache-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from coordinator.plan import Plan, Stage
from coordinator.shipping import Shipper, model_manifest
from node import linkprobe
from node._proto.layerlink.v1 import node_pb2 as pb


def synth_weights(folder: Path, layers: int, tensor_mib: int, per_layer: int) -> None:
    """A weights-only model folder of random bytes (enough to ship; not to load)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = tensor_mib * (1 << 20) // 4
    tensors = {
        f"model.layers.{i}.w{j}.weight": rng.standard_normal(n, dtype=np.float32)
        for i in range(layers)
        for j in range(per_layer)
    }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 64,
              "vocab_size": 64, "tie_word_embeddings": True}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


async def run(node: str, model: Path, layers: int, streams: int) -> dict[str, float]:
    # The probe's sweep, three times: its bandwidth figure moves by tens of percent between
    # sweeps on a busy 2-core machine; the median is the link's figure.
    sweeps = [
        await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=node), "shipbench")
        for _ in range(3)
    ]
    link = sorted(sweeps, key=lambda r: r.bandwidth_gbs)[1]
    config = json.loads((model / "config.json").read_text())
    manifest = await asyncio.to_thread(model_manifest, model, model.name, layers, config)
    plan = Plan(model=model.name, num_layers=layers,
                stages=(Stage(node_id="n", node_name="n", address=node, start=0, end=layers),))  # fmt: skip
    (shipped,) = await Shipper(manifest, streams=streams).ship(plan)
    return {
        "link_gbs": link.bandwidth_gbs,
        "link_latency_us": link.latency_us,
        "ship_gbs": shipped.gbs,
        "ship_bytes": shipped.sent_bytes,
        "ship_seconds": shipped.seconds,
        "ratio": shipped.gbs / link.bandwidth_gbs if link.bandwidth_gbs > 0 else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--synth-layers", type=int, default=0, help="write a random model first")
    p.add_argument("--tensor-mib", type=int, default=8)
    p.add_argument("--per-layer", type=int, default=8)
    p.add_argument("--streams", type=int, default=1)
    args = p.parse_args()
    if args.synth_layers:
        synth_weights(args.model, args.synth_layers, args.tensor_mib, args.per_layer)
    layers = int(json.loads((args.model / "config.json").read_text())["num_hidden_layers"])
    from node.memtune import keep_large_buffers

    keep_large_buffers()  # as the coordinator's main does
    out = asyncio.run(run(args.node, args.model, layers, args.streams))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
