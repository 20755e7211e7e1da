"""Pruning on tiny random models: the calibration forward against the model's own, the layer
metric on a constructed near-identity block, exactness of width pruning when the pruned units
contribute nothing, the N:M pattern, healing, and save -> LLM -> generate.

Width pruning is checked on a tiny Llama and by the same rules on a tiny Gemma 3 (tanh-GELU
MLP, q/k and post norms, sqrt(D) embeddings, sliding layers shorter than the calibration
sequences), including its 270M shape of one KV head, where only per-group head pruning
applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.config import ModelConfig
from jax_infer.model.cache import init_cache
from jax_infer.model.llama import rms_norm
from jax_infer.model.step import forward
from jax_infer.prune import (
    HealConfig,
    LayerwiseRunner,
    calibration_tokens,
    choose_heads,
    distillation_loss,
    heal,
    layer_distances,
    layer_names,
    model_logits,
    nm_mask,
    prune_layers,
    prune_sparse,
    prune_width,
    remove_layers,
    select_layers,
)

TINY = ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
# Gemma 3's layer shapes and extra norms; three sliding layers of window 8 and one full layer.
TINY_GEMMA3 = TINY.replace(
    family="gemma3",
    hidden_act="gelu_tanh",
    norm_offset=1.0,
    post_norms=True,
    qk_norm=True,
    embed_scale=8.0,
    query_pre_attn_scalar=24.0,
    sliding_window=8,
    layer_types=("sliding_attention",) * 3 + ("full_attention",),
    rope_local_theta=100.0,
    tie_word_embeddings=True,
)


def tiny_params(config: ModelConfig = TINY, seed: int = 0) -> dict:
    """Random params built directly (flax's eager init is slow on a loaded machine), with
    projections of std 0.2 (the model's init of 0.02 makes every block a near-identity) and
    norms away from 1, so each block changes the hidden state."""
    rng = np.random.default_rng(seed)
    c = config

    def normal(*shape, std=0.2):
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    def norm(width=c.hidden_size):
        # Gemma stores w - 1 (`norm_offset`): the effective scale is near 1 either way.
        scale = 1.0 - c.norm_offset + 0.1 * rng.standard_normal(width)
        return jnp.asarray(scale, jnp.float32)

    d, f, q = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    params = {"embed": normal(c.vocab_size, d, std=1.0), "final_norm": norm()}
    if not c.tie_word_embeddings:
        params["lm_head"] = normal(d, c.vocab_size)
    for i in range(c.num_layers):
        p = {
            "attn_norm": norm(),
            "wq": normal(d, q),
            "wk": normal(d, kv),
            "wv": normal(d, kv),
            "wo": normal(q, d),
            "mlp_norm": norm(),
            "w_gate": normal(d, f),
            "w_up": normal(d, f),
            "w_down": normal(f, d),
        }
        if c.attention_bias:
            p.update(bq=normal(q, std=1.0), bk=normal(kv, std=1.0), bv=normal(kv, std=1.0))
        if c.qk_norm:
            p.update(q_norm=norm(c.head_dim), k_norm=norm(c.head_dim))
        if c.post_norms:
            p.update(post_attn_norm=norm(), post_mlp_norm=norm())
        params[f"layers_{i}"] = p
    return params


def tokens_for(config: ModelConfig, num_seqs: int = 4, seq_len: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (num_seqs, seq_len), dtype=np.int32)


def inference_logits(params, config, tokens) -> np.ndarray:
    """All-position logits through the inference path (`model.step.forward`, contiguous cache)."""
    b, t = tokens.shape
    logits, _ = forward(
        params,
        jnp.asarray(tokens),
        jnp.zeros((b,), jnp.int32),
        jnp.full((b,), t, jnp.int32),
        init_cache(config, b, t),
        config=config,
        dtype=jnp.float32,
        attn_len=t,
        all_logits=True,
    )
    return np.asarray(logits)


@pytest.mark.parametrize("config", [TINY, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_calibration_forward_matches_the_model(config):
    params, tokens = tiny_params(config), tokens_for(config)
    runner = LayerwiseRunner(params, config, tokens, batch_size=3)
    for name in layer_names(params):
        runner.advance(params[name])
    hidden = jnp.concatenate(runner.hidden)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    normed = rms_norm(hidden, params["final_norm"], config.rms_norm_eps, config.norm_offset)
    want = inference_logits(params, config, tokens)
    np.testing.assert_allclose(normed @ head, want, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(
        jax.jit(model_logits, static_argnums=1)(params, config, jnp.asarray(tokens)),
        want,
        atol=2e-4,
        rtol=2e-4,
    )


def near_identity(params: dict, layer: int, factor: float) -> dict:
    """Scale a block's output projections: factor 0 makes the block exactly the identity."""
    p = dict(params[f"layers_{layer}"])
    p["wo"] = p["wo"] * factor
    p["w_down"] = p["w_down"] * factor
    return {**params, f"layers_{layer}": p}


@pytest.mark.parametrize("layer", [1, 2])
def test_layer_metric_picks_the_near_identity_block(layer):
    config = TINY.replace(num_layers=5)
    params = near_identity(tiny_params(config), layer, 1e-3)
    d = layer_distances(params, config, tokens_for(config))
    single = [d.angular[i, i + 1] for i in range(config.num_layers)]
    assert int(np.argmin(single)) == layer
    assert single[layer] < 0.1 * sorted(single)[1]
    for metric in ("angular", "bi"):
        assert select_layers(d, 1, metric=metric) == [layer]
        assert select_layers(d, 1, metric=metric, contiguous=False) == [layer]
        assert layer in select_layers(d, 2, metric=metric)
    # Two identity blocks side by side form the best contiguous pair.
    both = near_identity(params, layer + 1, 0.0)
    d2 = layer_distances(both, config, tokens_for(config))
    assert select_layers(d2, 2) == [layer, layer + 1]
    assert d2.angular[layer, layer + 2] < 1e-3


def test_removing_an_identity_layer_is_exact_and_renumbers():
    params = near_identity(tiny_params(), 2, 0.0)
    tokens = tokens_for(TINY)
    pruned, config, info = prune_layers(params, TINY, tokens, 0.25)
    assert info["removed_layers"] == [2]
    assert config.num_layers == 3 and layer_names(pruned) == ["layers_0", "layers_1", "layers_2"]
    assert pruned["layers_2"] is params["layers_3"]
    np.testing.assert_allclose(
        inference_logits(pruned, config, tokens),
        inference_logits(params, TINY, tokens),
        atol=1e-5,
        rtol=1e-5,
    )


def test_layer_arguments_are_checked():
    params = tiny_params()
    with pytest.raises(ValueError, match=r"drop=\[7\]"):
        remove_layers(params, TINY, [7])
    with pytest.raises(ValueError, match="removes every layer"):
        remove_layers(params, TINY, range(4))
    with pytest.raises(ValueError, match="fraction=1.0"):
        prune_layers(params, TINY, tokens_for(TINY), 1.0)
    d = layer_distances(params, TINY, tokens_for(TINY, 1))
    with pytest.raises(ValueError, match="num_remove=4"):
        select_layers(d, 4)
    with pytest.raises(ValueError, match="metric='cos'"):
        select_layers(d, 1, metric="cos")
    from jax_infer.quant import quantize

    with pytest.raises(ValueError, match="params are quantized"):
        layer_distances(quantize(params, "int8"), TINY, tokens_for(TINY, 1))


def zero_units(params: dict, config: ModelConfig, mlp_channels, heads) -> dict:
    """Make MLP channels (per layer) and query heads (per layer) contribute nothing: zero their
    rows of w_down / wo. Their other weights stay random, so slicing errors would show."""
    out = dict(params)
    h = config.head_dim
    for i, name in enumerate(layer_names(params)):
        p = dict(params[name])
        if mlp_channels is not None:
            p["w_down"] = p["w_down"].at[np.asarray(mlp_channels[i])].set(0.0)
        if heads is not None:
            rows = np.concatenate([np.arange(n * h, (n + 1) * h) for n in heads[i]])
            p["wo"] = p["wo"].at[rows].set(0.0)
        out[name] = p
    return out


@pytest.mark.parametrize("config", [TINY, TINY_GEMMA3], ids=["llama", "gemma3"])
def test_mlp_width_pruning_is_exact_when_pruned_channels_are_dead(config):
    rng = np.random.default_rng(3)
    dead = [rng.choice(config.intermediate_size, 24, replace=False) for _ in range(4)]
    params = zero_units(tiny_params(config), config, dead, None)
    tokens = tokens_for(config)
    pruned, new_config, info = prune_width(params, config, tokens, mlp_fraction=0.25)
    assert new_config.intermediate_size == 72 == info["intermediate_size"][1]
    assert new_config.layer_types == config.layer_types
    for name in layer_names(pruned):
        p = pruned[name]
        assert p["w_gate"].shape == p["w_up"].shape == (64, 72)
        assert p["w_down"].shape == (72, 64)
        assert {k: v for k, v in p.items() if "norm" in k} == {
            k: v for k, v in params[name].items() if "norm" in k
        }
    np.testing.assert_allclose(
        inference_logits(pruned, new_config, tokens),
        inference_logits(params, config, tokens),
        atol=1e-5,
        rtol=1e-5,
    )


HEAD_CASES = [
    # (config, mode, dead query heads per layer, N and K after pruning half)
    (TINY.replace(attention_bias=True), "kv_groups", [[2, 3], [0, 1], [0, 1], [2, 3]], 2, 1),
    (TINY.replace(attention_bias=True), "per_group", [[1, 2], [0, 3], [1, 3], [0, 2]], 2, 2),
    (TINY_GEMMA3, "kv_groups", [[0, 1], [2, 3], [0, 1], [2, 3]], 2, 1),
    (TINY_GEMMA3, "per_group", [[0, 2], [1, 3], [0, 3], [1, 2]], 2, 2),
    # Gemma-3-270M's grouping: one KV head shared by every query head.
    (TINY_GEMMA3.replace(num_kv_heads=1), "per_group", [[0, 3], [1, 2], [2, 3], [0, 1]], 2, 1),
]


@pytest.mark.parametrize(
    "config,mode,dead_heads,expect_n,expect_k",
    HEAD_CASES,
    ids=["llama-kv_groups", "llama-per_group", "gemma3-kv_groups", "gemma3-per_group", "gemma3-k1"],
)
def test_head_pruning_is_exact_when_pruned_heads_are_dead(
    config, mode, dead_heads, expect_n, expect_k
):
    """q/k/v biases (Llama case) are sliced with their heads; Gemma's per-head q/k norms stay."""
    params = zero_units(tiny_params(config), config, None, dead_heads)
    tokens = tokens_for(config)
    pruned, new_config, info = prune_width(
        params, config, tokens, head_fraction=0.5, head_mode=mode
    )
    assert (new_config.num_heads, new_config.num_kv_heads) == (expect_n, expect_k)
    for i, name in enumerate(layer_names(pruned)):
        p = pruned[name]
        assert p["wq"].shape == (64, expect_n * 16) and p["wo"].shape == (expect_n * 16, 64)
        assert p["wk"].shape == p["wv"].shape == (64, expect_k * 16)
        if config.attention_bias:
            assert p["bq"].shape == (expect_n * 16,) and p["bk"].shape == (expect_k * 16,)
        if config.qk_norm:
            assert p["q_norm"].shape == p["k_norm"].shape == (16,)
        assert not set(info["kept_heads"][i]) & set(dead_heads[i])
    # Slicing changes the f32 summation order only: differences are rounding, ~1e-5 of the
    # logits' scale, where a wrongly kept or dropped head would change them by O(1).
    want = inference_logits(params, config, tokens)
    got = inference_logits(pruned, new_config, tokens)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_width_pruning_that_removes_nothing_is_refused():
    """Gemma-3-270M has one KV head: dropping KV groups has nothing to remove."""
    one_kv = TINY_GEMMA3.replace(num_kv_heads=1)
    params, tokens = tiny_params(one_kv), tokens_for(one_kv, 1)
    with pytest.raises(
        ValueError, match=r"head_fraction=0.5 .*kv_groups.*num_kv_heads=1.*per_group"
    ):
        prune_width(params, one_kv, tokens, head_fraction=0.5, head_mode="kv_groups")
    mha = TINY.replace(num_kv_heads=4)  # one query head per group: per_group cannot drop any
    with pytest.raises(ValueError, match=r"head_fraction=0.5 .*per_group.*=1 query head"):
        prune_width(tiny_params(mha), mha, tokens, head_fraction=0.5, head_mode="per_group")
    with pytest.raises(ValueError, match=r"mlp_fraction=0.01 removes no MLP channel"):
        prune_width(params, one_kv, tokens, mlp_fraction=0.01)


def test_choose_heads_keeps_grouping():
    scores = np.array([5.0, 1.0, 0.5, 9.0, 0.1, 0.2])  # N=6, K=2, G=3
    heads, groups = choose_heads(scores, 2, 0.5, "kv_groups")
    assert list(groups) == [1] and list(heads) == [3, 4, 5]  # group sums 6.5 and 9.3
    heads, groups = choose_heads(scores, 2, 1 / 3, "per_group")
    assert list(groups) == [0, 1] and list(heads) == [0, 1, 3, 5]
    with pytest.raises(ValueError, match="mode='rows'"):
        choose_heads(scores, 2, 0.5, "rows")


def test_width_arguments_are_checked():
    params, tokens = tiny_params(), tokens_for(TINY, 1)
    with pytest.raises(ValueError, match="mlp_fraction=1.5"):
        prune_width(params, TINY, tokens, mlp_fraction=1.5)
    with pytest.raises(ValueError, match="head_mode='x'"):
        prune_width(params, TINY, tokens, head_fraction=0.5, head_mode="x")


def test_nm_mask_keeps_the_top_two_of_every_four():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((16, 5))
    keep = nm_mask(scores, 2, 4)
    groups = keep.reshape(4, 4, 5)
    assert (groups.sum(axis=1) == 2).all()
    s = scores.reshape(4, 4, 5)
    kept_min = np.where(groups, s, np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, s).max(axis=1)
    assert (kept_min > dropped_max).all()


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_sparse_pruning_patterns(criterion):
    params, tokens = tiny_params(), tokens_for(TINY)
    pruned, config, info = prune_sparse(params, TINY, tokens, criterion=criterion, pattern="2:4")
    assert config == TINY and info["sparsity_achieved"] == pytest.approx(0.5)
    for name in layer_names(pruned):
        for proj in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            w = np.asarray(pruned[name][proj])
            assert w.shape == params[name][proj].shape
            nonzero = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
            assert (nonzero <= 2).all()
            if criterion == "magnitude":  # the kept weights are the larger two of each four
                orig = np.abs(np.asarray(params[name][proj])).reshape(-1, 4, w.shape[1])
                kept = (w != 0).reshape(-1, 4, w.shape[1])
                assert (
                    np.where(kept, orig, np.inf).min(1) >= np.where(kept, -np.inf, orig).max(1)
                ).all()
    assert pruned["embed"] is params["embed"]
    pruned, _, info = prune_sparse(params, TINY, tokens, criterion=criterion, sparsity=0.3)
    assert info["sparsity_achieved"] == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="pattern='3:2'"):
        prune_sparse(params, TINY, tokens, criterion=criterion, pattern="3:2")


def test_wanda_uses_activations():
    """Wanda and magnitude differ once one input feature's activations dominate."""
    params, tokens = tiny_params(), tokens_for(TINY)
    p = dict(params["layers_0"])
    p["attn_norm"] = p["attn_norm"].at[5].set(50.0)  # feature 5 of wq/wk/wv's input is large
    params = {**params, "layers_0": p}
    wanda, _, _ = prune_sparse(params, TINY, tokens, criterion="wanda", sparsity=0.9)
    mag, _, _ = prune_sparse(params, TINY, tokens, criterion="magnitude", sparsity=0.9)
    assert (np.asarray(wanda["layers_0"]["wq"])[5] != 0).mean() > 0.8  # row 5 mostly kept
    assert (np.asarray(mag["layers_0"]["wq"])[5] != 0).mean() < 0.3


def test_healing_reduces_the_distillation_loss():
    teacher = tiny_params()
    tokens = calibration_tokens(tokens_for(TINY, 1, 24 * 32).reshape(-1), 24, 32)
    student, config = remove_layers(teacher, TINY, [1])
    before = distillation_loss(student, config, teacher, TINY, tokens)
    healed, history = heal(
        student,
        config,
        teacher,
        TINY,
        tokens,
        HealConfig(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=3),
    )
    after = distillation_loss(healed, config, teacher, TINY, tokens)
    assert after < 0.7 * before, (before, after)
    assert len(history["loss"]) == 30
    assert history["learning_rate"][0] == 0.0
    assert max(history["learning_rate"]) == pytest.approx(3e-3)
    assert healed["embed"] is not None and np.array_equal(healed["embed"], teacher["embed"])
    assert jax.tree.map(jnp.shape, healed) == jax.tree.map(jnp.shape, student)


def test_heal_config_is_checked():
    with pytest.raises(ValueError, match="warmup_steps=10"):
        HealConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="steps=0"):
        HealConfig(steps=0)


def test_calibration_tokens():
    ids = list(range(50))
    assert calibration_tokens(ids, 16, 10).shape == (3, 16)
    with pytest.raises(ValueError, match="seq_len=16"):
        calibration_tokens(ids[:10], 16, 2)


def write_word_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer.json whose ids are the tiny model's vocabulary (w0 .. w{V-1})."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))


def test_pruned_checkpoint_loads_and_generates_through_llm(tmp_path):
    from jax_infer import LLM, SamplingParams
    from jax_infer.weights import load_orbax, save_orbax

    params, tokens = tiny_params(), tokens_for(TINY)
    pruned, config, _ = prune_layers(params, TINY, tokens, 0.25)
    pruned, config, info = prune_width(
        pruned, config, tokens, mlp_fraction=0.25, head_fraction=0.5, head_mode="per_group"
    )
    assert (config.num_layers, config.intermediate_size, config.num_heads) == (3, 72, 2)
    ckpt = tmp_path / "pruned"
    save_orbax(str(ckpt), pruned, config, extra={"prune": info})
    write_word_tokenizer(ckpt, TINY.vocab_size)
    restored_config, restored, meta = load_orbax(str(ckpt), progress=False)
    assert restored_config == config and meta["extra"]["prune"]["num_heads"] == [4, 2]
    assert jax.tree.map(jnp.shape, restored) == jax.tree.map(jnp.shape, pruned)

    llm = LLM(model=str(ckpt), num_pages=16, max_model_len=64, progress=False)
    assert llm.config == config
    prompt = [int(t) for t in tokens[0, :8]]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert out.text.split() == [f"w{t}" for t in out.token_ids]
    # Greedy tokens agree with the pruned params' own argmax, teacher-forced in one pass.
    ids = np.asarray([prompt + list(out.token_ids)], np.int32)
    logits = inference_logits(pruned, config, ids[:, :-1])[0]
    assert list(np.argmax(logits[len(prompt) - 1 :], axis=-1)) == list(out.token_ids)
