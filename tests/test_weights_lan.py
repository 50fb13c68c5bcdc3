"""Shipping throughput on an unshaped namespace link (root only; see tests/lan.py).

The coordinator's seat (the hub namespace) measures its link to a node with the probe's echo
sweep (node/linkprobe.py; median of three sweeps), then ships a 512 MB model to that node as
one stage; each of five repeats gets a node with an empty cache. The median ratio must be at
least one half. Figures go to the test's output (`pytest -s`) and docs/weights.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import lan as lanlib
from tests.shipbench import synth_weights

lan_factory = lanlib.lan_factory
REPEATS = 5


@pytest.mark.netns
def test_shipping_reaches_half_the_measured_link_bandwidth(
    lan_factory: Any, tmp_path: Path
) -> None:
    lan = lan_factory(1)
    model = tmp_path / "model"
    synth_weights(model, layers=16, tensor_mib=8, per_layer=4)  # 512 MiB
    empty = lan.workdir / "empty"
    empty.mkdir()
    runs: list[dict[str, float]] = []
    for r in range(REPEATS):
        port = lanlib.NODE_PORT + r
        node = lan.start_node(0, f"ship{r}", port, extra_args=[
            "--model-dir", str(empty), "--cache-dir", str(lan.workdir / f"cache{r}")])  # fmt: skip
        lan.wait_ready([node])
        done = subprocess.run(
            lan.hub_cmd([sys.executable, "-m", "tests.shipbench", "--node", node.address,
                         "--model", str(model)]),  # fmt: skip
            capture_output=True,
            text=True,
            cwd=lanlib.REPO,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout))
        node.process.terminate()
        node.process.wait(10)
        assert runs[-1]["ship_bytes"] == 512 << 20
    for r in runs:
        print(
            f"link {r['link_gbs']:.3f} GB/s ({r['link_latency_us']:.0f} us), shipped "
            f"{r['ship_bytes'] / 1e6:.0f} MB at {r['ship_gbs']:.3f} GB/s: {r['ratio']:.2f}"
        )
    ratio = statistics.median(r["ratio"] for r in runs)
    assert ratio >= 0.5, f"median shipping / link bandwidth {ratio:.2f} < 0.5: {runs}"
