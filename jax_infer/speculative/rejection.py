"""Lossless verification of draft tokens: the modified rejection sampling of Leviathan et al.
(2023) and Chen et al. (2023).

A proposer suggests tokens x_1..x_n drawn from q_1..q_n; the target scored them all in one
step and gives p_1..p_(n+1) at the n+1 positions. Walk left to right: accept x_j with
probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection j, emit one token from the
residual norm(max(0, p_j - q_j)) and stop; when all n are accepted, emit a bonus token from
p_(n+1). Every emitted token is then distributed exactly as the target would have sampled it
(the residual makes up for the mass q took from where p is smaller), so speculation changes
speed, never the output distribution.

Special cases of the same rule, with no separate code path:

* A proposer without a distribution (n-gram lookup, a greedy draft) is a point mass at x_j:
  accept with probability p_j(x_j); the residual is p_j with x_j removed.
* A greedy request's p_j is one-hot at the target's argmax: a draft is accepted exactly when it
  equals the argmax and the correction is the argmax, which is greedy decoding token for token.

`target_probs` turns raw logits into the distribution the normal sampler draws from
(temperature, top-k, top-p, min-p: `sampling._filter_logits`, the same code). Penalties,
min_tokens bans and logprobs depend on the tokens before each position and are not applied
here: the engine does not speculate for requests that use them (see `supports_speculation`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_infer.sampling import (
    GREEDY_TEMPERATURE_EPS,
    KeyPurpose,
    SamplerFlags,
    SamplingMetadata,
    SamplingParams,
    _filter_logits,
    apply_token_bitmask,
    argmax_last,
    request_key,
)


def supports_speculation(params: SamplingParams, num_generated: int) -> bool:
    """Whether a request's next tokens may be verified speculatively: the target
    distribution of every draft position must not depend on the drafts before it beyond the
    model itself. Penalties (counts of output tokens), a min_tokens ban still in force and
    per-token logprobs and logit_bias are not supported; such requests decode without drafts."""
    return (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.logprobs is None
        and not params.logit_bias
        and num_generated >= params.min_tokens
    )


def target_probs(logits, meta: SamplingMetadata, flags: SamplerFlags):
    """f32[R, V] logits -> f32[R, V]: the normal sampler's distribution per row (one-hot at
    the argmax for greedy rows). `meta` and `flags` as for `sampling.sample` (no penalties)."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jax.nn.one_hot(argmax_last(logits), vocab, dtype=jnp.float32)
    if flags.all_greedy:
        return greedy
    is_greedy = meta.temperature < GREEDY_TEMPERATURE_EPS  # bool[R]
    temperature = jnp.where(is_greedy, 1.0, meta.temperature).astype(jnp.float32)
    scaled = logits / temperature[:, None]
    if flags.use_top_k_top_p_min_p:
        scaled = _filter_logits(
            scaled, meta.top_k, meta.top_p, meta.min_p, top_k_cap=flags.top_k_cap
        )
    return jnp.where(is_greedy[:, None], greedy, jax.nn.softmax(scaled, axis=-1))


def rejection_sample(p, draft_ids, q, num_drafts, keys):
    """Verify up to K drafts per row.

    p f32[B, K+1, V]: target distributions at the K+1 positions (row b uses the first
    num_drafts[b] + 1); draft_ids i32[B, K] (entries past num_drafts are ignored); q f32[B, K, V]
    draft distributions the drafts were drawn from, or None for point masses; num_drafts
    i32[B]; keys: one PRNG key per row.

    Returns (tokens i32[B, K+1], num_tokens i32[B]): row b emits tokens[b, :num_tokens[b]],
    the accepted drafts followed by one corrected or bonus token (1 <= num_tokens <= n + 1).
    """
    b, k1, vocab = p.shape
    k = k1 - 1
    draft_ids = draft_ids.astype(jnp.int32)
    p_x = jnp.take_along_axis(p[:, :k], draft_ids[..., None], axis=-1)[..., 0]  # f32[B, K]
    if q is None:
        q_x = jnp.ones_like(p_x)
    else:
        q_x = jnp.take_along_axis(q, draft_ids[..., None], axis=-1)[..., 0]
    split = jax.vmap(jax.random.split)(keys)  # [B, 2] keys
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(split[:, 0])  # f32[B, K]
    valid = jnp.arange(k)[None, :] < num_drafts[:, None]
    # u < p/q, written without the division (q(x) > 0 for a drawn x; p(x) = 0 never accepts).
    accept = (u * q_x < p_x) & valid
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # i32[B]
    rows = jnp.arange(b)
    p_a = p[rows, num_accepted]  # f32[B, V]
    rejected = num_accepted < num_drafts
    x_a = draft_ids[rows, jnp.minimum(num_accepted, k - 1)] if k else jnp.zeros(b, jnp.int32)
    if q is None:
        residual = p_a * (1.0 - jax.nn.one_hot(x_a, vocab, dtype=p.dtype))
    else:
        q_a = q[rows, jnp.minimum(num_accepted, k - 1)]
        residual = jnp.maximum(p_a - q_a, 0.0)
    dist = jnp.where(rejected[:, None], residual, p_a)
    # A rejection has probability 0 when the residual is empty, so this only guards rounding.
    dist = jnp.where(jnp.sum(dist, axis=-1, keepdims=True) > 0, dist, p_a)
    final = jax.vmap(jax.random.categorical)(split[:, 1], jnp.log(dist)).astype(jnp.int32)
    tokens = jnp.concatenate([draft_ids, jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens = tokens.at[rows, num_accepted].set(final)
    return tokens, num_accepted + 1


@functools.partial(jax.jit, static_argnames=("flags",))
def verify(
    logits,
    rows,
    meta: SamplingMetadata,
    draft_ids,
    q,
    num_drafts,
    *,
    flags: SamplerFlags,
    bitmask=None,
):
    """The engine's verify step. logits f32[S, K+1, V] are the step's, right-aligned: the
    verified row rows[b] scored its last known token and n = num_drafts[b] drafts, and their
    logits are the last n + 1 of the K+1 entries (`build_metadata(logits_per_row=K+1)` lays
    them out so). rows i32[B] picks the B verified rows; meta is over them (seed, step per
    request). bitmask i32[B, K+1, ceil(V/32)] or None (structured outputs): the tokens allowed
    at each left-aligned position (`sampling.apply_token_bitmask`); the target distribution is
    the masked one, as the sampler's is.

    Returns (tokens i32[B, K+1], num_tokens i32[B]) as `rejection_sample`.
    """
    logits = logits[rows]
    b, k1, vocab = logits.shape
    index = jnp.minimum(k1 - 1 - num_drafts[:, None] + jnp.arange(k1)[None, :], k1 - 1)
    logits = jnp.take_along_axis(logits, index[..., None], axis=1)  # left-aligned
    if bitmask is not None:
        flat = apply_token_bitmask(logits.reshape(b * k1, vocab), bitmask.reshape(b * k1, -1))
        logits = flat.reshape(b, k1, vocab)
    if flags.all_greedy:
        # p is one-hot at the argmax: a draft is accepted iff it is the argmax, and the token
        # after the accepted run (correction or bonus) is the argmax there, whatever q is. So
        # the argmaxes themselves are the emitted tokens (no softmax, no random draws).
        target = argmax_last(logits)  # i32[B, K+1]
        valid = jnp.arange(k1 - 1)[None, :] < num_drafts[:, None]
        accept = (target[:, :-1] == draft_ids.astype(jnp.int32)) & valid
        num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
        return target, num_accepted + 1
    per_pos = jax.tree.map(lambda a: jnp.repeat(a, k1, axis=0), meta)
    p = target_probs(logits.reshape(b * k1, vocab), per_pos, flags).reshape(b, k1, vocab)
    # The VERIFY stream of (seed, step): a verify step and a plain sampling step never share
    # random numbers.
    keys = jax.vmap(functools.partial(request_key, purpose=KeyPurpose.VERIFY))(meta.seed, meta.step)
    return rejection_sample(p, draft_ids, q, num_drafts, keys)
