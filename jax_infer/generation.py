"""Static-batch generation over a contiguous KV cache (the trunk's engine).

A batch of up to `max_num_seqs` requests is prefilled together (prompts right-padded to a
length bucket), then decoded one token per step until every row has finished. Shapes are
bucketed (batch to a power of two, prompt length to a power of two, attended cache length to a
power of two), so a stream of requests compiles a bounded set of programs.

Each step makes one round trip to the host for the sampled tokens: stop strings, streaming and
per-request bookkeeping need them, and at batch 1 it costs well under a millisecond against a
~30 ms step.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import sharding
from jax_infer.attention.metadata import bucket
from jax_infer.attention.paged import default_backend
from jax_infer.config import ModelConfig
from jax_infer.cpu import attention as cpu_attention
from jax_infer.model.cache import init_cache, init_sharded_cache
from jax_infer.model.step import forward
from jax_infer.outputs import RequestOutput, host_logprob_rows, logprob_entry, make_output
from jax_infer.runner import backend_params
from jax_infer.sampling import (
    SamplerFlags,
    SamplingMetadata,
    logit_bias_arrays,
    min_tokens_banned_ids,
    sample,
    update_output_counts,
)
from jax_infer.scheduler.request import Request, commit_tokens
from jax_infer.tokenizer import Tokenizer


def _pad_rows(rows: list, size: int, fill) -> list:
    return rows + [fill] * (size - len(rows))


class StaticBatchGenerator:
    """Runs batches of sequences to completion and streams RequestOutput chunks."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer: Tokenizer,
        dtype,
        max_model_len: int,
        cache_dtype=None,
        min_prompt_bucket: int = 16,
        *,
        mesh=None,
        rules=None,
        attention_backend: str | None = None,
    ):
        """params: canonical (as loaded), laid out here like the paged engine's
        (`runner.backend_params`). mesh: None, or a `sharding.make_mesh` Mesh; the batch (rows of tokens and cache) is then split over `data` where the padded
        batch size divides it, kv heads over `model`.

        attention_backend: as the paged engine's (None: the platform default). "cpu" (the
        default on a CPU without a mesh) attends with the C++ kernel where the cache is
        float32 of a supported head shape; anything else with the jnp `attend`."""
        self.config = config
        self.params = backend_params(params, config, mesh, rules)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.cache_dtype = cache_dtype or dtype
        self.max_model_len = max_model_len
        self.min_prompt_bucket = min_prompt_bucket
        self.eos_ids = tuple(sorted(tokenizer.eos_token_ids))
        self.mesh = mesh
        self.rules = rules
        backend = attention_backend or default_backend(sharded=mesh is not None)
        self.native_attention = (
            backend == "cpu"
            and mesh is None
            and jnp.dtype(self.cache_dtype) == jnp.float32
            and cpu_attention.attention_supports(
                config.num_heads, config.num_kv_heads, config.head_dim
            )
        )

    def _batch(self, a: np.ndarray):
        """A host array with a leading batch dim, on the device(s): split over `data`."""
        if self.mesh is None:
            return jnp.asarray(a)
        axes = ("batch",) + (None,) * (a.ndim - 1)
        return jax.device_put(a, sharding.named_sharding(axes, a.shape, self.mesh, self.rules))

    # -- one batch ---------------------------------------------------------------------

    def run(self, seqs: list[Request]) -> Iterator[RequestOutput]:
        """Prefill then decode `seqs` together; yields a chunk per sequence per step."""
        n = len(seqs)
        b = bucket(n, 1)
        lens = [s.num_prompt_tokens for s in seqs]
        t = min(bucket(max(lens), self.min_prompt_bucket), bucket(self.max_model_len, 1))
        total = max(len_ + s.max_tokens for len_, s in zip(lens, seqs))
        cache_len = bucket(max(t, total), 64)
        if self.mesh is None:
            cache = init_cache(self.config, b, cache_len, self.cache_dtype)
        else:
            cache = init_sharded_cache(
                self.config, b, cache_len, self.mesh, self.rules, self.cache_dtype
            )

        params_list = [s.sampling_params for s in seqs]
        flags = SamplerFlags.for_batch(params_list)
        vocab = self.config.vocab_size
        if flags.use_penalties:
            prompt_mask = np.zeros((b, vocab), bool)
            for i, s in enumerate(seqs):
                prompt_mask[i, s.prompt_token_ids] = True
            prompt_mask = jnp.asarray(prompt_mask)
            counts = jnp.zeros((b, vocab), jnp.int32)
        else:
            prompt_mask = jnp.zeros((b, 1), bool)
            counts = jnp.zeros((b, 1), jnp.int32)

        tokens = np.zeros((b, t), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : lens[i]] = s.prompt_token_ids
        start = np.zeros(b, np.int32)
        num_valid = np.array(_pad_rows(lens, b, 1), np.int32)
        logits, cache = forward(
            self.params,
            self._batch(tokens),
            self._batch(start),
            self._batch(num_valid),
            cache,
            config=self.config,
            dtype=self.dtype,
            attn_len=t,
            native_attention=self.native_attention,
        )
        positions = np.array(_pad_rows(lens, b, 0), np.int32)  # next cache slot per row
        bias = logit_bias_arrays(params_list, b)
        bias = None if bias is None else tuple(map(jnp.asarray, bias))
        while True:
            meta = SamplingMetadata.build(
                params_list, [s.seed for s in seqs], [s.num_output_tokens for s in seqs], b
            )
            banned = min_tokens_banned_ids(
                params_list, [s.num_output_tokens for s in seqs], self.eos_ids, b
            )
            out = sample(
                logits,
                meta,
                counts,
                prompt_mask,
                flags=flags,
                banned_ids=None if banned is None else jnp.asarray(banned),
                logit_bias=bias,
            )
            token_ids = np.asarray(out.token_ids)
            if flags.use_penalties:
                active = np.array(_pad_rows([not s.is_finished for s in seqs], b, False))
                counts = update_output_counts(counts, out.token_ids, jnp.asarray(active))
            logprob_rows = host_logprob_rows(out, flags.num_logprobs)
            for i, s in enumerate(seqs):
                if s.is_finished:
                    continue
                token = int(token_ids[i])
                entry = logprob_entry(token, s.sampling_params.logprobs, i, logprob_rows)
                commit_tokens(s, [token], self.max_model_len, [entry])
                yield make_output(s)
            if all(s.is_finished for s in seqs):
                return
            # Finished rows stay where they are (their writes land in their own dead slot),
            # so no row ever writes past the cache.
            step_tokens = np.zeros((b, 1), np.int32)
            step_tokens[:n, 0] = token_ids[:n]
            step_start = positions.copy()
            for i, s in enumerate(seqs):
                if not s.is_finished:
                    positions[i] += 1
                else:
                    step_start[i] = max(positions[i] - 1, 0)
            attn_len = min(cache_len, bucket(int(step_start.max()) + 1, 64))
            logits, cache = forward(
                self.params,
                self._batch(step_tokens),
                self._batch(step_start),
                self._batch(np.ones(b, np.int32)),
                cache,
                config=self.config,
                dtype=self.dtype,
                attn_len=attn_len,
                native_attention=self.native_attention,
            )

    # -- bookkeeping -------------------------------------------------------------------
