"""The MLX stage engine: layers [start, end) of a model, with a KV cache per request.

A stage keeps only its own layers' weights in memory (plus the embedding on the first stage
and norm + head on the last). The model tree is built lazily by mlx-lm and pruned before any
weight is evaluated, so other layers' tensors are never read from disk.

Not thread-safe: every method runs on the node's one compute thread.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from node import computedtype
from node.architectures import shape_error, unsupported_reason

if TYPE_CHECKING:
    from node.weightcache import CachedStage

log = logging.getLogger(__name__)

MAX_CHUNK_TOKENS = 8192
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Requests with a KV cache on one stage at once (each holds memory until released or idle).
MAX_REQUESTS = 1024


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class StageError(Exception):
    """A request the stage refuses; `kind` maps to a gRPC status code."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StageSpec:
    plan_id: str
    model_path: Path
    start: int  # first layer held
    end: int  # one past the last layer held
    stage_index: int
    stage_count: int
    next_address: str = ""
    # Load the shipped tensors in the node's weight cache (model_path is their stage folder).
    cached: CachedStage | None = None

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return not self.next_address


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class RequestState:
    """Per-request state on one stage (mutable, owned by the compute thread)."""

    cache: list[Any]
    sampling: Sampling
    key: mx.array | None
    offset: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # Look-ahead (single-stage ring): the next step's token and logits, already computed
    # lazily from this step's unevaluated token, and the position they belong to.
    ahead: tuple[mx.array, mx.array] | None = None
    ahead_position: int = -1


@dataclass(frozen=True)
class DecodeItem:
    """One request's decode step (one token) in a batch."""

    request_id: str
    position: int
    sampling: Sampling
    token: int | None  # first stage
    hidden: mx.array | None  # (1, 1, hidden) on later stages
    want_logits: bool = False


MAX_BATCH = 16


class _RowsCache:
    """One layer's KV caches of several requests seen as one batch for a decode step.

    Each row's new key and value go into that request's own cache; attention reads the rows
    left-padded to the longest (the step's mask hides the padding) and RoPE rotates each row
    at its own position (`offset` holds one per row)."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches
        self.offset = mx.array([c.offset for c in caches])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        rows = [
            c.update_and_fetch(keys[i : i + 1], values[i : i + 1])
            for i, c in enumerate(self.caches)
        ]
        longest = max(k.shape[2] for k, _ in rows)

        def padded(a: mx.array) -> mx.array:
            n = longest - a.shape[2]
            return a if n == 0 else mx.pad(a, [(0, 0), (0, 0), (n, 0), (0, 0)])

        return (
            mx.concatenate([padded(k) for k, _ in rows]),
            mx.concatenate([padded(v) for _, v in rows]),
        )


@dataclass(frozen=True)
class StepResult:
    """What one step produced: hidden states for the next stage, or a sampled token."""

    hidden: mx.array | None = None  # (1, T, hidden)
    token: int = -1
    logits: mx.array | None = None  # (vocab,)
    compute_seconds: float = 0.0


def read_model_config(model_path: Path) -> dict[str, Any]:
    from mlx_lm.utils import load_config

    if not model_path.is_dir():
        raise StageError(
            ErrorKind.NOT_FOUND, f"model folder {model_path} does not exist on this node"
        )
    if not (model_path / "config.json").is_file():
        raise StageError(
            ErrorKind.NOT_FOUND, f"{model_path} has no config.json: not a model folder"
        )
    cfg_path = model_path / "config.json"
    try:
        config = load_config(model_path)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise StageError(
            ErrorKind.FAILED_PRECONDITION, f"{cfg_path} on this node is not valid JSON: {e}"
        ) from None
    except (OSError, TypeError, AttributeError) as e:
        raise StageError(
            ErrorKind.FAILED_PRECONDITION, f"cannot read {cfg_path} on this node: {e}"
        ) from None
    if not isinstance(config, dict):
        raise StageError(
            ErrorKind.FAILED_PRECONDITION, f"{cfg_path} on this node does not hold a JSON object"
        )
    if not isinstance(config.get("model_type", ""), str):
        raise StageError(ErrorKind.FAILED_PRECONDITION, f"{cfg_path}: model_type is not a string")
    problem = shape_error(config)
    if problem is not None:
        raise StageError(ErrorKind.FAILED_PRECONDITION, f"{cfg_path}: {problem}")
    return config


def num_layers_of(config: dict[str, Any]) -> int:
    n = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    if not isinstance(n, int) or n <= 0:
        raise StageError(ErrorKind.FAILED_PRECONDITION, "config.json has no num_hidden_layers")
    return n


class ModelStage:
    """Layers [start, end) of one model, ready to run requests."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        config = read_model_config(spec.model_path)
        n = num_layers_of(config)
        if not (0 <= spec.start < spec.end <= n):
            raise StageError(
                ErrorKind.INVALID_ARGUMENT,
                f"layer range [{spec.start}, {spec.end}) is outside the model's {n} layers "
                f"(valid: 0 <= start < end <= {n})",
            )
        reason = unsupported_reason(config)
        if reason is not None:
            raise StageError(ErrorKind.FAILED_PRECONDITION, reason)
        self.num_layers = n
        self.config = config
        t0 = time.perf_counter()
        self._build(spec, config)
        self.load_seconds = time.perf_counter() - t0
        self.requests: dict[str, RequestState] = {}
        self._batchable: bool | None = None
        log.info(
            "loaded %s layers [%d, %d) (%.1f MB) in %.2fs",
            spec.model_path.name,
            spec.start,
            spec.end,
            self.weight_bytes / 1e6,
            self.load_seconds,
        )

    def _build(self, spec: StageSpec, config: dict[str, Any]) -> None:
        from mlx_lm.utils import load_model

        provided: dict[int, Any] | None = None
        if spec.cached is not None:
            from node.cachedload import build_model

            try:
                model, provided = build_model(spec.cached)
            except (ValueError, OSError, RuntimeError) as e:
                raise StageError(
                    ErrorKind.FAILED_PRECONDITION, f"cannot build the shipped stage: {e}"
                ) from None
        else:
            try:
                model, _ = load_model(spec.model_path, lazy=True, strict=True)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
                # A model folder with no or corrupt safetensors, or a config.json whose
                # fields do not describe its weights.
                raise StageError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"cannot load the model in {spec.model_path} on this node: "
                    f"{type(e).__name__}: {e}",
                ) from None
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
            raise StageError(
                ErrorKind.FAILED_PRECONDITION,
                f"model type {config.get('model_type')!r} has no plain layer stack LayerLink can split",
            )
        tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
        self.layers: list[Any] = list(inner.layers[spec.start : spec.end])
        self.embed: Any = inner.embed_tokens if spec.first or (spec.last and tied) else None
        self.norm: Any = inner.norm if spec.last else None
        self.head: Any = None
        if spec.last:
            self.head = inner.embed_tokens if tied else model.lm_head
        self._tied = tied
        self._make_cache = getattr(model, "make_cache", None)
        # Only the kept modules' parameters are evaluated (read from disk); the rest of the
        # lazily built tree is dropped with `model` without ever being materialized.
        kept: list[Any] = [*self.layers]
        for m in (self.embed, self.norm, self.head):
            if m is not None:
                kept.append(m)
        if provided is not None:
            # The tree was loaded non-strictly: every kept parameter must be a shipped tensor.
            absent = [n for m in kept for n, v in _flatten(m.parameters()) if id(v) not in provided]
            if absent:
                raise StageError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"the shipped stage lacks {len(absent)} tensors it needs, e.g. {absent[:3]}",
                )
        # The CPU backend computes half-precision weights as float32 (node/computedtype.py).
        rule = computedtype.policy()
        for m in kept:
            computedtype.cast_for_compute(m, rule)
        params = [m.parameters() for m in kept]
        try:
            mx.eval(params)  # the weights are read from disk here
        except (OSError, ValueError, RuntimeError) as e:
            raise StageError(
                ErrorKind.FAILED_PRECONDITION,
                f"cannot read the weights of {spec.model_path} on this node: {e}",
            ) from None
        self.weight_bytes = sum(int(v.nbytes) for m in kept for _, v in _flatten(m.parameters()))
        self.hidden_size = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.dtype = self._activation_dtype(kept)
        self._all_cache_len = len(model.layers)
        # Measured on MLX's CPU backend only (docs/performance.md); GPUs keep one
        # evaluation per step until a device run says otherwise.
        self._eval_each_layer = mx.default_device().type == mx.DeviceType.cpu
        del model, inner

    @staticmethod
    def _activation_dtype(mods: list[Any]) -> mx.Dtype:
        for m in mods:
            for name, v in _flatten(m.parameters()):
                if v.dtype in FLOAT_DTYPES and not name.endswith(("scales", "biases")):
                    return v.dtype
        return mx.float32

    # ----- requests -------------------------------------------------------------------------

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache

        if self._make_cache is None:
            return [KVCache() for _ in self.layers]
        full = self._make_cache()
        return list(full[self.spec.start : self.spec.end])

    def begin(self, request_id: str, sampling: Sampling) -> RequestState:
        if len(self.requests) >= MAX_REQUESTS:
            raise StageError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"stage {self.spec.stage_index} already holds {MAX_REQUESTS} requests' KV "
                "caches; release some first",
            )
        key = mx.random.key(sampling.seed) if sampling.seed is not None else None
        state = RequestState(cache=self._new_cache(), sampling=sampling, key=key)
        self.requests[request_id] = state
        return state

    def state_for(
        self, request_id: str, position: int, prefill: bool, sampling: Sampling
    ) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            if prefill and position == 0:
                return self.begin(request_id, sampling)
            raise StageError(
                ErrorKind.NOT_FOUND,
                f"unknown request id {request_id!r} on stage {self.spec.stage_index} "
                "(never started here, already finished, or expired)",
            )
        if position != state.offset:
            raise StageError(
                ErrorKind.FAILED_PRECONDITION,
                f"request {request_id!r} is at position {state.offset} on this stage, "
                f"the message says {position}",
            )
        return state

    def release(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def expire(self, idle_seconds: float) -> list[str]:
        now = time.monotonic()
        gone = [r for r, s in self.requests.items() if now - s.last_used > idle_seconds]
        for r in gone:
            del self.requests[r]
        return gone

    def step(
        self,
        request_id: str,
        position: int,
        prefill: bool,
        sampling: Sampling,
        tokens: list[int] | None,
        hidden: mx.array | None,
        sample: bool,
        want_logits: bool,
        lookahead: bool = False,
    ) -> StepResult:
        """Run this stage's layers on one chunk (prefill) or one token (decode).

        `lookahead` (a stage that is the whole pipeline, in ring mode, with more tokens to
        come): build the next step from this step's still-unevaluated token and start
        evaluating it before reading this token back, as mlx_lm's generate loop does, so
        graph building overlaps computation and no host round trip sits between tokens."""
        t0 = time.perf_counter()
        n_new = self._check_input(tokens, hidden)
        if not prefill and n_new != 1:
            raise StageError(
                ErrorKind.INVALID_ARGUMENT, f"a decode step carries one token, got {n_new}"
            )
        state = self.state_for(request_id, position, prefill, sampling)
        state.last_used = time.monotonic()
        if state.ahead is not None:
            ahead, state.ahead = state.ahead, None
            if not prefill and position == state.ahead_position:
                state.offset += n_new
                return self._emit(ahead[0], ahead[1], state, want_logits, lookahead, t0)
            # Never used (the request changed course): the cache holds one extra position.
            raise StageError(
                ErrorKind.FAILED_PRECONDITION,
                f"request {request_id!r} left ring mode after a look-ahead step",
            )

        if self.spec.first:
            assert self.embed is not None and tokens is not None
            h = self.embed(mx.array(tokens, dtype=mx.int32)[None])  # (1, T, H)
        else:
            assert hidden is not None
            h = hidden
        h = self.run_layers(h, state.cache)
        state.offset += n_new
        if not self.spec.last:
            mx.eval(h)
            return StepResult(hidden=h, compute_seconds=time.perf_counter() - t0)
        if not sample:
            mx.eval([c.state for c in state.cache if c.state])
            return StepResult(compute_seconds=time.perf_counter() - t0)
        logits = self.logits(h[:, -1:, :])[0, -1]  # (vocab,)
        token = self.sample(logits, state)
        if lookahead and self.spec.first:
            return self._emit(token, logits, state, want_logits, lookahead, t0)
        if want_logits:
            mx.eval(token, logits)
            out_logits: mx.array | None = logits.astype(mx.float32)
        else:
            mx.eval(token)
            out_logits = None
        return StepResult(
            token=int(token.item()),  # type: ignore[arg-type]
            logits=out_logits,
            compute_seconds=time.perf_counter() - t0,
        )

    def _check_input(self, tokens: list[int] | None, hidden: mx.array | None) -> int:
        """The number of new positions the input carries; raises StageError if malformed."""
        if self.spec.first:
            if not tokens:
                raise StageError(ErrorKind.INVALID_ARGUMENT, "the first stage needs token ids")
            if len(tokens) > MAX_CHUNK_TOKENS:
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"chunk of {len(tokens)} tokens exceeds {MAX_CHUNK_TOKENS}",
                )
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})",
                )
            return len(tokens)
        if hidden is None:
            raise StageError(
                ErrorKind.INVALID_ARGUMENT,
                f"stage {self.spec.stage_index} needs hidden states, got none",
            )
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
            raise StageError(
                ErrorKind.INVALID_ARGUMENT,
                f"hidden states of shape {list(hidden.shape)}; expected [1, T, {self.hidden_size}]",
            )
        # Activations arrive in the dtype the previous stage produced (a mixed-dtype model's
        # float32 norms promote them; a GPU stage may send float16 to a CPU one), exactly as
        # they would flow inside one process.
        if hidden.dtype not in FLOAT_DTYPES:
            raise StageError(
                ErrorKind.INVALID_ARGUMENT,
                f"hidden states are {hidden.dtype}; expected float32, float16 or bfloat16",
            )
        return int(hidden.shape[1])

    @property
    def can_batch(self) -> bool:
        """Whether decode steps of several requests can share a forward pass here (plain
        KV caches; rotating, quantized or other caches run one request at a time)."""
        from mlx_lm.models.cache import KVCache

        if self._batchable is None:
            self._batchable = all(type(c) is KVCache for c in self._new_cache())
        return self._batchable

    def step_batch(self, items: list[DecodeItem]) -> list[StepResult | StageError]:
        """Decode steps of several requests (one token each) in one forward pass: the
        weights are read once for all of them. Each item gets its own result, or the
        StageError that refused it (the others still run). Sampling is per request."""
        t0 = time.perf_counter()
        out: list[StepResult | StageError] = []
        rows: list[tuple[int, DecodeItem, RequestState]] = []
        for i, item in enumerate(items):
            try:
                tokens = [item.token] if item.token is not None else None
                if self._check_input(tokens, item.hidden) != 1:
                    raise StageError(ErrorKind.INVALID_ARGUMENT, "a decode step carries one token")
                state = self.state_for(item.request_id, item.position, False, item.sampling)
                if state.ahead is not None or any(r[1].request_id == item.request_id for r in rows):
                    raise StageError(
                        ErrorKind.FAILED_PRECONDITION,
                        f"request {item.request_id!r} cannot take a batched step now",
                    )
                rows.append((i, item, state))
                out.append(StageError(ErrorKind.INTERNAL, "not run"))  # replaced below
            except StageError as e:
                out.append(e)
        if not rows:
            return out
        if self.spec.first:
            ids = [[r[1].token] for r in rows]
            h = self.embed(mx.array(ids, dtype=mx.int32))  # (B, 1, H)
        else:
            h = mx.concatenate([r[1].hidden for r in rows])  # type: ignore[misc]
        lengths = [r[2].offset + 1 for r in rows]
        longest = max(lengths)
        # Row b sees its own positions only: the last lengths[b] of the padded keys.
        mask = mx.arange(longest)[None, :] >= mx.array([longest - n for n in lengths])[:, None]
        mask = mask[:, None, None, :]
        for li, layer in enumerate(self.layers):
            h = layer(h, mask, _RowsCache([r[2].cache[li] for r in rows]))
            if self._eval_each_layer:
                mx.async_eval(h)  # as run_layers: layer li computes while li + 1 is built
        now = time.monotonic()
        for _, _, state in rows:
            state.offset += 1
            state.last_used = now
        if not self.spec.last:
            mx.eval(h)
            share = (time.perf_counter() - t0) / len(rows)
            for b, (i, _, _) in enumerate(rows):
                out[i] = StepResult(hidden=h[b : b + 1], compute_seconds=share)
            return out
        logits = self.logits(h)[:, -1, :]  # (B, vocab)
        sampled = [self.sample(logits[b], r[2]) for b, r in enumerate(rows)]
        wanted = [logits[b] for b, r in enumerate(rows) if r[1].want_logits]
        mx.eval(sampled, wanted)
        share = (time.perf_counter() - t0) / len(rows)
        for b, (i, item, _) in enumerate(rows):
            out[i] = StepResult(
                token=int(sampled[b].item()),  # type: ignore[arg-type]
                logits=logits[b].astype(mx.float32) if item.want_logits else None,
                compute_seconds=share,
            )
        return out

    def _emit(
        self,
        token: mx.array,
        logits: mx.array,
        state: RequestState,
        want_logits: bool,
        lookahead: bool,
        t0: float,
    ) -> StepResult:
        """Start evaluating `token`, queue the next step behind it, then read it back."""
        mx.async_eval(*((token, logits) if want_logits else (token,)))
        if lookahead:
            assert self.embed is not None
            h = self.run_layers(self.embed(token.reshape(1, 1)), state.cache)
            next_logits = self.logits(h)[0, -1]
            next_token = self.sample(next_logits, state)
            mx.async_eval(*((next_token, next_logits) if want_logits else (next_token,)))
            state.ahead = (next_token, next_logits)
            state.ahead_position = state.offset
        value = int(token.item())  # type: ignore[arg-type]
        return StepResult(
            token=value,
            logits=logits.astype(mx.float32) if want_logits else None,
            compute_seconds=time.perf_counter() - t0,
        )

    def run_layers(self, h: mx.array, cache: list[Any]) -> mx.array:
        """This stage's layers on `h`. On the CPU each layer's output goes to MLX to
        evaluate as soon as its graph is built (`mx.async_eval`), so layer i computes while
        Python builds layer i + 1 instead of after it (docs/performance.md, "Evaluating
        layer by layer"); the graph and its results are the same."""
        from mlx_lm.models.base import create_attention_mask

        mask = create_attention_mask(h, cache[0] if cache else None)
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c)
            if self._eval_each_layer:
                mx.async_eval(h)
        return h

    def logits(self, h: mx.array) -> mx.array:
        assert self.norm is not None and self.head is not None
        h = self.norm(h)
        if self._tied:
            out: mx.array = self.head.as_linear(h)
            return out
        result: mx.array = self.head(h)
        return result

    def sample(self, logits: mx.array, state: RequestState) -> mx.array:
        s = state.sampling
        if s.temperature <= 0:
            return mx.argmax(logits, axis=-1)
        scaled = logits.astype(mx.float32) / s.temperature
        if 0 < s.top_p < 1:
            probs = mx.softmax(scaled, axis=-1)
            sorted_probs = mx.sort(probs)[::-1]
            before = mx.cumsum(sorted_probs) - sorted_probs  # mass strictly ahead of each token
            n_keep = mx.maximum(mx.sum(before < s.top_p), 1)
            threshold = sorted_probs[n_keep - 1]
            scaled = mx.where(probs >= threshold, scaled, -math.inf)
        if state.key is not None:
            state.key, sub = mx.random.split(state.key)
            return mx.random.categorical(scaled, key=sub)
        return mx.random.categorical(scaled)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    out = tree_flatten(tree, prefix=prefix)
    assert isinstance(out, list)
    return out
