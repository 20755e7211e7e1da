"""Name maps from each on-disk format to our params pytree, as data.

Each map sends a source tensor name (with `{i}` for the layer index) to a path in the params
pytree and a transform tag:
  "copy"      store as is
  "T"         transpose an [out, in] matrix to our [in, out]
  "T_q", "T_k"  transpose after undoing llama.cpp's interleaved-RoPE row permutation of
              the query / key projection (GGUF, llama and mistral only)
  "unperm_q", "unperm_k"  the same permutation undone for a bias vector
  "minus_one" subtract 1: llama.cpp stores Gemma's RMSNorm weights as the factor 1 + w,
              HF (and we, `ModelConfig.norm_offset`) as w; transformers' GGUF loader
              subtracts 1 the same way

`name_map(fmt, config)` picks the map for a model: Gemma's HF names differ from Llama's (its
`post_attention_layernorm` norms the attention output, its `pre_feedforward_layernorm` is
Llama's post-attention norm), so each family with its own names has its own map.
"""

from __future__ import annotations

from jax_infer.config import ModelConfig

HF_NAMES = {
    "model.embed_tokens.weight": ("embed", "copy"),
    "model.norm.weight": ("final_norm", "copy"),
    "lm_head.weight": ("lm_head", "T"),
    "model.layers.{i}.input_layernorm.weight": ("layers_{i}/attn_norm", "copy"),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers_{i}/wq", "T"),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers_{i}/wk", "T"),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers_{i}/wv", "T"),
    "model.layers.{i}.self_attn.q_proj.bias": ("layers_{i}/bq", "copy"),
    "model.layers.{i}.self_attn.k_proj.bias": ("layers_{i}/bk", "copy"),
    "model.layers.{i}.self_attn.v_proj.bias": ("layers_{i}/bv", "copy"),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers_{i}/wo", "T"),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers_{i}/mlp_norm", "copy"),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers_{i}/w_gate", "T"),
    "model.layers.{i}.mlp.up_proj.weight": ("layers_{i}/w_up", "T"),
    "model.layers.{i}.mlp.down_proj.weight": ("layers_{i}/w_down", "T"),
}

GGUF_NAMES = {
    "token_embd.weight": ("embed", "copy"),
    "output_norm.weight": ("final_norm", "copy"),
    "output.weight": ("lm_head", "T"),
    "blk.{i}.attn_norm.weight": ("layers_{i}/attn_norm", "copy"),
    "blk.{i}.attn_q.weight": ("layers_{i}/wq", "T_q"),
    "blk.{i}.attn_k.weight": ("layers_{i}/wk", "T_k"),
    "blk.{i}.attn_v.weight": ("layers_{i}/wv", "T"),
    "blk.{i}.attn_q.bias": ("layers_{i}/bq", "unperm_q"),
    "blk.{i}.attn_k.bias": ("layers_{i}/bk", "unperm_k"),
    "blk.{i}.attn_v.bias": ("layers_{i}/bv", "copy"),
    "blk.{i}.attn_output.weight": ("layers_{i}/wo", "T"),
    "blk.{i}.ffn_norm.weight": ("layers_{i}/mlp_norm", "copy"),
    "blk.{i}.ffn_gate.weight": ("layers_{i}/w_gate", "T"),
    "blk.{i}.ffn_up.weight": ("layers_{i}/w_up", "T"),
    "blk.{i}.ffn_down.weight": ("layers_{i}/w_down", "T"),
}

# Gemma 2/3 (HF `Gemma2ForCausalLM`, `Gemma3ForCausalLM`): four norms per layer, QK-norm.
GEMMA_HF_NAMES = {
    **{k: v for k, v in HF_NAMES.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": ("layers_{i}/post_attn_norm", "copy"),
    "model.layers.{i}.pre_feedforward_layernorm.weight": ("layers_{i}/mlp_norm", "copy"),
    "model.layers.{i}.post_feedforward_layernorm.weight": ("layers_{i}/post_mlp_norm", "copy"),
    "model.layers.{i}.self_attn.q_norm.weight": ("layers_{i}/q_norm", "copy"),
    "model.layers.{i}.self_attn.k_norm.weight": ("layers_{i}/k_norm", "copy"),
}
# Gemma GGUFs: Llama's tensor names plus the QK and post norms, every norm stored as 1 + w.
GEMMA_GGUF_NAMES = {
    k: (dst, "minus_one" if dst.endswith("norm") else tag)
    for k, (dst, tag) in {
        **GGUF_NAMES,
        "blk.{i}.attn_q_norm.weight": ("layers_{i}/q_norm", "copy"),
        "blk.{i}.attn_k_norm.weight": ("layers_{i}/k_norm", "copy"),
        "blk.{i}.post_attention_norm.weight": ("layers_{i}/post_attn_norm", "copy"),
        "blk.{i}.post_ffw_norm.weight": ("layers_{i}/post_mlp_norm", "copy"),
    }.items()
}
FAMILY_NAMES = {
    ("hf", "gemma2"): GEMMA_HF_NAMES,
    ("hf", "gemma3"): GEMMA_HF_NAMES,
    ("gguf", "gemma2"): GEMMA_GGUF_NAMES,
    ("gguf", "gemma3"): GEMMA_GGUF_NAMES,
}

# Source tensors we know and deliberately drop (buffers some exporters write).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope_freqs.weight")


def name_map(fmt: str, config: ModelConfig) -> dict[str, tuple[str, str]]:
    """The concrete name map (every layer) of format "hf" or "gguf" for this config's family."""
    default = {"hf": HF_NAMES, "gguf": GGUF_NAMES}[fmt]
    return expand(FAMILY_NAMES.get((fmt, config.family), default), config.num_layers)


def expand(name_map: dict, num_layers: int) -> dict[str, tuple[str, str]]:
    """Concrete source name -> (params path, transform) for every layer."""
    out = {}
    for src, (dst, tf) in name_map.items():
        if "{i}" in src:
            for i in range(num_layers):
                out[src.format(i=i)] = (dst.format(i=i), tf)
        else:
            out[src] = (dst, tf)
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """params path -> shape, for every parameter the config calls for."""
    c = config
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    nh, kh = c.num_heads * h, c.num_kv_heads * h
    shapes = {"embed": (c.vocab_size, d), "final_norm": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (d, c.vocab_size)
    for i in range(c.num_layers):
        p = f"layers_{i}/"
        shapes.update(
            {
                p + "attn_norm": (d,),
                p + "wq": (d, nh),
                p + "wk": (d, kh),
                p + "wv": (d, kh),
                p + "wo": (nh, d),
                p + "mlp_norm": (d,),
                p + "w_gate": (d, f),
                p + "w_up": (d, f),
                p + "w_down": (f, d),
            }
        )
        if c.attention_bias:
            shapes.update({p + "bq": (nh,), p + "bk": (kh,), p + "bv": (kh,)})
        if c.qk_norm:
            shapes.update({p + "q_norm": (h,), p + "k_norm": (h,)})
        if c.post_norms:
            shapes.update({p + "post_attn_norm": (d,), p + "post_mlp_norm": (d,)})
    return shapes
