"""Calibration: run the decoder layer by layer on real text and collect what pruning needs.

Pruning needs the hidden state between layers and a few activations inside each layer.
`layer_forward` applies the model's own `DecoderLayer` (so calibration cannot drift from
inference; a test compares the result with the inference path) with flax's "intermediates"
collection mutable, which keeps the input of each projection that the layer `sow`s. From those
it returns per-layer statistics, reduced on the device so only small vectors come back:

    attn_in_sq  f32[D]    sum over tokens of the attention input (after the norm) squared
    attn_out_sq f32[N*H]  same for the input of wo (the concatenated head outputs)
    mlp_in_sq   f32[D]    same for the input of w_gate / w_up
    mlp_act_sq  f32[F]    same for silu(gate) * up, the input of w_down
    mlp_act_abs f32[F]    sum over tokens of |silu(gate) * up|
    head_out    f32[N]    sum over tokens of ||o_n @ wo[n]||, each query head's contribution

Calibration batches are contiguous chunks of one text with no padding, so every token is real
and attention is plain causal attention over the chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig, rope_frequencies
from jax_infer.model.layers import embed_lookup
from jax_infer.model.llama import DecoderLayer, attend
from jax_infer.quant.transform import is_quantized

STAT_NAMES = ("attn_in_sq", "attn_out_sq", "mlp_in_sq", "mlp_act_sq", "mlp_act_abs", "head_out")


def layer_names(params: dict) -> list[str]:
    """`layers_0`, `layers_1`, ... in numeric order (dict order is alphabetical after orbax)."""
    names = [k for k in params if k.startswith("layers_")]
    return sorted(names, key=lambda k: int(k.split("_")[1]))


def calibration_tokens(token_ids: Sequence[int], seq_len: int, num_seqs: int) -> np.ndarray:
    """i32[num_seqs, seq_len]: consecutive, non-overlapping chunks of token_ids (the last partial
    chunk is dropped). Raises if the text is too short for even one chunk."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be an int >= 2")
    if not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs={num_seqs!r} is invalid: must be an int >= 1")
    ids = np.asarray(token_ids, np.int32)
    available = len(ids) // seq_len
    if available < 1:
        raise ValueError(
            f"calibration text has {len(ids)} tokens: fewer than seq_len={seq_len}; "
            "give a longer text or a shorter seq_len"
        )
    n = min(num_seqs, available)
    return ids[: n * seq_len].reshape(n, seq_len)


def full_causal_attention(t: int) -> Callable:
    """attend_fn for `Llama`/`DecoderLayer` without a KV cache: T real tokens at positions
    0..T-1 attend causally to each other (within the layer's window). The layer cache passes
    through untouched (None)."""

    def attend_fn(q, k, v, layer_cache, window=None, softcap=None):
        b = q.shape[0]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        out = attend(q, k, v, positions, jnp.full((b,), t, jnp.int32), window, softcap)
        return out, layer_cache

    return attend_fn


def layer_forward(
    p: dict, x, config: ModelConfig, dtype=jnp.float32, window=None, local: bool = False
):
    """One decoder layer over x [B, T, D] (positions 0..T-1, causal, within `window`, the
    layer's entry of `config.layer_windows`; `local`, its entry of `config.layer_rope_local`,
    picks the sliding layers' RoPE): the model's own `DecoderLayer`, applied with its
    "intermediates" (the input of each projection) kept.
    Returns (x_out [B, T, D], stats: dict of per-feature sums over the B*T tokens)."""
    c = config
    b, t, _ = x.shape
    n, h = c.num_heads, c.head_dim
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = jnp.asarray(rope_frequencies(c, local=local))
    (x, _), state = DecoderLayer(c, dtype).apply(
        {"params": p},
        x,
        positions,
        inv_freq,
        None,
        full_causal_attention(t),
        window,
        mutable=["intermediates"],
    )
    # `sow` keeps a tuple per name: one entry, as the layer ran once.
    taps = {name: values[0] for name, values in state["intermediates"].items()}
    attn, act = taps["attn_out"], taps["mlp_act"]  # [B, T, N*H], [B, T, F]

    def sq(a):
        a = a.astype(jnp.float32)
        return jnp.sum(a * a, axis=(0, 1))

    # Each head's contribution to the residual stream: o_n [B, T, H] @ wo[n] [H, D].
    wo = jnp.asarray(p["wo"], jnp.float32).reshape(n, h, -1)
    contrib = jnp.einsum("btnh,nhd->btnd", attn.astype(jnp.float32).reshape(b, t, n, h), wo)
    stats = {
        "attn_in_sq": sq(taps["attn_in"]),
        "attn_out_sq": sq(attn),
        "mlp_in_sq": sq(taps["mlp_in"]),
        "mlp_act_sq": sq(act),
        "mlp_act_abs": jnp.sum(jnp.abs(act.astype(jnp.float32)), axis=(0, 1)),
        "head_out": jnp.sum(jnp.linalg.norm(contrib, axis=-1), axis=(0, 1)),
    }
    return x, stats


@functools.partial(jax.jit, static_argnames=("config", "dtype", "window", "local"))
def _layer_step(p, x, *, config: ModelConfig, dtype, window, local):
    return layer_forward(p, x, config, dtype, window, local)


@functools.partial(jax.jit, static_argnames=("dtype", "scale"))
def _embed(table, tokens, *, dtype, scale: float):
    x = embed_lookup(table, tokens, dtype)
    # As the model does (`ModelConfig.embed_scale`, Gemma's sqrt(D)).
    return x * jnp.asarray(scale, dtype) if scale != 1.0 else x


class LayerwiseRunner:
    """Runs calibration batches through the layers one at a time, keeping every batch's hidden
    state between layers, so a transform can change layer i (from its statistics) before layer
    i+1 sees its output: the sequential scheme of SparseGPT and Wanda.

        runner = LayerwiseRunner(params, config, tokens)
        for name in layer_names(params):
            stats = runner.stats(params[name])          # of the current inputs
            params[name] = transform(params[name], stats)
            runner.advance(params[name])                # inputs of the next layer
    """

    def __init__(
        self,
        params: dict,
        config: ModelConfig,
        tokens: np.ndarray,
        *,
        batch_size: int = 4,
        dtype=jnp.float32,
    ):
        if is_quantized(params):
            raise ValueError(
                "params are quantized: prune the float model first, then quantize the result "
                "(pruning scores and slices float matrices)"
            )
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be i32[num_seqs, seq_len]; got shape {tokens.shape}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.num_tokens = int(tokens.size)
        self.layer = 0  # index of the layer the held hidden states enter next
        self.hidden = [
            _embed(
                params["embed"],
                jnp.asarray(tokens[i : i + batch_size]),
                dtype=self.dtype,
                scale=config.embed_scale,
            )
            for i in range(0, len(tokens), batch_size)
        ]

    def _config_for(self, p: dict) -> ModelConfig:
        # Layers may already be narrower than the config says (width pruning in progress).
        h = self.config.head_dim
        return self.config.replace(
            num_heads=p["wq"].shape[1] // h,
            num_kv_heads=p["wk"].shape[1] // h,
            intermediate_size=p["w_gate"].shape[1],
        )

    def _window(self):
        return self.config.layer_windows[self.layer]

    def _local(self):
        return self.config.layer_rope_local[self.layer]

    def stats(self, p: dict) -> dict[str, np.ndarray]:
        """Statistics of layer p over the current inputs, as means over tokens."""
        cfg = self._config_for(p)
        total = None
        for x in self.hidden:
            _, s = _layer_step(
                p, x, config=cfg, dtype=self.dtype, window=self._window(), local=self._local()
            )
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        return {k: np.asarray(v) / self.num_tokens for k, v in total.items()}

    def advance(self, p: dict) -> None:
        """Replace the held hidden states by layer p's outputs."""
        cfg, window, local = self._config_for(p), self._window(), self._local()
        self.hidden = [
            _layer_step(p, x, config=cfg, dtype=self.dtype, window=window, local=local)[0]
            for x in self.hidden
        ]
        self.layer += 1
