"""Weight loaders: GGUF types and q/k un-permutation, orbax round trips, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from jax_infer.model.cache import init_cache
from jax_infer.model.step import forward
from jax_infer.weights import WeightsError, load_gguf, load_hf, load_orbax, save_orbax
from tests.tiny_models import make_hf_model

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation, written out from its definition:
    rows [heads, 2, H/2] -> [heads, H/2, 2] (rotate-half pairs become adjacent)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]


def write_gguf(path, model, matrix_type=Q.F32, overrides=None):
    """A llama GGUF of an HF model, as llama.cpp's converter would lay it out."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        target = gguf_name(name)
        if overrides and target in overrides:
            raw, qtype = overrides[target]
            w.add_tensor(target, raw, raw_dtype=qtype)
        elif a.ndim == 2 and matrix_type != Q.F32:
            w.add_tensor(target, quantize(a, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(target, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits_of(config, params, tokens):
    logits, _ = forward(
        params,
        jnp.asarray(tokens, jnp.int32),
        jnp.zeros(len(tokens), jnp.int32),
        jnp.full(len(tokens), len(tokens[0]), jnp.int32),
        init_cache(config, len(tokens), 32),
        config=config,
        dtype=jnp.float32,
        attn_len=32,
        all_logits=True,
    )
    return np.asarray(logits)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    return make_hf_model("llama", path), path


def test_gguf_f32_equals_hf_after_unpermuting_qk(tiny_llama, tmp_path):
    model, hf_dir = tiny_llama
    write_gguf(tmp_path / "m.gguf", model)
    config, params, _ = load_gguf(str(tmp_path / "m.gguf"), progress=False)
    hf_config, hf_params = load_hf(str(hf_dir), progress=False)
    assert config.replace(rms_norm_eps=hf_config.rms_norm_eps) == hf_config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = [[3, 17, 42, 8, 77, 1, 5, 60]]
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(logits_of(config, params, tokens) - ref).max() <= 1e-4


@pytest.mark.parametrize(
    "qtype,tol", [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-3), (Q.Q4_1, 0.02), (Q.Q4_0, 0.03)]
)
def test_gguf_quantized_types_dequantize_close(tmp_path, qtype, tol):
    # Block types need rows that are multiples of 32 values.
    hf_dir = tmp_path / "hf"
    model = make_hf_model("llama", hf_dir, intermediate_size=128)
    write_gguf(tmp_path / "m.gguf", model, matrix_type=qtype)
    config, params, _ = load_gguf(str(tmp_path / "m.gguf"), progress=False)
    _, ref = load_hf(str(hf_dir), progress=False)
    for key in ("wq", "wk", "w_down"):
        got, want = np.asarray(params["layers_0"][key]), np.asarray(ref["layers_0"][key])
        # Errors bounded relative to the matrix scale (init std 0.02, so max |w| ~ 0.1).
        assert np.abs(got - want).max() <= tol, (qtype.name, key)


def q4_k_reference(raw: np.ndarray) -> np.ndarray:
    """Q4_K blocks (256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 nibble
    bytes) decoded from llama.cpp's block layout, written out independently of gguf-py."""
    blocks = raw.reshape(-1, 144)
    out = np.zeros((blocks.shape[0], 256), np.float32)
    for b, blk in enumerate(blocks):
        d = blk[0:2].view(np.float16)[0].astype(np.float32)
        dmin = blk[2:4].view(np.float16)[0].astype(np.float32)
        sc, qs = blk[4:16], blk[16:144]

        def scale_min(j, sc=sc):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | (
                (sc[j] >> 6) << 4
            )

        for chunk in range(4):
            s1, m1 = scale_min(2 * chunk)
            s2, m2 = scale_min(2 * chunk + 1)
            q = qs[32 * chunk : 32 * chunk + 32]
            out[b, 64 * chunk : 64 * chunk + 32] = d * s1 * (q & 0xF) - dmin * m1
            out[b, 64 * chunk + 32 : 64 * chunk + 64] = d * s2 * (q >> 4) - dmin * m2
    return out.reshape(-1)


def q6_k_reference(raw: np.ndarray) -> np.ndarray:
    """Q6_K blocks (128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, f16 d)."""
    blocks = raw.reshape(-1, 210)
    out = np.zeros((blocks.shape[0], 256), np.float32)
    for b, blk in enumerate(blocks):
        ql, qh = blk[0:128].astype(np.int32), blk[128:192].astype(np.int32)
        scales = blk[192:208].view(np.int8).astype(np.float32)
        d = blk[208:210].view(np.float16)[0].astype(np.float32)
        for half in range(2):
            lo, hi, sc = ql[64 * half :], qh[32 * half :], scales[8 * half :]
            y = out[b, 128 * half :]
            for j in range(32):
                s = j // 16
                y[j] = d * sc[s] * (((lo[j] & 0xF) | (((hi[j] >> 0) & 3) << 4)) - 32)
                y[j + 32] = d * sc[s + 2] * (((lo[j + 32] & 0xF) | (((hi[j] >> 2) & 3) << 4)) - 32)
                y[j + 64] = d * sc[s + 4] * (((lo[j] >> 4) | (((hi[j] >> 4) & 3) << 4)) - 32)
                y[j + 96] = d * sc[s + 6] * (((lo[j + 32] >> 4) | (((hi[j] >> 6) & 3) << 4)) - 32)
    return out.reshape(-1)


def random_k_blocks(rng, n_blocks, block_bytes, d_offsets):
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in d_offsets:  # keep the f16 scales finite and small
        raw[:, off : off + 2] = (
            rng.uniform(0.001, 0.01, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return raw


@pytest.mark.parametrize(
    "qtype,block_bytes,d_offsets,reference",
    [(Q.Q4_K, 144, (0, 2), q4_k_reference), (Q.Q6_K, 210, (208,), q6_k_reference)],
)
def test_gguf_k_quants_match_reference_decoder(tmp_path, qtype, block_bytes, d_offsets, reference):
    """K-quant rows (in-dim 256) decode as llama.cpp defines them."""
    model = make_hf_model("llama", tmp_path / "hf", intermediate_size=256)
    out_dim, in_dim = model.config.hidden_size, 256  # ffn_down is [D, F] in GGUF numpy order
    raw = random_k_blocks(np.random.default_rng(0), out_dim, block_bytes, d_offsets)
    write_gguf(tmp_path / "k.gguf", model, overrides={"blk.1.ffn_down.weight": (raw, qtype)})
    _, params, _ = load_gguf(str(tmp_path / "k.gguf"), progress=False)
    want = reference(raw).reshape(out_dim, in_dim).T  # ours is [in, out]
    np.testing.assert_allclose(np.asarray(params["layers_1"]["w_down"]), want, rtol=1e-6, atol=1e-7)


def test_orbax_roundtrip_is_bitwise(tiny_llama, tmp_path):
    _, hf_dir = tiny_llama
    config, params = load_hf(str(hf_dir), progress=False)
    save_orbax(str(tmp_path / "ckpt"), params, config)
    config2, params2, _ = load_orbax(str(tmp_path / "ckpt"), progress=False)
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_corrupt_checkpoint_is_clear(tiny_llama, tmp_path):
    _, hf_dir = tiny_llama
    config, params = load_hf(str(hf_dir), progress=False)
    ckpt = tmp_path / "ckpt"
    save_orbax(str(ckpt), params, config)
    data_files = [
        os.path.join(root, f)
        for root, _, files in os.walk(ckpt / "params")
        for f in files
        if os.path.getsize(os.path.join(root, f)) > 1000
    ]
    assert data_files
    for f in data_files:  # cut every data file in half
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(WeightsError, match="corrupt"):
        load_orbax(str(ckpt), progress=False)
    (ckpt / "jax_infer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="jax_infer.json"):
        load_orbax(str(ckpt), progress=False)


def test_missing_and_truncated_files_are_clear(tiny_llama, tmp_path):
    model, hf_dir = tiny_llama
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(str(tmp_path / "nope.gguf"))
    write_gguf(tmp_path / "m.gguf", model)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.gguf"):
        load_gguf(str(tmp_path / "cut.gguf"), progress=False)

    broken = tmp_path / "broken_hf"
    shutil.copytree(hf_dir, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_hf(str(broken), progress=False)
    st.unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_hf(str(broken), progress=False)


def test_unknown_architecture_and_shape_mismatch(tiny_llama, tmp_path):
    _, hf_dir = tiny_llama
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 100}))
    with pytest.raises(
        WeightsError, match=r"has shape \(\d+, \d+\) after conversion, but the config expects"
    ):
        load_hf(str(bad), progress=False)
    (bad / "config.json").write_text(
        json.dumps(cfg | {"architectures": ["BertModel"], "model_type": "bert"})
    )
    with pytest.raises(ValueError, match="BertModel"):
        load_hf(str(bad), progress=False)
