"""Batch-invariant mode (`EngineConfig.batch_invariant`, model/invariant.py): one request's
logits at every step are bitwise the same alone, beside random mixes of other requests
(joining and leaving at random steps), under three prefill chunk sizes and after a forced
preemption; its greedy outputs are the same; the logits still match HF transformers and the
normal path within float tolerance; setups that cannot be invariant are refused.

Without the mode these comparisons fail on this CPU (measured when the mode was built: the
tiny model's logits differed in the last bits at 8 to 12 of 12 steps beside 1 to 31
companions and under 16- and 32-token chunks; the first layer's RMSNorm and XLA's dot on
the untiled [64, 32] projections were the sources).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_infer import SamplingParams
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.llm import LLM
from jax_infer.model.invariant import fixed_order_matmul, fixed_order_sum
from jax_infer.quant import quantize
from jax_infer.weights import load_hf
from tests.test_window_pages import word_tokenizer
from tests.tiny_models import make_hf_model

MAX_NEW = 12
MAX_LEN = 128
TARGET = "T"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """HF's tiny Llama (tests/tiny_models.py) loaded: its [64, 32] K/V projections, [64, 112]
    gate/up and 97-token head are not multiples of the kernels' 64-column tiles, so they
    take `fixed_order_matmul`; wq, wo and w_down take the tiled kernel."""
    path = str(tmp_path_factory.mktemp("batch_invariant"))
    hf = make_hf_model("llama", path)
    config, params = load_hf(path, progress=False)
    return hf, config, params, word_tokenizer(config.vocab_size)


def make_engine(tiny, batch_invariant=True, **kwargs) -> LLMEngine:
    """Synchronous steps by default: `run_target` reads each step's logits, which the fused
    (and async) step never brings back; `fast=True` runs the default fused async path."""
    _, config, params, tok = tiny
    fast = kwargs.pop("fast", False)
    ec = dict(
        async_scheduling=fast,
        max_num_seqs=40,
        page_size=8,
        num_pages=700,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        batch_invariant=batch_invariant,
    )
    ec.update(kwargs)
    return LLMEngine(config, params, tok, max_model_len=MAX_LEN, engine_config=EngineConfig(**ec))


def run_target(engine, target, companions=(), preempt_after=None, max_new=MAX_NEW, record=True):
    """Runs the target request beside companions [(join step, prompt, max_tokens)] to the
    end; preempt_after: preempt every running request (the target among them) after that
    step (the scheduler recomputes them from their tokens). Returns the
    target's logits at each sampled step {outputs so far: f32[V]} and its output ids.
    record=False: no logits (the fused step keeps them on the device), only the output ids."""
    logits: dict[int, np.ndarray] = {}
    execute = engine.runner.execute
    if not record:
        execute = None

    def recording(batch):
        result = execute(batch)
        rows = np.asarray(result.logits)
        for r, i in enumerate(result.order):
            req = batch.sample[i] if i >= 0 else None
            if req is not None and req.request_id == TARGET:
                logits[req.num_output_tokens] = rows[r].copy()
        return result

    if record:
        engine.runner.execute = recording
        # Forward and sampler as two programs, so the step hands its logits back.
        engine.runner.can_fuse = lambda batch: False
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    engine.add_request(target, params, request_id=TARGET)
    pending = sorted(companions, key=lambda c: c[0])
    step, out = 0, None
    try:
        while engine.has_unfinished_requests() or pending:
            while pending and pending[0][0] <= step:
                _, prompt, n = pending.pop(0)
                sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                engine.add_request(prompt, sp)
            for chunk in engine.step():
                if chunk.request_id == TARGET and chunk.finished:
                    out = chunk.token_ids
            step += 1
            if step == preempt_after:
                preempted = engine.scheduler.preempt_all()
                assert TARGET in preempted, f"the target was not running at step {step}"
    finally:
        if record:
            engine.runner.execute = execute
            del engine.runner.can_fuse
    if record:
        assert sorted(logits) == list(range(max_new))
    return logits, out


def random_companions(rng, vocab, n):
    return [
        (
            int(rng.integers(0, 6)),
            rng.integers(1, vocab, size=int(rng.integers(1, 100))).tolist(),
            int(rng.integers(1, 17)),
        )
        for _ in range(n)
    ]


def assert_bitwise(base, got, what):
    for step in base:
        assert np.array_equal(base[step], got[step]), (
            f"{what}: logits at step {step} differ (max |diff| "
            f"{np.abs(base[step] - got[step]).max():.3g})"
        )


@pytest.fixture(scope="module")
def target(tiny):
    vocab = tiny[1].vocab_size
    return np.random.default_rng(7).integers(1, vocab, size=45).tolist()


@pytest.fixture(scope="module")
def alone(tiny, target):
    """The target alone, its whole prompt in one chunk."""
    return run_target(make_engine(tiny), target)


def test_fixed_order_helpers_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    w = rng.standard_normal((37, 11)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fixed_order_sum(x))[:, 0], x.sum(-1), rtol=1e-5)
    sq = np.asarray(fixed_order_sum(x, squares=True))[:, 0]
    np.testing.assert_allclose(sq, (x * x).sum(-1), rtol=1e-5)
    wide = rng.standard_normal((3, 576)).astype(np.float32)  # 9 slices of 64 lanes
    np.testing.assert_allclose(np.asarray(fixed_order_sum(wide))[:, 0], wide.sum(-1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(fixed_order_matmul(x, w)), x @ w, rtol=1e-4, atol=1e-5)
    # A row's result does not depend on the other rows.
    one = np.asarray(fixed_order_matmul(x[:1], w))
    np.testing.assert_array_equal(one, np.asarray(fixed_order_matmul(x, w))[:1])


def test_mixes_chunks_and_preemption_fast(tiny, target, alone):
    """The fast subset: two mixes, one chunk size, one preemption."""
    base, tokens = alone
    rng = np.random.default_rng(1)
    engine = make_engine(tiny)
    for n in (1, 8):
        got, out = run_target(engine, target, random_companions(rng, tiny[1].vocab_size, n))
        assert_bitwise(base, got, f"beside {n} companions")
        assert out == tokens
    got, out = run_target(make_engine(tiny, max_num_batched_tokens=16), target)
    assert_bitwise(base, got, "16-token chunks")
    engine = make_engine(tiny)
    comps = random_companions(rng, tiny[1].vocab_size, 4)
    got, out = run_target(engine, target, comps, preempt_after=5)
    assert_bitwise(base, got, "preempted")
    assert out == tokens
    # The default fused, async step gives the same greedy outputs beside companions.
    fast = make_engine(tiny, fast=True)
    for n in (3, 12):
        comps = random_companions(rng, tiny[1].vocab_size, n)
        _, out = run_target(fast, target, comps, record=False)
        assert out == tokens, f"fused async step beside {n} companions"
    assert fast.stats()["num_async_steps"] > 0


@pytest.mark.slow
def test_twenty_mixes_three_chunks_and_preemption(tiny, target, alone):
    """The must-show: 20 random mixes of 1 to 32 companions (joining at steps 0-5, leaving
    after 1-16 tokens), chunk sizes 8, 16 and 32 (each beside companions too), and a forced
    preemption mid-decode: every step's logits bitwise equal, greedy outputs identical."""
    base, tokens = alone
    rng = np.random.default_rng(2)
    vocab = tiny[1].vocab_size
    engine = make_engine(tiny)
    sizes = [1, 32] + rng.integers(1, 33, size=18).tolist()
    for k, n in enumerate(sizes):
        got, out = run_target(engine, target, random_companions(rng, vocab, n))
        assert_bitwise(base, got, f"mix {k} ({n} companions)")
        assert out == tokens, f"mix {k}: greedy outputs differ"
    for chunk in (8, 16, 32):
        engine = make_engine(tiny, max_num_batched_tokens=chunk)
        for comps in ([], random_companions(rng, vocab, 6)):
            got, out = run_target(engine, target, comps)
            assert_bitwise(base, got, f"{chunk}-token chunks, {len(comps)} companions")
            assert out == tokens
    for preempt_after in (1, 7):  # mid-prompt (45 tokens in 32-token chunks), mid-decode
        engine = make_engine(tiny, max_num_batched_tokens=32)
        comps = random_companions(rng, vocab, 8)
        got, out = run_target(engine, target, comps, preempt_after=preempt_after)
        assert_bitwise(base, got, f"preempted after step {preempt_after}")
        assert out == tokens


@pytest.mark.slow
def test_bfloat16_with_a_float32_kv_cache(tiny, target):
    """bf16 weights and activations (the bf16 tiled kernel at every row count) over an f32
    KV cache (what kv_cache_dtype="auto" gives bf16 under the "cpu" backend): invariant too."""
    _, config, params, tok = tiny
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)

    def engine(**kw):
        ec = dict(
            async_scheduling=False,
            max_num_seqs=40,
            page_size=8,
            num_pages=700,
            enable_prefix_caching=False,
            kv_cache_dtype="float32",
        )
        ec = EngineConfig(batch_invariant=True, **{**ec, **kw})
        return LLMEngine(
            config, bf16, tok, dtype=jnp.bfloat16, max_model_len=MAX_LEN, engine_config=ec
        )

    base, tokens = run_target(engine(), target)
    rng = np.random.default_rng(4)
    got, out = run_target(engine(), target, random_companions(rng, config.vocab_size, 12))
    assert_bitwise(base, got, "bf16 beside 12 companions")
    got, out2 = run_target(engine(max_num_batched_tokens=16), target)
    assert_bitwise(base, got, "bf16, 16-token chunks")
    assert out == out2 == tokens


def test_logits_match_hf_and_the_normal_path(tiny, target, alone):
    """Invariance does not cost correctness: the target's logits at every step against HF
    transformers' forward over the same tokens, and against the engine without the mode."""
    hf = tiny[0]
    base, tokens = alone
    seq = target + tokens
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].float().numpy()
    for step in base:
        np.testing.assert_allclose(
            base[step], ref[len(target) - 1 + step], atol=2e-4, rtol=1e-4, err_msg=f"step {step}"
        )
    normal, normal_tokens = run_target(make_engine(tiny, batch_invariant=False), target)
    assert normal_tokens == tokens
    for step in base:
        np.testing.assert_allclose(base[step], normal[step], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attention_backend="xla"), "attention_backend"),
        (dict(attention_backend="reference"), "attention_backend"),
        (dict(kv_cache_dtype="int8"), "kv_cache_dtype"),
        (dict(kv_cache_dtype="bfloat16"), "kv_cache_dtype"),
    ],
)
def test_refused_setups_name_the_parameter(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_engine(tiny, **kwargs)


def test_refuses_quantized_weights_and_bad_values(tiny):
    hf, config, params, tok = tiny
    ec = EngineConfig(num_pages=64, batch_invariant=True)
    with pytest.raises(ValueError, match="quantization"):
        LLMEngine(config, quantize(params, "int8"), tok, max_model_len=64, engine_config=ec)
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineConfig(batch_invariant="yes")
    with pytest.raises(ValueError, match="engine='continuous'"):
        LLM(model="no-such-model", engine="static", batch_invariant=True)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_invariant(smollm2, hf_smollm2):
    """SmolLM2-135M (every projection on the tiled kernel): a lean version of the must-show
    (3 mixes, a 16-token chunk, a preemption) and its logits against HF transformers."""
    tok = smollm2.tokenizer
    engine_kwargs = dict(
        max_num_seqs=16, num_pages=400, enable_prefix_caching=False, async_scheduling=False
    )

    def engine(**kw):
        ec = EngineConfig(batch_invariant=True, **{**engine_kwargs, **kw})
        return LLMEngine(smollm2.config, smollm2.params, tok, max_model_len=256, engine_config=ec)

    target = tok.encode("The river carried small boats past old stone houses while the")
    base, tokens = run_target(engine(), target, max_new=6)
    rng = np.random.default_rng(3)
    eng = engine(max_num_batched_tokens=64)
    for n in (1, 5, 15):
        comps = random_companions(rng, 5000, n)
        got, out = run_target(eng, target, comps, max_new=6)
        assert_bitwise(base, got, f"beside {n} companions")
        assert out == tokens
    got, out = run_target(engine(max_num_batched_tokens=16), target, max_new=6)
    assert_bitwise(base, got, "16-token chunks")
    eng = engine()
    got, out = run_target(eng, target, random_companions(rng, 5000, 3), 4, max_new=6)
    assert_bitwise(base, got, "preempted")
    assert out == tokens
    model, _ = hf_smollm2
    with torch.no_grad():
        ref = model(torch.tensor([target + tokens])).logits[0].float().numpy()
    for step in base:
        np.testing.assert_allclose(base[step], ref[len(target) - 1 + step], atol=2e-3, rtol=1e-3)
