"""The continuous-batching engine: a paged KV cache, a ragged step, and a host scheduler.

    engine = LLMEngine(config, params, tokenizer, dtype=jnp.float32, max_model_len=2048)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            print(chunk.request_id, chunk.delta_text)

Each `step()` asks the scheduler what to compute (decodes first, then prefill chunks under
a token budget), lays the tokens out flat with `attention.build_metadata` (every dimension
bucketed, so serving compiles a bounded set of programs), runs one jitted `paged_forward`
over the page pool (donated, updated in place), samples a token for every request whose chunk
reached its end, applies the stop rules (`outputs.SequenceState`) and reports back to the
scheduler. A bad request is refused by `add_request` with a ValueError and never reaches the
batch; aborting frees its pages at once.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import sharding
from jax_infer.attention import BACKENDS, build_metadata, default_backend, flat_tokens
from jax_infer.config import ModelConfig
from jax_infer.model.cache import init_paged_cache, init_sharded_paged_cache, kv_bytes_per_token
from jax_infer.model.step import paged_forward
from jax_infer.outputs import RequestOutput, SequenceState, logprob_entry
from jax_infer.quant.kv import KV_DTYPES, resolve_kv_cache_dtype
from jax_infer.sampling import (
    SamplerFlags,
    SamplingMetadata,
    SamplingParams,
    min_tokens_banned_ids,
    sample,
)
from jax_infer.scheduler import Request, Scheduler
from jax_infer.speculative.decoder import make_speculative_decoder
from jax_infer.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


def prepare_prompt(prompt, params, tokenizer, vocab_size: int, max_model_len: int):
    """Validate one request; returns (prompt text or None, token ids). Raises ValueError
    naming what is wrong, before the request touches any engine state."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        prompt = prompt["prompt_token_ids"]
    if isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt)
    else:
        text = None
        try:
            ids = list(prompt)
        except TypeError:
            raise ValueError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            ) from None
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt token ids must be ints; got {ids[:8]!r}")
        ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("prompt is empty: a request needs at least one prompt token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if len(ids) + params.max_tokens > max_model_len:
        raise ValueError(
            f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds "
            f"max_model_len={max_model_len}"
        )
    return text, ids


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs (vLLM names where vLLM has one).

    kv_cache_gb sizes the page pool unless num_pages is given; page 0 is reserved.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    page_size: int = 16
    kv_cache_gb: float = 1.0
    num_pages: int | None = None
    enable_prefix_caching: bool = True
    long_prefill_chunk: int | None = None
    # One prompt chunk per step (vLLM's default): each step then has a single prefill row,
    # which keeps the set of compiled step shapes small. Prefill on a CPU is compute-bound,
    # so batching several prompts in one step would save little.
    max_num_partial_prefills: int | None = 1
    attention_backend: str | None = None  # None: pallas on TPU/GPU, cpu (or xla) on CPU
    # "auto" stores K/V in the model dtype; "int8" quantizes them per token and KV head
    # (quant/kv.py), fitting 1.9x the tokens of bf16 (3.8x of f32) in the same kv_cache_gb.
    kv_cache_dtype: str = "auto"
    # Speculative decoding (vLLM names, speculative/): "ngram" (prompt lookup) or "draft_model" (give
    # LLMEngine draft_model=(config, params), e.g. the target quantized: a self-draft); k drafts
    # per decode, verified in the same ragged step; off for a step when more requests run than
    # speculative_disable_by_batch_size.
    speculative_method: str | None = None
    num_speculative_tokens: int = 0
    speculative_disable_by_batch_size: int | None = None
    ngram_prompt_lookup_max: int = 4
    # A match of n tokens proposes up to 2**n (capped at k): 1-token matches propose 2 tokens,
    # which verify at about the cost of a plain decode step.
    ngram_prompt_lookup_min: int = 1

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} is invalid: must be an int >= 1")
        if not (isinstance(self.kv_cache_gb, (int, float)) and self.kv_cache_gb > 0):
            raise ValueError(f"EngineConfig.kv_cache_gb={self.kv_cache_gb!r} must be > 0")
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 2
        ):
            raise ValueError(f"EngineConfig.num_pages={self.num_pages!r} must be an int >= 2")
        if self.speculative_method not in (None, "ngram", "draft_model"):
            raise ValueError(
                f"EngineConfig.speculative_method={self.speculative_method!r} is not one of "
                "None, 'ngram', 'draft_model'"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 16:
            raise ValueError(
                f"EngineConfig.num_speculative_tokens={k!r} is invalid: must be an int in [0, 16]"
            )
        b = self.speculative_disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(
                f"EngineConfig.speculative_disable_by_batch_size={b!r} is invalid: must be None "
                "or an int >= 1"
            )
        if self.speculative_method is not None and k == 0:
            raise ValueError(
                f"EngineConfig.num_speculative_tokens=0 with speculative_method="
                f"{self.speculative_method!r}: give num_speculative_tokens >= 1"
            )
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_DTYPES}"
            )
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise ValueError(
                f"EngineConfig.attention_backend={self.attention_backend!r} is not one of "
                f"{BACKENDS} (or None for the platform default)"
            )


class LLMEngine:
    """Owns params and the page pool; turns scheduler output into jitted steps."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer: Tokenizer,
        *,
        dtype=jnp.float32,
        max_model_len: int,
        engine_config: EngineConfig | None = None,
        seed: int = 0,
        cache_dtype=None,
        mesh=None,
        rules=None,
        draft_model=None,
    ):
        """mesh: a `sharding.make_mesh` Mesh, or None for one device. With a mesh, params must
        already be placed (`sharding.shard_params`); the page pool is created split by kv heads
        over `model` and replicated over `data` (see `model.cache.init_sharded_paged_cache`), and
        each step's inputs are replicated: in this engine `data` adds replicas, not throughput
        (run one engine per data slice for that; the static engine splits its batch)."""
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_model_len = max_model_len
        ec = engine_config or EngineConfig()
        self.engine_config = ec
        self.cache_dtype = cache_dtype or resolve_kv_cache_dtype(ec.kv_cache_dtype, dtype)
        self.backend = ec.attention_backend or default_backend(sharded=mesh is not None)
        if self.cache_dtype == jnp.int8 and self.backend == "pallas":
            raise ValueError(
                "kv_cache_dtype='int8' needs attention_backend 'cpu', 'xla' or 'reference': the "
                f"Pallas kernel reads float pages (attention_backend={self.backend!r})"
            )
        per_token = kv_bytes_per_token(config, self.cache_dtype)
        num_pages = ec.num_pages
        if num_pages is None:
            num_pages = int(ec.kv_cache_gb * 2**30) // (per_token * ec.page_size)
        # Raises (naming the numbers) when one max_model_len request cannot fit.
        self.scheduler = Scheduler(
            num_pages=num_pages,
            page_size=ec.page_size,
            max_num_seqs=ec.max_num_seqs,
            max_num_batched_tokens=ec.max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=ec.enable_prefix_caching,
            long_prefill_chunk=ec.long_prefill_chunk,
            max_num_partial_prefills=ec.max_num_partial_prefills,
        )
        self.num_pages = num_pages
        capacity = (num_pages - 1) * ec.page_size
        log.info(
            "KV cache: %d pages of %d tokens = %d tokens (%.2f GB); %.1f requests of "
            "max_model_len=%d fit at once",
            num_pages,
            ec.page_size,
            capacity,
            num_pages * ec.page_size * per_token / 1e9,
            capacity / max_model_len,
            max_model_len,
        )
        self.mesh = mesh
        if mesh is None:
            self.cache = init_paged_cache(config, num_pages, ec.page_size, self.cache_dtype)
            self._forward = paged_forward
        else:
            self.cache = init_sharded_paged_cache(
                config, num_pages, ec.page_size, mesh, rules, self.cache_dtype
            )
            # Logits are gathered (the sampler reads every row); the pool keeps its sharding.
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            pool = jax.tree.map(lambda a: a.sharding, self.cache)
            self._forward = sharding.sharded_step(paged_forward, replicated, pool)
        self.states: dict[str, SequenceState] = {}
        self._rng = np.random.default_rng(seed)
        self._next_id = 0
        self.num_steps = 0
        self.num_preemptions = 0
        # Speculative decoding (speculative/decoder.py), or None. draft_model: (ModelConfig, params).
        self.spec = make_speculative_decoder(
            ec,
            config,
            num_pages=num_pages,
            dtype=self.dtype,
            backend=self.backend,
            draft_model=draft_model,
            # One device: a self-draft shares the page pool (a sharded pool stays the engine's).
            cache_owner=self if mesh is None else None,
        )

    # -- requests ----------------------------------------------------------------------

    def add_request(
        self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request (text or token ids); returns its id. Raises ValueError for a bad
        request without touching the others."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        text, ids = prepare_prompt(
            prompt, params, self.tokenizer, self.config.vocab_size, self.max_model_len
        )
        return self.add_prepared(text, ids, params, request_id)

    def add_prepared(
        self, text: str | None, ids: list[int], params: SamplingParams, request_id=None
    ) -> str:
        """add_request for a prompt already checked by `prepare_prompt`."""
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.states:
            raise ValueError(f"request_id={request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        detok = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
        )
        state = SequenceState(
            request_id, text, ids, params, seed % 2**32, detok, self.tokenizer.eos_token_ids
        )
        self.scheduler.add_request(Request(request_id, ids, params.max_tokens, payload=state))
        self.states[request_id] = state
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its pages are freed at once. False if it is unknown/finished."""
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    # -- one step ----------------------------------------------------------------------

    def _end(self, request_id: str, reason: str, error: str | None = None) -> RequestOutput | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        if not state.finished:
            state.finish(reason, error=error)
        return state.chunk()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns a chunk for every request that changed."""
        lookahead = None
        if self.spec is not None:
            lookahead = self.spec.lookahead(self.states, self.scheduler.num_running())
        out = self.scheduler.schedule(lookahead)
        outputs = []
        # Aborted requests, and requests the scheduler found can never fit (errors).
        for req in self.scheduler.pop_finished():
            chunk = self._end(req.request_id, req.status.finish_reason or "error", req.error)
            if chunk is not None:
                outputs.append(chunk)
        self.num_preemptions += len(out.preempted)
        if out.is_empty:
            return outputs
        self.num_steps += 1
        scheduled = out.scheduled
        drafts = self.spec.propose(out, self.states) if self.spec is not None else {}
        rows = [
            s.token_ids + (drafts[s.request_id].token_ids if s.request_id in drafts else [])
            for s in scheduled
        ]
        # With drafts, logits at each row's last W tokens (W: the longest draft + 1, bucketed;
        # k + 1 beside a prompt chunk), and draft rows padded to W rather than to a 32-token
        # prefill chunk.
        per_row = None
        if drafts:
            chunk = any(len(s.token_ids) > 1 for s in scheduled)
            per_row = self.spec.verify_width(drafts, with_prompt_chunk=chunk)
        meta, order, offsets = build_metadata(
            [s.start for s in scheduled],
            [len(r) for r in rows],
            [s.block_table for s in scheduled],
            self.engine_config.page_size,
            max_decode_rows=self.engine_config.max_num_seqs,
            logits_per_row=per_row,
            min_chunk=per_row or 32,
        )
        tokens = flat_tokens(meta, rows, offsets)
        logits, self.cache = self._forward(
            self.params,
            tokens,  # numpy: the jitted call transfers it (cheaper than jnp.asarray each)
            meta,
            self.cache,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
        )
        if drafts:
            sampled, finished = self._sample(logits[:, -1], scheduled, order, outputs, drafts)
            spec_sampled, spec_finished = self.spec.verify(
                logits, scheduled, order, drafts, self.states, outputs, self.max_model_len
            )
            sampled.update(spec_sampled)
            finished.update(spec_finished)
        else:
            sampled, finished = self._sample(logits, scheduled, order, outputs)
        for req in self.scheduler.update(out, sampled, finished):
            chunk = self._end(req.request_id, req.status.finish_reason or "length", req.error)
            if chunk is not None and req.request_id not in finished:
                outputs.append(chunk)
        if self.spec is not None:
            self.spec.synced(self.scheduler)
        return outputs

    def _sample(self, logits, scheduled, order, outputs, skip=()):
        """Sample for rows whose chunk reached the end of their known tokens (except the
        request ids in `skip`: speculative rows, verified by self.spec)."""
        rows = len(order)
        row_params: list[SamplingParams | None] = [None] * rows
        seeds, steps = [0] * rows, [0] * rows
        states: list[SequenceState | None] = [None] * rows
        for r, i in enumerate(order):
            if i >= 0 and scheduled[i].sample and scheduled[i].request_id not in skip:
                st = self.states[scheduled[i].request_id]
                states[r], row_params[r] = st, st.params
                seeds[r], steps[r] = st.seed, len(st.out_ids)
        if all(st is None for st in states):  # e.g. every row verifies drafts this step
            return {}, {}
        flags = SamplerFlags.for_batch(row_params)
        vocab = self.config.vocab_size
        if flags.use_penalties:
            counts = np.zeros((rows, vocab), np.int32)
            prompt_mask = np.zeros((rows, vocab), bool)
            for r, st in enumerate(states):
                if st is not None:
                    np.add.at(counts[r], st.out_ids, 1)
                    prompt_mask[r, st.prompt_ids] = True
        else:
            counts = np.zeros((rows, 1), np.int32)
            prompt_mask = np.zeros((rows, 1), bool)
        num_generated = [len(st.out_ids) if st is not None else 0 for st in states]
        eos = sorted(self.tokenizer.eos_token_ids)
        banned = min_tokens_banned_ids(row_params, num_generated, eos, rows)
        res = sample(
            logits,
            SamplingMetadata.build(row_params, seeds, steps, rows),
            jnp.asarray(counts),
            jnp.asarray(prompt_mask),
            flags=flags,
            banned_ids=None if banned is None else jnp.asarray(banned),
        )
        token_ids = np.asarray(res.token_ids)
        lp_rows = None
        if flags.num_logprobs >= 0:
            lp_rows = (
                np.asarray(res.logprob),
                np.asarray(res.top_ids),
                np.asarray(res.top_logprobs),
            )
        sampled: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        for r, st in enumerate(states):
            if st is None:
                continue
            tok = int(token_ids[r])
            st.append(tok, logprob_entry(tok, st.params.logprobs, r, lp_rows), self.max_model_len)
            sampled[st.request_id] = [tok]
            if st.finished:
                finished[st.request_id] = st.finish_reason
                del self.states[st.request_id]
            outputs.append(st.chunk())
        return sampled, finished

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "kv_usage": self.scheduler.kv_usage(),
            "prefix_hit_rate": self.scheduler.prefix_hit_rate(),
            "num_pages": self.num_pages,
            "num_waiting": self.scheduler.num_waiting(),
            "num_running": self.scheduler.num_running(),
            "speculative": self.spec.stats.as_dict() if self.spec is not None else None,
        }
