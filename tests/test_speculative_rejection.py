"""The acceptance rule, tested against the distribution it must reproduce: many verify steps
over fixed target (p) and draft (q) distributions on a 6-token vocabulary, and a chi-square
test of the emitted tokens against p. Deliberately wrong rules must fail the same test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jax_infer.sampling import SamplerFlags, SamplingMetadata, SamplingParams, sample
from jax_infer.speculative.rejection import rejection_sample, target_probs

V, K, N = 6, 3, 40_000


def dists(seed: int, sparse: bool):
    """p f32[K+1, V] (some zeros when sparse, like top-k/top-p), q f32[K, V] (all > 0)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V) * 0.7, size=K + 1)
    if sparse:
        p[:, :2] = 0.0
        p /= p.sum(-1, keepdims=True)
    # A draft that roughly agrees with the target, as a useful one does; drafts must be
    # accepted often enough for the deeper positions to get samples.
    q = 0.6 * p[:K] + 0.4 * rng.dirichlet(np.ones(V) * 0.7, size=K)
    return p.astype(np.float32), q.astype(np.float32)


def run(rule, p, q, point_mass: bool, seed: int = 0):
    """N independent verify steps with K drafts drawn from q; returns tokens, counts."""
    key_d, key_v = jax.random.split(jax.random.key(seed))
    drafts = jax.random.categorical(key_d, jnp.log(jnp.asarray(q)), shape=(N, K))
    pb = jnp.broadcast_to(jnp.asarray(p), (N, K + 1, V))
    qb = None if point_mass else jnp.broadcast_to(jnp.asarray(q), (N, K, V))
    num = jnp.full((N,), K, jnp.int32)
    tokens, count = jax.jit(rule)(pb, drafts, qb, num, jax.random.split(key_v, N))
    return np.asarray(tokens), np.asarray(count), np.asarray(drafts)


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(samples, minlength=V)
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    expected = probs * len(samples)
    if observed[expected == 0].any():
        return 0.0  # a token the target never emits
    keep = expected > 0
    expected = expected[keep] * observed.sum() / expected[keep].sum()
    return stats.chisquare(observed[keep], expected).pvalue


def always_accept(p, draft_ids, q, num_drafts, keys):
    """Wrong: every draft accepted, bonus from p."""
    tokens, _ = rejection_sample(p, draft_ids, q, jnp.zeros_like(num_drafts), keys)
    return jnp.concatenate([draft_ids, tokens[:, :1]], axis=1), num_drafts + 1


def accept_when_more_likely(p, draft_ids, q, num_drafts, keys):
    """Wrong: accept the first draft iff p(x) >= q(x), without the coin flip; the residual is
    right. (Judging drafts from q as point masses, accept with p(x) and draw from p without
    x, is NOT wrong: that rule is exact whatever the drafts come from.)"""
    rows = jnp.arange(len(p))
    x = draft_ids[:, 0]
    accept = p[rows, 0, x] >= q[rows, 0, x]
    residual = jnp.maximum(p[:, 0] - q[:, 0], 0.0)
    fresh = jax.vmap(jax.random.categorical)(keys, jnp.log(residual))
    first = jnp.where(accept, x, fresh)
    return jnp.concatenate([first[:, None], draft_ids], axis=1), jnp.ones_like(num_drafts)


def resample_from_p(p, draft_ids, q, num_drafts, keys):
    """Wrong: on rejection draw from p instead of the residual max(0, p - q)."""
    tokens, count = rejection_sample(p, draft_ids, q, num_drafts, keys)
    accepted = count - 1
    fresh = jax.vmap(jax.random.categorical)(
        jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys), jnp.log(p[jnp.arange(len(p)), accepted])
    )
    rejected = accepted < num_drafts
    final = jnp.where(rejected, fresh, tokens[jnp.arange(len(p)), accepted])
    return tokens.at[jnp.arange(len(p)), accepted].set(final), count


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("point_mass", [False, True])
def test_emitted_tokens_follow_the_target(sparse, point_mass):
    p, q = dists(1, sparse)
    # point_mass: a proposer without a distribution (drafts still come from somewhere, here
    # q); the point-mass rule must be right whatever that is.
    tokens, count, _ = run(rejection_sample, p, q, point_mass)
    assert (count >= 1).all() and (count <= K + 1).all()
    # First emitted token ~ p_0; given the first draft was accepted, the second ~ p_1, and so
    # on: acceptance at j is independent of what happens at j + 1.
    for j in range(K + 1):
        rows = count > j
        assert rows.sum() > 1000, "too few samples at this position for a meaningful test"
        assert chi2_pvalue(tokens[rows, j], p[j]) > 1e-4, f"position {j}"
    # Some drafts are accepted and some rejected, or the test proves little.
    assert 0.05 < (count > 1).mean() < 0.95


@pytest.mark.parametrize(
    "wrong, point_mass",
    [(always_accept, False), (accept_when_more_likely, False), (resample_from_p, False)],
)
def test_wrong_rules_fail_the_same_test(wrong, point_mass):
    p, q = dists(1, sparse=False)
    tokens, count, _ = run(wrong, p, q, point_mass)
    pvalues = [chi2_pvalue(tokens[count > j, j], p[j]) for j in range(K) if (count > j).sum()]
    assert min(pvalues) < 1e-6


def test_greedy_target_accepts_exactly_the_argmax_prefix():
    p, _ = dists(2, sparse=False)
    argmax = p.argmax(-1)
    onehot = np.eye(V, dtype=np.float32)[argmax][None]  # the greedy target
    drafts = np.array([[argmax[0], argmax[1], (argmax[2] + 1) % V]], np.int32)
    for n, want in [(3, [argmax[0], argmax[1], argmax[2]]), (1, [argmax[0], argmax[1]])]:
        tokens, count = rejection_sample(
            jnp.asarray(onehot),
            jnp.asarray(drafts),
            None,
            jnp.array([n]),
            jax.random.split(jax.random.key(0), 1),
        )
        assert np.asarray(tokens)[0, : int(count[0])].tolist() == want


def test_target_probs_match_the_sampler():
    """The distribution verification uses is the one `sample` draws from (top-k/top-p/min-p)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32) * 2)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.05),
    ]
    meta = SamplingMetadata.build(params, [1, 2, 3], [0, 0, 0], 3)
    flags = SamplerFlags.for_batch(params)
    probs = np.asarray(target_probs(logits, jax.tree.map(jnp.asarray, meta), flags))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert probs[0].max() == 1.0 and probs[0].argmax() == int(jnp.argmax(logits[0]))
    n = 3000  # draws per row, as one batch of rows that differ only in their step
    m = SamplingMetadata.build(
        params * n, [1, 2, 3] * n, np.repeat(np.arange(n), 3).tolist(), 3 * n
    )
    ids = sample(
        jnp.tile(logits, (n, 1)),
        m,
        jnp.zeros((3 * n, 1), jnp.int32),
        jnp.zeros((3 * n, 1), bool),
        flags=flags,
    )
    counts = np.zeros((3, 50))
    np.add.at(counts, (np.tile(np.arange(3), n), np.asarray(ids.token_ids)), 1)
    for r in (1, 2):
        assert (counts[r][probs[r] == 0] == 0).all(), "sampler draws a token verify excludes"
        assert chi2_pvalue_n(counts[r], probs[r]) > 1e-4


def chi2_pvalue_n(observed: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    expected = probs[keep].astype(np.float64)
    expected *= observed[keep].sum() / expected.sum()
    return stats.chisquare(observed[keep], expected).pvalue


@pytest.mark.parametrize("with_q", [False, True])
def test_greedy_verify_shortcut_equals_the_general_rule(with_q):
    """`verify` skips the probabilities for all-greedy batches (argmax comparison); it must
    emit what the general rule emits for greedy rows (one-hot p), with or without draft
    distributions, for every draft count including none."""
    from jax_infer.speculative.rejection import verify

    rng = np.random.default_rng(3)
    steps, width, vocab = 5, 5, 40
    logits = rng.normal(size=(steps, width, vocab)).astype(np.float32)
    rows = np.array([4, 0, 2, 1], np.int32)
    num_drafts = np.array([4, 2, 0, 3], np.int32)
    drafts = rng.integers(0, vocab, size=(len(rows), width - 1)).astype(np.int32)
    for b, r in enumerate(rows):
        n = num_drafts[b]
        # Right-aligned: the row's n drafts are scored by its last n + 1 logits; agree with
        # the argmax for a prefix of b + 1 drafts so that accepted runs differ between rows.
        target = logits[r, width - 1 - n :].argmax(-1)
        agree = min(b + 1, n)
        drafts[b, :agree] = target[:agree]
    q = None
    if with_q:
        q = jnp.asarray(rng.dirichlet(np.ones(vocab), size=(len(rows), width - 1)), jnp.float32)
    params = [SamplingParams(temperature=0.0)] * len(rows)
    meta = jax.tree.map(jnp.asarray, SamplingMetadata.build(params, [7] * 4, [0] * 4, 4))
    fast = SamplerFlags.for_batch(params)
    assert fast.all_greedy
    general = SamplerFlags(False, False, False, -1, 0)
    got = verify(jnp.asarray(logits), rows, meta, drafts, q, num_drafts, flags=fast)
    want = verify(jnp.asarray(logits), rows, meta, drafts, q, num_drafts, flags=general)
    got_tokens, got_counts = map(np.asarray, got)
    want_tokens, want_counts = map(np.asarray, want)
    np.testing.assert_array_equal(got_counts, want_counts)
    for b, r in enumerate(rows):
        n = num_drafts[b]
        target = logits[r, width - 1 - n :].argmax(-1)  # numpy: the argmax at each position
        accepted = 0
        while accepted < n and drafts[b, accepted] == target[accepted]:
            accepted += 1
        assert got_counts[b] == accepted + 1
        np.testing.assert_array_equal(got_tokens[b, : accepted + 1], target[: accepted + 1])
        np.testing.assert_array_equal(want_tokens[b, : accepted + 1], target[: accepted + 1])
    assert len(set(got_counts.tolist())) > 1  # the rows accept runs of different lengths
