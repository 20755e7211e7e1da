"""Tests for jax_infer.sampling against independent numpy references.

Kept sets for top-k / top-p / min-p are recomputed here in float64 from the
definitions in the module docstring. Tokens within a small tolerance of a
top-p or min-p boundary are "ambiguous" (float32 on device vs float64 here may
legitimately disagree) and are excluded from exact comparisons; everything else
must match exactly. Shapes are kept few and fixed so the number of XLA
compilations, which dominates runtime on CPU, stays small.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_infer.sampling import (
    KeyPurpose,
    SamplerFlags,
    SamplingMetadata,
    SamplingParams,
    _filter_logits,
    apply_penalties,
    min_tokens_banned_ids,
    request_key,
    sample,
    update_output_counts,
)

_filter_jit = jax.jit(_filter_logits, static_argnames="top_k_cap")
_penalties_jit = jax.jit(apply_penalties)

# Distance (in probability mass or log-ratio) from a top-p / min-p boundary
# inside which float32 rounding may flip a token's membership.
_AMBIGUITY_TOL = 1e-4


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _np_kept(x: np.ndarray, k: int, p: float, m: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference kept set of one row x f32[V] (temperature-scaled): (keep, ambiguous)."""
    v = x.astype(np.float64)
    vocab = v.shape[0]
    keep = np.ones(vocab, bool)
    ambiguous = np.zeros(vocab, bool)
    if k > 0:
        kth = np.sort(v)[::-1][min(k, vocab) - 1]
        keep &= v >= kth
    if p < 1.0:
        masked = np.where(keep, v, -np.inf)
        probs = _softmax(masked)
        # mass of tokens with a strictly greater value, per token
        above = (masked[None, :] > masked[:, None]).astype(np.float64) @ probs
        ambiguous |= keep & (np.abs(above - p) < _AMBIGUITY_TOL)
        keep &= above < p
    if m > 0.0:
        gap = v - v.max()
        ambiguous |= (keep | ambiguous) & (np.abs(gap - math.log(m)) < _AMBIGUITY_TOL)
        keep &= gap >= math.log(m)
    return keep, ambiguous


def _np_penalties(logits, counts, prompt_mask, rep, pres, freq) -> np.ndarray:
    """float32 reference of HF/vLLM repetition + OpenAI presence/frequency penalties."""
    logits = logits.astype(np.float32)
    seen_out = counts > 0
    rep = rep.astype(np.float32)[:, None]
    penalized = np.where(logits > 0, logits / rep, logits * rep)
    out = np.where(prompt_mask | seen_out, penalized, logits)
    out = out - freq.astype(np.float32)[:, None] * counts.astype(np.float32)
    return out - pres.astype(np.float32)[:, None] * seen_out.astype(np.float32)


def _run(
    logits, params, *, seeds=None, steps=None, pad_to=None, counts=None, prompt=None, banned=None
):
    """Build metadata/flags on the host and sample; returns numpy SamplerOutput fields."""
    n = len(params)
    pad_to = pad_to or n
    logits = np.asarray(logits, np.float32)
    if logits.shape[0] < pad_to:
        logits = np.concatenate([logits, np.zeros((pad_to - n, logits.shape[1]), np.float32)])
    vocab = logits.shape[1]
    seeds = list(range(n)) if seeds is None else seeds
    steps = [0] * n if steps is None else steps
    meta = SamplingMetadata.build(params, seeds, steps, pad_to)
    counts = np.zeros((pad_to, vocab), np.int32) if counts is None else counts
    prompt = np.zeros((pad_to, vocab), bool) if prompt is None else prompt
    out = sample(
        logits, meta, counts, prompt, flags=SamplerFlags.for_batch(params), banned_ids=banned
    )
    return jax.tree_util.tree_map(np.asarray, out)


# --- SamplingParams validation ---------------------------------------------

_INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", 4.0),
    ("max_tokens", None),
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "1"),
    ("temperature", True),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", False),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", float("nan")),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", float("nan")),
    ("frequency_penalty", 3),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", float("nan")),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 1.0),
    ("seed", True),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", 5),
    ("stop", {"a"}),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 3),
    ("ignore_eos", 1),
    ("ignore_eos", None),
    ("min_tokens", -1),
    ("min_tokens", 17),
    ("min_tokens", 1.5),
    ("min_tokens", True),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("logprobs", True),
    ("skip_special_tokens", 0),
    ("include_stop_str_in_output", "no"),
]


@pytest.mark.parametrize(("field", "value"), _INVALID, ids=[f"{f}={v!r}" for f, v in _INVALID])
def test_invalid_field_rejected_with_named_message(field, value):
    prefix = f"SamplingParams.{field}={value!r} is invalid: must"
    with pytest.raises(ValueError, match=re.escape(prefix)):
        SamplingParams(**{field: value})


def test_invalid_message_states_allowed_range():
    with pytest.raises(ValueError) as err:
        SamplingParams(top_p=1.5)
    assert str(err.value) == "SamplingParams.top_p=1.5 is invalid: must be in (0, 1]"
    with pytest.raises(ValueError, match=re.escape("must be an int in [0, max_tokens=4]")):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_valid_params_are_normalized_and_hashable():
    p = SamplingParams(
        max_tokens=np.int64(8),
        temperature=1,
        top_k=-1,
        top_p=np.float32(0.5),
        stop="END",
        stop_token_ids=[np.int32(7), 2],
        min_tokens=8,
        logprobs=0,
        seed=2**32 - 1,
    )
    assert p.top_k == 0 and type(p.max_tokens) is int and type(p.temperature) is float
    assert p.stop == ("END",) and p.stop_token_ids == (7, 2)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(p) == hash(dataclasses.replace(p)) and p == dataclasses.replace(p)
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().is_greedy


# --- host-side metadata and flags --------------------------------------------


def test_build_pads_with_greedy_rows_and_neutralizes_greedy_filters():
    params = [
        SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, presence_penalty=0.5),
        None,
        SamplingParams(temperature=0.0, top_k=9, top_p=0.2, repetition_penalty=1.3),
    ]
    meta = SamplingMetadata.build(params, [11, 12, 2**32 - 1], [0, 4, 9], pad_to=5)
    assert all(isinstance(a, np.ndarray) and a.shape == (5,) for a in meta)
    assert meta.seed.dtype == np.uint32 and meta.step.dtype == np.int32
    np.testing.assert_array_equal(meta.temperature, np.float32([0.5, 0, 0, 0, 0]))
    np.testing.assert_array_equal(meta.top_k, [3, 0, 0, 0, 0])
    np.testing.assert_array_equal(meta.top_p, np.float32([0.9, 1, 1, 1, 1]))
    np.testing.assert_array_equal(meta.repetition_penalty, np.float32([1, 1, 1.3, 1, 1]))
    np.testing.assert_array_equal(meta.presence_penalty, np.float32([0.5, 0, 0, 0, 0]))
    np.testing.assert_array_equal(meta.seed, [11, 12, 2**32 - 1, 0, 0])
    with pytest.raises(ValueError, match="pad_to"):
        SamplingMetadata.build(params, [1, 2, 3], [0, 0, 0], pad_to=2)
    with pytest.raises(ValueError, match="equal lengths"):
        SamplingMetadata.build(params, [1, 2], [0, 0, 0], pad_to=4)
    with pytest.raises(ValueError, match=re.escape("seeds[0]=-5")):
        SamplingMetadata.build(params, [-5, 2, 3], [0, 0, 0], pad_to=4)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([None, None], SamplerFlags(True, False, False, -1, 0)),
        (
            [SamplingParams(temperature=0, top_p=0.5, logprobs=3)],
            SamplerFlags(True, False, False, 3, 0),
        ),
        (
            [SamplingParams(temperature=0, frequency_penalty=1.0)],
            SamplerFlags(True, False, True, -1, 0),
        ),
        ([SamplingParams(), None], SamplerFlags(False, False, False, -1, 0)),
        (
            [SamplingParams(top_k=5), SamplingParams(top_k=40, logprobs=0)],
            SamplerFlags(False, True, False, 0, 64),
        ),
        (
            [SamplingParams(top_k=5), SamplingParams(top_p=0.9)],
            SamplerFlags(False, True, False, -1, -1),
        ),
        (
            [SamplingParams(min_p=0.1), SamplingParams(logprobs=2)],
            SamplerFlags(False, True, False, 2, 0),
        ),
    ],
)
def test_flags_for_batch(params, expected):
    assert SamplerFlags.for_batch(params) == expected


# --- top-k / top-p / min-p kept sets -----------------------------------------

_B, _V = 32, 128


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.3, 2.0, 8.0]), ties=st.booleans())
def test_filter_matches_numpy_kept_set(seed, scale, ties):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((_B, _V)) * scale).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2  # many exact ties, including at boundaries
    k = rng.choice([0, 1, 2, 5, 17, _V, _V + 9], _B).astype(np.int32)
    p = rng.choice([1.0, 0.05, 0.3, 0.9, 0.999, rng.uniform(0.01, 1)], _B).astype(np.float32)
    m = rng.choice([0.0, 0.0, 0.01, 0.3, 0.95, rng.uniform(0, 1)], _B).astype(np.float32)
    out = np.asarray(_filter_jit(x, k, p, m, top_k_cap=-1))
    for b in range(_B):
        keep, ambiguous = _np_kept(x[b], int(k[b]), float(p[b]), float(m[b]))
        got = np.isfinite(out[b])
        sure = ~ambiguous
        np.testing.assert_array_equal(got[sure], keep[sure], err_msg=f"row {b}")
        np.testing.assert_array_equal(out[b][got], x[b][got])  # kept logits untouched
        assert got[np.argmax(x[b])]
    # Without top-p the lax.top_k path must give bit-identical results to the sort path.
    p_off = np.ones_like(p)
    sorted_path = np.asarray(_filter_jit(x, k, p_off, m, top_k_cap=-1))
    top_k_path = np.asarray(_filter_jit(x, k, p_off, m, top_k_cap=256))
    np.testing.assert_array_equal(sorted_path, top_k_path)


def test_ties_keep_whole_tie_group():
    x = np.float32([[3, 2, 2, 2, 1, 0], [1, 1, 1, 1, 0, 0], [2, 1, 1, 0, 0, 0]])
    k = np.int32([2, 0, 0])
    p = np.float32([1.0, 0.3, 0.6])
    m = np.float32([0, 0, 0])
    kept = np.isfinite(np.asarray(_filter_jit(x, k, p, m, top_k_cap=-1)))
    # top_k=2 keeps every token tied with the 2nd largest value.
    np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 0, 0])
    # Every token of the top tie-group has zero mass strictly above it.
    np.testing.assert_array_equal(kept[1], [1, 1, 1, 1, 0, 0])
    # mass above the "1" group is ~0.47 < 0.6, so that whole group is kept.
    np.testing.assert_array_equal(kept[2], [1, 1, 1, 0, 0, 0])
    fast = np.isfinite(np.asarray(_filter_jit(x[:1], k[:1], p[:1], m[:1], top_k_cap=16)))
    np.testing.assert_array_equal(fast[0], kept[0])


_CONFIGS = [
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.5, top_k=5, min_p=0.2),
    dict(temperature=2.0, min_p=0.3),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=0.5, top_p=0.9, top_k=10),
    dict(temperature=1.2, top_p=0.7, min_p=0.05),
    dict(temperature=1.0),
]


@pytest.mark.parametrize("with_top_p", [True, False], ids=["sort_path", "top_k_path"])
def test_sampled_tokens_stay_in_kept_set(with_top_p):
    rng = np.random.default_rng(1234)
    draws, vocab = 64, 64
    configs = [c for c in _CONFIGS if with_top_p or "top_p" not in c]
    params, logits = [], []
    for c in configs:
        row_logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
        params += [SamplingParams(**c)] * draws
        logits += [row_logits] * draws
    logits = np.stack(logits)
    flags = SamplerFlags.for_batch(params)
    assert (flags.top_k_cap == -1) == with_top_p
    out = _run(logits, params, seeds=list(range(len(params))))
    for i, c in enumerate(configs):
        rows = slice(i * draws, (i + 1) * draws)
        x = logits[i * draws] / np.float32(c["temperature"])
        keep, ambiguous = _np_kept(x, c.get("top_k", 0), c.get("top_p", 1.0), c.get("min_p", 0.0))
        tokens = out.token_ids[rows]
        assert np.all(keep[tokens] | ambiguous[tokens]), (c, tokens, np.flatnonzero(keep))
        # Non-degenerate: whenever more than one token is (surely) kept, draws vary.
        if keep.sum() > 2:
            assert len(set(tokens.tolist())) > 1, c


# --- reproducibility ---------------------------------------------------------


def test_same_seed_and_step_reproduce_and_seeds_or_steps_differ():
    vocab = 64
    logits = np.zeros((256, vocab), np.float32)
    params = [SamplingParams(temperature=1.0)] * 256
    by_seed = _run(logits, params, seeds=list(range(256)), steps=[3] * 256).token_ids
    by_step = _run(logits, params, seeds=[7] * 256, steps=list(range(256))).token_ids
    assert len(set(by_seed.tolist())) > 40 and len(set(by_step.tolist())) > 40
    again = _run(logits, params, seeds=list(range(256)), steps=[3] * 256).token_ids
    np.testing.assert_array_equal(by_seed, again)
    # Identical seed and step within one batch: identical tokens.
    same = _run(logits, params, seeds=[5] * 256, steps=[1] * 256).token_ids
    assert len(set(same.tolist())) == 1


def test_row_result_independent_of_batch_and_padding():
    rng = np.random.default_rng(7)
    vocab = 256
    target = SamplingParams(temperature=0.8, top_k=7, logprobs=2)
    row = (rng.standard_normal(vocab) * 3).astype(np.float32)
    others = [
        SamplingParams(temperature=1.0, top_p=0.8),
        None,
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, min_p=0.1, frequency_penalty=0.5, logprobs=5),
        SamplingParams(temperature=0.6, top_k=300),
    ]
    other_logits = (rng.standard_normal((len(others), vocab)) * 3).astype(np.float32)
    counts = np.zeros((16, vocab), np.int32)
    counts[:, :10] = 2  # other rows' penalties see these; the target row has none
    for step in range(8):
        alone = _run(row[None], [target], seeds=[99], steps=[step])
        mixed_params = others[:3] + [target] + others[3:]
        mixed_logits = np.concatenate([other_logits[:3], row[None], other_logits[3:]])
        cnt = counts[: len(mixed_params)].copy()
        cnt[3] = 0
        mixed = _run(
            mixed_logits,
            mixed_params,
            seeds=[1, 2, 3, 99, 5, 6],
            steps=[0, 1, 2, step, 4, 5],
            counts=cnt,
        )
        padded_params = [target] + others
        padded_logits = np.concatenate([row[None], other_logits])
        cnt16 = counts.copy()
        cnt16[0] = 0
        padded = _run(
            padded_logits,
            padded_params,
            seeds=[99, 1, 2, 3, 5, 6],
            steps=[step, 0, 1, 2, 4, 5],
            pad_to=16,
            counts=cnt16,
        )
        assert alone.token_ids[0] == mixed.token_ids[3] == padded.token_ids[0]
        assert alone.logprob[0] == mixed.logprob[3] == padded.logprob[0]
        np.testing.assert_array_equal(alone.top_ids[0], mixed.top_ids[3, :2])
        np.testing.assert_array_equal(alone.top_ids[0], padded.top_ids[0, :2])


def test_request_key_purposes_are_distinct_streams_with_the_keys_of_before():
    seeds = np.uint32([0, 5, 2**32 - 1])
    steps = np.int32([0, 3, 1000])

    def data(key):
        return np.asarray(jax.random.key_data(key))

    for seed, step in zip(seeds, steps):
        base = jax.random.fold_in(jax.random.key(seed), step)
        # The formulas each path used before request_key, so seeded outputs do not change.
        np.testing.assert_array_equal(data(request_key(seed, step)), data(base))
        np.testing.assert_array_equal(
            data(request_key(seed, step, KeyPurpose.VERIFY)), data(jax.random.fold_in(base, 1))
        )
        np.testing.assert_array_equal(
            data(request_key(seed, step, KeyPurpose.DRAFT, 4)),
            data(jax.random.fold_in(jax.random.fold_in(base, 2), 4)),
        )
        # Distinct streams: different keys and different random numbers per purpose (and
        # per draft index), for the same (seed, step).
        keys = [request_key(seed, step, purpose) for purpose in KeyPurpose]
        keys += [request_key(seed, step, KeyPurpose.DRAFT, i) for i in range(3)]
        draws = [tuple(np.asarray(jax.random.uniform(k, (4,))).tolist()) for k in keys]
        assert len({tuple(data(k).tolist()) for k in keys}) == len(keys)
        assert len(set(draws)) == len(keys)
    # And under jit/vmap, as the samplers call it.
    batched = jax.jit(jax.vmap(lambda s, t: request_key(s, t, KeyPurpose.VERIFY)))(seeds, steps)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        np.testing.assert_array_equal(
            data(batched[i]), data(request_key(seed, step, KeyPurpose.VERIFY))
        )


# --- distribution -------------------------------------------------------------

_DIST_LOGITS = np.float32([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=0.6),
        dict(temperature=1.6, top_k=4),
        dict(temperature=0.5, top_p=0.8),
        dict(temperature=1.8, min_p=0.1),
    ],
    ids=str,
)
def test_sampling_distribution_matches_filtered_softmax(config):
    n = 20000
    params = [SamplingParams(**config)] * n
    logits = np.broadcast_to(_DIST_LOGITS, (n, _DIST_LOGITS.size))
    tokens = _run(logits, params, seeds=[12345] * n, steps=list(range(n))).token_ids
    empirical = np.bincount(tokens, minlength=_DIST_LOGITS.size) / n
    x = _DIST_LOGITS / np.float32(config["temperature"])
    keep, ambiguous = _np_kept(
        x, config.get("top_k", 0), config.get("top_p", 1.0), config.get("min_p", 0.0)
    )
    assert not ambiguous.any()
    expected = _softmax(np.where(keep, x, -np.inf))
    # Expected TV from sampling noise at n=20000 over 8 bins is ~0.007.
    assert 0.5 * np.abs(empirical - expected).sum() < 0.02
    # The bound is tight enough to notice an ignored temperature (TV >= 0.05 here).
    ignored_t = _softmax(np.where(keep, _DIST_LOGITS, -np.inf))
    assert 0.5 * np.abs(empirical - ignored_t).sum() > 0.05


# --- penalties, greedy, logprobs ----------------------------------------------


def _penalty_case(rng, batch=16, vocab=200):
    logits = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    logits[:, :5] = 0.0  # zero logits sit on the > 0 branch boundary
    counts = rng.choice([0, 0, 0, 1, 2, 7], (batch, vocab)).astype(np.int32)
    prompt = rng.random((batch, vocab)) < 0.2
    rep = rng.choice([1.0, 0.5, 1.3, 2.0], batch).astype(np.float32)
    pres = rng.uniform(-2, 2, batch).astype(np.float32)
    freq = rng.uniform(-2, 2, batch).astype(np.float32)
    return logits, counts, prompt, rep, pres, freq


def test_penalties_match_numpy_reference():
    logits, counts, prompt, rep, pres, freq = _penalty_case(np.random.default_rng(3))
    got = np.asarray(_penalties_jit(logits, counts, prompt, rep, pres, freq))
    want = _np_penalties(logits, counts, prompt, rep, pres, freq)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    neutral = np.asarray(
        _penalties_jit(
            logits,
            counts,
            prompt,
            np.ones(16, np.float32),
            np.zeros(16, np.float32),
            np.zeros(16, np.float32),
        )
    )
    np.testing.assert_array_equal(neutral, logits)


def test_greedy_rows_take_argmax_of_penalized_logits_and_logprobs_are_raw():
    logits, counts, prompt, rep, pres, freq = _penalty_case(np.random.default_rng(4))
    batch = logits.shape[0]
    params = []
    for b in range(batch):
        # even rows greedy (one with a sub-epsilon temperature), odd rows sampled
        temp = (1e-7 if b == 2 else 0.0) if b % 2 == 0 else 0.8
        params.append(
            SamplingParams(
                temperature=temp,
                top_p=0.9,
                repetition_penalty=float(rep[b]),
                presence_penalty=float(pres[b]),
                frequency_penalty=float(freq[b]),
                logprobs=4,
            )
        )
    out = _run(logits, params, counts=counts, prompt=prompt)
    penalized = _np_penalties(logits, counts, prompt, rep, pres, freq)
    np.testing.assert_array_equal(out.token_ids[::2], penalized[::2].argmax(-1))
    raw = _log_softmax(logits)
    np.testing.assert_allclose(out.logprob, raw[np.arange(batch), out.token_ids], atol=1e-5)
    assert out.top_ids.shape == (batch, 4) and out.top_logprobs.shape == (batch, 4)
    want_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out.top_ids, want_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, want_ids, -1), atol=1e-5)

    all_greedy = [
        SamplingParams(
            temperature=0.0,
            **{
                k: getattr(p, k)
                for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")
            },
        )
        for p in params
    ]
    assert SamplerFlags.for_batch(all_greedy).all_greedy
    out = _run(logits, all_greedy, counts=counts, prompt=prompt)
    np.testing.assert_array_equal(out.token_ids, penalized.argmax(-1))
    assert out.top_ids.shape == (batch, 0) and out.top_logprobs.shape == (batch, 0)
    zero_n = _run(logits, [SamplingParams(temperature=0.0, logprobs=0)] * batch)
    assert zero_n.top_ids.shape == (batch, 0)
    np.testing.assert_array_equal(zero_n.token_ids, logits.argmax(-1))


# --- min_tokens and output counts ----------------------------------------------


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos, vocab = 3, 16
    greedy_logits = np.zeros(vocab, np.float32)
    greedy_logits[[eos, 5, 9]] = [10.0, 9.0, 8.0]
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5]),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5]),
        SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5], ignore_eos=True),
        None,
    ] + [SamplingParams(temperature=1.0, min_tokens=1)] * 60
    num_generated = [0, 2, 0, 0] + [0] * 60
    banned = min_tokens_banned_ids(params, num_generated, eos, pad_to=64)
    assert banned.shape == (64, 2) and banned.dtype == np.int32
    np.testing.assert_array_equal(banned[:4], [[3, 5], [-1, -1], [5, -1], [-1, -1]])
    logits = np.tile(greedy_logits, (64, 1))
    out = _run(logits, params, banned=banned)
    np.testing.assert_array_equal(out.token_ids[:4], [9, eos, eos, eos])
    assert not np.any(out.token_ids[4:] == eos)  # eos holds ~99.8% mass unbanned
    # Raw logprobs are reported before the ban is applied.
    np.testing.assert_allclose(out.logprob[0], _log_softmax(greedy_logits)[9], atol=1e-5)
    assert min_tokens_banned_ids(params[:2], [5, 5], [eos, 4], pad_to=2) is None


def test_update_output_counts():
    counts = np.zeros((3, 8), np.int32)
    counts = update_output_counts(counts, np.int32([1, 2, 1]), np.array([True, False, True]))
    counts = update_output_counts(counts, np.int32([1, 4, 0]), np.array([True, True, True]))
    want = np.zeros((3, 8), np.int32)
    want[0, 1] = 2
    want[1, 4] = 1
    want[2, [0, 1]] = 1
    np.testing.assert_array_equal(np.asarray(counts), want)


# --- realistic vocabulary size --------------------------------------------------


@pytest.mark.parametrize("with_top_p", [True, False], ids=["sort_path", "top_k_path"])
def test_large_vocab_shapes(with_top_p):
    batch, vocab = 4, 49152
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
    params = [
        SamplingParams(temperature=0.9, top_k=50, logprobs=5),
        SamplingParams(temperature=1.0, top_p=0.95) if with_top_p else SamplingParams(min_p=0.05),
        None,
        SamplingParams(temperature=0.7, top_k=1),
    ]
    out = _run(logits, params, pad_to=batch)
    assert out.token_ids.shape == (batch,) and out.token_ids.dtype == np.int32
    assert out.top_ids.shape == (batch, 5) and out.top_logprobs.dtype == np.float32
    top50 = np.argsort(-logits[0])[:50]
    assert out.token_ids[0] in top50
    assert out.token_ids[2] == logits[2].argmax() == out.top_ids[2, 0]
    assert out.token_ids[3] == logits[3].argmax()


def test_sample_composes_under_outer_jit():
    params = [SamplingParams(temperature=0.9, top_k=3), None]
    meta = SamplingMetadata.build(params, [1, 2], [0, 0], pad_to=2)
    flags = SamplerFlags.for_batch(params)
    logits = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    zeros = np.zeros((2, 32), np.int32)
    prompt = np.zeros((2, 32), bool)
    outer = jax.jit(functools.partial(sample, flags=flags))
    np.testing.assert_array_equal(
        outer(logits, meta, zeros, prompt).token_ids,
        sample(logits, meta, zeros, prompt, flags=flags).token_ids,
    )


def test_argmax_last_equals_numpy_argmax_with_ties_nan_and_inf():
    """`argmax_last` (the greedy pick: a max, then the smallest index holding it) against
    numpy's argmax: lowest index on ties, the first NaN where there is one, -inf rows."""
    from jax_infer.sampling import argmax_last

    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 1000)).astype(np.float32)
    x[1, [7, 300, 999]] = 50.0  # ties: lowest index
    x[2, :] = -np.inf
    x[3, [5, 600]] = np.nan  # numpy: the first NaN
    x[4, :] = 3.0
    x[5, 999] = np.inf
    x[6] = np.round(x[6])  # many ties below the max
    x[7, 0] = np.nan
    got = np.asarray(jax.jit(argmax_last)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    y = rng.standard_normal((2, 3, 4, 50)).astype(np.float32)  # any leading shape
    np.testing.assert_array_equal(np.asarray(argmax_last(jnp.asarray(y))), np.argmax(y, -1))
