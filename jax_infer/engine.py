"""The continuous-batching engine: a paged KV cache, a ragged step, and a host scheduler.

    engine = LLMEngine(config, params, tokenizer, dtype=jnp.float32, max_model_len=2048)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            print(chunk.request_id, chunk.delta_text)

Each `step()` asks the scheduler what to compute (decodes first, then prefill chunks under
a token budget) and hands the rows to the model runner (`runner.ModelRunner.execute`), which
lays them out flat (every dimension bucketed, so serving compiles a bounded set of programs),
runs one jitted step over the page pool and samples a token for every request whose chunk
reached its end. The engine appends them with the stop rules (`outputs.commit_tokens`, the
one commit path), reports back to the scheduler and streams `RequestOutput`s. Each request
is one `scheduler.Request` record. A bad request is refused by `add_request` with a
ValueError and never reaches the batch; aborting frees its pages at once.

Host work off the critical path. A step is one jitted program where the batch needs no
logits back (`runner.forward_and_sample`: forward plus sampler, greedy an argmax on the
device): one dispatch, and only the sampled token ids (and logprobs, when asked) reach the
host. Speculative verification, prompt logprobs, parallel-sampling forks, structured-output
bitmasks (computed on a worker while the forward runs), a mesh and data replicas keep the
forward and the sampler as two calls.

Async scheduling (EngineConfig.async_scheduling, on by default), after vLLM's async
scheduler and SGLang's overlap loop: `step()` schedules step n + 1 and lays out its arrays
while step n computes, and dispatches it before n's tokens reach the host. The scheduler
advances over step n with a `PLACEHOLDER` for each sampled token (`Scheduler.update`; the
length limit is exact, the other stop rules wait for the token); a row of n + 1 whose input
is such a token takes it from step n's device output (`runner.dispatch`'s gathers: a decode,
or the last token of a recompute chunk after a preemption). Then step n is resolved: its
tokens come to the host, replace the placeholders and go through the stop rules and the
detokenizer (`resolve_placeholder`), while step n + 1 computes. A request that a stop token or
string ends there is freed (`Scheduler.end`); its row in step n + 1 is computed and ignored,
its pages reused only by later steps. So outputs come one `step()` call later, and never
differ from synchronous stepping: the inputs, seeds (a request's step count includes the
placeholder) and every stop are the same. A step whose sampling needs the previous tokens'
values on the host runs synchronously, after resolving the step in flight: rows with
penalties (they count output tokens), a grammar (its mask follows the last token), forks or
prompt logprobs; and async scheduling is off with speculative decoding (drafts are proposed
from the tokens) or a mesh (its step is not fused). An aborted request whose token is in
flight gets it (it was sampled before the abort) and is reported when resolved.

Faults: an exception raised while executing a step (drafting, the runner's jitted step,
sampling, verification) ends that step's requests with finish_reason "error" and an `error`
naming the cause; the other requests keep going. If the failed call had the page pool donated
and lost, the runner re-creates it and every running request is preempted to recompute. An
exception anywhere else (the scheduler's bookkeeping) propagates: the engine is then not to be
trusted, and the server treats it as fatal.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time

import jax.numpy as jnp
import numpy as np

from jax_infer import compile_cache, sharding
from jax_infer.attention import BACKENDS, default_backend
from jax_infer.config import ModelConfig
from jax_infer.engine_async import AsyncSchedulingMixin, _InFlight
from jax_infer.model.cache import kv_bytes_per_page_group, page_group_windows
from jax_infer.outputs import RequestOutput, child_request_ids, make_output
from jax_infer.quant.kv import KV_DTYPES, resolve_kv_cache_dtype
from jax_infer.runner import ModelRunner, StepBatch
from jax_infer.sampling import SamplingParams
from jax_infer.scheduler import Request, Scheduler
from jax_infer.scheduler.page_groups import split_page_budget
from jax_infer.scheduler.replicas import ReplicatedScheduler
from jax_infer.scheduler.request import (
    finish,
    has_placeholder,
)
from jax_infer.speculative.config import SPECULATIVE_METHODS
from jax_infer.speculative.decoder import make_speculative_decoder
from jax_infer.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)
_STRUCTURED_LOCK = threading.Lock()


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
    bad_bias = [t for t, _ in params.logit_bias or () if t >= vocab_size]
    if bad_bias:
        raise ValueError(
            f"SamplingParams.logit_bias token ids {bad_bias[:5]} are outside the vocabulary "
            f"[0, {vocab_size})"
        )
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

    free_window_pages: a model with sliding-window layers keeps their pages in page groups
    of their own and frees the pages their window no longer reaches (scheduler.py); kv_cache_gb
    is split over the groups (`scheduler.page_groups.split_page_budget`), and num_pages, where
    given, is each group's count. Off (or without windows, or with a draft model, which
    reads the target's tables): one group holding every page.
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
    free_window_pages: bool = True
    # Schedule and lay out step n + 1 while step n computes; its decode inputs are step n's
    # sampled tokens, taken on the device (see the module docstring). Steps it cannot
    # overlap run synchronously, with the same results.
    async_scheduling: bool = True
    # Cold start (compile_cache.py, precompile.py): compile every step bucket at start (a
    # dummy step per shape over the null page; None: the entry point's default, off for
    # LLM/LLMEngine, on for the server), and where jax keeps compiled programs between
    # processes: "auto" (~/.cache/jax_infer/xla, or $JAX_INFER_COMPILATION_CACHE_DIR), a
    # directory, or None/"off".
    precompile: bool | None = None
    compilation_cache_dir: str | None = "auto"
    # Each request's logits the same bits whatever else runs in its step, the prompt chunk
    # size or a preemption (model/invariant.py): CPU kernels with fixed reduction orders only;
    # a setup that cannot (another attention backend, int8 KV cache, quantized weights, a
    # mesh) is refused with a ValueError naming the parameter.
    batch_invariant: bool = False

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
        if self.speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ValueError(
                f"EngineConfig.speculative_method={self.speculative_method!r} is not one of "
                f"{(None, *SPECULATIVE_METHODS)}"
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
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(
                f"EngineConfig.async_scheduling={self.async_scheduling!r} must be True or False"
            )
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(
                f"EngineConfig.batch_invariant={self.batch_invariant!r} must be True or False"
            )
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_DTYPES}"
            )
        if self.precompile is not None and not isinstance(self.precompile, bool):
            raise ValueError(
                f"EngineConfig.precompile={self.precompile!r} must be a bool (or None: the "
                "entry point's default)"
            )
        compile_cache.resolve_cache_dir(self.compilation_cache_dir)  # raises on a bad value
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise ValueError(
                f"EngineConfig.attention_backend={self.attention_backend!r} is not one of "
                f"{BACKENDS} (or None for the platform default)"
            )


def make_requests(
    request_id: str, text: str | None, ids: list[int], params: SamplingParams, tokenizer, rng
) -> list[Request]:
    """The records of the `params.n` samples of one prompt (ids `child_request_ids`): sample i
    has params with n=1 and seed `params.sample_seed(seed, i)`, so it is the single request
    with that seed. A request without a seed gets one drawn from `rng`."""
    if params.n == 1:
        return [make_request(request_id, text, ids, params, tokenizer, rng)]
    base = params.seed if params.seed is not None else int(rng.integers(0, 2**32))
    out = []
    for i, rid in enumerate(child_request_ids(request_id, params.n)):
        one = dataclasses.replace(params, n=1, seed=params.sample_seed(base, i))
        req = make_request(rid, text, ids, one, tokenizer, rng)
        req.group_id, req.sample_index = request_id, i
        out.append(req)
    return out


class _MaskFuture:
    """The structured-output masks of one step, being computed: rows by request id."""

    def __init__(self, future, first_row: dict[str, int]):
        self.future = future
        self.first_row = first_row

    def for_rows(self, scheduled):
        """A callable for StepBatch.token_bitmask: {input row: i32[W]} of constrained rows."""

        def get():
            bitmask = self.future.result()
            return {
                i: bitmask[self.first_row[s.request_id]]
                for i, s in enumerate(scheduled)
                if s.request_id in self.first_row
            }

        return get

    def for_drafts(self, drafts):
        """{request id: i32[n + 1, W]} for the constrained rows that verify n drafts."""
        bitmask = self.future.result()
        return {
            rid: bitmask[self.first_row[rid] : self.first_row[rid] + len(d.token_ids) + 1]
            for rid, d in drafts.items()
            if rid in self.first_row
        }


def make_request(
    request_id: str, text: str | None, ids: list[int], params: SamplingParams, tokenizer, rng
) -> Request:
    """The one record of a request checked by `prepare_prompt` (any engine). A request without
    a seed gets one drawn from `rng` (np.random.Generator), so it is reproducible per engine."""
    seed = params.seed if params.seed is not None else int(rng.integers(0, 2**32))
    wants_prompt_lps = params.prompt_logprobs is not None
    return Request(
        request_id,
        ids,
        params.max_tokens,
        sampling_params=params,
        seed=seed % 2**32,
        prompt=text,
        detokenizer=IncrementalDetokenizer(
            tokenizer, ids, skip_special_tokens=params.skip_special_tokens
        ),
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        skip_prefix_cache=wants_prompt_lps,
        prompt_logprobs=[None] * len(ids) if wants_prompt_lps else None,
    )


class LLMEngine(AsyncSchedulingMixin):
    """Owns the requests and the scheduler; a `ModelRunner` owns params, pool and the step."""

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
        progress: bool = True,
    ):
        """params: canonical (as loaded, maybe quantized); the runner lays them out for the
        backend. mesh: a `sharding.make_mesh` Mesh, or None for one device. With a mesh the
        page pool is split by kv heads over `model`; over `data` the engine is data
        parallel: D = data replicas, each with a pool of num_pages pages (kv_cache_gb) of its
        own and its own scheduler (`scheduler.replicas`), requests assigned to the least
        loaded, and one jitted step runs every replica's rows (D times the rows of one).
        draft_model: (ModelConfig, canonical params) for speculative_method="draft_model".
        progress: the precompile progress bar (EngineConfig.precompile) on stderr."""
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_model_len = max_model_len
        ec = engine_config or EngineConfig()
        self.engine_config = ec
        compile_cache.enable(ec.compilation_cache_dir)
        self.backend = ec.attention_backend or default_backend(sharded=mesh is not None)
        self.cache_dtype = cache_dtype or resolve_kv_cache_dtype(
            ec.kv_cache_dtype, dtype, self.backend
        )
        if self.cache_dtype == jnp.int8 and self.backend == "pallas":
            raise ValueError(
                "kv_cache_dtype='int8' needs attention_backend 'cpu', 'xla' or 'reference': the "
                f"Pallas kernel reads float pages (attention_backend={self.backend!r})"
            )
        # A draft model stays on one group: it (own pool, own windows, or the target's pool
        # lent) reads through group 0's tables, which must then hold every page its layers may
        # read. N-gram drafts touch no pool; their rejected tail never needs a freed page
        # (pages are freed behind num_computed_tokens, which counts accepted tokens only).
        free_windows = ec.free_window_pages and ec.speculative_method != "draft_model"
        self.page_groups = page_group_windows(config, free_windows)
        page_bytes = kv_bytes_per_page_group(
            config, self.page_groups, ec.page_size, self.cache_dtype
        )
        num_pages = ec.num_pages
        if num_pages is None:
            chunk = min(ec.max_num_batched_tokens, ec.long_prefill_chunk or max_model_len)
            group_pages = split_page_budget(
                int(ec.kv_cache_gb * 2**30),
                page_bytes,
                self.page_groups,
                ec.page_size,
                max_model_len,
                chunk,
            )
        else:
            group_pages = [num_pages] * len(self.page_groups)
        num_pages = group_pages[0] if len(group_pages) == 1 else tuple(group_pages)
        self.num_replicas = 1 if mesh is None else mesh.shape[sharding.DATA]
        if self.num_replicas > 1 and ec.speculative_method is not None:
            raise ValueError(
                f"speculative_method={ec.speculative_method!r} needs one data replica; the mesh "
                f"has data={self.num_replicas}"
            )
        if self.num_replicas > 1 and len(self.page_groups) > 1:
            raise ValueError(
                f"data={self.num_replicas} replicas need one page group; this model has "
                f"{len(self.page_groups)} (windows {self.page_groups}): set "
                "free_window_pages=False"
            )
        # Raises (naming the numbers) when one max_model_len request cannot fit.
        scheduler_cls = Scheduler
        replicas = {}
        if self.num_replicas > 1:
            scheduler_cls, replicas = ReplicatedScheduler, {"num_replicas": self.num_replicas}
        self.scheduler = scheduler_cls(
            **replicas,
            num_pages=num_pages,
            page_size=ec.page_size,
            max_num_seqs=ec.max_num_seqs,
            max_num_batched_tokens=ec.max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=ec.enable_prefix_caching,
            long_prefill_chunk=ec.long_prefill_chunk,
            max_num_partial_prefills=ec.max_num_partial_prefills,
            windows=self.page_groups,
        )
        self.num_pages = num_pages
        for g, (window, n, b) in enumerate(zip(self.page_groups, group_pages, page_bytes)):
            capacity = (n - 1) * ec.page_size
            log.info(
                "KV cache%s group %d (window %s): %d pages of %d tokens = %d tokens (%.2f GB)",
                f" per data replica (x{self.num_replicas})" if self.num_replicas > 1 else "",
                g,
                window,
                n,
                ec.page_size,
                capacity,
                n * b / 1e9,
            )
        self.mesh = mesh
        self.runner = ModelRunner(
            config,
            params,
            dtype=dtype,
            backend=self.backend,
            num_pages=num_pages,
            page_size=ec.page_size,
            cache_dtype=self.cache_dtype,
            max_decode_rows=ec.max_num_seqs,
            eos_token_ids=tokenizer.eos_token_ids,
            mesh=mesh,
            rules=rules,
            groups=self.page_groups,
            batch_invariant=ec.batch_invariant,
        )
        # Requests not yet reported finished, by id (the scheduler forgets them at finish).
        self.requests: dict[str, Request] = {}
        # The sample ids of each request with n > 1, by the id it was added under.
        self.groups: dict[str, list[str]] = {}
        self._rng = np.random.default_rng(seed)
        self._next_id = 0
        self.num_steps = 0
        self.num_preemptions = 0
        # Rows (scheduled requests) over all steps, and the most in one step.
        self.num_rows = 0
        self.max_rows_per_step = 0
        self.num_async_steps = 0  # steps dispatched before the previous one's tokens were in
        # Test hook: called as fault_hook(engine, scheduler_output) inside each step, before
        # the device work; an exception it raises is handled like a failed step (see step()).
        # The server sets it from JAX_INFER_TEST_FAULT_SEED (server/cli.py). None in service.
        self.fault_hook = None
        # Structured outputs (structured_outputs.py): built at the first constrained request.
        self._structured = None
        # Async scheduling: the step dispatched last and not yet resolved (_InFlight), or None.
        self._inflight: _InFlight | None = None
        self.async_scheduling = (
            ec.async_scheduling and ec.speculative_method is None and mesh is None
        )
        # Speculative decoding (speculative/decoder.py), or None.
        self.spec = make_speculative_decoder(
            ec,
            config,
            num_pages=num_pages,
            dtype=self.dtype,
            backend=self.backend,
            draft_model=draft_model,
            # One device: a self-draft may share the page pool (a sharded pool may not).
            share_pool=mesh is None,
        )
        self.precompile_stats = None
        if ec.precompile:
            self.precompile(progress)

    def precompile(self, progress: bool = True) -> dict:
        """Compile every step bucket now (precompile.py): one dummy step per shape over the
        null page, no request touched. Returns {"shapes", "seconds"}; also in `stats()`."""
        from jax_infer import precompile as precompile_lib

        ec = self.engine_config
        shapes = precompile_lib.step_shapes(
            max_num_seqs=ec.max_num_seqs,
            max_num_batched_tokens=ec.max_num_batched_tokens,
            page_size=ec.page_size,
            max_model_len=self.max_model_len,
            long_prefill_chunk=ec.long_prefill_chunk,
        )
        self.precompile_stats = precompile_lib.precompile(self.runner, shapes, progress=progress)
        return self.precompile_stats

    @property
    def params(self):
        """The params in the runner's layout."""
        return self.runner.params

    @property
    def cache(self):
        """The page pool (the runner's)."""
        return self.runner.pool

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
        if params.prompt_logprobs is not None and self.num_replicas > 1:
            raise ValueError(
                f"SamplingParams.prompt_logprobs={params.prompt_logprobs} is not supported with "
                f"{self.num_replicas} data replicas: use a mesh with data=1"
            )
        reqs = make_requests(request_id, text, ids, params, self.tokenizer, self._rng)
        if params.structured_outputs is not None:
            for req in reqs:  # each sample its own matcher
                req.grammar = self.structured_outputs.new_matcher(params.structured_outputs)
        for rid in {request_id, *(r.request_id for r in reqs)}:
            if rid in self.requests or rid in self.groups:
                raise ValueError(f"request_id={rid!r} is already in use")
        fork = (
            len(reqs) > 1
            and self.num_replicas == 1
            and len(self.page_groups) == 1
            and params.structured_outputs is None
        )
        if not fork:
            # Forking the prompt's pages needs one page group on one replica, and samples
            # whose first token needs no grammar mask (a fork samples from its leader's row);
            # otherwise the samples are separate requests (the same seeds, so the same
            # tokens; the prefix cache still shares the prompt's full pages).
            for req in reqs:
                self.scheduler.add_request(req)
        else:
            self.scheduler.add_request(reqs[0], reqs[1:])
        for req in reqs:
            self.requests[req.request_id] = req
        if params.n > 1:
            self.groups[request_id] = [r.request_id for r in reqs]
        return request_id

    def sample_ids(self, request_id: str) -> list[str]:
        """The engine request ids of the samples of `request_id` (itself when n=1)."""
        return list(self.groups.get(request_id, [request_id]))

    @property
    def structured_outputs(self):
        """The llguidance tokenizer, grammar cache and mask worker (built on first use)."""
        with _STRUCTURED_LOCK:  # the server's request threads check grammars too
            if self._structured is None:
                from jax_infer.structured_outputs import StructuredOutputs

                self._structured = StructuredOutputs(self.tokenizer, self.config.vocab_size)
        return self._structured

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (and cache) a request's grammar now: ValueError naming the field and the
        reason for an invalid schema, regex or grammar. The server calls it before a 200."""
        if params.structured_outputs is not None:
            self.structured_outputs.compile(params.structured_outputs)

    def abort(self, request_id: str) -> bool:
        """Stop a request (all n samples, or one sample by its id) now; its pages are freed at
        once. False if it is unknown/finished."""
        ids = self.groups.get(request_id, [request_id])
        return any([self.scheduler.abort(rid) for rid in ids])

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for every request that changed. With
        async scheduling the tokens of a step come back from the next call (the step is
        resolved after its successor is dispatched)."""
        lookahead = None
        if self.spec is not None:
            # Samples of n > 1 decode without drafts: a forked sample's pages hold K/V its
            # draft never computed, and a draft catching up would write into shared pages.
            solo = (r for r in self.requests.values() if r.group_id is None)
            lookahead = self.spec.lookahead(solo, self.scheduler.num_running())
        out = self.scheduler.schedule(lookahead)
        outputs = []
        # Aborted requests, and requests the scheduler found can never fit (errors).
        for req in self.scheduler.pop_finished():
            if has_placeholder(req):
                continue  # its token is on the device: reported when resolved
            if self._pop(req.request_id) is not None:
                finish(req)
                outputs.append(make_output(req))
        self.num_preemptions += len(out.preempted)
        if out.is_empty:
            return outputs + self._resolve()
        self.num_steps += 1
        self.num_rows += len(out.scheduled)
        self.max_rows_per_step = max(self.max_rows_per_step, len(out.scheduled))
        now = time.monotonic()
        for s in out.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        if self._can_overlap(out):
            return outputs + self._step_async(out)
        if self._inflight is not None:
            outputs += self._resolve()
            if not self._drop_finished_rows(out):
                self.scheduler.update(out, {})
                return outputs
        try:
            sampled, logprobs, drafts, before = self._execute(out)
        except Exception as e:  # the device step: fail its requests, keep serving the others
            return outputs + self._fail_step(out, e)
        self.scheduler.update(out, sampled, logprobs=logprobs)
        if drafts:
            self.spec.stats.num_emitted_tokens += sum(
                self.requests[rid].num_output_tokens - n for rid, n in before.items()
            )
        for rid in sampled:
            req = self.requests[rid]
            if req.is_finished:
                self._pop(rid)
            outputs.append(make_output(req))
        if self.spec is not None:
            self.spec.synced(self.scheduler)
        return outputs

    def _pop(self, rid: str) -> Request | None:
        """Forget a finished request (and its group once every sample is done)."""
        req = self.requests.pop(rid, None)
        if req is not None and req.group_id is not None:
            group = self.groups.get(req.group_id, [])
            if not any(r in self.requests for r in group):
                self.groups.pop(req.group_id, None)
        return req

    def _prompt_logits(self, scheduled) -> list[tuple[int, list[int], int]]:
        """StepBatch.prompt_logits for the rows whose request wants prompt logprobs: the
        chunk's positions p < len(prompt) - 1 give the logprob of prompt token p + 1."""
        out = []
        for i, s in enumerate(scheduled):
            req = s.request
            if req.prompt_logprobs is None:
                continue
            last = min(s.end, req.num_prompt_tokens - 1)
            if last > s.start:
                out.append(
                    (
                        i,
                        req.prompt_token_ids[s.start + 1 : last + 1],
                        req.sampling_params.prompt_logprobs,
                    )
                )
        return out

    def _execute(self, out):
        """Propose drafts, run the ragged step, sample and verify: (sampled, logprobs,
        drafts, output counts before verification) for Scheduler.update."""
        scheduled = out.scheduled
        if self.fault_hook is not None:
            self.fault_hook(self, out)
        if out.page_copies:  # copy on write, before any of this step's writes
            self.runner.copy_pages(out.page_copies)
        drafts = {}
        if self.spec is not None:
            drafts, self.runner.pool = self.spec.propose(out, self.runner.pool)
        prompt_logits = self._prompt_logits(scheduled)
        if prompt_logits:
            drafts = {}  # logits at every prompt position: this step verifies no drafts
        masks = self._submit_masks(scheduled, drafts)
        try:
            return self._run_step(out, drafts, masks, prompt_logits)
        finally:
            if masks is not None:
                # The worker touches the matchers: it is done before anything commits.
                concurrent.futures.wait([masks.future])

    def _submit_masks(self, scheduled, drafts):
        """Structured outputs: cut each constrained request's drafts at the first token its
        grammar refuses, then start computing the step's masks on the worker (they are ready
        when the sampler needs them, after the forward). Returns a Future of
        (bitmask i32[R, W], {request id: first row}), or None when no row is constrained."""
        rows = []
        for s in scheduled:
            g = s.request.grammar
            if g is None or not s.sample:
                continue
            d = drafts.get(s.request_id)
            if d is not None:
                n = g.valid_prefix(d.token_ids)
                if n == 0:
                    del drafts[s.request_id]
                    d = None
                elif n < len(d.token_ids):
                    d = drafts[s.request_id] = dataclasses.replace(
                        d,
                        token_ids=d.token_ids[:n],
                        probs=None if d.probs is None else d.probs[:n],
                    )
            rows.append((s.request_id, g, d.token_ids if d is not None else []))
        if not rows:
            return None
        first, offset = {}, 0
        for rid, _, toks in rows:
            first[rid] = offset
            offset += len(toks) + 1
        future = self.structured_outputs.submit_masks([(g, toks) for _, g, toks in rows])
        return _MaskFuture(future, first)

    def _run_step(self, out, drafts, masks, prompt_logits):
        scheduled = out.scheduled
        batch = self._step_batch(out, drafts, masks, prompt_logits)
        result = self.runner.execute(batch)
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        for s, token, entry in zip(scheduled, result.tokens, result.logprobs):
            if token is not None:
                sampled[s.request_id], logprobs[s.request_id] = [token], [entry]
        for (_, f), token, entry in zip(batch.forks, result.fork_tokens, result.fork_logprobs):
            sampled[f.request_id], logprobs[f.request_id] = [token], [entry]
        for (i, _, _), entries in zip(prompt_logits, result.prompt_logprobs):
            s = scheduled[i]
            s.request.prompt_logprobs[s.start + 1 : s.start + 1 + len(entries)] = entries
        for s in scheduled:  # followers fork from the prompt their leader computed
            if s.followers and s.request.prompt_logprobs is not None:
                for f in s.followers:
                    f.prompt_logprobs = list(s.request.prompt_logprobs)
        before = {}
        if drafts:
            verified = self.spec.verify(
                result.logits,
                result.order,
                scheduled,
                drafts,
                bitmasks=None if masks is None else masks.for_drafts(drafts),
            )
            sampled.update(verified)
            before = {rid: self.requests[rid].num_output_tokens for rid in verified}
        return sampled, logprobs, drafts, before

    def _step_batch(self, out, drafts, masks, prompt_logits) -> StepBatch:
        """The runner's StepBatch of `out`: rows with their drafts appended."""
        scheduled = out.scheduled
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
        return StepBatch(
            starts=[s.start for s in scheduled],
            rows=rows,
            block_tables=[s.block_table for s in scheduled],
            sample=[
                s.request if s.sample and s.request_id not in drafts else None for s in scheduled
            ],
            logits_per_row=per_row,
            min_chunk=per_row or 32,
            replicas=getattr(out, "replicas", None),
            group_block_tables=(
                [s.block_tables for s in scheduled] if len(self.page_groups) > 1 else None
            ),
            forks=[(i, f) for i, s in enumerate(scheduled) if s.sample for f in s.followers],
            prompt_logits=prompt_logits,
            token_bitmask=None if masks is None else masks.for_rows(scheduled),
        )

    def _fail_step(self, out, exc: Exception) -> list[RequestOutput]:
        """A step that raised ends exactly its scheduled requests with finish_reason "error"
        (their error names the cause); the others go on. If the failed call had the page
        pool donated and deleted, a fresh pool holds no K/V: every other running request is
        preempted to recompute, and the prefix cache is dropped."""
        message = f"the engine step failed: {type(exc).__name__}: {exc}"
        ids = [s.request_id for s in out.scheduled]
        log.error(
            "step %d failed, ending requests %s: %s", self.num_steps, ids, message, exc_info=exc
        )
        for s in out.scheduled:
            s.request.error = message
        self.scheduler.update(out, {}, finished=dict.fromkeys(ids, "error"))
        outputs = []
        for rid in ids:
            req = self._pop(rid)
            finish(req)
            outputs.append(make_output(req))
        if self.runner.pool_is_lost():
            preempted = self.scheduler.preempt_all()
            self.runner.reset_pool()
            self.num_preemptions += len(preempted)
            log.warning(
                "the page pool was lost in the failed step: re-created; %d running requests "
                "preempted to recompute",
                len(preempted),
            )
        if self.spec is not None:
            self.spec.recover(self.scheduler)
        return outputs

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "kv_usage": self.scheduler.kv_usage(),
            "prefix_hit_rate": self.scheduler.prefix_hit_rate(),
            # Tokens looked up in the prefix cache at admissions, and those found there.
            "prefix_cache_queries": self.scheduler.allocator.stats.query_tokens,
            "prefix_cache_hits": self.scheduler.allocator.stats.hit_tokens,
            "num_pages": self.num_pages,
            # Per page group: its window (None: full attention) and the fraction of its
            # pages in use; kv_usage above is the fullest group's.
            "page_group_windows": list(self.page_groups),
            "kv_usage_per_group": self.scheduler.kv_usage_per_group(),
            "num_waiting": self.scheduler.num_waiting(),
            "num_running": self.scheduler.num_running(),
            "speculative": self.spec.stats.as_dict() if self.spec is not None else None,
            "num_rows": self.num_rows,
            "num_async_steps": self.num_async_steps,
            "mean_rows_per_step": self.num_rows / self.num_steps if self.num_steps else 0.0,
            "max_rows_per_step": self.max_rows_per_step,
            "num_data_replicas": self.num_replicas,
            # Requests ever assigned to each data replica (one replica: all of them).
            "replica_requests": (
                list(self.scheduler.num_assigned) if self.num_replicas > 1 else None
            ),
            # Process totals (compile_cache.stats): programs, cache_hits, compiled,
            # cache_writes, compile_seconds, trace_seconds, cache_dir; and the start-up
            # precompile's {"shapes", "seconds"} (None: not run).
            "compile": compile_cache.stats(),
            "precompile": self.precompile_stats,
        }
