"""The command line as a user runs it: `coordinator run --json`, `demo`, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import reference_generate


def coordinator(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_json(local_cluster, tiny_llama: Path) -> None:
    nodes = [a for n in local_cluster.nodes[:2] for a in ("--node", n.address)]
    out = coordinator(
        "run",
        "--model",
        str(tiny_llama),
        "--prompt",
        "Hello there",
        "--max-tokens",
        "12",
        "--placement",
        "even",
        "--json",
        *nodes,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"text", "tokens", "ttft_s", "decode_tps", "plan"} <= result.keys()
    assert [s["layers"] for s in result["plan"]] == [[0, 4], [4, 8]]
    assert result["decode_tps"] > 0 and result["ttft_s"] > 0
    from mlx_lm.utils import load_tokenizer

    prompt = load_tokenizer(tiny_llama).encode("Hello there")
    ref, _ = reference_generate(tiny_llama, prompt, 12)
    assert result["tokens"] == ref[: len(result["tokens"])]


def test_clear_errors(tiny_llama: Path) -> None:
    out = coordinator("run", "--model", "/no/such/model", "--prompt", "x", "--wait", "0.5")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = coordinator(
        "run",
        "--model",
        str(tiny_llama),
        "--prompt",
        "x",
        "--wait",
        "0.5",
        "--cluster",
        "nobody-here",
    )
    assert out.returncode == 2 and "no nodes of cluster 'nobody-here'" in out.stderr
    out = coordinator(
        "run", "--model", str(tiny_llama), "--prompt", "x", "--node", "not-an-address"
    )
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


def test_demo_prints_text_and_speed(tiny_llama: Path) -> None:
    out = coordinator(
        "demo", "--nodes", "2", "--model", str(tiny_llama), "--max-tokens", "8", timeout=240
    )
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "TTFT" in out.stdout
    assert "[0, 4)" in out.stdout and "[4, 8)" in out.stdout
    assert "stopped every node" in out.stderr


def test_run_uses_the_planner_and_predicts(local_cluster, tiny_llama: Path) -> None:
    nodes = [a for n in local_cluster.nodes for a in ("--node", n.address)]
    out = coordinator(
        "run", "--model", str(tiny_llama), "--prompt", "Hi", "--max-tokens", "8", "--json", *nodes
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    layers = [s["layers"] for s in result["plan"]]
    assert layers[0][0] == 0 and layers[-1][1] == 8
    # Three equal CPU nodes on one host: splitting only adds hops, so one stage wins.
    assert len(layers) == 1, result["explanation"]
    assert result["predicted"]["decode_tps"] > 0


def test_plan_live_cluster_json(local_cluster, tiny_llama: Path) -> None:
    nodes = [a for n in local_cluster.nodes[:2] for a in ("--node", n.address)]
    out = coordinator("plan", "--model", str(tiny_llama), "--json", *nodes)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["fits"] is True
    assert result["predicted"]["decode_tps"] > 0
    assert result["plan"][0]["layers"][0] == 0 and result["plan"][-1]["layers"][1] == 8
