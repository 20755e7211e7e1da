"""Text <-> token ids, built on the Rust `tokenizers` library, matching HF transformers.

Why not just use `transformers.AutoTokenizer`? It pulls in torch-era machinery and seconds of
import time for what is, at run time, one `tokenizers.Tokenizer` plus a few settings
(special token ids, the chat template, whether to add BOS). We build that same backend object
ourselves, from either source a model can come in:

* an HF model directory: `tokenizer.json` already *is* the backend, serialized, so we load it
  as-is and read the settings around it from `tokenizer_config.json` and friends. (transformers
  5 instead rebuilds some classes, e.g. `GPT2Tokenizer`, from the file's vocabulary with the
  class's own pre-tokenizer, dropping the file's; we keep the file's, as transformers 4 did.)
* a GGUF file: llama.cpp stores the vocabulary, merges and token types as metadata, plus a
  `tokenizer.ggml.pre` name for the pre-tokenizer (the regex that cuts text into words before
  BPE). We rebuild the backend from those, the way transformers' GGUF loader does.

By default we tokenize exactly as transformers' GGUF loader does, since that is the reference
our users compare against. That loader has no entry for some `pre` names (among them `smollm`)
and falls back to the GPT-2 regex. The model was trained with its own pre-tokenizer, which for
`smollm` splits every digit off first (as SmolLM's own `tokenizer.json` does); the two differ
only where a run of spaces or newlines precedes a digit ("x\\n\\n1": transformers gives
["x", "Ċ", "Ċ", "1"], the training-time split ["x", "ĊĊ", "1"]).
`from_gguf(..., match_transformers=False)` uses the model's own split instead.

`IncrementalDetokenizer` turns a stream of generated ids into text deltas without emitting
half a UTF-8 character when one character spans several byte-level tokens.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer source (directory or GGUF) that we cannot build a tokenizer from."""


# llama.cpp's token types (`tokenizer.ggml.token_type`).
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes, keyed by family. Each is the `tokenizer.json` split of the model family
# that llama.cpp's `pre` names stand for.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre_tokenizer():
    # llama.cpp: "\p{N}" first, then the GPT-2 regex; StarCoder-lineage tokenizer.json files
    # spell the same thing as Digits(individual_digits) followed by the ByteLevel regex.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _split_pre_tokenizer(pattern: str):
    def build():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# `tokenizer.ggml.pre` -> pre-tokenizer factory, for byte-level BPE ("gpt2") vocabularies.
_BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "smollm": _digits_then_gpt2_pre_tokenizer,
    "starcoder": _digits_then_gpt2_pre_tokenizer,
    "refact": _digits_then_gpt2_pre_tokenizer,
    "codeshell": _digits_then_gpt2_pre_tokenizer,
    "command-r": _digits_then_gpt2_pre_tokenizer,
    "llama3": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "llama-v3": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "llama-bpe": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "falcon3": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "pixtral": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "dbrx": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "smaug-bpe": _split_pre_tokenizer(_LLAMA3_SPLIT),
    "qwen2": _split_pre_tokenizer(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _split_pre_tokenizer(_QWEN2_SPLIT),
}

# Names transformers' GGUF loader has no split for: it keeps GPT-2's byte-level regex.
_TRANSFORMERS_GPT2_FALLBACK = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r"})

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")
SUPPORTED_GGUF_PRE = tuple(sorted(_BYTE_LEVEL_PRE_TOKENIZERS))

# Architectures whose sentencepiece GGUF vocabulary is Gemma's (see `_gemma_backend`).
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Gemma's chat format, built in because llama.cpp's Gemma GGUFs carry no template: BOS, then
# turns "<start_of_turn>{user|model}\n{text}<end_of_turn>\n"; a system message has no turn
# of its own and is put in front of the first user turn; roles must alternate from user.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set ns.prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma chat roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (ns.prefix if loop.first else '') + m['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
GEMMA_END_OF_TURN = "<end_of_turn>"

# Named special token -> the GGUF key (under tokenizer.ggml.) holding its id.
_GGUF_SPECIAL_ID_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# What HF passes into a chat template as `bos_token` etc. (its `special_tokens_map`).
_TEMPLATE_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_content(value: Any) -> str | None:
    """A special token from a config file: a string, or an AddedToken dict with `content`."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


def _add_missing_special_tokens(
    backend: tokenizers.Tokenizer, tokens: Iterable[str | None]
) -> None:
    known = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    missing = [
        AddedToken(token, special=True, normalized=False)
        for token in dict.fromkeys(t for t in tokens if t is not None)
        if token not in known
    ]
    if missing:
        backend.add_special_tokens(missing)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"cannot parse JSON file {path!r}: {e}") from e


def _clean_up_tokenization(text: str) -> str:
    # transformers' `clean_up_tokenization`, for WordPiece/Unigram tokenizers whose config asks
    # for it; HF never applies it to BPE.
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Encode/decode and chat templates for one model; build with `from_dir` or `from_gguf`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        special_token_ids: Mapping[str, int] | None = None,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        source: str = "<memory>",
    ):
        self._backend = backend
        self._source = source
        # Strings, keyed like HF's `special_tokens_map` ("bos_token", ...), for chat templates.
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is None:
            chat_template = self.chat_templates.get("default")
        self.chat_template: str | None = chat_template
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        ids = dict(special_token_ids or {})
        for name, token in self._special_tokens.items():
            if name not in ids and backend.token_to_id(token) is not None:
                ids[name] = backend.token_to_id(token)
        self.bos_token_id: int | None = ids.get("bos_token")
        self.eos_token_id: int | None = ids.get("eos_token")
        self.unk_token_id: int | None = ids.get("unk_token")
        self.pad_token_id: int | None = ids.get("pad_token")
        eos = {self.eos_token_id} if self.eos_token_id is not None else set()
        self.eos_token_ids: frozenset[int] = frozenset(eos | {int(i) for i in extra_eos_token_ids})
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (batch encoding, offsets, ...)."""
        return self._backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into
        directory `path`, so that `Tokenizer.from_dir(path)` rebuilds this tokenizer (orbax
        checkpoints carry their tokenizer this way)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._backend.save(os.path.join(path, "tokenizer.json"))
        config: dict[str, Any] = dict(self._special_tokens)
        config["clean_up_tokenization_spaces"] = self._clean_up
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": sorted(self.eos_token_ids)}, f)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF model directory: `tokenizer.json` + `tokenizer_config.json`, and, when
        present, `special_tokens_map.json`, `generation_config.json`, `chat_template.jinja` and
        `additional_chat_templates/*.jinja`."""
        path = os.fspath(path)
        if os.path.isfile(path):
            raise TokenizerError(
                f"from_dir: path={path!r} is a file; pass the model directory holding "
                "tokenizer.json (for a .gguf file use Tokenizer.from_gguf)"
            )
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: path={path!r}")
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(
                f"no tokenizer.json in {path!r}; from_dir needs an HF 'fast' tokenizer "
                "(tokenizer.json). For a GGUF file use Tokenizer.from_gguf"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:
            raise TokenizerError(f"cannot load {tokenizer_file!r}: {e}") from e

        def optional_json(name: str) -> dict:
            file = os.path.join(path, name)
            return _read_json(file) if os.path.isfile(file) else {}

        config = optional_json("tokenizer_config.json")
        special_map = optional_json("special_tokens_map.json")
        generation = optional_json("generation_config.json")

        special_tokens = {}
        for name in _TEMPLATE_SPECIAL_TOKENS:
            value = _token_content(config.get(name))
            special_tokens[name] = (
                value if value is not None else _token_content(special_map.get(name))
            )
        extra = (
            config.get("extra_special_tokens")
            or config.get("additional_special_tokens")
            or special_map.get("additional_special_tokens")
            or []
        )
        if isinstance(extra, Mapping):
            # transformers 5 also allows model-specific names: {"image_token": "<image>"}.
            extra = list(extra.values())
        # Like HF: special tokens named in the config but absent from tokenizer.json are added.
        _add_missing_special_tokens(
            backend, [*special_tokens.values(), *(_token_content(t) for t in extra)]
        )

        chat_templates: dict[str, str] = {}
        inline = config.get("chat_template")
        if isinstance(inline, str):
            chat_templates["default"] = inline
        elif isinstance(inline, list):
            chat_templates.update({t["name"]: t["template"] for t in inline})
        # As in HF, template files take priority over templates inside tokenizer_config.json.
        files: dict[str, str] = {}
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                files["default"] = f.read()
        extra_dir = os.path.join(path, "additional_chat_templates")
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        files[name.removesuffix(".jinja")] = f.read()
        if files:
            chat_templates = files

        extra_eos = generation.get("eos_token_id")
        if extra_eos is None:
            extra_eos = []
        elif isinstance(extra_eos, int):
            extra_eos = [extra_eos]
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_templates=chat_templates,
            extra_eos_token_ids=extra_eos,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            source=path,
        )

    @classmethod
    def from_gguf(
        cls,
        path_or_reader: str | os.PathLike | Any,
        pre: str | None = None,
        match_transformers: bool = True,
    ) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata; takes a path or a `gguf.GGUFReader`.

        `tokenizer.ggml.model` "gpt2" is byte-level BPE, with the pre-tokenizer named by
        `tokenizer.ggml.pre` (see `SUPPORTED_GGUF_PRE`); "llama" is sentencepiece-style BPE
        with byte fallback. `pre` overrides the file's pre-tokenizer name (byte-level only),
        e.g. `pre="smollm"`. With `match_transformers` (the default) and no `pre`, a name that
        transformers' GGUF loader does not know falls back to GPT-2's split as it does there,
        so ids equal transformers'; pass False for the model's own split."""
        reader, source = _open_gguf(path_or_reader)
        meta = _gguf_tokenizer_metadata(reader)
        if pre is None and match_transformers:
            file_pre = meta.get("tokenizer.ggml.pre")
            if file_pre in _TRANSFORMERS_GPT2_FALLBACK:
                pre = "gpt2"
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError(
                f"GGUF {source!r} has no tokenizer.ggml.model key, so it carries no tokenizer; "
                f"supported tokenizer.ggml.model values: {list(SUPPORTED_GGUF_MODELS)}"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"GGUF {source!r} has no tokenizer.ggml.tokens (vocabulary)")
        token_types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)

        def special(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is None or not 0 <= token_id < len(tokens):
                return None
            return tokens[token_id]

        special_tokens = {name: special(key) for name, key in _GGUF_SPECIAL_ID_KEYS.items()}
        if model == "gpt2":
            backend = _byte_level_backend(meta, tokens, token_types, source, pre)
            add_bos_default = False
        elif model == "llama" and meta.get("general.architecture") in GEMMA_ARCHITECTURES:
            backend = _gemma_backend(meta, tokens, token_types, special_tokens)
            add_bos_default = True
        elif model == "llama":
            backend = _sentencepiece_backend(meta, tokens, token_types, special_tokens)
            # Older sentencepiece GGUFs have no flag; llama.cpp (and HF) then add BOS.
            add_bos_default = True
        else:
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model={model!r} in GGUF {source!r}; "
                f"supported: {list(SUPPORTED_GGUF_MODELS)}"
            )

        # Like HF: named special tokens that are not control tokens already become special.
        _add_missing_special_tokens(backend, special_tokens.values())

        special_ids = {
            name: meta[f"tokenizer.ggml.{key}"]
            for name, key in _GGUF_SPECIAL_ID_KEYS.items()
            if special_tokens[name] is not None
        }
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        bos = special_tokens["bos_token"], special_ids.get("bos_token")
        eos = special_tokens["eos_token"], special_ids.get("eos_token")
        backend.post_processor = _template_processor(
            bos if add_bos and bos[0] is not None else None,
            eos if add_eos and eos[0] is not None else None,
        )
        # llama.cpp stops generation on end-of-turn/message ids as well as on EOS.
        extra_eos = [
            meta[key]
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if meta.get(key) is not None
        ]
        chat_template = meta.get("tokenizer.chat_template")
        if meta.get("general.architecture") in GEMMA_ARCHITECTURES:
            # Gemma's turns end with <end_of_turn>, which the files do not mark as EOT.
            end_of_turn = backend.token_to_id(GEMMA_END_OF_TURN)
            if end_of_turn is not None:
                extra_eos.append(end_of_turn)
            if chat_template is None:
                chat_template = GEMMA_CHAT_TEMPLATE
        return cls(
            backend,
            special_tokens=special_tokens,
            special_token_ids=special_ids,
            chat_template=chat_template,
            extra_eos_token_ids=extra_eos,
            source=source,
        )

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token strings in it (e.g. `<|im_start|>`) become their
        ids. `add_special_tokens` adds BOS/EOS if the model is configured to."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string for an id (byte-level spelling, e.g. "Ġthe"); None if unknown."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """True for special added tokens (control tokens like `<|im_end|>`), which
        `decode(..., skip_special_tokens=True)` drops."""
        return int(token_id) in self._special_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    # ---- chat templates -----------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template, as HF's `apply_chat_template`.

        `chat_template` may be a template string or the name of one of `chat_templates`.
        Extra keyword arguments are passed to the template (e.g. `enable_thinking=False`).
        With `tokenize=True` returns ids, encoded without adding BOS/EOS (the template
        writes whatever it wants)."""
        template = self._resolve_chat_template(chat_template, tools)
        if not messages:
            raise ValueError("apply_chat_template: messages is empty; pass at least one message")
        conversation = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(
                    f"apply_chat_template: each message must be a dict, got {type(message).__name__}"
                )
            # HF drops None values: templates handle a missing key, but render a None as "None".
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next(
                (
                    message[k]
                    for k in ("reasoning_content", "thinking", "reasoning")
                    if k in message
                ),
                None,
            )
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            conversation.append(message)
        context = {**self._special_tokens, **kwargs}
        rendered = _compile_chat_template(template).render(
            messages=conversation,
            tools=list(tools) if tools is not None else None,
            documents=list(documents) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    def _resolve_chat_template(self, chat_template: str | None, tools) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if self.chat_template is not None:
            if tools is not None and "tool_use" in self.chat_templates:
                return self.chat_templates["tool_use"]
            return self.chat_template
        if self.chat_templates:
            raise ValueError(
                f"tokenizer from {self._source!r} has several chat templates and no 'default'; "
                f"pass chat_template= one of {sorted(self.chat_templates)}"
            )
        raise ValueError(
            f"tokenizer from {self._source!r} has no chat template (no tokenizer.chat_template "
            "in the GGUF, or no chat_template.jinja / tokenizer_config.json 'chat_template' in "
            "the directory); pass chat_template= a Jinja template string"
        )


# ---- GGUF -------------------------------------------------------------------------------


def _open_gguf(path_or_reader) -> tuple[Any, str]:
    if not isinstance(path_or_reader, (str, os.PathLike)):
        if not hasattr(path_or_reader, "fields"):
            raise TypeError(
                "from_gguf: path_or_reader must be a path or a gguf.GGUFReader, "
                f"got {type(path_or_reader).__name__}"
            )
        return path_or_reader, str(getattr(path_or_reader, "path", "<GGUFReader>"))
    # Imported here: only GGUF users need the `gguf` package.
    import gguf

    path = os.fspath(path_or_reader)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: path={path!r}")
    try:
        return gguf.GGUFReader(path, "r"), path
    except (ValueError, IndexError, OSError, AssertionError) as e:
        raise TokenizerError(f"cannot read GGUF file {path!r} (not GGUF, or corrupt): {e}") from e


def _gguf_tokenizer_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            try:
                meta[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise TokenizerError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return meta


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed tokenizer.ggml.merges entry {merge!r}; expected 'a b'")
        pairs.append((left, right))
    return pairs


def _byte_level_backend(meta, tokens, token_types, source, pre) -> tokenizers.Tokenizer:
    if pre is not None:
        where = "from_gguf(pre=...)"
    else:
        # Files from before llama.cpp recorded the pre-tokenizer: llama.cpp treats them as default.
        pre = meta.get("tokenizer.ggml.pre", "default")
        where = f"tokenizer.ggml.pre of GGUF {source!r}"
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise TokenizerError(
            f"unsupported pre-tokenizer {pre!r} ({where}); supported: {list(SUPPORTED_GGUF_PRE)}"
        )
    merges = _merges(meta)
    if merges is None:
        raise TokenizerError(
            f"GGUF {source!r} has tokenizer.ggml.model='gpt2' but no tokenizer.ggml.merges"
        )
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Byte-level vocabularies are spelled in GPT-2's byte alphabet; a token written in plain
    # text (some converters do that for added tokens) is respelled so BPE can find it.
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter mislabel (HF skips it
    # too): adding it would grow the vocabulary past the model's embedding table.
    _add_gguf_added_tokens(backend, tokens, token_types, alphabet)
    return backend


def _sentencepiece_backend(meta, tokens, token_types, special_tokens) -> tokenizers.Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(
                "GGUF tokenizer.ggml.model='llama' needs tokenizer.ggml.merges or "
                "tokenizer.ggml.scores; it has neither"
            )
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk = special_tokens.get("unk_token")
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # HF's non-legacy Llama tokenizer: "▁" for spaces, prepended only at the start of the text.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_added_tokens(backend, tokens, token_types, alphabet=None)
    return backend


def _gemma_backend(meta, tokens, token_types, special_tokens) -> tokenizers.Tokenizer:
    """Gemma's sentencepiece vocabulary as transformers' GGUF loader builds it (its
    `GemmaTokenizer`): no pre-tokenizer split and no prefix space; a normalizer spells spaces
    "▁"; BPE with byte fallback. Two quirks of llama.cpp's Gemma files are undone the same
    way: tokens made only of spaces are stored as real spaces and are respelled "▁" * n,
    and with no merges stored, the merges are derived from the vocabulary ranked by each
    token's position in the file (Gemma's scores do not follow its merge order)."""
    respelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(respelled)}
    merges = _merges(meta)
    if merges is None:
        positions = {token: -index for index, token in enumerate(respelled)}
        merges = _merges_from_scores(vocab, positions)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=special_tokens.get("unk_token"),
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Added tokens by the file's own spelling (as HF): "\n" is matched whole, "  " is not.
    _add_gguf_added_tokens(backend, tokens, token_types, alphabet=None)
    return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]):
    """Sentencepiece GGUFs may carry no merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (best first), as HF derives them."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=functools.partial(_pair_ids, vocab))
        merges.extend(local)
    merges.sort(key=_merge_rank, reverse=True)
    return [(left, right) for left, right, _ in merges]


def _pair_ids(vocab: Mapping[str, int], merge: tuple[str, str, float]) -> tuple[int, int]:
    return vocab[merge[0]], vocab[merge[1]]


def _merge_rank(merge: tuple[str, str, float]) -> tuple[float, int, int]:
    return merge[2], len(merge[0]), len(merge[1])


def _add_gguf_added_tokens(backend, tokens, token_types, alphabet: set[str] | None) -> None:
    # Control tokens (<|im_start|>, <s>) are special: matched whole in text, dropped by
    # skip_special_tokens. User-defined ones (<think>) are matched whole but kept on decode.
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == _TOKEN_CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == _TOKEN_USER_DEFINED and token in vocab
    ]
    if user:
        backend.add_tokens(user)


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """HF's `update_post_processor`: optional BOS before and EOS after each sequence."""

    def sequence(name: str, type_id: int) -> list[str]:
        return (
            ([f"{bos[0]}:{type_id}"] if bos else [])
            + [f"${name}:{type_id}"]
            + ([f"{eos[0]}:{type_id}"] if eos else [])
        )

    special = [token for token in (bos, eos) if token is not None]
    return processors.TemplateProcessing(
        single=" ".join(sequence("A", 0)),
        pair=" ".join(sequence("A", 0) + sequence("B", 1)),
        special_tokens=special,
    )


# ---- chat template rendering ------------------------------------------------------------


# jinja2 is imported on the first chat template, not with the package: ~0.2 s of every
# process start (cold start, compile_cache.py) that plain generate never needs.
@functools.cache
def _generation_tag():
    import jinja2.ext
    import jinja2.nodes

    class _GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for HF's training
        masks; for inference it renders its body unchanged, but templates using it must still
        parse."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body)
            return call.set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return _GenerationTag


def _raise_exception(message):
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '); HF's, which templates are written
    # against, does not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """The jinja2.Template of a chat template."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Chat templates come from model files, i.e. are untrusted: sandboxed, immutable env,
    # with the same whitespace settings and helpers as HF so output is byte-identical.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_tag(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


# ---- streaming detokenization -----------------------------------------------------------


class IncrementalDetokenizer:
    """Turn generated ids into text deltas as they arrive.

    Decoding one token at a time is wrong twice over: a character can span several
    byte-level tokens (decoding a part gives U+FFFD), and some decoders depend on context
    (sentencepiece drops the leading space of the first token decoded). So each step decodes
    a short window ending at the new token, and emits only what that window adds beyond the
    text already emitted; while the window ends in U+FFFD (an incomplete character) the
    token is held back until later tokens complete it.

    `prompt_ids` gives the first generated token its left context (so its leading space
    survives); their text is not part of `text`. Without prompt ids, after `flush()`,
    `text == tokenizer.decode(all added ids)`.
    """

    # Prompt tokens kept as left context; a few are enough for any decoder's lookbehind.
    _CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids]
        # ids[prefix:read] is the window's already-emitted left context; ids[read:] is pending.
        self._prefix = max(len(self._ids) - self._CONTEXT, 0)
        self._read = len(self._ids)
        self._num_prompt = len(self._ids)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The generated ids added so far (without the prompt)."""
        return self._ids[self._num_prompt :]

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (possibly "" while a character is
        incomplete, or several tokens' worth once it completes)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (at the end of generation), U+FFFD included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self._skip)
        window_text = decode(self._ids[self._prefix :], self._skip)
        if not final and window_text.endswith("\ufffd"):
            return ""
        delta = window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
