"""GGUF files with SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2,
Mistral 7B, TinyLlama): the tokenizer coordinator/ggufsource.py builds from the GGUF's
pieces and scores splits text as llama.cpp's own SPM tokenizer does, on a vocabulary trained
here the way SentencePiece trains BPE (no such GGUF is on this machine)."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from coordinator import ggufsource
from coordinator.api import IncrementalDetokenizer
from tests.helpers import reference_generate

SPACE = "\u2581"
# Training text: English, French and German accents, Spanish, code, numbers, Chinese and
# Japanese. Characters not in it (emoji, most CJK, rare accents) are left to byte fallback.
CORPUS = """
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs into the forest.
There is nothing there that they would not think of, and then the other one thinks again.
Tokenization is the process of splitting text into tokens, and tokens into pieces.
In the beginning the model reads the prompt, then it writes the answer one token at a time.
She said that the weather was nice, but the wind was cold and the rain was coming.
What is the capital of France? Paris is the capital of France, and Berlin of Germany.
I have 1234 apples and 56 oranges; 2024 was a good year, 1999 was better.
def main(argv):
    return run(argv[1:]) if argv else 0
for i in range(10): print(i, i * i)
Émile a mangé trois crêpes à la crème. Où est la bibliothèque? Déjà vu, café, naïve, élève.
Über die Brücke gehen die Mädchen schön langsam. Größe, Straße, fünf, hören, Schlüssel.
El niño comió mañana en la montaña. ¿Dónde está el baño? Canción, corazón, después.
我们今天学习中文。中国的首都是北京。你好世界，我爱学习。
日本語のテキストです。東京は日本の首都です。ありがとうございます。
the the the and and of of to to in in is is it it that that
"""
ADDED_CONTROL = ["[INST]", "[/INST]"]
USER_DEFINED = ["<|sep|>"]
TEXTS = [
    "",
    " ",
    "  ",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello   world",
    "   leading and trailing   ",
    "The quick brown fox jumps over the lazy dog.",
    "There is nothing there that they think.",
    "line one\nline two\n\nline three\n",
    "\n",
    "\n\n\n",
    "\tindented\ttabs\t",
    "  \n  \t mixed  \n",
    "1234567890 0.5 3,14 -42 2024-12-06",
    "Émile a mangé 3 crêpes à 10h30 — déjà!",
    "Größe Straße fünf Schlüssel über",
    "¿Dónde está el niño? mañana",
    "我们今天学习中文。你好世界",
    "日本語のテキスト、東京。",
    "Emoji: 😀👍🏽 🇫🇷 ❤️ and a rocket 🚀",
    "mixed 中文 and English and 😀 together",
    "def f(x):\n    return x**2  # squares\n",
    "   ",
    "a",
    "ab cd ef",
    "thethethe andand",
    "ÀÁÂÃÄÅ àáâãäå ŒœŠš Ωω ЖжЯя",
    "zero\u200bwidth and nbsp\u00a0here",
    "<s>[INST] What is the capital of France? [/INST]",
    "<s>[INST]hi[/INST] Paris</s><s>[INST] and Germany? [/INST]",
    "text [INST]in the middle[/INST]  after",
    "<|sep|>user defined<|sep|> x",
    "<unk> and </s> as text",
    "<0x41> is not a byte token in text",
    "▁ already a metaspace ▁▁",
    "x" * 40,
    " " * 17,
]


def _bpe_train(corpus: str, n_merges: int) -> tuple[list[str], list[str]]:
    """SentencePiece-style BPE: words are "▁" + the word, pairs never cross words, the most
    frequent pair (ties: the smaller pair) is joined first. Returns (characters by
    frequency, merged pieces in merge order)."""
    words = Counter(SPACE + w for w in corpus.split())
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    seqs = {w: list(w) for w in words}
    pieces: list[str] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b
        if merged not in pieces:
            pieces.append(merged)
        for w, seq in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    # Rare characters are left out, as SentencePiece's character coverage does; so are
    # pieces made of them.
    kept = [
        c for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if n > 1 or c.isascii()
    ]
    pieces = [p for p in pieces if all(c in kept for c in p)]
    return kept, pieces


def spm_vocab(n_merges: int = 400, tied: bool = False) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) laid out as a Llama 2 / Mistral GGUF: <unk>, <s>, </s>, the
    256 byte tokens, control and user-defined tokens, then the merged pieces (score -rank
    in merge order), then the characters (scores below every merge). The merged pieces are
    stored out of merge order, so that only their scores say which merge comes first.
    `tied`: pieces in merge order, each scored -1000, as gguf-py's converter writes a
    vocabulary without tokenizer.model."""
    chars, pieces = _bpe_train(CORPUS, n_merges)
    # Runs of spaces, as Llama's vocabulary has them, between the merges.
    for run in (2, 4, 3, 8):
        pieces.insert(5 * run, SPACE * run)
    order = list(range(len(pieces)))
    if not tied:
        random.Random(0).shuffle(order)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    tokens += ADDED_CONTROL + USER_DEFINED + ["<unused0>"]
    types += [3] * len(ADDED_CONTROL) + [4] * len(USER_DEFINED) + [5]
    scores += [0.0] * (len(ADDED_CONTROL) + len(USER_DEFINED) + 1)
    for rank in order:
        tokens.append(pieces[rank])
        types.append(1)
        scores.append(-1000.0 if tied else -float(rank))
    for rank, c in enumerate(c for c in chars if c not in tokens):
        tokens.append(c)
        types.append(1)
        scores.append(-float(len(pieces) + rank))
    if SPACE not in tokens:
        tokens.append(SPACE)
        types.append(1)
        scores.append(-float(len(tokens)))
    return tokens, scores, types


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def write_spm_gguf(
    path: Path,
    *,
    tied: bool = False,
    add_space_prefix: bool | None = None,
    add_bos: bool | None = True,
    add_eos: bool | None = None,
    tokenizer_model: str = "llama",
    vocab: tuple[list[str], list[float], list[int]] | None = None,
) -> Path:
    """A tiny random-weight llama (2 layers, hidden 64) with a SentencePiece vocabulary
    (`vocab`: tokens, scores, types; else spm_vocab's; <unk>, <s>, </s> at ids 0-2)."""
    import gguf

    tokens, scores, types = vocab or spm_vocab(tied=tied)
    vocab, hidden, heads, kv, ffn, layers = len(tokens), 64, 4, 2, 128, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("spm-test")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output.weight", mat(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_tokens(path: Path, texts: list[str], add_bos: bool, special: bool) -> list[list[int]]:
    """llama.cpp's own tokenization of `texts` (a child process: llama.cpp may abort)."""
    pytest.importorskip("llama_cpp")
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
        "add_bos, special = sys.argv[2] == '1', sys.argv[3] == '1'\n"
        "print(json.dumps([m.tokenize(t.encode(), add_bos=add_bos, special=special)\n"
        "                  for t in json.load(sys.stdin)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(int(add_bos)), str(int(special))],
        input=json.dumps(texts), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result: list[list[int]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def llama_cpp_text(path: Path, ids: list[list[int]]) -> list[str]:
    """llama.cpp's detokenization of each id list (special tokens rendered)."""
    pytest.importorskip("llama_cpp")
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
        "print(json.dumps([m.detokenize(t).decode('utf-8', 'replace') for t in json.loads(sys.argv[2])]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(ids)],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    result: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def spm_folder(spm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufsource.converted_folder(spm_gguf, root=tmp_path_factory.mktemp("cache"))


def test_the_test_vocabulary_is_sentencepiece_like() -> None:
    """The vocabulary exercises what the comparison is about: a few hundred merges, byte
    fallback for characters outside it, multi-space pieces, unique scores."""
    tokens, scores, types = spm_vocab()
    merges, tied = ggufsource.spm_merges(tokens, scores)
    assert len(tokens) > 600 and len(merges) > 300 and tied == 0
    assert f"{SPACE}the" in tokens and SPACE * 4 in tokens and "学" in tokens
    assert "😀" not in tokens and "<0xF0>" in tokens
    assert types.count(6) == 256


@pytest.mark.parametrize("special", [True, False])
def test_tokenizer_matches_llama_cpp_on_a_sentencepiece_gguf(
    spm_gguf: Path, spm_folder: Path, special: bool
) -> None:
    """Token for token what llama.cpp makes of the same GGUF: spaces, newlines, tabs, digits,
    accents, CJK, emoji through byte fallback, control and user-defined tokens, BOS."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(spm_folder / "tokenizer.json"))
    theirs = llama_cpp_tokens(spm_gguf, TEXTS, add_bos=True, special=special)
    if not special:  # llama.cpp then splits only user-defined tokens out of the text
        ours = _without_special_parsing(ours)
    byte_tokens = 0
    for text, want in zip(TEXTS, theirs, strict=True):
        got = ours.encode(text).ids
        assert got == want, (text, ours.encode(text).tokens, [ours.id_to_token(i) for i in want])
        byte_tokens += sum(ours.id_to_token(i).startswith("<0x") for i in got)
    assert byte_tokens > 20  # the emoji and rare characters went through byte fallback
    assert theirs[TEXTS.index("")] == [1]


def _without_special_parsing(tok):  # type: ignore[no-untyped-def]
    """Our tokenizer as llama.cpp's with parse_special off: control and unknown tokens are
    text like any other (transformers has no such switch: the served path parses them)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["special"]]
    return Tokenizer.from_str(json.dumps(spec))


def test_tokenizer_options_follow_the_gguf(tmp_path: Path) -> None:
    """add_space_prefix false, add_eos true, and no add_bos key (llama.cpp's default for
    SentencePiece: add BOS): still what llama.cpp does."""
    from tokenizers import Tokenizer

    path = write_spm_gguf(
        tmp_path / "opts.gguf", add_space_prefix=False, add_bos=None, add_eos=True
    )
    folder = ggufsource.converted_folder(path, root=tmp_path / "cache")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    theirs = llama_cpp_tokens(path, [*TEXTS, "hello world"], add_bos=True, special=True)
    theirs_hw = theirs.pop()
    for text, want in zip(TEXTS, theirs, strict=True):
        assert ours.encode(text).ids == want, text
    assert ours.encode("hello").ids[0] == 1 and ours.encode("hello").ids[-1] == 2
    from mlx_lm.utils import load_tokenizer

    served = load_tokenizer(folder)  # transformers keeps the GGUF's BOS and EOS
    assert list(served.encode("hello world")) == theirs_hw
    plain = llama_cpp_tokens(path, ["hello world"], add_bos=False, special=True)[0]
    assert ours.encode("hello world", add_special_tokens=False).ids == plain


def test_detokenization_round_trips_and_matches_llama_cpp(spm_gguf: Path, spm_folder: Path) -> None:
    """decode(encode(text)) is the text, through transformers (as the chat path loads it),
    mlx_lm's streaming detokenizer and the API's incremental one, token by token; and it is
    what llama.cpp decodes."""
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(spm_folder)
    assert isinstance(tok.detokenizer, SPMStreamingDetokenizer)
    # Not "▁" itself: SentencePiece decodes it as a space, llama.cpp too.
    plain = [t for t in TEXTS if "<" not in t and "[" not in t and SPACE not in t]
    ids = [list(tok.encode(t, add_special_tokens=False)) for t in plain]
    for text, t_ids in zip(plain, ids, strict=True):
        assert tok.decode(t_ids) == text, text
        detok = tok.detokenizer
        detok.reset()
        for i in t_ids:
            detok.add_token(i)
        detok.finalize()
        assert detok.text == text, text
        served = IncrementalDetokenizer(lambda ids: str(tok.decode(ids)))  # the API's streaming
        assert "".join(served.add(i) for i in t_ids) + served.flush() == text, text
    # llama-cpp-python drops the prefix space after a BOS (as SentencePiece does), and only
    # then: give it the BOS that encode() adds.
    theirs = llama_cpp_text(spm_gguf, [[1, *t] for t in ids])
    for text, got in zip(plain, theirs, strict=True):
        assert got == text, text


def test_sentencepiece_gguf_serves_chat_through_the_coordinator(spm_gguf: Path) -> None:
    """The GGUF as the coordinator reads it (read_model, load_tokenizer, encode_prompt): BOS
    and EOS from the GGUF, the chat template renders and encodes to what llama.cpp makes of
    the rendered text, and the converted model computes."""
    from coordinator.session import encode_prompt, load_tokenizer, read_model

    model = read_model(spm_gguf)
    config = json.loads((model.path / "config.json").read_text())
    assert config["vocab_size"] == len(spm_vocab()[0]) and config["eos_token_id"] == [2]
    tok = load_tokenizer(model)
    assert tok.eos_token_ids == {2} and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<s>[INST] {question} [/INST]"
    ids = encode_prompt(tok, question, chat=True)
    assert ids == llama_cpp_tokens(spm_gguf, [text], add_bos=False, special=True)[0]
    assert ids[:2] == [1, tok.convert_tokens_to_ids("[INST]")]
    plain = llama_cpp_tokens(spm_gguf, [question], add_bos=True, special=True)[0]
    assert encode_prompt(tok, question, chat=False) == plain
    tokens, _ = reference_generate(model.path, ids, 4)
    assert len(tokens) == 4


def test_equal_scores_split_as_the_trained_vocabulary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pieces that share one score (gguf-py's converter without tokenizer.model scores
    every piece -1000) lose the merge order; stored by id in that order, they split as the
    vocabulary with its trained scores does in llama.cpp (which itself joins the leftmost
    pair first there: docs/weights.md), and the conversion says so in a warning."""
    from tokenizers import Tokenizer

    tied = write_spm_gguf(tmp_path / "tied.gguf", tied=True)
    with caplog.at_level(logging.WARNING, logger="coordinator.ggufsource"):
        folder = ggufsource.converted_folder(tied, root=tmp_path / "cache")
    assert "share a score" in caplog.text
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    trained = write_spm_gguf(tmp_path / "trained.gguf")
    want = llama_cpp_tokens(trained, TEXTS, add_bos=False, special=True)
    tokens, _, _ = spm_vocab()
    for text, w in zip(TEXTS, want, strict=True):
        assert ours.encode(text, add_special_tokens=False).tokens == [tokens[i] for i in w], text


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", ""])
def test_other_tokenizer_models_are_refused(tmp_path: Path, model: str) -> None:
    path = write_spm_gguf(tmp_path / "other.gguf", tokenizer_model=model)
    with pytest.raises(
        ggufsource.GGUFError, match=f"tokenizer model '{model}'" if model else "'\\(none\\)'"
    ):
        ggufsource.inspect_gguf(path)
