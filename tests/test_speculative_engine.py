"""Speculative decoding in the engine on tiny random models: greedy outputs token for token
identical to decoding without speculation, with every proposer kind (a draft model equal to
the target: all accepted; an unrelated one: nearly all rejected; the quantized self-draft;
a noisy oracle: partial acceptance, stop rules mid-run), batched and one at a time; pages
never leak; the metrics count what happened."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jax_infer import SamplingParams
from jax_infer.config import ModelConfig
from jax_infer.engine import EngineConfig, LLMEngine
from jax_infer.model.llama import init_params
from jax_infer.speculative import Draft, SpeculativeDecoder
from jax_infer.tokenizer import Tokenizer

VOCAB = 512  # ids below 512 are real tokens of the SmolLM2 tokenizer used to detokenize
CONFIG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
MAX_LEN = 64
K = 3


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    out = []
    # Few distinct step shapes (compiles dominate the time here): prompts under one 32-token
    # chunk and sequences within 4 pages of 16.
    for n in [2, 3, 5, 8, 13, 17, 21, 3, 9, 11, 4, 6, 7, 15, 19, 20]:
        out.append(rng.integers(3, VOCAB, size=n).tolist())
    return out


def engine(tokenizer, params, max_num_seqs=4, draft_model=None, **spec):
    ec = EngineConfig(max_num_seqs=max_num_seqs, page_size=16, num_pages=40, **spec)
    return LLMEngine(
        CONFIG, params, tokenizer, max_model_len=MAX_LEN, engine_config=ec, draft_model=draft_model
    )


def draft_engine(tokenizer, params, draft_model, k=K, **kw):
    """An engine speculating with a draft model: draft_model=(config, params)."""
    return engine(
        tokenizer,
        params,
        draft_model=draft_model,
        speculative_method="draft_model",
        num_speculative_tokens=k,
        **kw,
    )


def run(eng, prompts, sp):
    """Runs prompts to the end under sp (one SamplingParams for all, or one per prompt)."""
    sps = sp if isinstance(sp, list) else [sp] * len(prompts)
    ids = [eng.add_request(p, s) for p, s in zip(prompts, sps)]
    final = {}
    while eng.has_unfinished_requests():
        for chunk in eng.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    eng.scheduler.check_invariants()
    assert eng.scheduler.allocator.num_free() == eng.num_pages - 1, "pages leaked"
    return [final[i].token_ids for i in ids], [final[i].finish_reason for i in ids]


GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tokenizer, params, prompts):
    return run(engine(tokenizer, params), prompts, GREEDY)[0]


class OracleProposer:
    """Proposes the reference continuation, corrupted at random: partial acceptance."""

    def __init__(self, prompts, reference, seed=0):
        self.truth = {tuple(p): r for p, r in zip(prompts, reference)}
        self.rng = np.random.default_rng(seed)

    def propose(self, rows, pool):
        out = []
        for r in rows:
            for prompt, ref in self.truth.items():
                if tuple(r.token_ids[: len(prompt)]) == prompt:
                    done = len(r.token_ids) - len(prompt)
                    toks = list(ref[done : done + r.num_drafts])
                    break
            toks = [t if self.rng.random() < 0.75 else (t + 1) % VOCAB for t in toks]
            out.append(Draft(toks[: self.rng.integers(0, r.num_drafts + 1)]))
        return out, pool

    def verified(self, request_id, num_valid):
        pass

    def forget(self, request_id):
        pass


@pytest.mark.parametrize("max_num_seqs", [4, pytest.param(1, marks=pytest.mark.slow)])
def test_oracle_partial_acceptance_identical(tokenizer, params, prompts, reference, max_num_seqs):
    eng = engine(tokenizer, params, max_num_seqs=max_num_seqs)
    eng.spec = SpeculativeDecoder(OracleProposer(prompts, reference), K)
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    s = eng.stats()["speculative"]
    assert 0.3 < s["acceptance_rate"] < 0.95, s
    assert s["per_position_acceptance"][0] > s["per_position_acceptance"][-1]


def test_stop_rules_cut_an_accepted_run(tokenizer, params, prompts, reference):
    """A stop token in the middle of accepted drafts ends the request there, as without
    speculation; max_tokens likewise."""
    stops = tuple({ref[5] for ref in reference})
    sp = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, stop_token_ids=stops)
    want = run(engine(tokenizer, params), prompts, sp)
    eng = engine(tokenizer, params)
    eng.spec = SpeculativeDecoder(OracleProposer(prompts, reference, seed=1), K)
    assert run(eng, prompts, sp) == want
    assert "stop" in want[1]


@pytest.mark.parametrize("max_num_seqs", [4, 1])
def test_ngram_greedy_identical(tokenizer, params, prompts, reference, max_num_seqs):
    """Prompt lookup on the 16 prompts, batched and one request at a time: drafts of several
    lengths (so several verify widths), never gated, outputs those of plain decoding."""
    eng = engine(
        tokenizer,
        params,
        max_num_seqs=max_num_seqs,
        speculative_method="ngram",
        num_speculative_tokens=8,
    )
    widths = []
    width_of = eng.spec.verify_width
    eng.spec.verify_width = lambda *a, **kw: widths.append(width_of(*a, **kw)) or widths[-1]
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    s = eng.stats()["speculative"]
    assert s["num_verify_rows"] > 0 and s["num_gated_decodes"] == 0, s
    assert len(set(widths)) > 1, widths


def test_verify_width_follows_the_longest_draft():
    from jax_infer.speculative import NgramProposer

    def width(k, *lengths):
        dec = SpeculativeDecoder(NgramProposer(), k)
        return dec.verify_width({str(i): Draft([1] * n) for i, n in enumerate(lengths)})

    assert [width(12, n) for n in range(1, 13)] == [2, 3, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13]
    assert width(12, 1, 6, 2) == 9  # the longest draft of the step decides
    assert [width(4, n) for n in range(1, 5)] == [2, 3, 5, 5]
    assert [width(3, n) for n in range(1, 4)] == [2, 3, 4]
    # Beside a prompt chunk the step keeps one width, k + 1 (fewer shapes to compile).
    dec = SpeculativeDecoder(NgramProposer(), 12)
    assert dec.verify_width({"a": Draft([1])}, with_prompt_chunk=True) == 13


@pytest.mark.parametrize(
    "draft",
    ["same", pytest.param("other", marks=pytest.mark.slow), "self-int8"],
)
def test_draft_model_greedy_identical(tokenizer, params, prompts, reference, draft):
    if draft == "same":
        draft_model = (CONFIG, params)
    elif draft == "other":
        draft_model = (CONFIG, init_params(CONFIG, seed=7))
    else:
        from jax_infer.quant import quantize

        draft_model = (CONFIG, quantize(params, "int8"))
    eng = draft_engine(tokenizer, params, draft_model)
    # A draft with the target's config attends over the target's page pool (no pool of its
    # own); with the target's weights it must then still agree on every draft.
    assert eng.spec.proposer.shares_pool and not hasattr(eng.spec.proposer, "cache")
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    s = eng.stats()["speculative"]
    assert s["num_verify_rows"] > 0
    if draft == "same":
        assert s["acceptance_rate"] == 1.0 and s["mean_accepted_tokens_per_step"] > 3
    elif draft == "other":
        assert s["acceptance_rate"] < 0.2
        assert s["num_gated_decodes"] > 0  # a draft model that keeps failing stops drafting


def test_draft_of_another_shape_keeps_its_own_pool(tokenizer, params, prompts, reference):
    """A draft with fewer layers cannot read the target's pool: it keeps its own, catches up
    on each prompt itself, and the outputs are still the target's."""
    small = dataclasses.replace(CONFIG, num_layers=1)
    eng = draft_engine(tokenizer, params, (small, init_params(small, seed=3)))
    assert not eng.spec.proposer.shares_pool
    assert len(eng.spec.proposer.cache) == 1
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    assert eng.stats()["speculative"]["num_verify_rows"] > 0


def test_layer_pruned_self_draft_greedy_identical(tokenizer, params, prompts, reference):
    """The self-draft with layers removed (prune/layers.py: the target's remaining layers,
    embedding and head, shared): another shape, so it keeps its own pool; outputs unchanged."""
    from jax_infer.prune.layers import remove_layers

    draft_params, draft_config = remove_layers(params, CONFIG, [1])
    eng = draft_engine(tokenizer, params, (draft_config, draft_params))
    assert not eng.spec.proposer.shares_pool and len(eng.spec.proposer.cache) == 1
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    assert eng.stats()["speculative"]["num_verify_rows"] > 0


def test_draft_vocab_mismatch_is_a_clear_error(tokenizer, params):
    other = ModelConfig(**{**CONFIG.__dict__, "vocab_size": VOCAB * 2})
    with pytest.raises(ValueError, match="vocab_size=1024 != target vocab_size=512"):
        draft_engine(tokenizer, params, (other, init_params(other)))


def test_unsupported_requests_fall_back(tokenizer, params, prompts):
    """Penalties and logprobs are not verified speculatively: those requests decode as usual,
    next to speculating ones, with the same outputs as without speculation."""
    sps = [
        SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=8),
    ]
    ps = prompts[:3]
    base = engine(tokenizer, params)
    want = [run(base, [p], sp)[0][0] for p, sp in zip(ps, sps)]
    eng = draft_engine(tokenizer, params, (CONFIG, params))
    ids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
    final = {}
    while eng.has_unfinished_requests():
        for chunk in eng.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    assert [final[i].token_ids for i in ids] == want
    assert final[ids[1]].logprobs is not None and len(final[ids[1]].logprobs) == 8
    assert eng.stats()["speculative"]["num_verify_rows"] > 0


def test_speculation_off_for_large_batches(tokenizer, params, prompts, reference):
    eng = draft_engine(tokenizer, params, (CONFIG, params), speculative_disable_by_batch_size=2)
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    rows = eng.stats()["speculative"]["num_verify_rows"]
    # Only steps with at most 2 running requests speculate: the run's tail.
    assert 0 < rows < len(prompts) * 16 / 4


@pytest.mark.parametrize("max_num_seqs", [4, 1])
def test_int4_self_draft_greedy_identical(tokenizer, params, prompts, reference, max_num_seqs):
    """The int4 self-draft (the target quantized to int4 groups, embedding included) on the 16
    prompts, batched and one request at a time."""
    from jax_infer.quant import quantize

    eng = draft_engine(
        tokenizer, params, (CONFIG, quantize(params, "int4+embed")), max_num_seqs=max_num_seqs
    )
    got, _ = run(eng, prompts, GREEDY)
    assert got == reference
    s = eng.stats()["speculative"]
    assert s["num_verify_rows"] > 0 and s["acceptance_rate"] > 0.3, s


@pytest.mark.slow
def test_sampled_outputs_keep_the_target_distribution(tokenizer, monkeypatch):
    """End to end through the engine (a draft model that agrees with the target part of the
    time, the verify widths, the q layout, the seeds): with temperature and top-k, the 2nd
    and 3rd tokens of 600 seeded requests of one prompt follow the same distribution with and
    without speculation (chi-square homogeneity). The same check run with an always-accept
    rule must fail."""
    import jax
    import jax.numpy as jnp
    from scipy import stats

    import jax_infer.speculative.decoder as decoder_module
    import jax_infer.speculative.rejection as rejection_module

    # A peaked target (few likely tokens, so the cells are populated) and a draft mixed from
    # it and an unrelated model: acceptance well inside (0, 1).
    target = init_params(CONFIG, seed=1)
    target["embed"] = target["embed"] * 30
    other = init_params(CONFIG, seed=7)
    other["embed"] = other["embed"] * 30
    draft = jax.tree.map(lambda a, b: 0.7 * a + 0.3 * b, target, other)
    sp = [
        SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True, seed=s)
        for s in range(600)
    ]
    prompt = list(range(40, 50))

    def tokens(eng):
        return np.array(run(eng, [prompt] * len(sp), sp)[0])

    def speculative():
        eng = draft_engine(tokenizer, target, (CONFIG, draft), k=2, max_num_seqs=16)
        return tokens(eng), eng.stats()["speculative"]

    def pvalues(a, b):
        out = []
        for pos in (1, 2):
            values = np.union1d(a[:, pos], b[:, pos])
            table = np.array([[np.sum(t[:, pos] == v) for v in values] for t in (a, b)])
            table = table[:, table.sum(0) >= 5]  # chi-square wants populated cells
            assert table.shape[1] >= 4
            out.append(stats.chi2_contingency(table).pvalue)
        return out

    plain = tokens(engine(tokenizer, target, max_num_seqs=16))
    spec, s = speculative()
    assert s["num_verify_rows"] > 0 and 0.2 < s["acceptance_rate"] < 0.9, s
    assert min(pvalues(plain, spec)) > 1e-3

    real_rule = rejection_module.rejection_sample

    def always_accept(p, draft_ids, q, num_drafts, keys):
        tokens, _ = real_rule(p, draft_ids, q, num_drafts * 0, keys)  # the bonus from p
        return jnp.concatenate([draft_ids, tokens[:, :1]], axis=1), num_drafts + 1

    # A fresh jit of verify tracing the wrong rule (jit caches by function: wrap it anew).
    monkeypatch.setattr(rejection_module, "rejection_sample", always_accept)
    unjitted = rejection_module.verify.__wrapped__
    monkeypatch.setattr(
        decoder_module,
        "verify",
        jax.jit(
            lambda *a, flags, **kw: unjitted(*a, flags=flags, **kw), static_argnames=("flags",)
        ),
    )
    wrong, _ = speculative()
    assert max(pvalues(plain, wrong)) < 1e-6
