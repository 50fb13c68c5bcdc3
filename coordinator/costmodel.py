"""The cost model: what a pipeline plan will cost before anything is loaded.

Pure functions of frozen values (model shapes, devices, links, workload) -> predicted decode
time per token, time to first token, throughput at m concurrent requests and peak memory per
device, with a per-stage and per-hop breakdown and the bottleneck named in words. The only I/O
is `ModelSpec.from_config_dir`, which reads config.json and the safetensors *headers* (never the
weights).

Units: bytes, seconds, GB/s = 1e9 bytes/s (stream bandwidth), TFLOPS = 1e12 FLOP/s,
link bandwidth in bytes/s. Layer ranges are half-open: a stage holds layers [start, end).

Decode, one request (design.md, "Cost model"):

    t_token = sum over stages (weight bytes / stream bandwidth + KV-cache bytes read / stream
              bandwidth + layers x per-layer overhead)
            + last stage: (final norm + lm_head bytes) / stream bandwidth + sampling
            + sum over hops (latency + per-message overhead + hidden x dtype bytes / bandwidth)
            + the ring-closing hop (last stage -> first stage, a 4-byte token id) when split
              (Workload.ring_hop; without it the token returns through the coordinator, a
              per-token cost in Workload.sample_s).

Prefill (TTFT) runs the prompt in chunks through the stages as a flow shop; each stage-chunk
costs max(FLOPs / matmul throughput, weight bytes / stream bandwidth) + per-layer overhead, each
hop costs latency + overhead + chunk x hidden x dtype bytes / bandwidth.

Throughput with m requests in flight ~ min(m / t_token, 1 / slowest stage time) (batched decode,
where one weight read serves several requests, is not modelled: this is conservative).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

GIB = 1 << 30
TOKEN_ID_BYTES = 4  # the ring-closing hop carries the sampled token id

__all__ = [
    "GIB",
    "Cluster",
    "DeviceSpec",
    "HopCost",
    "LinkSpec",
    "MemoryUse",
    "ModelSpec",
    "Placement",
    "PlanCost",
    "StageCost",
    "Workload",
    "hop_cost",
    "predict",
    "prefill_stage_s",
    "stage_decode_cost",
    "stage_memory",
    "stage_weight_bytes",
    "throughput_at",
    "working_bytes",
]


# --------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """The shapes and byte sizes of a decoder-only transformer that matter for cost."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    layer_bytes: tuple[int, ...]  # weight bytes of each decoder layer, len == layers
    embed_bytes: int  # token embedding: held by the first stage, one row read per token
    head_bytes: int  # final norm + lm_head: held by the last stage and read every token
    tied_embeddings: bool = False  # lm_head is the embedding matrix (head_bytes includes it)
    act_bytes: int = 2  # dtype bytes of the hidden states sent between stages
    kv_bytes: int = 2  # dtype bytes of a KV-cache entry
    layer_params: int = 0  # parameters per decoder layer (prefill FLOPs)

    def __post_init__(self) -> None:
        if self.layers < 1 or len(self.layer_bytes) != self.layers:
            raise ValueError(
                f"model {self.name!r}: {len(self.layer_bytes)} layer sizes for {self.layers} layers"
            )
        if min(self.layer_bytes) < 0 or self.embed_bytes < 0 or self.head_bytes < 0:
            raise ValueError(f"model {self.name!r}: byte sizes must be >= 0")
        for f in ("hidden", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, f) < 1:
                raise ValueError(f"model {self.name!r}: {f} must be >= 1")

    @cached_property
    def prefix_bytes(self) -> tuple[int, ...]:
        """prefix_bytes[i] = bytes of layers [0, i)."""
        out = [0]
        for b in self.layer_bytes:
            out.append(out[-1] + b)
        return tuple(out)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights, the tied matrix counted once."""
        head_extra = (
            max(0, self.head_bytes - self.embed_bytes)
            if self.tied_embeddings
            else (self.head_bytes)
        )
        return self.prefix_bytes[-1] + self.embed_bytes + head_extra

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes

    @property
    def hop_bytes_per_token(self) -> int:
        """The hidden state one token carries across a stage boundary."""
        return self.hidden * self.act_bytes

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layer_params * self.layers + self.vocab * self.hidden + head

    @staticmethod
    def from_params(
        name: str,
        params_b: float,
        layers: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        vocab: int,
        bits_per_weight: float,
        *,
        intermediate: int | None = None,
        head_dim: int | None = None,
        tied_embeddings: bool = False,
        act_bytes: int = 2,
        kv_bytes: int = 2,
    ) -> ModelSpec:
        """A model you do not have, from its parameter count and shapes (what-if planning).

        Every weight, embeddings included, is stored at `bits_per_weight`; the parameters not
        in the embedding/head are spread evenly over the layers. `intermediate` defaults to what
        the layer budget leaves after attention, for a gated MLP (3 x hidden x intermediate)."""
        if params_b <= 0 or bits_per_weight <= 0:
            raise ValueError("params_b and bits_per_weight must be positive")
        hd = head_dim or hidden // heads
        total = int(params_b * 1e9)
        embed_p = vocab * hidden
        head_p = 0 if tied_embeddings else vocab * hidden
        layer_p = (total - embed_p - head_p) // layers
        if layer_p <= 0:
            raise ValueError(f"{params_b}B parameters leave nothing for {layers} layers")
        if intermediate is None:
            attn = hidden * heads * hd * 2 + hidden * kv_heads * hd * 2
            intermediate = max(1, (layer_p - attn) // (3 * hidden))

        def nbytes(p: int) -> int:
            return int(round(p * bits_per_weight / 8))

        return ModelSpec(
            name=name,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=hd,
            vocab=vocab,
            intermediate=intermediate,
            layer_bytes=(nbytes(layer_p),) * layers,
            embed_bytes=nbytes(embed_p),
            head_bytes=nbytes(embed_p if tied_embeddings else head_p),
            tied_embeddings=tied_embeddings,
            act_bytes=act_bytes,
            kv_bytes=kv_bytes,
            layer_params=layer_p,
        )

    @staticmethod
    def from_config_dir(path: str | Path, name: str | None = None) -> ModelSpec:
        """Shapes from config.json, byte sizes from the safetensors headers (weights never read).

        Tensors named `...layers.<i>....` belong to layer i; `embed_tokens` to the embedding;
        `lm_head` and the final `norm` to the head; anything else (e.g. a vision tower) is
        counted with the embedding, on the first stage."""
        root = Path(path)
        cfg_path = root / "config.json"
        try:
            cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {cfg_path}: {e}") from e
        if isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg, **cfg["text_config"]}
        try:
            layers = int(cfg["num_hidden_layers"])
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: missing or bad field {e}") from e
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        intermediate = int(cfg.get("intermediate_size") or 4 * hidden)
        tied = bool(cfg.get("tie_word_embeddings", False))
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        act_bytes = 4 if "32" in dtype else 2

        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {root}")
        per_layer = [0] * layers
        embed = head = 0
        has_lm_head = False
        layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
        for f in files:
            for tname, nbytes in _safetensors_sizes(f).items():
                m = layer_re.search(tname)
                if m:
                    i = int(m.group(1))
                    if i >= layers:
                        raise ValueError(f"{f.name}: tensor {tname} beyond {layers} layers")
                    per_layer[i] += nbytes
                elif "lm_head" in tname:
                    head += nbytes
                    has_lm_head = True
                elif re.search(r"(?:^|\.)norm\.", tname) and "layers" not in tname:
                    head += nbytes
                else:
                    embed += nbytes
        tied = tied or not has_lm_head
        if tied:
            head += embed  # the last stage needs the (tied) embedding matrix as its lm_head
        attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        return ModelSpec(
            name=name or root.name,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            intermediate=intermediate,
            layer_bytes=tuple(per_layer),
            embed_bytes=embed,
            head_bytes=head,
            tied_embeddings=tied,
            act_bytes=act_bytes,
            kv_bytes=act_bytes,
            layer_params=attn + 3 * hidden * intermediate,
        )


def _safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> byte size from a safetensors header (node/tensorfiles.py parses it)."""
    from node.tensorfiles import read_header

    return {e.name: e.nbytes for e in read_header(path)}


# --------------------------------------------------------------------------------------------
# Cluster


@dataclass(frozen=True)
class DeviceSpec:
    """One device a stage can run on, with *achieved* (measured or factored) figures."""

    id: str  # unique in the cluster, e.g. "pc/0"
    node: str  # node name; devices of one node talk over PCIe / host memory
    name: str  # e.g. "NVIDIA GeForce RTX 2060 SUPER"
    kind: str  # "cuda" | "metal" | "cpu"
    mem_free_bytes: int  # what a stage may use: weights + KV cache + working memory
    stream_gbs: float  # effective weight-streaming bandwidth, GB/s
    matmul_tflops: float  # effective matmul throughput (prefill), TFLOPS
    per_layer_overhead_s: float = 0.0  # fixed cost per layer per token (kernel launches)
    # The machine whose CPU runs it ("" when unknown), and the cores it may run on there (()
    # when unknown). CPU devices on the same cores share them: the probe times them one after
    # another, each with the machine to itself.
    host: str = ""
    cores: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "metal", "cpu"):
            raise ValueError(
                f"device {self.id}: kind must be cuda, metal or cpu, not {self.kind!r}"
            )
        if self.stream_gbs <= 0 or self.matmul_tflops <= 0:
            raise ValueError(f"device {self.id}: stream_gbs and matmul_tflops must be positive")
        if self.mem_free_bytes < 0 or self.per_layer_overhead_s < 0:
            raise ValueError(f"device {self.id}: memory and overhead must be >= 0")

    @property
    def label(self) -> str:
        """How a person names it: "mac (M4 Pro)"."""
        return f"{self.node} ({short_name(self.name)})"


def short_name(name: str) -> str:
    """ "NVIDIA GeForce RTX 2060 SUPER" -> "RTX 2060 SUPER"; "Apple M4 Pro (20-core GPU)" -> "M4 Pro"."""
    s = re.sub(r"\s*\(.*?\)", "", name)
    for prefix in ("NVIDIA GeForce ", "NVIDIA ", "GeForce ", "Apple "):
        if s.startswith(prefix):
            s = s[len(prefix) :]
    return s.strip() or name


@dataclass(frozen=True)
class LinkSpec:
    """A one-way path for messages between two devices (or two nodes)."""

    src: str  # device id, or node name for a node-to-node (network) link
    dst: str
    latency_s: float
    bandwidth_Bps: float  # bytes/s
    overhead_s: float = 0.0  # software cost per message: serialization, syscalls, copies
    kind: str = "network"  # "network" | "pcie" | "host"

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.overhead_s < 0 or self.bandwidth_Bps <= 0:
            raise ValueError(f"link {self.src}->{self.dst}: bad latency/bandwidth/overhead")


@dataclass(frozen=True)
class Cluster:
    """Devices and the links between them.

    `link(a, b)` looks for a device-pair link first (PCIe inside a PC), then a node-pair link
    (the network), in either direction; a same-node pair with no device link is an error."""

    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...] = ()

    def __post_init__(self) -> None:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"device ids must be unique: {ids}")

    @cached_property
    def _by_id(self) -> dict[str, DeviceSpec]:
        return {d.id: d for d in self.devices}

    @cached_property
    def _links(self) -> dict[tuple[str, str], LinkSpec]:
        return {(lk.src, lk.dst): lk for lk in self.links}

    def label(self, device_id: str) -> str:
        """ "mac (M4 Pro)" for a node's only device, "pc/1 (RTX 2060 SUPER)" otherwise."""
        d = self.device(device_id)
        if sum(1 for x in self.devices if x.node == d.node) == 1:
            return d.label
        return f"{d.id} ({short_name(d.name)})"

    def device(self, device_id: str) -> DeviceSpec:
        try:
            return self._by_id[device_id]
        except KeyError:
            raise KeyError(f"no device {device_id!r} in the cluster") from None

    def link(self, src: str, dst: str) -> LinkSpec:
        if src == dst:
            raise KeyError(f"no hop from device {src!r} to itself")
        a, b = self.device(src), self.device(dst)
        table = self._links
        for key in ((a.id, b.id), (b.id, a.id)):
            if key in table:
                return table[key]
        if a.node == b.node:
            raise KeyError(f"no link between devices {a.id} and {b.id} of node {a.node}")
        for key in ((a.node, b.node), (b.node, a.node)):
            if key in table:
                return table[key]
        raise KeyError(f"no link between nodes {a.node} and {b.node}")

    @staticmethod
    def from_probe_json(
        probe: Mapping[str, Any], *, hop_overhead_s: float = 0.0, reserve_bytes: int = 0
    ) -> Cluster:
        """Build from `coordinator probe --json` (issue 3): nodes with devices and node links.

        Devices the probe could not time (stream or matmul 0) are left out. Two devices of one
        node are joined by the hop their processes measured through host memory
        (`device_links`), plus, for GPUs, the device -> host and host -> device copies their
        PCIe figures give; a node whose devices share one process (no measured hop) gets
        assumed figures (20 us over PCIe, 5 us and 10 GB/s in host memory). A link whose
        bandwidth the sweep could not resolve (0) is taken as 10 GB/s: decode hops are
        latency-bound."""
        devices: list[DeviceSpec] = []
        pcie: dict[str, tuple[float, float]] = {}  # device id -> (h2d, d2h) bytes/s
        copy_latency: dict[str, tuple[float, float]] = {}  # device id -> (h2d, d2h) s
        links: list[LinkSpec] = []
        names: dict[str, str] = {}
        for node in probe.get("nodes", []):
            node_id = str(node["id"])
            node_name = str(node.get("name") or node_id)
            if node_name in names.values():
                node_name = f"{node_name}-{node_id[:6]}"
            names[node_id] = node_name
            for i, d in enumerate(node.get("devices", [])):
                if float(d.get("stream_gbs", 0)) <= 0 or float(d.get("matmul_tflops", 0)) <= 0:
                    continue
                dev_id = f"{node_name}/{d.get('index', i)}"
                devices.append(
                    DeviceSpec(
                        id=dev_id,
                        node=node_name,
                        name=str(d.get("name", d.get("kind", "device"))),
                        kind=str(d.get("kind", "cpu")),
                        mem_free_bytes=max(0, int(d["mem_free_bytes"]) - reserve_bytes),
                        stream_gbs=float(d["stream_gbs"]),
                        matmul_tflops=float(d["matmul_tflops"]),
                        per_layer_overhead_s=float(d.get("per_layer_overhead_s", 0.0)),
                        host=str(node.get("hostname") or ""),
                        cores=tuple(int(c) for c in node.get("cpu_cores") or ()),
                    )
                )
                p = d.get("pcie")
                if isinstance(p, Mapping) and p.get("h2d_gbs") and p.get("d2h_gbs"):
                    pcie[dev_id] = (float(p["h2d_gbs"]) * 1e9, float(p["d2h_gbs"]) * 1e9)
                    copy_latency[dev_id] = (
                        float(p.get("h2d_latency_us") or 0.0) * 1e-6,
                        float(p.get("d2h_latency_us") or 0.0) * 1e-6,
                    )
        measured: dict[tuple[str, str], tuple[float, float]] = {}
        for dl in probe.get("device_links", []):
            owner = names.get(str(dl["node"]))
            if owner is None:
                continue
            bw = float(dl.get("bandwidth_gbs") or 0.0) * 1e9
            measured[(f"{owner}/{dl['src']}", f"{owner}/{dl['dst']}")] = (
                max(0.0, float(dl["latency_us"]) * 1e-6),
                bw if bw > 0 else 10e9,
            )
        for lk in probe.get("links", []):
            src, dst = names.get(str(lk["src"])), names.get(str(lk["dst"]))
            if src is None or dst is None or src == dst:
                continue
            bw = float(lk.get("bandwidth_gbs") or 0.0) * 1e9
            links.append(
                LinkSpec(
                    src=src,
                    dst=dst,
                    latency_s=max(0.0, float(lk["latency_us"]) * 1e-6),
                    bandwidth_Bps=bw if bw > 0 else 10e9,
                    overhead_s=hop_overhead_s,
                )
            )
        by_node: dict[str, list[DeviceSpec]] = {}
        for d in devices:
            by_node.setdefault(d.node, []).append(d)
        for group in by_node.values():
            for a in group:
                for b in group:
                    if a.id == b.id:
                        continue
                    links.append(_intra_node_link(a.id, b.id, measured.get((a.id, b.id)),
                                                  pcie, copy_latency, hop_overhead_s))  # fmt: skip
        return Cluster(tuple(devices), tuple(links))


def _intra_node_link(
    a: str,
    b: str,
    hop: tuple[float, float] | None,
    pcie: Mapping[str, tuple[float, float]],
    copy_latency: Mapping[str, tuple[float, float]],
    overhead_s: float,
) -> LinkSpec:
    """Device a -> device b of one node: a's device -> host copy (GPUs), the hop between
    their processes through host memory as measured (`hop`: latency s, bytes/s), b's host ->
    device copy. Not measured (devices sharing one process): 20 us over PCIe, else 5 us and
    10 GB/s."""
    gpus = a in pcie and b in pcie
    if hop is None:
        if not gpus:
            return LinkSpec(a, b, 5e-6, 10e9, overhead_s, "host")
        bw = 1.0 / (1.0 / pcie[a][1] + 1.0 / pcie[b][0])
        return LinkSpec(a, b, 20e-6, bw, overhead_s, "pcie")
    latency, bw = hop
    if not gpus:
        return LinkSpec(a, b, latency, bw, overhead_s, "host")
    latency += copy_latency.get(a, (0.0, 0.0))[1] + copy_latency.get(b, (0.0, 0.0))[0]
    bw = 1.0 / (1.0 / pcie[a][1] + 1.0 / bw + 1.0 / pcie[b][0])  # staged through host memory
    return LinkSpec(a, b, latency, bw, overhead_s, "pcie")


# --------------------------------------------------------------------------------------------
# Workload and plan shapes


@dataclass(frozen=True)
class Workload:
    """What the plan must serve."""

    context: int = 4096  # tokens each request's KV cache is sized for
    prompt_tokens: int = 512  # prompt length for TTFT; decode is costed at this KV position
    concurrency: int = 1  # requests in flight (throughput objective)
    prefill_chunk: int = 512  # prompt tokens per prefill message
    sample_s: float = 1e-4  # sampling and token bookkeeping on the last stage
    pipelined_prefill: bool = True  # chunks overlap across stages (flow shop)
    # How the sampled token reaches stage 0 again. True: the last stage sends it straight
    # there (issue 9's ring), one hop when split, none for one stage. False: it goes back
    # through the coordinator, for every plan alike; that cost is then part of sample_s.
    ring_hop: bool = True

    def __post_init__(self) -> None:
        if self.context < 1 or self.prompt_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("context, prompt_tokens and prefill_chunk must be >= 1")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.prompt_tokens > self.context:
            raise ValueError(f"prompt ({self.prompt_tokens}) longer than context ({self.context})")


@dataclass(frozen=True)
class Placement:
    """Layers [start, end) on one device."""

    device: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad layer range [{self.start}, {self.end}) on {self.device}")


@dataclass(frozen=True)
class StageCost:
    """One stage's share of a decoded token."""

    device: str
    label: str
    start: int
    end: int
    weights_s: float  # streaming the stage's layer weights
    kv_s: float  # reading the KV cache at the decode position
    overhead_s: float  # per-layer fixed costs
    head_s: float  # last stage: final norm + lm_head + sampling

    @property
    def total_s(self) -> float:
        return self.weights_s + self.kv_s + self.overhead_s + self.head_s


@dataclass(frozen=True)
class HopCost:
    """One message between stages."""

    src: str
    dst: str
    kind: str
    latency_s: float
    transfer_s: float  # bytes / bandwidth
    overhead_s: float  # software per message

    @property
    def total_s(self) -> float:
        return self.latency_s + self.transfer_s + self.overhead_s


@dataclass(frozen=True)
class MemoryUse:
    """Peak memory of one stage on its device."""

    device: str
    label: str
    weights_bytes: int
    kv_bytes: int
    working_bytes: int
    free_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.free_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.free_bytes - self.total_bytes


@dataclass(frozen=True)
class PlanCost:
    """Everything the cost model predicts for one plan."""

    placements: tuple[Placement, ...]
    stages: tuple[StageCost, ...]
    hops: tuple[HopCost, ...]  # stage i -> i+1, then the ring-closing hop when split
    memory: tuple[MemoryUse, ...]
    prefill_stage_s: tuple[float, ...]  # each stage's prefill time for the whole prompt
    ttft_s: float
    concurrency: int
    bottleneck: str = field(default="")

    @property
    def token_s(self) -> float:
        return sum(s.total_s for s in self.stages) + sum(h.total_s for h in self.hops)

    @property
    def decode_tps(self) -> float:
        return 1.0 / self.token_s

    @property
    def slowest_stage_s(self) -> float:
        return max(s.total_s for s in self.stages)

    @property
    def throughput_tps(self) -> float:
        return throughput_at(self.token_s, self.slowest_stage_s, self.concurrency)

    def throughput_with(self, requests: int) -> float:
        """Aggregate tokens/s of this pipeline with `requests` in flight (0 for none)."""
        return throughput_at(self.token_s, self.slowest_stage_s, requests)

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.memory)

    @property
    def hops_s(self) -> float:
        return sum(h.total_s for h in self.hops)


# --------------------------------------------------------------------------------------------
# Primitives (the planner's tables are built from exactly these formulas)


def throughput_at(token_s: float, slowest_stage_s: float, requests: int) -> float:
    """Tokens/s of one pipeline with `requests` in flight: min(m / t_token, 1 / slowest
    stage), 0 with none. Each request then decodes at this / m tokens/s."""
    if requests <= 0:
        return 0.0
    return min(requests / token_s, 1.0 / slowest_stage_s)


def stage_weight_bytes(model: ModelSpec, start: int, end: int) -> int:
    """Weight bytes a stage holding layers [start, end) keeps in memory."""
    b = model.prefix_bytes[end] - model.prefix_bytes[start]
    first, last = start == 0, end == model.layers
    if first and last and model.tied_embeddings:
        return b + max(model.embed_bytes, model.head_bytes)
    return b + (model.embed_bytes if first else 0) + (model.head_bytes if last else 0)


def working_bytes(model: ModelSpec, workload: Workload, last: bool) -> int:
    """Activation buffers for one prefill chunk (fp32 worst case), plus the chunk's logits on
    the last stage."""
    chunk = min(workload.prefill_chunk, workload.prompt_tokens)
    act = chunk * (2 * model.hidden + 2 * model.intermediate) * 4
    return act + (chunk * model.vocab * 4 if last else 0)


def stage_memory(
    model: ModelSpec,
    device: DeviceSpec,
    start: int,
    end: int,
    workload: Workload,
    label: str = "",
) -> MemoryUse:
    """Weights + KV cache for `workload.context` tokens + working memory."""
    return MemoryUse(
        device=device.id,
        label=label or device.label,
        weights_bytes=stage_weight_bytes(model, start, end),
        kv_bytes=(end - start) * model.kv_bytes_per_token_layer * workload.context,
        working_bytes=working_bytes(model, workload, end == model.layers),
        free_bytes=device.mem_free_bytes,
    )


def stage_decode_cost(
    model: ModelSpec,
    device: DeviceSpec,
    start: int,
    end: int,
    workload: Workload,
    label: str = "",
) -> StageCost:
    """One decoded token's time on a stage, at KV position `workload.prompt_tokens`."""
    bw = device.stream_gbs * 1e9
    n = end - start
    layer_b = model.prefix_bytes[end] - model.prefix_bytes[start]
    kv_read = n * model.kv_bytes_per_token_layer * workload.prompt_tokens
    head_s = model.head_bytes / bw + workload.sample_s if end == model.layers else 0.0
    return StageCost(
        device=device.id,
        label=label or device.label,
        start=start,
        end=end,
        weights_s=layer_b / bw,
        kv_s=kv_read / bw,
        overhead_s=n * device.per_layer_overhead_s,
        head_s=head_s,
    )


def hop_cost(link: LinkSpec, nbytes: int, src: str = "", dst: str = "") -> HopCost:
    """One message of `nbytes` over a link."""
    return HopCost(
        src=src or link.src,
        dst=dst or link.dst,
        kind=link.kind,
        latency_s=link.latency_s,
        transfer_s=nbytes / link.bandwidth_Bps,
        overhead_s=link.overhead_s,
    )


def prefill_stage_s(
    model: ModelSpec, device: DeviceSpec, start: int, end: int, tokens: int, kv_before: int
) -> float:
    """One prefill chunk of `tokens` (after `kv_before` cached tokens) through a stage:
    max(compute, weight streaming) + per-layer overhead; the last stage adds lm_head for the
    final position."""
    n = end - start
    flops = 2.0 * model.layer_params * n * tokens
    # causal attention: QK^T and AV, each 2 x tokens x (kv_before + tokens/2) x heads x head_dim
    flops += 4.0 * tokens * (kv_before + tokens / 2) * model.heads * model.head_dim * n
    weights = model.prefix_bytes[end] - model.prefix_bytes[start]
    if end == model.layers:
        flops += 2.0 * model.vocab * model.hidden
        weights += model.head_bytes
    compute_s = flops / (device.matmul_tflops * 1e12)
    stream_s = weights / (device.stream_gbs * 1e9)
    return max(compute_s, stream_s) + n * device.per_layer_overhead_s


def _chunks(prompt: int, chunk: int) -> list[int]:
    sizes = [chunk] * (prompt // chunk)
    if prompt % chunk:
        sizes.append(prompt % chunk)
    return sizes


def _ttft(
    model: ModelSpec,
    cluster: Cluster,
    placements: Sequence[Placement],
    workload: Workload,
    links: Sequence[LinkSpec],
) -> tuple[float, tuple[float, ...]]:
    """Flow-shop completion time of the prompt's chunks through the stages, plus sampling."""
    chunks = _chunks(workload.prompt_tokens, workload.prefill_chunk)
    devs = [cluster.device(p.device) for p in placements]
    n = len(placements)
    done_prev_chunk = [0.0] * n  # finish time of the previous chunk on each stage
    per_stage = [0.0] * n
    kv = 0
    finish = 0.0
    for c in chunks:
        arrive = 0.0 if workload.pipelined_prefill else finish
        for i, (p, d) in enumerate(zip(placements, devs, strict=True)):
            t = prefill_stage_s(model, d, p.start, p.end, c, kv)
            per_stage[i] += t
            start = max(arrive, done_prev_chunk[i])
            done_prev_chunk[i] = start + t
            arrive = done_prev_chunk[i]
            if i < n - 1:
                arrive += hop_cost(links[i], c * model.hop_bytes_per_token).total_s
        finish = arrive
        kv += c
    return finish + workload.sample_s, tuple(per_stage)


# --------------------------------------------------------------------------------------------
# The whole plan


def predict(
    model: ModelSpec,
    cluster: Cluster,
    placements: Sequence[Placement],
    workload: Workload = Workload(),
) -> PlanCost:
    """Cost of running `model` with these stages (in pipeline order) on `cluster`."""
    if not placements:
        raise ValueError("a plan needs at least one stage")
    expected = 0
    for p in placements:
        if p.start != expected:
            raise ValueError(f"stages must cover [0, {model.layers}) contiguously")
        expected = p.end
    if expected != model.layers:
        raise ValueError(f"stages end at layer {expected}, model has {model.layers}")
    ids = [p.device for p in placements]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a device may hold only one stage: {ids}")

    stages: list[StageCost] = []
    memory: list[MemoryUse] = []
    for p in placements:
        d = cluster.device(p.device)
        label = cluster.label(d.id)
        stages.append(stage_decode_cost(model, d, p.start, p.end, workload, label))
        memory.append(stage_memory(model, d, p.start, p.end, workload, label))
    links = [cluster.link(a, b) for a, b in zip(ids, ids[1:], strict=False)]
    hops = [
        hop_cost(lk, model.hop_bytes_per_token, a, b)
        for lk, a, b in zip(links, ids, ids[1:], strict=False)
    ]
    if len(ids) > 1 and workload.ring_hop:
        ring = cluster.link(ids[-1], ids[0])
        hops.append(hop_cost(ring, TOKEN_ID_BYTES, ids[-1], ids[0]))
    ttft, prefill = _ttft(model, cluster, placements, workload, links)
    cost = PlanCost(
        placements=tuple(placements),
        stages=tuple(stages),
        hops=tuple(hops),
        memory=tuple(memory),
        prefill_stage_s=prefill,
        ttft_s=ttft,
        concurrency=workload.concurrency,
    )
    return replace(cost, bottleneck=describe_bottleneck(cost))


def describe_bottleneck(cost: PlanCost) -> str:
    """The largest share of a token, in words; with concurrency, the stage that caps throughput
    when it binds."""
    t = cost.token_s
    if cost.concurrency > 1 and len(cost.stages) > 1:
        slow_i = max(range(len(cost.stages)), key=lambda i: cost.stages[i].total_s)
        slow = cost.stages[slow_i]
        if 1.0 / slow.total_s < cost.concurrency / t:
            return (
                f"stage {slow_i + 1} on {slow.label} is the slowest stage "
                f"({slow.total_s * 1e3:.2f} ms per token): it caps throughput at "
                f"{1.0 / slow.total_s:.1f} tok/s with {cost.concurrency} requests in flight"
            )
    parts: list[tuple[float, str]] = []
    for i, s in enumerate(cost.stages):
        where = f"stage {i + 1} on {s.label}" if len(cost.stages) > 1 else s.label
        parts.append((s.weights_s + s.head_s, f"{where}: weight streaming"))
        parts.append((s.kv_s, f"{where}: KV-cache reads"))
        parts.append((s.overhead_s, f"{where}: per-layer overhead"))
    if cost.hops:
        n = len(cost.hops)
        lat = sum(h.latency_s + h.overhead_s for h in cost.hops)
        xfer = sum(h.transfer_s for h in cost.hops)
        parts.append((lat, f"{n} hops: latency and per-message overhead"))
        parts.append((xfer, f"{n} hops: activation transfer"))
    share, what = max(parts, key=lambda p: p[0])
    return f"{what} {100.0 * share / t:.0f}% of the token"


def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"
