"""The command line as a user runs it: `coordinator run --json`, `demo`, and clear errors;
`cluster-node up`'s ports."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

from coordinator.lab.localcluster import LocalCluster
from coordinator.nodeclient import NodeClient
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


# ----- cluster-node up: the ports ------------------------------------------------------------


def node_up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.main", "up", "--host", "127.0.0.1", "--no-advertise", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def free_port_pair() -> int:
    """A port p with p and p + 1 both free just now."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two adjacent free ports")


def test_node_data_port_defaults_to_the_grpc_port_plus_one(session_dir: Path) -> None:
    port = free_port_pair()
    (session_dir / "logs").mkdir(parents=True, exist_ok=True)
    with LocalCluster(1, "dataport", log_dir=session_dir / "logs", name_prefix="dport",
                      extra_args=["--port", str(port), "--no-advertise"]) as cluster:  # fmt: skip
        (node,) = cluster.nodes

        async def info() -> int:
            async with NodeClient(node.address) as c:
                return int((await c.get_info()).data_port)

        assert node.address.endswith(f":{port}")
        assert asyncio.run(info()) == port + 1


def test_node_port_errors_name_the_data_port() -> None:
    port = free_port_pair()
    with socket.create_server(("127.0.0.1", port + 1)):  # the default data port is taken
        taken = node_up("--port", str(port))
    assert taken.returncode == 1
    assert "cannot bind the data path" in taken.stderr and "--data-port" in taken.stderr
    assert "gRPC port + 1" in taken.stderr
    bad = node_up("--port", "0", "--data-port", "70000")
    assert bad.returncode == 2 and "--data-port 70000 is not a TCP port" in bad.stderr
    top = node_up("--port", "65535")
    assert top.returncode == 2 and "by default, the gRPC port + 1" in top.stderr
    same = node_up("--port", str(port), "--data-port", str(port))
    assert same.returncode == 2 and "is the gRPC port" in same.stderr


def test_malformed_inputs_exit_2_naming_the_field(tiny_llama: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Model folders without a tokenizer or weights, a config.json field of the wrong type,
    a malformed --probe-json file and out-of-range flags: exit 2 and a message naming what
    is wrong, never a traceback. No node is needed: each is refused before discovery."""
    import shutil

    from coordinator.main import main

    def folder(name: str, drop: str = "", config: dict[str, object] | None = None) -> str:
        d = tmp_path / name
        shutil.copytree(tiny_llama, d)
        for f in d.glob(drop) if drop else ():
            f.unlink()
        if config is not None:
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, **config}))
        return str(d)

    probe = tmp_path / "probe.json"
    probe.write_text(
        json.dumps(
            {"nodes": [{"id": "a"}], "links": [{"src": "a", "dst": "b", "latency_us": "fast"}]}
        )
    )
    nowhere = ["--wait", "0.1", "--cluster", "nobody-here"]
    cases = [
        (["up", "--model", folder("no-tokenizer", "tokenizer*"), *nowhere], "has no tokenizer"),
        (["up", "--model", folder("no-weights", "*.safetensors"), *nowhere], "has no *.safetensors weights"),
        (["up", "--model", folder("bad-field", config={"hidden_size": "big"}), *nowhere],
         "hidden_size must be a positive whole number"),
        (["up", "--model", folder("bad-text", config={"text_config": 3}), *nowhere], "text_config must be an object"),
        (["up", "--model", str(tiny_llama), "--probe-json", str(probe), *nowhere], "links[0].latency_us must be a number"),
        (["up", "--model", str(tiny_llama), "--port", "70000", *nowhere], "--port must be from 0 to 65535"),
        (["up", "--model", str(tiny_llama), "--reprobe-debounce", "nan", *nowhere], "--reprobe-debounce"),
        (["up", "--model", str(tiny_llama), "--wait", "nan"], "--wait must be a number"),
        (["run", "--model", str(tiny_llama), "--prompt", "x", "--seed", "-1", *nowhere], "--seed"),
        (["run", "--model", str(tiny_llama), "--prompt", "x", "--temperature", "nan", *nowhere], "--temperature"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), (argv, err)
        assert "Traceback" not in err
