"""Perplexity of a causal LM over a long token stream, with a sliding window.

The model sees at most `window` tokens at once, so a long text is cut into windows that start
`stride` tokens apart. As in HF's perplexity guide, each window scores only the tokens that the
previous window did not score: with stride < window every token from the second on is scored
exactly once, and every scored token (outside the first window) has at least
`window - stride` tokens of context. With stride == window the windows are disjoint and, as in
HF, each window's first token (which has no context inside it) is not scored. Smaller strides
give more context per scored token and cost more forward passes.

Each window runs through the jitted `model.step.forward(..., all_logits=True)` at one static
shape ([1, window], the last window padded), so the whole evaluation compiles one program; the
negative log-likelihoods are reduced on the device, so only one float per window comes back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.model.cache import init_cache
from jax_infer.model.step import forward


@dataclasses.dataclass(frozen=True)
class Window:
    """One forward pass: tokens[begin:end] go in, targets [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float  # natural-log NLL summed over scored tokens
    scored_tokens: int
    total_tokens: int
    windows: int
    window: int
    stride: int
    seconds: float  # wall time of windows 2.. (the first one compiles)
    compile_seconds: float  # the first window: compile plus one pass
    tokens_per_s: float  # real (unpadded) tokens fed per second over windows 2..; nan if one

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sliding_windows(num_tokens: int, window: int, stride: int) -> Iterator[Window]:
    """The HF-style windows over num_tokens tokens.

    Window i covers [i * stride, i * stride + window) clipped to the text, and scores targets
    from where the previous window ended; the first window scores from position 1 (token 0
    has no context). Ends as soon as a window reaches the end of the text.
    """
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r} is invalid: must be an int >= 2")
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride={stride!r} is invalid: must be an int in [1, window={window}]")
    if num_tokens < 2:
        raise ValueError(f"num_tokens={num_tokens} is too few: perplexity needs at least 2 tokens")
    prev_end = 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        yield Window(begin, end, max(prev_end, begin + 1))
        prev_end = end
        if end == num_tokens:
            return


@functools.partial(jax.jit, static_argnames=("config", "dtype", "window", "int8_kv"))
def _window_nll(
    params, tokens, num_valid, score_from, *, config: ModelConfig, dtype, window, int8_kv=False
):
    """Sum of -log p(tokens[t] | tokens[:t]) over t in [score_from, num_valid) of one window.

    tokens i32[1, window]; num_valid, score_from i32[] (positions within the window).
    """
    cache = init_cache(config, 1, window, dtype)
    logits, _ = forward(
        params,
        tokens,
        jnp.zeros((1,), jnp.int32),
        num_valid[None],
        cache,
        config=config,
        dtype=dtype,
        attn_len=window,
        all_logits=True,
        int8_kv=int8_kv,
    )
    # Logits at position t predict token t + 1.
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)  # [T-1, V]
    targets = tokens[0, 1:]
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]  # [T-1]
    pos = jnp.arange(1, window, dtype=jnp.int32)  # position of each target
    scored = (pos >= score_from) & (pos < num_valid)
    return jnp.sum(jnp.where(scored, nll, 0.0))


def perplexity(
    params,
    config: ModelConfig,
    token_ids: Sequence[int],
    *,
    window: int = 1024,
    stride: int = 512,
    dtype=jnp.float32,
    progress: bool = False,
    kv_cache_dtype: str = "auto",
) -> PerplexityResult:
    """Sliding-window perplexity of `token_ids` under the model (see the module docstring).

    kv_cache_dtype="int8" scores with keys and values rounded as the engine's int8 KV cache
    stores them (`quant.kv`); "auto" keeps them in the compute dtype."""
    if kv_cache_dtype not in ("auto", "int8"):
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of ('auto', 'int8')")
    tokens = np.asarray(token_ids, np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be a flat sequence; got shape {tokens.shape}")
    if window > config.max_position_embeddings:
        raise ValueError(
            f"window={window} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    windows = list(sliding_windows(len(tokens), window, stride))
    run = functools.partial(
        _window_nll,
        config=config,
        dtype=jnp.dtype(dtype),
        window=window,
        int8_kv=kv_cache_dtype == "int8",
    )

    def args(w: Window):
        padded = np.zeros((1, window), np.int32)
        padded[0, : w.end - w.begin] = tokens[w.begin : w.end]
        return (
            params,
            jnp.asarray(padded),
            jnp.asarray(w.end - w.begin, jnp.int32),
            jnp.asarray(w.score_from - w.begin, jnp.int32),
        )

    # The first window pays for the compile (every window has the same shape); the rest are
    # timed for tokens/s.
    t0 = time.perf_counter()
    nll_sum = float(run(*args(windows[0])))
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, w in enumerate(windows[1:], start=2):
        nll_sum += float(run(*args(w)))
        if progress:
            print(f"\rwindow {i}/{len(windows)}", end="", flush=True)
    seconds = time.perf_counter() - t0
    if progress:
        print(flush=True)
    timed_tokens = sum(w.end - w.begin for w in windows[1:])
    scored = sum(w.end - w.score_from for w in windows)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / scored),
        nll_sum=nll_sum,
        scored_tokens=scored,
        total_tokens=len(tokens),
        windows=len(windows),
        window=window,
        stride=stride,
        seconds=seconds,
        compile_seconds=compile_seconds,
        tokens_per_s=timed_tokens / seconds if timed_tokens else float("nan"),
    )
