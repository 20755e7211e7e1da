"""Speculative decoding inside the batching engine: the engine-side glue, kept out of
engine.py so that the engine's hooks stay a few lines.

One engine step with speculation:

1. `lookahead()`: every request whose sampling the verifier supports asks the scheduler for k
   draft slots (none when more than `disable_by_batch_size` requests run: a large batch
   already uses the weights it reads, and verifying k+1 tokens per row no longer pays).
2. The scheduler reserves pages for the decodes it runs (`ScheduledRequest.num_lookahead`).
3. `propose()`: the proposer drafts up to num_lookahead tokens per decode (the engine lends it
   the target's page pool and takes it back: a self-draft attends over it); the engine appends
   them to the row, which becomes a (n+1)-token row of the same ragged step, and asks for the
   logits of each row's last W tokens (`build_metadata(logits_per_row=W)`, W from
   `verify_width`: the longest draft + 1, bucketed).
4. `verify()`: the modified rejection sampling (rejection.py) keeps a prefix of the drafts plus
   one token and returns them; the engine appends them through `outputs.commit_tokens`, so
   eos, stop tokens, stop strings and max_tokens cut the accepted run exactly where plain
   decoding would stop.
5. The scheduler advances num_computed_tokens past the accepted drafts only (rejected drafts'
   K/V is overwritten later) and `synced()` tells the proposer how far its own cache is valid.

Rows without drafts (no n-gram match, an unsupported request, a request gated off for low
acceptance, see GATE_MIN_ACCEPTED) are sampled by the engine's normal sampler in the same
step, from the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.attention.metadata import bucket
from jax_infer.sampling import SamplerFlags, SamplingMetadata
from jax_infer.speculative.config import NGRAM
from jax_infer.speculative.proposers import (
    Draft,
    DraftModelProposer,
    DraftRow,
    NgramProposer,
    Proposer,
)
from jax_infer.speculative.rejection import supports_speculation, verify


@dataclasses.dataclass
class SpecStats:
    """Counters since the engine started; `as_dict()` adds the rates."""

    num_verify_rows: int = 0  # (request, step) pairs that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # accepted drafts + corrections/bonuses, after stop rules
    num_gated_decodes: int = 0  # decodes that skipped drafting: the request's acceptance is low
    proposed_per_position: list[int] = dataclasses.field(default_factory=list)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        rows = max(self.num_verify_rows, 1)
        return {
            "num_gated_decodes": self.num_gated_decodes,
            "num_verify_rows": self.num_verify_rows,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            # Tokens a verify step gives a request: accepted drafts + 1 (before stop rules).
            "mean_accepted_tokens_per_step": (self.num_accepted_tokens + self.num_verify_rows)
            / rows,
            "per_position_acceptance": [
                a / p if p else 0.0
                for a, p in zip(self.accepted_per_position, self.proposed_per_position)
            ],
        }


# Per-request gating, for proposers whose drafts cost compute (`proposer.gated`: a draft
# model runs one step per draft): drafting pays only while a request accepts about one draft
# per verify or more. A request whose running mean (EMA) of accepted drafts falls below
# GATE_MIN_ACCEPTED decodes without drafts; each such step raises the mean by GATE_RECOVERY so
# it is retried every few steps (the text may become predictable again). Prompt lookup is not
# gated: its drafts cost nothing to make, and a weak match proposes few tokens, whose verify
# costs about a plain decode (measured on the grounded and open-ended benchmark outputs, gating
# it off lost 3-4%). Output is unaffected either way.
GATE_MIN_ACCEPTED = 1.0
GATE_RECOVERY = 0.1
GATE_EMA = 0.3


class SpeculativeDecoder:
    """Holds the proposer, k and the metrics; the engine calls it at the points above."""

    def __init__(
        self,
        proposer: Proposer,
        num_speculative_tokens: int,
        disable_by_batch_size: int | None = None,
    ):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens!r} is invalid: must be an "
                "int >= 1 when a speculative method is set"
            )
        self.proposer = proposer
        # Proposers without the attribute (written outside this package) are gated.
        self._gated = bool(getattr(proposer, "gated", True))
        self.k = num_speculative_tokens
        self.disable_by_batch_size = disable_by_batch_size
        self.stats = SpecStats(
            proposed_per_position=[0] * self.k, accepted_per_position=[0] * self.k
        )
        self._tracked: set[str] = set()
        self._mean_accepted: dict[str, float] = {}  # EMA of accepted drafts per verify

    def verify_width(self, drafts: dict[str, Draft], with_prompt_chunk: bool = False) -> int:
        """Logits per row (`build_metadata(logits_per_row=...)`) for a step with these drafts:
        the longest draft + 1, its draft count rounded up to a power of two and capped at k. A
        step of short drafts then costs about a plain decode on a CPU (k=12: 2 drafts verify
        as 3 rows, not 13), and the compiled widths stay few (k=12: 2, 3, 5, 9, 13). A step
        that also computes a prompt chunk is costly anyway and takes k + 1, so that its many
        shapes (chunk and page buckets) are not compiled once per width."""
        if with_prompt_chunk:
            return self.k + 1
        longest = max(len(d.token_ids) for d in drafts.values())
        return min(bucket(longest, 1), self.k) + 1

    def lookahead(self, requests, num_running: int) -> dict[str, int] | None:
        """{request id: k} for the requests (scheduler Requests) that may speculate this step,
        or None."""
        if self.disable_by_batch_size is not None and num_running > self.disable_by_batch_size:
            return None
        return {
            req.request_id: self.k
            for req in requests
            if supports_speculation(req.sampling_params, req.num_output_tokens)
        }

    def propose(self, out, pool) -> tuple[dict[str, Draft], Any]:
        """Drafts for the scheduled decodes that reserved lookahead slots (empty ones dropped),
        and the target's page pool back (a self-draft writes to it)."""
        for rid in out.preempted:
            self.proposer.forget(rid)
        for sr in out.scheduled:
            if sr.is_new:
                self.proposer.forget(sr.request_id)
        rows = []
        for sr in out.scheduled:
            if sr.num_lookahead:
                rid = sr.request_id
                mean = self._mean_accepted.get(rid, float(self.k))
                if self._gated and mean < GATE_MIN_ACCEPTED:
                    self._mean_accepted[rid] = mean + GATE_RECOVERY
                    self.stats.num_gated_decodes += 1
                    continue
                req = sr.request
                rows.append(
                    DraftRow(
                        rid,
                        req.all_token_ids,
                        sr.num_lookahead,
                        sr.block_table,
                        req.sampling_params,
                        req.seed,
                        req.num_output_tokens,
                    )
                )
        if not rows:
            return {}, pool
        drafts, pool = self.proposer.propose(rows, pool)
        self._tracked.update(r.request_id for r in rows)
        return {r.request_id: d for r, d in zip(rows, drafts) if d.token_ids}, pool

    def verify(self, logits, order, scheduled, drafts, bitmasks=None) -> dict[str, list[int]]:
        """Accept drafts for the rows in `drafts`; logits f32[S, W, V] from the step, W =
        `verify_width(drafts)`, `order[r]` the scheduled index of sequence row r. bitmasks
        (structured outputs): {request id: i32[n + 1, ceil(V/32)]} the tokens its grammar
        allows at each of its n drafts' positions and after them. Returns {request id:
        accepted drafts + one token} for the engine to commit."""
        rows = [r for r, i in enumerate(order) if i >= 0 and scheduled[i].request_id in drafts]
        reqs = [scheduled[order[r]].request for r in rows]
        ids = [req.request_id for req in reqs]
        n = len(rows)
        pad = bucket(n, 1)  # a bounded set of compiled verify shapes
        k = logits.shape[1] - 1
        draft_ids = np.zeros((pad, k), np.int32)
        num_drafts = np.zeros(pad, np.int32)
        for b, rid in enumerate(ids):
            toks = drafts[rid].token_ids
            draft_ids[b, : len(toks)] = toks
            num_drafts[b] = len(toks)
        params = [req.sampling_params for req in reqs]
        flags = SamplerFlags.for_batch(params)
        q = None  # greedy rows ignore q (see rejection.verify)
        if not flags.all_greedy and any(drafts[rid].probs is not None for rid in ids):
            vocab = logits.shape[-1]
            parts = []
            for b in range(pad):
                d = drafts[ids[b]] if b < n else None
                if d is None:
                    parts.append(jnp.zeros((k, vocab), jnp.float32))
                    continue
                probs = d.probs
                if probs is None:  # a point mass is a one-hot q
                    probs = jax.nn.one_hot(jnp.asarray(d.token_ids), vocab, dtype=jnp.float32)
                parts.append(jnp.pad(probs, ((0, k - probs.shape[0]), (0, 0))))
            q = jnp.stack(parts)
        meta = SamplingMetadata.build(
            params, [req.seed for req in reqs], [req.num_output_tokens for req in reqs], pad
        )
        index = np.zeros(pad, np.int32)
        index[:n] = rows
        mask = None
        if bitmasks and any(rid in bitmasks for rid in ids):
            mask = np.full((pad, k + 1, (logits.shape[-1] + 31) // 32), -1, np.int32)
            for b, rid in enumerate(ids):
                if rid in bitmasks:
                    mask[b, : len(bitmasks[rid])] = bitmasks[rid]
            mask = jnp.asarray(mask)
        tokens, counts = verify(
            logits, index, meta, draft_ids, q, num_drafts, flags=flags, bitmask=mask
        )
        tokens, counts = np.asarray(tokens), np.asarray(counts)
        accepted_tokens: dict[str, list[int]] = {}
        s = self.stats
        for b, rid in enumerate(ids):
            accepted = int(counts[b]) - 1
            s.num_verify_rows += 1
            mean = self._mean_accepted.get(rid, float(self.k))
            self._mean_accepted[rid] = (1 - GATE_EMA) * mean + GATE_EMA * accepted
            s.num_draft_tokens += int(num_drafts[b])
            s.num_accepted_tokens += accepted
            for j in range(int(num_drafts[b])):
                s.proposed_per_position[j] += 1
                s.accepted_per_position[j] += j < accepted
            accepted_tokens[rid] = tokens[b, : accepted + 1].tolist()
        return accepted_tokens

    def recover(self, scheduler) -> None:
        """After a failed engine step: the proposer re-creates what it lost, and requests the
        step ended (or that were preempted) are forgotten."""
        recover = getattr(self.proposer, "recover", None)
        if recover is not None:
            recover()
        self.synced(scheduler)

    def synced(self, scheduler) -> None:
        """After Scheduler.update: tell the proposer how much of each request is computed, and
        drop the state of requests that ended."""
        for rid in list(self._tracked):
            req = scheduler.get_request(rid)
            if req is None or not req.block_table:
                self.proposer.forget(rid)
                self._tracked.discard(rid)
                self._mean_accepted.pop(rid, None)
            else:
                self.proposer.verified(rid, req.num_computed_tokens)


def make_speculative_decoder(
    engine_config,
    target_config,
    *,
    num_pages: int,
    dtype,
    backend: str,
    draft_model=None,
    share_pool: bool = False,
) -> SpeculativeDecoder | None:
    """The decoder an EngineConfig asks for (None without speculative_method).

    draft_model: (ModelConfig, params) of the draft for speculative_method="draft_model"; a
    self-draft is (target config, quantize(target params, "int4+embed")).
    share_pool: the target's pool may be lent to the draft (one device). A draft with the
    target's config (a quantized self-draft) then reads and writes the target's pool instead
    of a pool of its own: no second KV cache, no draft prefill of each prompt.
    """
    ec = engine_config
    if ec.speculative_method is None:
        if draft_model is not None:
            raise ValueError(
                "a draft model was given but EngineConfig.speculative_method=None; use "
                "speculative_method='draft_model'"
            )
        return None
    if ec.speculative_method == NGRAM:
        proposer = NgramProposer(ec.ngram_prompt_lookup_max, ec.ngram_prompt_lookup_min)
    else:
        if draft_model is None:
            raise ValueError(
                "speculative_method='draft_model' needs draft_model=(config, params) for the "
                "engine; got None"
            )
        draft_config, draft_params = draft_model
        proposer = DraftModelProposer(
            draft_config,
            draft_params,
            target_config=target_config,
            num_pages=num_pages,
            page_size=ec.page_size,
            dtype=dtype,
            backend=backend,
            max_decode_rows=ec.max_num_seqs,
            share_pool=share_pool and draft_config == target_config,
        )
    return SpeculativeDecoder(
        proposer, ec.num_speculative_tokens, ec.speculative_disable_by_batch_size
    )
