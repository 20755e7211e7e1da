"""The jitted model steps, with static shapes, over the two KV cache layouts.

`forward`: rows of tokens over a contiguous cache (`llama.init_cache`, one [B, S, K, H] pair
per layer): the static-batch generator (`generation.py`), the perplexity evaluator and the
model report. One function serves prefill (T = a prompt-length bucket) and decode (T = 1).

`paged_forward`: one ragged step over the page pool (`init_paged_cache`, page 0 the null
page), its flat tokens laid out by `attention.build_metadata`: the engine's step and the
draft model's (speculative/proposers.py). `kv_bytes_per_token` sizes that pool.

Both donate the cache, so XLA updates it in place. Shapes that vary (prompt length, attended
cache length, batch, pages) are rounded up by the caller with `attention.metadata.bucket`, so
a stream of prompts compiles a bounded number of programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_infer.attention import AttentionMetadata, paged_attend_fn
from jax_infer.config import ModelConfig
from jax_infer.model.cache import page_group_windows
from jax_infer.model.llama import Llama, contiguous_attention
from jax_infer.quant.kv import fake_quantize_kv


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "attn_len", "all_logits", "int8_kv", "native_attention"),
    donate_argnames=("cache",),
)
def forward(
    params,
    tokens,
    start,
    num_valid,
    cache,
    *,
    config: ModelConfig,
    dtype,
    attn_len: int,
    all_logits: bool = False,
    int8_kv: bool = False,
    native_attention: bool = False,
):
    """tokens i32[B, T] at cache slots start i32[B].. (first num_valid i32[B] real).

    Returns (logits, cache): logits f32[B, T, V] when all_logits, else f32[B, V] at each row's
    last real token. int8_kv: keys and values go through the int8 KV cache's quantization
    round trip (`quant.kv.fake_quantize_kv`) before they are stored and attended.
    native_attention: on the CPU, attention by the C++ kernel (see
    `llama.contiguous_attention`; the caller checks the cache is float32 of a supported shape
    on one device).
    """
    model = Llama(config, dtype)
    index = None if all_logits else (num_valid - 1)[:, None]
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    attend_fn = contiguous_attention(
        start,
        start + num_valid,
        attn_len,
        kv_transform=fake_quantize_kv if int8_kv else None,
        native=native_attention,
    )
    logits, cache = model.apply({"params": params}, tokens, positions, cache, attend_fn, index)
    if not all_logits:
        logits = logits[:, 0]
    return logits, cache


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "backend", "batch_invariant"),
    donate_argnames=("cache",),
)
def paged_forward(
    params,
    tokens,
    meta,
    cache,
    *,
    config: ModelConfig,
    dtype,
    backend: str,
    batch_invariant: bool = False,
):
    """One ragged step over the page pool: tokens i32[T] laid out by
    `attention.build_metadata`. Returns (logits f32[S, V] at each sequence row's last token,
    or f32[S, R, V] at its last R tokens when meta.logits_index is i32[S, R]; cache).

    meta may be a tuple, one AttentionMetadata per page group of
    `page_group_windows(config)` (sliding-window layers in pools of their own).
    batch_invariant: each row's logits independent of the other rows and of the chunking
    (model/invariant.py; the caller checks the setup with `check_batch_invariant`)."""
    model = Llama(config, dtype, batch_invariant)
    grouped = not isinstance(meta, AttentionMetadata)
    groups = page_group_windows(config) if grouped else (None,)
    attend_fn = paged_attend_fn(meta, backend, groups)
    meta = meta[0] if grouped else meta
    logits, cache = model.apply(
        {"params": params},
        tokens[None],
        meta.positions[None],
        cache,
        attend_fn,
        meta.logits_index.reshape(1, -1),
    )
    # logits_index i32[S] gives f32[S, V]; i32[S, R] (speculative verification) f32[S, R, V].
    return logits[0].reshape(*meta.logits_index.shape, logits.shape[-1]), cache


__all__ = ["forward", "paged_forward"]
