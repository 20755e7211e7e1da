"""`LLM`: the vLLM-style entry point.

from jax_infer import LLM, SamplingParams
llm = LLM(model="smollm2-135m")
out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))
print(out[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import weights
from jax_infer.generation import Sequence as Seq
from jax_infer.generation import StaticBatchGenerator
from jax_infer.outputs import RequestOutput
from jax_infer.sampling import SamplingParams
from jax_infer.tokenizer import IncrementalDetokenizer, Tokenizer

DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: allowed are {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={d} is not supported: allowed are float32 and bfloat16")
    return d


def load_tokenizer(fmt: str, path: str, reader) -> Tokenizer:
    if fmt == "gguf":
        return Tokenizer.from_gguf(reader if reader is not None else path)
    return Tokenizer.from_dir(path)


class LLM:
    """Loads a model once and generates for batches of prompts.

    model: a name (`smollm2-135m`), a .gguf file, an HF directory or an orbax checkpoint dir.
    dtype: "float32" or "bfloat16" (weights and activations; softmax and norms run in f32).
    max_model_len: longest prompt + completion accepted (default: the model's, capped at 4096).
    max_num_seqs: how many prompts run together in one batch.
    seed: seeds the per-request seeds drawn for requests that set none.
    quantization: None, or a scheme name for `jax_infer.quant.quantize` ("int8", "int4", ...),
        applied on load.
    """

    def __init__(
        self,
        model: str = weights.DEFAULT_MODEL,
        *,
        dtype="float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        seed: int = 0,
        quantization: str | None = None,
        progress: bool = True,
    ):
        self.dtype = resolve_dtype(dtype)
        config, params, fmt, path, reader = weights.load(model, self.dtype, progress)
        params = jax.tree.map(self._cast_float, params)
        if quantization is not None:
            from jax_infer.quant import quantize

            params = quantize(params, quantization)
        self.config = config
        self.params = params
        self.model_path = path
        self.tokenizer = load_tokenizer(fmt, path, reader)
        limit = min(config.max_position_embeddings, 4096)
        if max_model_len is None:
            max_model_len = limit
        if (
            not isinstance(max_model_len, int)
            or not 1 <= max_model_len <= config.max_position_embeddings
        ):
            raise ValueError(
                f"max_model_len={max_model_len!r} is invalid: must be an int in "
                f"[1, {config.max_position_embeddings}]"
            )
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs!r} is invalid: must be an int >= 1")
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self.generator = StaticBatchGenerator(
            config, params, self.tokenizer, self.dtype, max_model_len
        )

    def _cast_float(self, leaf):
        # Only float leaves follow `dtype`: integer leaves are quantized values.
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != self.dtype:
            return leaf.astype(self.dtype)
        return leaf

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def save(self, path: str) -> None:
        """Write an orbax checkpoint (params, config, tokenizer): `LLM(model=path)` restores it
        without touching the original weights file."""
        weights.save_orbax(path, self.params, self.config, tokenizer=self.tokenizer)

    # -- requests ----------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        ids = list(prompt)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be ints; got " + repr(ids[:8]))
        return None, [int(t) for t in ids]

    def _make_sequence(self, prompt, params: SamplingParams) -> Seq:
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("prompt is empty: a request needs at least one prompt token")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds "
                f"max_model_len={self.max_model_len}"
            )
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        detok = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
        )
        return Seq(str(next(self._ids)), text, ids, params, seed % 2**32, detok)

    def _sequences(self, prompts, sampling_params) -> list[Seq]:
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple))
            and prompts
            and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                "give one, or one per prompt"
            )
        return [self._make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]

    # -- generation --------------------------------------------------------------------

    def _run(self, seqs: list[Seq]) -> Iterator[RequestOutput]:
        for i in range(0, len(seqs), self.max_num_seqs):
            yield from self.generator.run(seqs[i : i + self.max_num_seqs])

    def generate(
        self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Completions for a prompt or a list of prompts (strings or token-id lists), in order."""
        seqs = self._sequences(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        for chunk in self._run(seqs):
            if chunk.finished:
                final[chunk.request_id] = chunk
        return [final[s.request_id] for s in seqs]

    def stream(self, prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Yields RequestOutput chunks as tokens arrive (`delta_text` is the new text)."""
        yield from self._run(self._sequences(prompts, sampling_params))

    def _chat_prompts(self, messages) -> list[list[int]]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return [
            self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
            for conv in conversations
        ]

    def chat(self, messages, sampling_params=None) -> list[RequestOutput]:
        """messages: [{"role": ..., "content": ...}, ...] or a list of such conversations."""
        return self.generate(self._chat_prompts(messages), sampling_params)

    def chat_stream(self, messages, sampling_params=None) -> Iterator[RequestOutput]:
        yield from self.stream(self._chat_prompts(messages), sampling_params)
