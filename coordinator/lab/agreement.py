"""Greedy-token agreement between LayerLink and llama.cpp on the same GGUF (lab tool).

LayerLink's tokens equal mlx_lm's on the same weights (tests/test_real_model.py checks it over
3 stages), so the MLX side is computed in this process with mlx_lm, in the dtype a node here
computes in. The llama.cpp side runs the user's GGUF file itself, one child process per prompt
(coordinator/lab/llama_baseline.py). The two are not expected to agree exactly: llama.cpp
quantizes activations to 8 bits for its quantized matmuls, MLX keeps them in float.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMPTS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is 12 plus 30?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "What planet is known as the Red Planet?",
    "Give me a synonym for happy.",
    "What is the largest ocean on Earth?",
    "Write a haiku about the sea.",
    "What does a bee make?",
    "How many days are in a week?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "Suggest a name for a black cat.",
    "What is the opposite of cold?",
    "Which animal is known as the king of the jungle?",
    "Explain what a computer is in one sentence.",
    "What is the square root of 81?",
    "What color is the sky on a clear day?",
)


@dataclass(frozen=True)
class Agreement:
    prompts: int
    tokens: int  # greedy tokens compared per prompt (fewer when both stop earlier)
    first_token: float  # share of prompts whose first answer token agrees
    identical: float  # share of prompts whose whole answers agree
    mean_common_prefix: float  # tokens, averaged over prompts
    per_prompt: tuple[tuple[str, int, int], ...]  # (prompt, common prefix, compared length)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "tokens": self.tokens,
            "first_token": round(self.first_token, 4),
            "identical": round(self.identical, 4),
            "mean_common_prefix": round(self.mean_common_prefix, 2),
            "per_prompt": [list(p) for p in self.per_prompt],
        }


def _until_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in stops:
            break
    return out


def greedy_agreement(
    model_dir: Path,
    gguf: Path,
    n_tokens: int = 16,
    prompts: Sequence[str] = PROMPTS,
    threads: int = 2,
    on_progress: Callable[[str], None] | None = None,
) -> Agreement:
    """Each prompt as a user turn of the model's chat template, `n_tokens` greedy tokens
    (to the end of turn) from both engines; how far they agree."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from coordinator.lab.llama_baseline import run_llama
    from coordinator.session import encode_prompt
    from node.computedtype import cast_for_compute

    loaded = load(str(model_dir))
    model, tokenizer = loaded[0], loaded[1]
    cast_for_compute(model)
    stops = set(tokenizer.eos_token_ids)
    rows: list[tuple[str, int, int]] = []
    for i, text in enumerate(prompts):
        ids = encode_prompt(tokenizer, text, chat=True)
        steps = generate_step(
            mx.array(ids), model, max_tokens=n_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
        )
        ours = _until_stop([int(t) for t, _ in steps], stops)
        theirs = _until_stop(run_llama(gguf, ids, n_tokens, threads=threads).tokens, stops)
        common = 0
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            common += 1
        rows.append((text, common, max(len(ours), len(theirs))))
        if on_progress is not None:
            on_progress(f"agreement {i + 1}/{len(prompts)}: {common}/{rows[-1][2]} tokens")
    return Agreement(
        prompts=len(rows),
        tokens=n_tokens,
        first_token=sum(1 for _, c, _ in rows if c > 0) / len(rows),
        identical=sum(1 for _, c, n in rows if c == n) / len(rows),
        mean_common_prefix=statistics.fmean(c for _, c, _ in rows),
        per_prompt=tuple(rows),
    )
