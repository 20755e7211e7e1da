"""Gemma 2 and Gemma 3 against HF transformers (torch, CPU, f32).

Tiny random models (tests/tiny_models.py, saved with `save_pretrained`; their logits are
also checked by tests/test_model_hf.py): greedy continuations through the engine with
16-token prefill chunks and with forced preemption over prompts longer than the window;
quantization, a quantized self-draft, depth pruning; config errors.

The real model, Gemma 3 270M from its Q4_K_M GGUF (`LLM(model="gemma3-270m")`), against
transformers loading the same file: the tokenizer on a varied set, last-position logits,
and greedy 32-token continuations of five prompts (one of ~1,600 tokens, past the 512-token
window of five layers in six) through `LLM.generate` and through the engine with 16-token
prefill chunks and with forced preemption. transformers takes about a minute to build the
262k-token tokenizer and load the file: each is done once, in module fixtures.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from jax_infer import LLM, SamplingParams
from jax_infer.config import GEMMA3_270M, ModelConfig
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.prune import remove_layers
from jax_infer.quant import quantize
from tests.test_sharding_engine import write_tokenizer
from tests.tiny_models import make_hf_model

TINY_VOCAB = 97


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens from HF's model with its KV cache, never stopping at EOS (as our
    `ignore_eos`; `generate(min_new_tokens=)` would instead mask EOS out of the argmax)."""
    out, tokens = [], torch.tensor([prompt])
    cache = None
    with torch.no_grad():
        for _ in range(n):
            result = model(tokens, cache=cache, use_cache=True)
            cache = result.cache
            out.append(int(result.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out


def run_engine(engine: LLMEngine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    return [final[i].token_ids for i in ids]


# == tiny random Gemma 2 / Gemma 3 =======================================================


@pytest.fixture(scope="module", params=["gemma2_softcap", "gemma3"])
def tiny(request, tmp_path_factory):
    """(name, HF model, our LLM) for a tiny Gemma with a sliding window of 8 tokens."""
    path = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param, path, vocab_size=TINY_VOCAB)
    write_tokenizer(path, TINY_VOCAB)
    llm = LLM(str(path), progress=False, max_model_len=128)
    return request.param, model, llm


@pytest.fixture(scope="module")
def tiny_prompts():
    rng = np.random.default_rng(3)
    # Longer than the window (8) and than a 16-token chunk, some crossing page boundaries.
    return [rng.integers(3, TINY_VOCAB, size=n).tolist() for n in (5, 13, 29, 40)]


def test_tiny_config_reads_gemma_fields(tiny):
    name, model, llm = tiny
    c, hf = llm.config, model.config
    assert c.family == ("gemma2" if name.startswith("gemma2") else "gemma3")
    assert c.norm_offset == 1.0 and c.post_norms and c.hidden_act == "gelu_tanh"
    assert c.qk_norm == (c.family == "gemma3")
    assert c.embed_scale == pytest.approx(hf.hidden_size**0.5)
    assert c.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert c.attn_logit_softcapping == hf.attn_logit_softcapping
    assert c.final_logit_softcapping == hf.final_logit_softcapping
    assert c.layer_types == tuple(hf.layer_types) and c.sliding_window == hf.sliding_window


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"max_num_batched_tokens": 16},
        {"num_pages": 16, "page_size": 4, "max_num_batched_tokens": 16},
    ],
    ids=["chunk16", "preempt"],
)
def test_tiny_engine_greedy_equals_hf(tiny, tiny_prompts, engine_kwargs):
    """Our engine, chunked and preempting, continues exactly as HF's generate."""
    name, model, llm = tiny
    want = [hf_greedy(model, p, 12) for p in tiny_prompts]
    engine = LLMEngine(
        llm.config,
        llm.params,
        llm.tokenizer,
        max_model_len=56,  # the longest prompt (40) and its 12 tokens fit
        engine_config=EngineConfig(max_num_seqs=4, **engine_kwargs),
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = run_engine(engine, tiny_prompts, greedy)
    assert got == want, f"{name} {engine_kwargs}"
    if "num_pages" in engine_kwargs:
        assert engine.num_preemptions > 0, "the pool was meant to force preemptions"
    # Every page of every page group (full and sliding-window layers) is free again.
    for alloc in engine.scheduler.allocators:
        assert alloc.num_free() == alloc.num_pages - 1


def test_tiny_quantized_and_self_draft(tiny, tiny_prompts):
    """int8 weights keep most greedy tokens; a quantized self-draft changes none."""
    name, model, llm = tiny
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(tiny_prompts, greedy)]
    canonical = llm.canonical_params()

    q = LLMEngine(llm.config, quantize(canonical, "int8"), llm.tokenizer, max_model_len=128)
    q_out = run_engine(q, tiny_prompts, greedy)
    same = sum(a == b for p, r in zip(plain, q_out) for a, b in zip(p, r))
    assert same >= 0.75 * sum(len(p) for p in plain), f"{name}: int8 kept {same} tokens"
    spec = LLMEngine(
        llm.config,
        canonical,
        llm.tokenizer,
        max_model_len=128,
        engine_config=EngineConfig(
            max_num_seqs=4, speculative_method="draft_model", num_speculative_tokens=3
        ),
        draft_model=(llm.config, quantize(canonical, "int8")),
    )
    assert run_engine(spec, tiny_prompts, greedy) == plain
    assert spec.stats()["speculative"]["acceptance_rate"] > 0


def test_tiny_depth_pruning_keeps_layer_kinds(tiny):
    name, _, llm = tiny
    params, config = remove_layers(llm.params, llm.config, [0])
    assert config.num_layers == 1
    assert config.layer_types == llm.config.layer_types[1:]
    out = LLMEngine(config, params, llm.tokenizer, max_model_len=64)
    ids = run_engine(out, [[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(ids[0]) == 4


def test_hf_config_errors_name_the_field():
    base = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 4,
        "sliding_window": 4,
    }
    config = ModelConfig.from_hf_config(base)
    # No layer_types: transformers' default pattern, and Gemma 3's default RoPE bases.
    assert config.layer_types == ("sliding_attention", "sliding_attention")
    assert config.rope_theta == 1e6 and config.rope_local_theta == 1e4
    with pytest.raises(ValueError, match="hidden_activation='relu'"):
        ModelConfig.from_hf_config({**base, "hidden_activation": "relu"})
    bad_rope = {"sliding_attention": {"rope_type": "yarn", "factor": 2.0}}
    with pytest.raises(ValueError, match="sliding_attention.rope_type='yarn'"):
        ModelConfig.from_hf_config({**base, "rope_parameters": bad_rope})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        config.replace(hidden_act="relu")


# == Gemma 3 270M from its GGUF ==========================================================

LONG_WORDS = (
    "In the old harbour town the fishermen mended their nets each morning while gulls "
    "circled above the grey water and merchants argued about the price of salt. "
)


def real_prompts(tokenizer) -> list[list[int]]:
    texts = [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        "Translate to German: The weather is nice today.\n",
        "Numbers: 1, 1, 2, 3, 5, 8, 13,",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    long = tokenizer.encode(LONG_WORDS * 60 + "\nSummary of the story:")
    assert len(long) >= 1500, len(long)
    return prompts + [long]


@pytest.fixture(scope="module")
def gemma():
    return LLM(model="gemma3-270m", progress=False, max_model_len=2048)


@pytest.fixture(scope="module")
def hf_gemma(gemma):
    """transformers' own load of the same GGUF (model and tokenizer), f32."""
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.dirname(gemma.model_path), os.path.basename(gemma.model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model.eval(), tok


@pytest.fixture(scope="module")
def hf_continuations(gemma, hf_gemma):
    prompts = real_prompts(gemma.tokenizer)
    return prompts, [hf_greedy(hf_gemma[0], p, 32) for p in prompts]


TOKENIZER_TEXTS = [
    "Hello world",
    "  two leading spaces and  double  spaces",
    "tabs\tand\r\nCRLF\n\n\nthree newlines",
    "def f(x):\n    return x ** 2  # square\n",
    "1234567890 3.14159 -2e10 0x1F",
    "héllo wörld, naïve café, Straße",
    "日本語のテキストと中文",
    "emoji 🎉👩‍👩‍👧 and symbols ∑∫√",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "   ",
    "",
    "trailing spaces   ",
]


@pytest.mark.slow
@pytest.mark.real_model
def test_270m_config_and_tokenizer_equal_hf(gemma, hf_gemma):
    # The GGUF stores eps as f32 (9.99999997e-07), as transformers reads it too.
    assert gemma.config.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)
    assert gemma.config.replace(rms_norm_eps=1e-6) == GEMMA3_270M
    hf_model, hf_tok = hf_gemma
    assert gemma.config.layer_types == tuple(hf_model.config.layer_types)
    tok = gemma.tokenizer
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), repr(text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), repr(text)
    assert tok.bos_token_id == 2 and {1, 106} <= tok.eos_token_ids  # <eos>, <end_of_turn>
    chat = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert chat == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        "Hello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == 2 and ids.count(2) == 1  # BOS once, from the template


@pytest.mark.slow
@pytest.mark.real_model
def test_270m_last_position_logits_equal_hf(gemma, hf_gemma, hf_continuations):
    import jax.numpy as jnp

    from jax_infer.model.cache import init_cache
    from jax_infer.model.step import forward

    prompts, _ = hf_continuations
    for prompt in (prompts[0], prompts[-1]):  # short, and past the 512-token window
        with torch.no_grad():
            ref = hf_gemma[0](torch.tensor([prompt])).logits[0, -1].numpy()
        n = len(prompt)
        ours, _ = forward(
            gemma.params,
            jnp.asarray([prompt], jnp.int32),
            jnp.zeros(1, jnp.int32),
            jnp.full(1, n, jnp.int32),
            init_cache(gemma.config, 1, n),
            config=gemma.config,
            dtype=jnp.float32,
            attn_len=n,
        )
        ours = np.asarray(ours[0])
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"{n} tokens: relative error {rel}"


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("mode", ["llm", "chunk16", "preempt"])
def test_270m_greedy_equals_hf(gemma, hf_continuations, mode):
    prompts, want = hf_continuations
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    if mode == "llm":
        got = [o.token_ids for o in gemma.generate(prompts, greedy)]
    else:
        page = 16
        max_len = max(len(p) for p in prompts) + 32
        kwargs = {"max_num_batched_tokens": 16}
        if mode == "preempt":
            # A pool that holds the longest request alone: the others force preemptions.
            kwargs = {"max_num_batched_tokens": 256, "num_pages": -(-max_len // page) + 1}
        engine = LLMEngine(
            gemma.config,
            gemma.params,
            gemma.tokenizer,
            max_model_len=max_len,
            engine_config=EngineConfig(max_num_seqs=8, page_size=page, **kwargs),
        )
        got = run_engine(engine, prompts, greedy)
        # Every page of every page group (full and sliding-window layers) is free again.
        for alloc in engine.scheduler.allocators:
            assert alloc.num_free() == alloc.num_pages - 1
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{mode}: prompt {i} ({len(prompts[i])} tokens) differs from HF"
    if mode == "preempt":
        assert engine.num_preemptions > 0, "the pool was meant to force preemptions"


# == tiny Gemma GGUFs, laid out as llama.cpp's converter writes them ======================

GGUF_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gemma_gguf(path, model, arch: str, window: int):
    """A Gemma GGUF of an HF model as llama.cpp writes one: q/k rows not permuted (NEOX
    RoPE), every norm stored as 1 + w, the window but no layer pattern or query scale."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters.get("rope_theta", 0)) or 1e6)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(window)
    w.add_vocab_size(cfg.vocab_size)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = p.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            target = f"blk.{i}.{GGUF_TENSORS[rest]}"
        else:
            target = GGUF_TENSORS[name]
        w.add_tensor(target, a + 1 if "norm" in name else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "name, overrides",
    [
        # transformers' GGUF defaults: caps 50 / 30, query scale 256, every 2nd layer global.
        (
            "gemma2_softcap",
            dict(
                query_pre_attn_scalar=256,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                initializer_range=0.4,
            ),
        ),
        # Gemma 3: every 6th layer global (here both sliding), local base 1e4.
        (
            "gemma3",
            dict(
                query_pre_attn_scalar=256,
                layer_types=["sliding_attention", "sliding_attention"],
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                },
            ),
        ),
    ],
)
def test_tiny_gemma_gguf_equals_hf(name, overrides, tmp_path):
    import jax.numpy as jnp

    from jax_infer.model.cache import init_cache
    from jax_infer.model.step import forward
    from jax_infer.weights import load_gguf

    model = make_hf_model(name, tmp_path / "hf", vocab_size=TINY_VOCAB, **overrides)
    arch = "gemma2" if name.startswith("gemma2") else "gemma3"
    write_gemma_gguf(tmp_path / "m.gguf", model, arch, model.config.sliding_window)
    config, params, _ = load_gguf(str(tmp_path / "m.gguf"), progress=False)
    assert config.family == arch and config.layer_types == tuple(model.config.layer_types)
    tokens = np.random.default_rng(5).integers(0, TINY_VOCAB, size=(1, 24)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _ = forward(
        params,
        jnp.asarray(tokens, jnp.int32),
        jnp.zeros(1, jnp.int32),
        jnp.full(1, 24, jnp.int32),
        init_cache(config, 1, 32),
        config=config,
        dtype=jnp.float32,
        attn_len=32,
        all_logits=True,
    )
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
