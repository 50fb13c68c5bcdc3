"""`make device-check`: one prepared run on a machine with NVIDIA GPUs that writes a JSON report
of what LayerLink does there (docs/hardware-runs.md holds the report format and how to run it).

Parts, in order, each timed and each ending "ok", "failed" (it ran and something was wrong:
`reason` says what) or "skipped" (it cannot run here: `reason` says why); a part that fails or
is skipped never stops the others, and the report is written in any case:

- nvml: NVML's inventory, per GPU: name, UUID, memory, PCIe link (current and maximum) and the
  link's theoretical rate. Read before any load, so an idle GPU may show a lowered link; the
  device bench reads it again per GPU right after that GPU's copies.
- nodes: `cluster-node up` once per GPU (CUDA_VISIBLE_DEVICES=<i>, each on its own ports; two
  nodes on GPU 0 when there is one GPU, so that a 2-stage pipeline has two nodes), and each
  node's GetInfo: backend, devices, per-device memory and its source.
- device_bench: MeasureDevices on one node per GPU (stream and matmul rates, PCIe copies).
- pipeline: a synthetic model (coordinator/lab/synth.py) as a 2-stage pipeline over two nodes,
  greedy, against mlx_lm in this process on the same device: the tokens must be equal.
- real_model: the bundled SmolLM2-135M GGUF (coordinator/bundled.py): its answer through a
  2-stage pipeline against mlx_lm's, then decode tokens/s of mlx_lm in this process and of
  LayerLink with 1 and 2 stages (coordinator/lab/bench.py's runners, medians over repeats).
- llama_cpp: llama.cpp (llama-cpp-python) on the same GGUF with every layer on the GPU, in a
  child process; skipped where llama-cpp-python has no GPU offload (a CPU build).

Without --dry-run the MLX parts need MLX's CUDA backend and are skipped without it (the
report says so). --dry-run runs every part on whatever MLX drives here (the CPU on a build
machine), with small sizes, and lets llama.cpp run on the CPU: it exercises the whole script
where there is no GPU, so that it cannot rot (tests/test_devicecheck.py).

The run keeps to a time budget (default 450 s, inside the 8 minutes a device call allows): a
part that would start with too little time left is skipped and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from coordinator import console

log = logging.getLogger(__name__)

SCHEMA = "layerlink.device-check/1"
REPORT_FILE = "device-check.json"
LOG_FILE = "nodes.log"
DEFAULT_BUDGET_S = 450.0
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
QUESTION = "What is the capital of France?"


class PartSkipped(Exception):
    """This part cannot run here; the message says why."""


class PartFailed(Exception):
    """This part ran and found something wrong; the message says what."""


@dataclass(frozen=True)
class Sizes:
    """How much work each part does: full on a GPU machine, small in a dry run."""

    bench_dtypes: tuple[str, ...]
    bench_buffer_bytes: int
    pipeline_tokens: int
    gen_tokens: int
    repeats: int
    # The real model's timed runs prefill the question's first N tokens (None: all of it).
    # A dry run only shows that they run: a CPU prefills at about the decode rate.
    timed_prompt_tokens: int | None = None

    @staticmethod
    def for_run(dry_run: bool) -> Sizes:
        if dry_run:
            return Sizes(("float32",), 16 << 20, 8, 8, 1, timed_prompt_tokens=8)
        return Sizes(("float16", "q4"), 256 << 20, 24, 128, 3)


@dataclass
class Check:
    out: Path
    dry_run: bool
    budget_s: float
    sizes: Sizes
    started: float = field(default_factory=time.monotonic)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[Any] = field(default_factory=list)  # LocalNode, with .gpu set below
    node_gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES of each node
    backend: str | None = None

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def part(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float) -> None:
        """Run one part; record its status, reason, seconds and data."""
        t0 = time.monotonic()
        entry: dict[str, Any] = {"status": OK, "reason": ""}
        if self.left_s() < need_s:
            entry = {"status": SKIPPED, "reason": f"out of time: {self.left_s():.0f} s left of "
                     f"the {self.budget_s:.0f} s budget, this part needs about {need_s:.0f} s"}  # fmt: skip
        else:
            try:
                entry.update(fn())
            except PartSkipped as e:
                entry = {"status": SKIPPED, "reason": str(e)}
            except PartFailed as e:
                entry = {"status": FAILED, "reason": str(e)}
            except Exception as e:  # a part's bug must not cost the report
                log.exception("part %s", name)
                entry = {"status": FAILED, "reason": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.monotonic() - t0, 2)
        self.parts[name] = entry
        log.info("%s: %s %s", name, entry["status"], entry.get("reason", ""))

    def need_mlx_gpu(self) -> None:
        """The MLX parts run on the GPU (or anywhere in a dry run)."""
        if self.backend is None:
            raise PartSkipped("MLX is not installed here (docs/hardware-runs.md: the wheels)")
        if not self.dry_run and self.backend != "cuda":
            raise PartSkipped(f"MLX has no CUDA backend here (its backend is {self.backend})")

    def need_nodes(self, count: int) -> None:
        self.need_mlx_gpu()
        if len(self.nodes) < count:
            raise PartSkipped(f"needs {count} running node(s); the nodes part started "
                              f"{len(self.nodes)}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mlx_backend() -> tuple[str | None, str]:
    if importlib.util.find_spec("mlx") is None:
        return None, "mlx is not installed"
    try:
        from node.hardware import mlx_backend

        return mlx_backend(), ""
    except (ImportError, OSError, RuntimeError) as e:  # a broken CUDA library, say
        return None, f"MLX does not load: {e}"


def machine(backend: str | None, why: str) -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mlx_backend": backend,
        "mlx_note": why,
        "versions": {d: _version(d) for d in ("mlx", "mlx-cuda-13", "mlx-cuda-12", "mlx-cpu",
                                              "mlx-lm", "nvidia-ml-py", "llama_cpp_python")},
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Parts


def nvml_part() -> dict[str, Any]:
    from node import nvml

    gpus, status = nvml.read_gpus()
    if not gpus:
        raise PartSkipped(status or "NVML lists no GPU")
    return {
        "note": status,
        "gpus": [
            {"index": g.index, "name": g.name, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id,
             "mem_total_bytes": g.mem_total_bytes, "mem_free_bytes": g.mem_free_bytes,
             "pcie": {"gen": g.pcie_gen, "width": g.pcie_width, "max_gen": g.pcie_max_gen,
                      "max_width": g.pcie_max_width,
                      "theoretical_gbs": round(g.pcie_theoretical_gbs, 3)}}
            for g in gpus
        ],
    }  # fmt: skip


def _message_json(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    out: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True)
    return out


def _gpu_plan(check: Check) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each node: one per GPU, two on GPU 0 when there is one; in a
    dry run without CUDA, two nodes on whatever MLX drives (no CUDA_VISIBLE_DEVICES)."""
    if check.backend != "cuda":
        return ["", ""]
    import mlx.core as mx

    count = int(mx.device_count(mx.gpu))
    if count == 0:
        raise PartFailed("MLX's CUDA backend lists no GPU")
    return [str(i) for i in range(count)] if count > 1 else ["0", "0"]


def nodes_part(check: Check, stack: contextlib.ExitStack, scratch: Path) -> dict[str, Any]:
    check.need_mlx_gpu()
    from coordinator.lab.localcluster import LocalCluster
    from coordinator.nodeclient import NodeClient

    cluster = f"devcheck{os.getpid()}"
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _gpu_plan(check)
    lc = LocalCluster(0, cluster, log_dir=logs, cpu_policy="none")
    stack.callback(lc.stop)
    names = [f"gpu{gpu}-n{k}" if gpu else f"n{k}" for k, gpu in enumerate(gpus)]
    envs = [{"CUDA_VISIBLE_DEVICES": gpu} if gpu else {} for gpu in gpus]
    check.nodes.extend(lc.start_nodes(names, timeout=120.0, envs=envs))
    check.node_gpus.extend(gpus)

    async def infos() -> list[Any]:
        out = []
        for n in check.nodes:
            async with NodeClient(n.address) as c:
                out.append(await c.get_info(timeout=30.0))
        return out

    got = asyncio.run(infos())
    nodes = [
        {"name": n.name, "address": n.address, "cuda_visible_devices": gpu or None,
         "info": _message_json(i)}
        for n, gpu, i in zip(check.nodes, check.node_gpus, got, strict=True)
    ]  # fmt: skip
    wrong = [n.name for n, i in zip(check.nodes, got, strict=True) if i.backend != check.backend]
    if wrong:
        raise PartFailed(f"node(s) {', '.join(wrong)} run MLX's {got[0].backend} backend, "
                         f"this process {check.backend}: {json.dumps(nodes)[:2000]}")  # fmt: skip
    return {"nodes": nodes}


def bench_part(check: Check) -> dict[str, Any]:
    check.need_nodes(1)
    from coordinator.nodeclient import NodeClient

    seen: set[str] = set()
    targets = []
    for n, gpu in zip(check.nodes, check.node_gpus, strict=True):
        if gpu not in seen:  # one bench per GPU: two nodes on one GPU would time each other
            seen.add(gpu)
            targets.append(n)

    async def run() -> list[dict[str, Any]]:
        out = []
        for n in targets:
            async with NodeClient(n.address) as c:
                reply = await c.measure_devices(list(check.sizes.bench_dtypes),
                                                check.sizes.bench_buffer_bytes, timeout=180.0)  # fmt: skip
            out.append({"node": n.name, "reply": _message_json(reply)})
        return out

    return {"dtypes": list(check.sizes.bench_dtypes),
            "buffer_bytes": check.sizes.bench_buffer_bytes, "nodes": asyncio.run(run())}  # fmt: skip


def _reference_tokens(model_path: Path, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    """mlx_lm's greedy tokens in this process, on MLX's default device, with the weights in
    the dtype a node on this machine computes in (node/computedtype.py)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from node.computedtype import cast_for_compute

    model = load(str(model_path))[0]
    cast_for_compute(model)
    out: list[int] = []
    steps = generate_step(mx.array(prompt), model, max_tokens=n,
                          sampler=lambda x: mx.argmax(x, axis=-1))  # fmt: skip
    for tok, _lp in steps:
        out.append(int(tok))
        if out[-1] in stops:
            break
    return out


def _pipeline_tokens(
    model: Any, nodes: list[Any], prompts: list[list[int]], n: int, stops: set[int]
) -> list[list[int]]:
    """Greedy tokens of each prompt through a pipeline with one stage per node (even split)."""
    from coordinator.pipeline import GenerationParams, Pipeline
    from coordinator.plan import Plan, Stage
    from coordinator.session import even_counts

    counts = even_counts(model.num_layers, len(nodes))
    stages, start = [], 0
    for node, c in zip(nodes, counts, strict=True):
        stages.append(Stage(node.node_id, node.name, node.address, start, start + c))
        start += c
    plan = Plan(model=model.name, num_layers=model.num_layers, stages=tuple(stages),
                explanation=f"device check split {counts}")  # fmt: skip
    params = GenerationParams(max_tokens=n, stop_token_ids=frozenset(stops))

    async def run() -> list[list[int]]:
        pipeline = Pipeline(plan, str(model.path))
        await pipeline.load()
        await pipeline.open()
        try:
            return [list((await pipeline.generate(p, params)).tokens) for p in prompts]
        finally:
            await asyncio.wait_for(pipeline.close(), 30.0)

    return asyncio.run(run())


def _compare(got: list[int], want: list[int]) -> dict[str, Any]:
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if first is None and len(got) != len(want):
        first = min(len(got), len(want))
    return {"equal": first is None, "first_difference": first, "tokens": got, "mlx_lm": want}


def pipeline_part(check: Check, scratch: Path) -> dict[str, Any]:
    check.need_nodes(2)
    from coordinator.lab.bench import prompt_ids
    from coordinator.lab.synth import synthesize
    from coordinator.session import read_model

    path = synthesize(scratch / "models" / "tiny-llama", preset="tiny", arch="llama", seed=0)
    model = read_model(path)
    prompts = [prompt_ids(model.vocab_size, 12, seed=s) for s in range(3)]
    n = check.sizes.pipeline_tokens
    got = _pipeline_tokens(model, check.nodes[:2], prompts, n, set())
    runs = [_compare(g, _reference_tokens(model.path, p, n, set()))
            for g, p in zip(got, prompts, strict=True)]  # fmt: skip
    result = {"model": "synthetic tiny llama (seed 0)", "stages": 2,
              "nodes": [n.name for n in check.nodes[:2]], "prompts": runs}  # fmt: skip
    if not all(r["equal"] for r in runs):
        raise PartFailed(f"2-stage tokens differ from mlx_lm's: {json.dumps(runs)}")
    return result


def real_model_part(check: Check) -> dict[str, Any]:
    check.need_nodes(2)
    from coordinator.bundled import INSTALL_HINT, smollm2_gguf
    from coordinator.lab import bench
    from coordinator.session import answer_text, encode_prompt, load_tokenizer, read_model

    gguf = smollm2_gguf()
    if gguf is None:
        raise PartSkipped(f"the bundled GGUF is not installed ({INSTALL_HINT})")
    model = read_model(gguf)
    tokenizer = load_tokenizer(model)
    prompt = encode_prompt(tokenizer, QUESTION, chat=True)
    stops = set(tokenizer.eos_token_ids)
    (got,) = _pipeline_tokens(model, check.nodes[:2], [prompt], 24, stops)
    answer = _compare(got, _reference_tokens(model.path, prompt, 24, stops))
    answer["text"] = answer_text(tokenizer, got)
    sizes = check.sizes
    timed = prompt[: sizes.timed_prompt_tokens]  # [:None]: the whole prompt
    name = gguf.name
    refs = [bench.NodeRef(n.name, n.address, n.node_id) for n in check.nodes[:2]]
    half = model.num_layers // 2
    runners: list[Any] = [
        bench.MlxLmRunner(bench.RunSpec(name, bench.SYSTEM_MLX_LM, bench.DEPLOY_IN_PROCESS, 1,
                                        (model.num_layers,)), model.path, timed, sizes.gen_tokens),
        bench.LayerLinkRunner(bench.RunSpec(name, bench.SYSTEM_LAYERLINK, bench.DEPLOY_LOOPBACK,
                                            1, (model.num_layers,)), model, refs[:1], timed,
                              sizes.gen_tokens),
        bench.LayerLinkRunner(bench.RunSpec(name, bench.SYSTEM_LAYERLINK, bench.DEPLOY_LOOPBACK,
                                            2, (half, model.num_layers - half)), model, refs,
                              timed, sizes.gen_tokens),
    ]  # fmt: skip
    results = asyncio.run(bench.measure(runners, sizes.repeats))
    out = {"gguf": str(gguf), "question": QUESTION, "answer": answer,
           "gen_tokens": sizes.gen_tokens, "repeats": sizes.repeats,
           "runs": [r.to_json() for r in results]}  # fmt: skip
    problems = [f"{r.spec.label}: {r.error}" for r in results if not r.ok]
    if not answer["equal"]:
        problems.append("the 2-stage answer differs from mlx_lm's")
    if "Paris" not in answer["text"]:
        problems.append(f"the answer does not say Paris: {answer['text']!r}")
    if problems:
        raise PartFailed("; ".join(problems) + f" ({json.dumps(out)[:4000]})")
    return out


def llama_part(check: Check, timeout_s: float) -> dict[str, Any]:
    from coordinator.bundled import INSTALL_HINT, smollm2_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        raise PartSkipped("llama-cpp-python is not installed")
    gguf = smollm2_gguf()
    if gguf is None:
        raise PartSkipped(f"the bundled GGUF is not installed ({INSTALL_HINT})")
    request = {"gguf": str(gguf), "question": QUESTION, "gen_tokens": check.sizes.gen_tokens,
               "repeats": check.sizes.repeats, "require_gpu": not check.dry_run}  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-m", "coordinator.lab.devicecheck", "--llama-child"],
            input=json.dumps(request), capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PartFailed(f"llama.cpp did not finish within {timeout_s:.0f} s") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise PartFailed(f"llama.cpp child exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result.get("skipped"):
        raise PartSkipped(str(result["skipped"]))
    return result


def _llama_child() -> int:
    """In a child process (a crash in llama.cpp costs only this part): greedy decode of the
    bundled GGUF with every layer offloaded where the build can offload."""
    import statistics

    import llama_cpp

    req = json.loads(sys.stdin.read())
    # llama_supports_gpu_offload() is true for any build with the RPC backend: the CUDA
    # backend's library is the sign of a CUDA build.
    lib = Path(llama_cpp.__file__).parent / "lib"
    gpu = lib.is_dir() and any("ggml-cuda" in p.name for p in lib.iterdir())
    if req["require_gpu"] and not gpu:
        _answer_parent({"skipped": "llama-cpp-python here is a CPU build (no libggml-cuda); "
                        "docs/hardware-runs.md says how to bring a CUDA build"})  # fmt: skip
        return 0
    llm = llama_cpp.Llama(model_path=req["gguf"], n_gpu_layers=-1 if gpu else 0, n_ctx=1024,
                          seed=0, verbose=False)  # fmt: skip
    # SmolLM2's chat turn (ChatML), for a prompt like the MLX parts' (timing only).
    turn = f"<|im_start|>user\n{req['question']}<|im_end|>\n<|im_start|>assistant\n"
    prompt = llm.tokenize(turn.encode(), add_bos=False, special=True)

    def generate(n: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        t_first = t_end = t0
        toks: list[int] = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            toks.append(int(tok))
            t_end = time.perf_counter()
            if len(toks) == 1:
                t_first = t_end
            if len(toks) >= n:
                break
        return toks, t_first - t0, t_end - t_first

    generate(8)  # warm-up, not counted
    samples = [generate(req["gen_tokens"]) for _ in range(req["repeats"])]
    ms = statistics.median(d / max(1, len(t) - 1) * 1e3 for t, _, d in samples)
    _answer_parent({
        "gguf": req["gguf"], "cuda_build": gpu, "n_gpu_layers": -1 if gpu else 0,
        "prompt_tokens": len(prompt), "gen_tokens": req["gen_tokens"], "repeats": len(samples),
        "ms_per_token": round(ms, 4), "decode_tps": round(1e3 / ms, 2) if ms else None,
        "ttft_s": round(statistics.median(f for _, f, _ in samples), 5),
        "tokens": samples[0][0][:24],
    })  # fmt: skip
    return 0


def _answer_parent(result: dict[str, Any]) -> None:
    """The llama.cpp child's one JSON line on stdout: the channel its parent reads."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="layerlink-devcheck-") as d:
        yield Path(d)


def run(out: Path, dry_run: bool, budget_s: float = DEFAULT_BUDGET_S) -> dict[str, Any]:
    """Every part, then the report at out/device-check.json (and the nodes' logs beside it)."""
    out.mkdir(parents=True, exist_ok=True)
    backend, why = _mlx_backend()
    check = Check(out, dry_run, budget_s, Sizes.for_run(dry_run), backend=backend)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with _scratch() as scratch, contextlib.ExitStack() as stack:
        check.part("nvml", nvml_part, 1)
        check.part("nodes", lambda: nodes_part(check, stack, scratch), 30)
        check.part("device_bench", lambda: bench_part(check), 30)
        check.part("pipeline", lambda: pipeline_part(check, scratch), 30)
        check.part("real_model", lambda: real_model_part(check), 60)
        stack.close()  # the nodes go before llama.cpp takes the GPU
        check.part("llama_cpp", lambda: llama_part(check, max(30.0, check.left_s())), 30)
        _collect_logs(scratch / "logs", out / LOG_FILE)
    report = {
        "schema": SCHEMA,
        "dry_run": dry_run,
        "started": started,
        "seconds": round(time.monotonic() - check.started, 2),
        "budget_s": budget_s,
        "machine": machine(backend, why),
        "parts": check.parts,
        "summary": {
            s: sorted(k for k, v in check.parts.items() if v["status"] == s)
            for s in (OK, FAILED, SKIPPED)
        },  # fmt: skip
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _collect_logs(folder: Path, dest: Path) -> None:
    """The nodes' logs in one file (a device call returns few files)."""
    if not folder.is_dir():
        return
    with dest.open("w") as f:
        for p in sorted(folder.glob("*.log")):
            f.write(f"===== {p.name}\n{p.read_text(errors='replace')}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coordinator.lab.devicecheck",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    ap.add_argument("--out", type=Path, help="folder for device-check.json and nodes.log")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every part on whatever MLX drives here, small sizes, no GPU needed")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"time budget of the whole run (default {DEFAULT_BUDGET_S:.0f} s)")  # fmt: skip
    ap.add_argument("--llama-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llama_child:
        return _llama_child()
    if args.out is None:
        ap.error("--out is required")
    if args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(args.out, args.dry_run, args.budget_s)
    summary = report["summary"]
    console.info(
        f"device check: ok {summary[OK]}, failed {summary[FAILED]}, "
        f"skipped {summary[SKIPPED]} -> {args.out / REPORT_FILE}"
    )
    return 1 if summary[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
