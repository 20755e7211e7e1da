"""Draft proposers for speculative decoding, behind one interface.

    proposer.propose(rows, pool) -> ([Draft, ...], pool)
                                             one per DraftRow, at most row.num_drafts tokens;
                                             pool: the target's page pool, passed through
                                             (a self-draft writes to it, others leave it)
    proposer.verified(request_id, num_valid) the target kept positions [0, num_valid)
    proposer.forget(request_id)              preempted, finished or aborted: drop its state

* `NgramProposer` (prompt lookup): no model. Find the latest earlier occurrence of the
  sequence's last n tokens (n from `max_n` down to `min_n`) and propose what followed it.
  Strong when the output copies from the input (rewrite, summarise, answer about a passage).
* `DraftModelProposer`: a second, cheaper model with the same vocabulary runs k steps ahead.
  Its K/V lives in its own page pool, indexed by the target's block tables (same page ids, same
  positions), so the scheduler's pages serve both models and nothing else is allocated; it
  tracks per request how many positions of its own cache are valid and catches up on the
  tokens it has not seen (the whole prompt the first time, then the 1-2 tokens a verify step
  added). A quantized copy of the target (`quantize(params, "int4+embed")`) is the
  self-draft: same tokenizer by construction, and it agrees with the target most of the time.
  A draft with the target's config (`shares_pool`) keeps no pool of its own: it attends over
  the target's pool, which the engine lends it for the call and takes back.

A draft model samples its tokens from q = the request's sampling distribution applied to its
own logits (one-hot for greedy requests) and returns q, which the rejection rule needs; the
n-gram proposer returns no distribution (a point mass, see rejection.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.attention import build_metadata, flat_tokens
from jax_infer.config import ModelConfig
from jax_infer.model.cache import init_paged_cache
from jax_infer.model.step import paged_forward
from jax_infer.runner import backend_params
from jax_infer.sampling import (
    KeyPurpose,
    SamplerFlags,
    SamplingMetadata,
    SamplingParams,
    argmax_last,
    request_key,
)
from jax_infer.speculative.rejection import target_probs


@dataclasses.dataclass
class DraftRow:
    """One request to draft for: its known tokens (prompt + output; the last one not yet
    computed by the target), how many drafts it may take, and its pages (which cover
    positions [0, len(token_ids) + num_drafts))."""

    request_id: str
    token_ids: list[int]
    num_drafts: int
    block_table: list[int]
    params: SamplingParams
    seed: int
    step: int  # tokens generated so far (the sampler's step)


@dataclasses.dataclass
class Draft:
    token_ids: list[int]  # 0..num_drafts proposed tokens
    probs: Any = None  # f32[num_drafts, V] the tokens were drawn from (device), or None


class Proposer(Protocol):
    gated: bool  # whether drafting stops for a request that accepts little (drafts cost compute)

    def propose(self, rows: list[DraftRow], pool) -> tuple[list[Draft], Any]: ...

    def verified(self, request_id: str, num_valid: int) -> None: ...

    def forget(self, request_id: str) -> None: ...

    def recover(self) -> None:
        """After a failed engine step: re-create any device state the step lost."""


class NgramProposer:
    """Prompt lookup: find the earlier occurrences of the sequence's last n tokens, trying
    n = max_n, max_n - 1, ..., min_n, and propose what followed them.

    A match of n tokens proposes at most 2**n tokens (capped at the request's k): one shared
    token is weak evidence that the text is being copied, four are strong. Short drafts cost
    little to verify (the step's verify width follows the longest draft, see
    `SpeculativeDecoder.verify_width`), so weak matches are still worth a try, while long drafts
    are kept for matches likely to run on. Where the occurrences disagree on what follows, the
    draft takes the continuation most of them share (`continuation`)."""

    gated = False

    def __init__(self, max_n: int = 4, min_n: int = 1):
        for name, value in (("ngram_prompt_lookup_max", max_n), ("ngram_prompt_lookup_min", min_n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
        if min_n > max_n:
            raise ValueError(
                f"ngram_prompt_lookup_min={min_n} must be <= ngram_prompt_lookup_max={max_n}"
            )
        self.max_n, self.min_n = max_n, min_n

    def propose(self, rows: list[DraftRow], pool=None) -> tuple[list[Draft], Any]:
        drafts = []
        for r in rows:
            seq = np.asarray(r.token_ids, np.int64)
            n, starts = matches(seq, self.max_n, self.min_n)
            length = min(r.num_drafts, 2**n) if n else 0
            drafts.append(Draft(continuation(seq, starts, length) if length else []))
        return drafts, pool

    def verified(self, request_id: str, num_valid: int) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass

    def recover(self) -> None:
        pass


def matches(seq: np.ndarray, max_n: int, min_n: int) -> tuple[int, np.ndarray]:
    """(n, starts): the longest n in [min_n, max_n] for which seq's last n tokens occurred
    earlier, and where the tokens after each earlier occurrence start (ascending); (0, [])
    if there is none."""
    size = len(seq)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # Windows starting at 0 .. size - n - 1: each has at least one token after it, and the
        # suffix itself (starting at size - n) is excluded.
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[size - n :]).all(axis=1))
        if hits.size:
            return n, hits + n
    return 0, np.zeros(0, np.int64)


def continuation(seq: np.ndarray, starts: np.ndarray, length: int) -> list[int]:
    """Up to `length` tokens continuing the occurrences that start at `starts`: at each
    position the token most of the occurrences still agreeing so far continue with (ties: the
    latest occurrence's), stopping where none of them has a next token. With one occurrence
    that is simply what followed it."""
    out: list[int] = []
    alive = np.asarray(starts, np.int64)
    for i in range(length):
        alive = alive[alive + i < len(seq)]
        if not alive.size:
            break
        if alive.size == 1:  # one occurrence left: the rest is what followed it
            start = int(alive[0])
            out += seq[start + i : start + length].tolist()
            break
        nxt = seq[alive + i]
        if (nxt == nxt[-1]).all():
            tok = int(nxt[-1])
        else:
            values, counts = np.unique(nxt, return_counts=True)
            best = values[counts == counts.max()]
            # The latest occurrence among those continuing with a most common token.
            tok = int(nxt[np.flatnonzero(np.isin(nxt, best))[-1]])
        out.append(tok)
        alive = alive[nxt == tok]
    return out


def lookup(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens
    (plain prompt lookup, without the proposer's majority vote or length rule)."""
    seq = np.asarray(tokens, np.int64)
    n, starts = matches(seq, max_n, min_n)
    return seq[int(starts[-1]) : int(starts[-1]) + k].tolist() if n else []


@functools.partial(jax.jit, static_argnames=("flags",))
def _draw(logits, where, meta: SamplingMetadata, position, *, flags: SamplerFlags):
    """Draft tokens i32[B] and the distributions f32[B, V] they were drawn from, for the
    sequence rows `where` i32[B] of the draft step's logits; `position` (i32[]) is the draft
    index, so each draft of a (seed, step) gets its own random numbers."""
    probs = target_probs(logits[where], meta, flags)
    if flags.all_greedy:
        return argmax_last(probs), probs

    def key(seed, step):
        return request_key(seed, step, KeyPurpose.DRAFT, position)

    keys = jax.vmap(key)(meta.seed, meta.step)
    ids = jax.vmap(jax.random.categorical)(keys, jnp.log(probs)).astype(jnp.int32)
    return ids, probs


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "backend", "flags"),
    donate_argnames=("cache",),
)
def _draft_steps(params, tokens, metas, where, sampling, cache, *, config, dtype, backend, flags):
    """k draft steps in one program (a scan over metas, AttentionMetadata stacked on a leading
    k axis; every row a 1-token decode row): each step's drawn tokens are the next step's
    inputs without a round trip to the host. -> (ids i32[k, B], probs f32[k, B, V], cache)."""

    def step(carry, xs):
        tokens, cache = carry
        meta, j = xs
        logits, cache = paged_forward(
            params, tokens, meta, cache, config=config, dtype=dtype, backend=backend
        )
        ids, probs = _draw(logits, where, sampling, j, flags=flags)
        # Decode row r is flat token r: the drafts go where their rows read them.
        return (tokens.at[where].set(ids), cache), (ids, probs)

    k = metas.positions.shape[0]
    (_, cache), (ids, probs) = jax.lax.scan(
        step, (tokens, cache), (metas, jnp.arange(k, dtype=jnp.int32))
    )
    return ids, probs, cache


class DraftModelProposer:
    """A smaller model (or the target quantized) drafting k tokens per request; see the module
    docstring for how its cache follows the target's pages."""

    gated = True

    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        target_config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype=jnp.float32,
        backend: str = "xla",
        max_decode_rows: int | None = None,
        share_pool: bool = False,
    ):
        """params: canonical (as loaded); laid out here for the backend like the target's.
        share_pool: the draft has the target's config (a quantized self-draft) and attends over
        the target's pool, passed to each `propose`, keeping no pool of its own."""
        if share_pool and config != target_config:
            raise ValueError(
                "share_pool=True needs a draft with the target's config (a quantized "
                "self-draft): its K/V pools must have the target's shape"
            )
        if config.vocab_size != target_config.vocab_size:
            raise ValueError(
                f"draft model vocab_size={config.vocab_size} != target vocab_size="
                f"{target_config.vocab_size}: a draft model must share the target's tokenizer"
            )
        self.config, self.dtype, self.backend = config, dtype, backend
        self.params = backend_params(params, config)
        self.page_size = page_size
        self.max_decode_rows = max_decode_rows
        self.shares_pool = share_pool
        self.num_pages = num_pages
        if not share_pool:
            self.cache = init_paged_cache(config, num_pages, page_size, dtype)
        self.computed: dict[str, int] = {}  # positions of the draft cache that are valid
        self.num_forward_steps = 0

    def verified(self, request_id: str, num_valid: int) -> None:
        if request_id in self.computed:
            self.computed[request_id] = min(self.computed[request_id], num_valid)

    def forget(self, request_id: str) -> None:
        self.computed.pop(request_id, None)

    def recover(self) -> None:
        """A draft step that failed after its pool was donated leaves the pool deleted: a
        fresh one holds nothing, so every request catches up from position 0."""
        if self.shares_pool or not any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
            return
        self.cache = init_paged_cache(self.config, self.num_pages, self.page_size, self.dtype)
        self.computed.clear()

    def _forward(self, starts, chunks, tables):
        meta, order, offsets = build_metadata(
            starts,
            [len(c) for c in chunks],
            tables,
            self.page_size,
            max_decode_rows=self.max_decode_rows,
            # Catch-up rows are mostly 2 tokens (the last accepted draft and the bonus token):
            # padded to the default 32-token chunk they cost 58 ms a draft step instead of ~9.
            min_chunk=2,
        )
        tokens = flat_tokens(meta, chunks, offsets)
        logits, self.cache = paged_forward(
            self.params,
            tokens,
            meta,
            self.cache,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
        )
        self.num_forward_steps += 1
        # Back to input order: sequence row r holds input order[r].
        where = np.zeros(len(chunks), np.int32)
        for r, i in enumerate(order):
            if i >= 0:
                where[i] = r
        return logits, where

    def propose(self, rows: list[DraftRow], pool=None) -> tuple[list[Draft], Any]:
        """Drafts for `rows`; pool: the target's page pool, which a shared-pool draft writes to
        and returns (others return it untouched)."""
        active = [r for r in rows if r.num_drafts > 0]
        if not active:
            return [Draft([]) for _ in rows], pool
        params = [r.params for r in active]
        flags = SamplerFlags.for_batch(params)
        k_max = max(r.num_drafts for r in active)
        # Over the target's pool there is nothing to catch up: the target holds positions
        # [0, len - 1), so step 1 feeds the last known token alone. The draft's writes at
        # len - 1.. land on slots the target rewrites in its verify step before it attends (and
        # K/V past the accepted tokens is never read before it is rewritten), so the target
        # only ever reads its own K/V.
        if self.shares_pool:
            return self._propose_over_target_pool(rows, active, flags, k_max, pool)
        # With its own pool, step 1 catches each request up from its first uncomputed position
        # to its last known token; each later step feeds the previous draft.
        starts = [self.computed.get(r.request_id, 0) for r in active]
        chunks = [r.token_ids[s:] for r, s in zip(active, starts)]
        ids_steps, prob_steps = [], []
        live = list(range(len(active)))
        for j in range(k_max):
            logits, where = self._forward(
                [starts[i] for i in live],
                [chunks[i] for i in live],
                [active[i].block_table for i in live],
            )
            sub = [active[i] for i in live]
            meta = SamplingMetadata.build(
                [r.params for r in sub],
                [r.seed for r in sub],
                [r.step for r in sub],
                len(sub),
            )
            ids, probs = _draw(
                logits,
                where,
                meta,
                np.int32(j),
                flags=flags,
            )
            ids_host = np.asarray(ids)
            ids_steps.append(dict(zip(live, ids_host.tolist())))
            prob_steps.append((probs, {i: n for n, i in enumerate(live)}))
            for n, i in enumerate(live):
                starts[i] += len(chunks[i])
                chunks[i] = [int(ids_host[n])]
            live = [i for i in live if active[i].num_drafts > j + 1]
            if not live:
                break
        drafts = {}
        for i, r in enumerate(active):
            n = r.num_drafts
            toks = [ids_steps[j][i] for j in range(n)]
            # A greedy request's q is one-hot at the draft: the point mass (None) is the same.
            probs = None
            if not r.params.is_greedy:
                probs = jnp.stack([prob_steps[j][0][prob_steps[j][1][i]] for j in range(n)])
            # Positions [0, len(tokens) + n - 1) now hold the draft's K/V: the last known token
            # and all drafts but the newest were fed.
            self.computed[r.request_id] = len(r.token_ids) + n - 1
            drafts[r.request_id] = Draft(toks, probs)
        return [drafts.get(r.request_id, Draft([])) for r in rows], pool

    def _propose_over_target_pool(self, rows, active, flags, k_max, pool):
        """Every draft step is a 1-token decode row per request (the target's pool holds the
        rest), so all k_max steps run as one jitted scan (`_draft_steps`): no host round trip
        between them. Step j feeds position len - 1 + j; a request with fewer drafts repeats
        its last fed position (a slot its verify row rewrites) and its extra drafts are
        dropped."""
        tables = [r.block_table for r in active]
        steps = []
        for j in range(k_max):
            starts = [len(r.token_ids) - 1 + min(j, r.num_drafts - 1) for r in active]
            meta, order, offsets = build_metadata(
                starts,
                [1] * len(active),
                tables,
                self.page_size,
                max_decode_rows=self.max_decode_rows,
            )
            steps.append(meta)
        width = max(m.block_tables.shape[1] for m in steps)
        steps = [
            m._replace(
                block_tables=np.pad(m.block_tables, ((0, 0), (0, width - m.block_tables.shape[1])))
            )
            for m in steps
        ]
        metas = jax.tree.map(lambda *a: np.stack(a), *steps)
        tokens = flat_tokens(steps[0], [[r.token_ids[-1]] for r in active], offsets)
        where = np.zeros(len(active), np.int32)
        for r, i in enumerate(order):
            if i >= 0:
                where[i] = r
        sampling = SamplingMetadata.build(
            [r.params for r in active],
            [r.seed for r in active],
            [r.step for r in active],
            len(active),
        )
        ids, probs, pool = _draft_steps(
            self.params,
            tokens,
            metas,
            where,
            sampling,
            pool,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
            flags=flags,
        )
        self.num_forward_steps += k_max
        ids_host = np.asarray(ids)
        drafts = {}
        for i, r in enumerate(active):
            n = r.num_drafts
            # A greedy request's q is one-hot at the draft: the point mass (None) is the same.
            drafts[r.request_id] = Draft(
                ids_host[:n, i].tolist(), None if r.params.is_greedy else probs[:n, i]
            )
        return [drafts.get(r.request_id, Draft([])) for r in rows], pool
