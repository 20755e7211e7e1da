"""The model runner: everything between the engine's requests and the model's arrays.

    runner = ModelRunner(config, params, dtype=jnp.float32, num_pages=256, page_size=16)
    result = runner.execute(StepBatch(starts, rows, block_tables, sample=requests))

Why a layer of its own: the engine decides *what* to compute (scheduling, request records,
stop rules, streaming); the runner decides *how* on this backend. It owns

* the params in the layout its backend wants (`backend_params`: on a CPU the LM head untied
  and, on one device, the f32 projections in the column tiles of the C++ matmul; on a mesh,
  placed by the sharding rules), and gives back the canonical ones (`canonical_params`) for
  saving or for deriving a self-draft;
* the page pool (`pool`, donated to each step and replaced by its result);
* the jitted step (sharded or not) and the sampling call.

`execute(batch) -> StepResult` runs one ragged step. Nothing here holds a reference to the
engine; speculative decoding borrows the pool explicitly (`pool` in, `pool` out).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import sharding
from jax_infer.attention import AttentionMetadata, build_metadata, flat_tokens
from jax_infer.attention.metadata import bucket, common_shape, step_shape
from jax_infer.config import ModelConfig
from jax_infer.cpu.layout import tile_f32_params, untile_f32_params
from jax_infer.model.cache import init_paged_cache, init_sharded_paged_cache
from jax_infer.model.invariant import check_batch_invariant
from jax_infer.model.llama import untie_lm_head
from jax_infer.model.step import paged_forward
from jax_infer.outputs import host_logprob_rows, logprob_entry
from jax_infer.program_store import StoredFunction
from jax_infer.sampling import (
    SamplerFlags,
    SamplingMetadata,
    logit_bias_arrays,
    min_tokens_banned_ids,
    sample,
    token_logprobs,
)
from jax_infer.scheduler.request import Request


def backend_params(params, config: ModelConfig, mesh=None, rules=None):
    """Canonical params (as loaded, maybe quantized) -> the layout this backend runs fastest.

    On a CPU the LM head of a tied model gets its own [D, V] copy (x @ W reads it faster than
    x against the [V, D] table) and, without a mesh, f32 projections go into the column tiles
    of the C++ f32 matmul (lossless). With a mesh, params move to their rule's sharding (a
    no-op for leaves loaded in place). `canonical_params` undoes the CPU changes."""
    if jax.default_backend() == "cpu":
        params = untie_lm_head(params, config)
        if mesh is None:
            params = tile_f32_params(params)
    if mesh is not None:
        params = sharding.shard_params(params, config, mesh, rules)
    return params


def canonical_params(params, config: ModelConfig):
    """Inverse of `backend_params`' layout: f32 tiles back to matrices, an LM head that only
    copies a tied embedding dropped (sharding is kept: it is placement, not layout)."""
    params = untile_f32_params(params)
    if config.tie_word_embeddings and "lm_head" in params:
        params = {k: v for k, v in params.items() if k != "lm_head"}
    return params


def sharded_step(step, logits_sharding: jax.sharding.NamedSharding, pool_shardings):
    """`step(params, tokens, meta, cache, **static) -> (logits, cache)` (e.g.
    `model.step.paged_forward`) jitted again with its outputs pinned: logits to
    `logits_sharding`, the cache to `pool_shardings`, its input sharding. The cache is
    donated, and an output sharding equal to the input's is what lets XLA reuse the donated
    buffers in place; nothing is resharded from one step to the next. Keyword arguments are
    static (one compiled wrapper per distinct set)."""
    wrappers: dict = {}

    def call(params, tokens, meta, cache, **static):
        # Host values (the step's token ids and metadata) go in as numpy: jit replicates them
        # over the mesh, and on several processes each process passes the same value.
        tokens, meta = jax.tree.map(np.asarray, (tokens, meta))
        key = tuple(sorted(static.items()))
        fn = wrappers.get(key)
        if fn is None:
            fn = jax.jit(
                functools.partial(step, **static),
                donate_argnums=(3,),
                out_shardings=(logits_sharding, pool_shardings),
            )
            wrappers[key] = fn
        return fn(params, tokens, meta, cache)

    return call


def data_parallel_step(step, mesh: jax.sharding.Mesh):
    """`step(params, tokens, meta, cache, **static)` run by each data replica on its own rows
    and its own slice of the page pool: tokens i32[D, T] and every metadata array with a
    leading replica axis D (`mesh.shape["data"]`), the pool split by pages over `data`
    (each replica sees its slice, page ids local to it). Returns (logits [D, S, ...], cache).

    A `shard_map` manual over `data` only: inside, the `model` axis is still partitioned by
    XLA from the params' and pool's shardings, as in the plain sharded step."""
    P = jax.sharding.PartitionSpec
    data = P(sharding.DATA)

    def local(params, tokens, meta, cache, **static):
        logits, cache = step(params, tokens[0], jax.tree.map(lambda a: a[0], meta), cache, **static)
        return logits[None], cache

    def call(params, tokens, meta, cache, **static):
        mapped = jax.shard_map(
            functools.partial(local, **static),
            mesh=mesh,
            in_specs=(P(), data, data, data),
            out_specs=(data, data),
            axis_names={sharding.DATA},
            check_vma=False,
        )
        return mapped(params, tokens, meta, cache)

    return call


# The page pool as one program (zeros for every layer's K and V), not one eager op per leaf:
# one program for a start to load, dispatched once (cold start, compile_cache.py).
_init_pool = jax.jit(init_paged_cache, static_argnums=(0, 1, 2, 3, 4))


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_pages(pool, src, dst):
    """pool leaves [P, ...] (page axis first, int8 scales included): leaf[dst] = leaf[src]."""
    return jax.tree.map(lambda a: a.at[dst].set(a[src]), pool)


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "backend", "flags", "prev_rows"),
    donate_argnames=("cache",),
)
def forward_and_sample(
    params,
    tokens,
    meta,
    cache,
    prev_tokens,
    gather_src,
    gather_dst,
    smeta,
    counts,
    prompt_mask,
    banned_ids,
    logit_bias,
    *,
    config: ModelConfig,
    dtype,
    backend: str,
    flags: SamplerFlags,
    prev_rows: int | None = None,
):
    """One step as one program: the ragged forward (`paged_forward`) and the sampler
    (`sampling.sample`; greedy is an argmax on the device), so a step is one dispatch and only
    the SamplerOutput (token ids i32[S], logprobs) comes back, never the logits.

    Async scheduling feeds the previous step's sampled tokens in on the device:
    tokens[gather_dst[j]] = prev_tokens[gather_src[j]] (prev_tokens: the previous step's
    token_ids i32[S']; gather_dst padded with T, which is dropped). prev_rows (static): the
    fixed length of prev_tokens, so that the program's shapes never depend on the previous
    step's rows (each pairing of shapes would be one more compile, which precompile could
    not foresee). Returns (SamplerOutput, cache, this step's token ids padded to prev_rows)."""
    tokens = tokens.at[gather_dst].set(prev_tokens[gather_src], mode="drop")
    logits, cache = paged_forward(
        params, tokens, meta, cache, config=config, dtype=dtype, backend=backend
    )
    res = sample(
        logits,
        smeta,
        counts,
        prompt_mask,
        flags=flags,
        banned_ids=banned_ids,
        logit_bias=logit_bias,
    )
    rows = res.token_ids.shape[0]
    if prev_rows is None:
        return res, cache, res.token_ids
    if rows > prev_rows:
        raise ValueError(f"a step of {rows} sequence rows exceeds prev_rows={prev_rows}")
    return res, cache, jnp.zeros((prev_rows,), jnp.int32).at[:rows].set(res.token_ids)


@dataclasses.dataclass
class PendingStep:
    """A fused step dispatched and maybe still computing (`ModelRunner.dispatch`): the
    sampler's device arrays, in sequence-row order. `result()` waits for them and brings the
    token ids (and logprobs, when a row asked) to the host."""

    output: object  # SamplerOutput of device arrays
    order: np.ndarray  # sequence row -> input row (-1: padding)
    requests: Sequence[Request | None]  # StepBatch.sample
    num_logprobs: int  # SamplerFlags.num_logprobs (-1: none asked)
    next_prev: jax.Array  # the token ids padded to the runner's prev_rows (forward_and_sample)
    _result: StepResult | None = None

    @property
    def token_ids(self) -> jax.Array:
        """i32[prev_rows] on the device (sequence-row order, padded): what the next step
        gathers its decode inputs from."""
        return self.next_prev

    def sequence_row(self) -> dict[int, int]:
        """Input row -> sequence row (index into `token_ids`)."""
        return {int(i): r for r, i in enumerate(self.order) if i >= 0}

    def result(self) -> StepResult:
        if self._result is None:
            token_ids = np.asarray(self.output.token_ids)  # the one blocking transfer
            lp_rows = host_logprob_rows(self.output, self.num_logprobs)
            n = len(self.requests)
            tokens: list[int | None] = [None] * n
            entries: list[dict | None] = [None] * n
            for r, i in enumerate(self.order):
                req = self.requests[i] if i >= 0 else None
                if req is None:
                    continue
                tok = int(token_ids[r])
                tokens[i] = tok
                entries[i] = logprob_entry(tok, req.sampling_params.logprobs, r, lp_rows)
            self._result = StepResult(None, self.order, tokens, entries)
        return self._result


@dataclasses.dataclass
class StepBatch:
    """One ragged step, in input order: row i computes `rows[i]` at positions starts[i].. over
    the pages `block_tables[i]`; `sample[i]` is the request to sample a token for after the
    row's last token (None: none, e.g. a prompt chunk short of the end, or a row whose drafts
    are verified instead)."""

    starts: Sequence[int]
    rows: Sequence[Sequence[int]]
    block_tables: Sequence[Sequence[int]]
    sample: Sequence[Request | None]
    # Logits at each row's last W tokens (speculative verification), and the smallest prompt
    # chunk bucket (draft rows are padded to W, not to a 32-token chunk).
    logits_per_row: int | None = None
    min_chunk: int = 32
    # Data parallelism: the replica (data slice) each row runs on, its block table in that
    # replica's page ids. None: one replica.
    replicas: Sequence[int] | None = None
    # With page groups: every group's table of each row (row_tables[i][g]; group 0's equals
    # block_tables[i]). None: one group.
    group_block_tables: Sequence[Sequence[Sequence[int]]] | None = None
    # Parallel sampling: (input row, request) pairs sampled from that row's logits as well.
    forks: Sequence[tuple[int, Request]] = ()
    # Prompt logprobs: (input row, m, k): logprobs at the row's first m tokens of the token
    # after each (rows[i][1:m + 1], or the next row token), with the top k. Needs
    # logits_per_row None.
    prompt_logits: Sequence[tuple[int, Sequence[int], int]] = ()
    # Structured outputs: a callable returning {input row: i32[ceil(V/32)] allowed-token
    # bitmask} for the constrained rows, called only after the forward is dispatched (the
    # engine computes the masks on a worker meanwhile); None: no row is constrained.
    token_bitmask: Callable[[], dict[int, np.ndarray]] | None = None


@dataclasses.dataclass
class StepResult:
    """logits f32[S, V] (or f32[S, W, V] with logits_per_row) in sequence-row order; `order[r]`
    is the input row of sequence row r (-1: padding). With data replicas the sequence rows are
    replica 0's, then replica 1's, and so on. tokens[i] / logprobs[i]: the token
    sampled for input row i and its logprob entry (None where batch.sample[i] is None)."""

    logits: jax.Array
    order: np.ndarray
    tokens: list[int | None]
    logprobs: list[dict[int, float] | None]
    fork_tokens: list[int] = dataclasses.field(default_factory=list)  # per batch.forks
    fork_logprobs: list[dict[int, float] | None] = dataclasses.field(default_factory=list)
    # Per batch.prompt_logits: one {token id: logprob} per position (the token and top k).
    prompt_logprobs: list[list[dict[int, float]]] = dataclasses.field(default_factory=list)


class ModelRunner:
    """Params in backend layout, the page pool and the jitted step of one model."""

    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        dtype=jnp.float32,
        backend: str,
        num_pages: int,
        page_size: int,
        cache_dtype=None,
        max_decode_rows: int | None = None,
        eos_token_ids=(),
        mesh=None,
        rules=None,
        data_parallel: bool = True,
        groups: tuple = (None,),
        batch_invariant: bool = False,
    ):
        """params: canonical (as loaded); laid out here by `backend_params`. mesh: None, or a
        `sharding.make_mesh` Mesh: the pool is then split by kv heads over `model`. Over
        `data` (when data_parallel and the mesh has data > 1) each replica holds a pool of
        `num_pages` pages of its own (the pool, D * num_pages pages, split by pages) and runs
        its own rows (`StepBatch.replicas`); otherwise the pool and each step are
        replicated over `data`. groups: the page groups (`model.cache.page_group_windows`),
        num_pages one int per group where several (data replicas need one group).
        batch_invariant: each row's logits the same bits whatever the other rows, the chunk
        size or a preemption (model/invariant.py); ValueError where this setup cannot."""
        self.config = config
        self.params = backend_params(params, config, mesh, rules)
        self.dtype = dtype
        self.backend = backend
        self.page_size = page_size
        self.max_decode_rows = max_decode_rows
        # The fixed length of a fused step's previous-token input (forward_and_sample): at
        # most max_decode_rows decode rows plus prompt rows padded to a power of two, so
        # 3x bounds a step's sequence rows. None (no bound known): per-step shapes.
        self.prev_rows = None if max_decode_rows is None else 3 * max(int(max_decode_rows), 1)
        self.eos_token_ids = sorted(eos_token_ids)
        self.num_pages = num_pages
        self.groups = tuple(groups)
        self.cache_dtype = cache_dtype or dtype
        self.batch_invariant = batch_invariant
        if batch_invariant:
            check_batch_invariant(
                config, self.params, backend=backend, cache_dtype=self.cache_dtype, mesh=mesh
            )
        self.mesh, self.rules = mesh, rules
        self.num_replicas = 1
        if mesh is not None and data_parallel:
            self.num_replicas = mesh.shape[sharding.DATA]
        self.pool = self._new_pool()
        # The fused step through stored programs: a second start loads it, never traces it.
        self._fused_step = StoredFunction(
            forward_and_sample, "forward_and_sample", fixed=(0,), stable=(3,)
        )
        if mesh is None:
            self._forward = paged_forward
        else:
            # Logits are gathered (the sampler reads every row); the pool keeps its sharding.
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            shardings = jax.tree.map(lambda a: a.sharding, self.pool)
            step = paged_forward
            if self.num_replicas > 1:
                step = data_parallel_step(paged_forward, mesh)
            self._forward = sharded_step(step, replicated, shardings)

    def _new_pool(self):
        if self.mesh is None:
            return _init_pool(
                self.config, self.num_pages, self.page_size, self.cache_dtype, self.groups
            )
        rules = self.rules
        num_pages = self.num_pages
        if self.num_replicas > 1:
            # Each data slice holds its own replica's pages: the pool splits by pages.
            rules = {**(sharding.DEFAULT_RULES if rules is None else rules), "pages": sharding.DATA}
            num_pages = self.num_replicas * num_pages
        return init_sharded_paged_cache(
            self.config,
            num_pages,
            self.page_size,
            self.mesh,
            rules,
            self.cache_dtype,
            self.groups,
        )

    def pool_is_lost(self) -> bool:
        """Whether the pool's buffers are gone: a step that failed after they were donated."""
        return any(leaf.is_deleted() for leaf in jax.tree.leaves(self.pool))

    def reset_pool(self) -> None:
        """A fresh page pool (zeros, same shapes and sharding): every page's K/V is void."""
        self.pool = self._new_pool()

    def canonical_params(self):
        """The params as loaded (and quantized): what `LLM.save` writes."""
        return canonical_params(self.params, self.config)

    def can_fuse(self, batch: StepBatch) -> bool:
        """Whether `batch` runs as one fused program (`forward_and_sample`): one device, no
        logits wanted back (speculative verification, prompt logprobs), no forks, no grammar
        bitmask (computed on a worker while the forward runs, so it joins after it)."""
        return (
            self.mesh is None
            and batch.logits_per_row is None
            and not batch.prompt_logits
            and not batch.forks
            and batch.token_bitmask is None
        )

    def dispatch(
        self,
        batch: StepBatch,
        prev: PendingStep | None = None,
        gathers: Sequence[tuple[int, int, int]] = (),
    ) -> PendingStep:
        """Start one fused step (`can_fuse(batch)` must hold) without waiting for it.
        gathers: (input row, index in the row, sequence row of `prev`): that input token is
        `prev`'s sampled token there, taken on the device (its value in batch.rows is a
        placeholder)."""
        meta, order, offsets = self._layout(batch)
        tokens = flat_tokens(meta, batch.rows, offsets)
        by_row, flags, inputs = self._sampler_inputs(order, batch.sample)
        size = self.prev_rows or bucket(max(len(gathers), 1), 8)
        src = np.zeros(size, np.int32)
        dst = np.full(size, len(tokens), np.int32)  # out of range: dropped
        for j, (i, k, r) in enumerate(gathers):
            src[j], dst[j] = r, offsets[i] + k
        prev_tokens = self._no_prev if prev is None else prev.token_ids
        if flags is None:  # nothing to sample: any flags (the tokens are not read)
            flags = SamplerFlags(True, False, False, -1, 0)
            inputs = self._sampler_inputs_none(len(order))
        res, self.pool, next_prev = self._fused_step(
            self.params,
            tokens,
            meta,
            self.pool,
            prev_tokens,
            src,
            dst,
            *inputs,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
            flags=flags,
            prev_rows=self.prev_rows,
        )
        return PendingStep(res, order, batch.sample, flags.num_logprobs, next_prev)

    def _layout(self, batch: StepBatch):
        """(metadata, order, flat offsets) of a one-replica step; a tuple of metadata, one per
        page group, where there are several."""
        meta, order, offsets = build_metadata(
            batch.starts,
            [len(r) for r in batch.rows],
            batch.block_tables,
            self.page_size,
            max_decode_rows=self.max_decode_rows,
            logits_per_row=batch.logits_per_row,
            min_chunk=batch.min_chunk,
        )
        if len(self.groups) > 1:
            # One metadata per page group: same layout, the group's block tables and slots.
            metas = [meta]
            for g in range(1, len(self.groups)):
                m, _, _ = build_metadata(
                    batch.starts,
                    [len(r) for r in batch.rows],
                    [tables[g] for tables in batch.group_block_tables],
                    self.page_size,
                    max_decode_rows=self.max_decode_rows,
                    logits_per_row=batch.logits_per_row,
                    min_chunk=batch.min_chunk,
                )
                metas.append(m)
            meta = tuple(metas)
        return meta, order, offsets

    def execute(self, batch: StepBatch) -> StepResult:
        """Run one ragged step over the pool and sample the rows that ask for it (one fused
        program where `can_fuse`; else the forward, then the sampler on its logits)."""
        if self.num_replicas > 1:
            return self._execute_replicas(batch)
        if self.can_fuse(batch):
            return self.dispatch(batch).result()
        meta, order, offsets = self._layout(batch)
        tokens = flat_tokens(meta, batch.rows, offsets)
        grouped = not isinstance(meta, AttentionMetadata)
        first = meta[0] if grouped else meta  # the one whose logits_index the model reads
        num_rows = len(first.logits_index)
        if batch.prompt_logits:
            # Logits at more positions: extra indices after the rows' own (a bucketed count).
            extra = np.concatenate(
                [offsets[i] + np.arange(len(nxt)) for i, nxt, _ in batch.prompt_logits]
            ).astype(np.int32)
            index = np.zeros(num_rows + bucket(len(extra), 32), np.int32)
            index[:num_rows] = first.logits_index
            index[num_rows : num_rows + len(extra)] = extra
            first = first._replace(logits_index=index)
            meta = (first, *meta[1:]) if grouped else first
        logits, self.pool = self._forward(
            self.params,
            tokens,  # numpy: the jitted call transfers it (cheaper than jnp.asarray each)
            meta,
            self.pool,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
            batch_invariant=self.batch_invariant,
        )
        prompt_lps = []
        if batch.prompt_logits:
            prompt_lps = self._prompt_logprobs(logits[num_rows:], batch.prompt_logits)
            logits = logits[:num_rows]
        last = logits[:, -1] if batch.logits_per_row else logits
        sampled, entries = self._sample(last, order, batch.sample, batch.token_bitmask)
        result = StepResult(logits, order, sampled, entries, prompt_logprobs=prompt_lps)
        if batch.forks:
            # Each fork samples from its leader's row: gather those rows, padded to a power of
            # two so the sampler compiles for few shapes.
            row_of = {int(i): r for r, i in enumerate(order) if i >= 0}
            rows = [row_of[i] for i, _ in batch.forks]
            rows += [0] * (bucket(len(rows), 1) - len(rows))
            fork_reqs = [req for _, req in batch.forks]
            fork_order = np.full(len(rows), -1, np.int64)
            fork_order[: len(fork_reqs)] = np.arange(len(fork_reqs))
            tokens, fork_entries = self._sample(logits[np.asarray(rows)], fork_order, fork_reqs)
            result.fork_tokens, result.fork_logprobs = tokens, fork_entries
        return result

    def copy_pages(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer's K and V (copy on write of pages shared
        by forked samples); padded to a power of two with null-page self-copies."""
        size = bucket(len(copies), 1)
        src = np.zeros(size, np.int32)
        dst = np.zeros(size, np.int32)
        src[: len(copies)] = [c[0] for c in copies]
        dst[: len(copies)] = [c[1] for c in copies]
        self.pool = _copy_pages(self.pool, src, dst)

    def _prompt_logprobs(self, logits, requests) -> list[list[dict[int, float]]]:
        """Entries for `StepBatch.prompt_logits` from the extra logits rows f32[X, V]."""
        next_ids = np.concatenate([np.asarray(nxt, np.int32) for _, nxt, _ in requests])
        ids = np.zeros(logits.shape[0], np.int32)
        ids[: len(next_ids)] = next_ids
        k = max(kk for _, _, kk in requests)
        lp, top_ids, top_lps = map(np.asarray, token_logprobs(logits, ids, k=k))
        out, pos = [], 0
        for _, nxt, kk in requests:
            entries = []
            for j, token in enumerate(nxt):
                entry = {
                    int(t): float(v) for t, v in zip(top_ids[pos + j, :kk], top_lps[pos + j, :kk])
                }
                entry[int(token)] = float(lp[pos + j])
                entries.append(entry)
            out.append(entries)
            pos += len(nxt)
        return out

    def _execute_replicas(self, batch: StepBatch) -> StepResult:
        """One step of every data replica's rows, in one call: each replica's metadata laid
        out in one common shape and stacked on a leading replica axis."""
        if batch.replicas is None or len(batch.replicas) != len(batch.rows):
            raise ValueError(
                f"a step over {self.num_replicas} data replicas needs StepBatch.replicas, one "
                "per row"
            )
        groups = [[] for _ in range(self.num_replicas)]
        for i, d in enumerate(batch.replicas):
            groups[d].append(i)

        def layout(rows, at_least=None):
            return build_metadata(
                [batch.starts[i] for i in rows],
                [len(batch.rows[i]) for i in rows],
                [batch.block_tables[i] for i in rows],
                self.page_size,
                max_decode_rows=self.max_decode_rows,
                logits_per_row=batch.logits_per_row,
                min_chunk=batch.min_chunk,
                at_least=at_least,
            )

        shape = common_shape([step_shape(layout(rows)[0]) for rows in groups if rows])
        metas, tokens, orders = [], [], []
        for rows in groups:
            meta, order, offsets = layout(rows, shape)
            metas.append(meta)
            tokens.append(flat_tokens(meta, [batch.rows[i] for i in rows], offsets))
            # Sequence row -> the batch's input row (-1: padding).
            orders.append(np.array([rows[j] if j >= 0 else -1 for j in order], np.int64))
        meta = jax.tree.map(lambda *a: np.stack(a), *metas)
        logits, self.pool = self._forward(
            self.params,
            np.stack(tokens),
            meta,
            self.pool,
            config=self.config,
            dtype=self.dtype,
            backend=self.backend,
            batch_invariant=self.batch_invariant,
        )
        logits = logits.reshape(-1, *logits.shape[2:])  # [D * S, ...]: replica-major rows
        order = np.concatenate(orders)
        last = logits[:, -1] if batch.logits_per_row else logits
        sampled, entries = self._sample(last, order, batch.sample, batch.token_bitmask)
        return StepResult(logits, order, sampled, entries)

    def _sampler_inputs(self, order, requests, token_bitmask=None):
        """(requests by sequence row, SamplerFlags, the sampler's array arguments after the
        logits: metadata, counts, prompt mask, banned ids, logit bias[, bitmask]) for the
        rows whose input row names a request; flags None when no row samples."""
        rows = len(order)
        by_row: list[Request | None] = [None] * rows
        for r, i in enumerate(order):
            if i >= 0:
                by_row[r] = requests[i]
        if all(req is None for req in by_row):  # e.g. every row verifies drafts this step
            return by_row, None, None
        params = [req.sampling_params if req is not None else None for req in by_row]
        flags = SamplerFlags.for_batch(params)
        vocab = self.config.vocab_size
        if flags.use_penalties:
            counts = np.zeros((rows, vocab), np.int32)
            prompt_mask = np.zeros((rows, vocab), bool)
            for r, req in enumerate(by_row):
                if req is not None:
                    np.add.at(counts[r], req.output_token_ids, 1)
                    prompt_mask[r, req.prompt_token_ids] = True
        else:
            counts = np.zeros((rows, 1), np.int32)
            prompt_mask = np.zeros((rows, 1), bool)
        generated = [req.num_output_tokens if req is not None else 0 for req in by_row]
        seeds = [req.seed if req is not None else 0 for req in by_row]
        banned = min_tokens_banned_ids(params, generated, self.eos_token_ids, rows)
        bias = logit_bias_arrays(params, rows)
        inputs = [
            SamplingMetadata.build(params, seeds, generated, rows),
            counts,
            prompt_mask,
            banned,
            bias,
        ]
        if token_bitmask is not None:
            bitmask = None
            masks = token_bitmask()
            if any(i >= 0 and by_row[r] is not None and i in masks for r, i in enumerate(order)):
                bitmask = np.full((rows, (vocab + 31) // 32), -1, np.int32)
                for r, i in enumerate(order):
                    if by_row[r] is not None and i in masks:
                        bitmask[r] = masks[i]
            inputs.append(bitmask)
        return by_row, flags, inputs

    def _sampler_inputs_none(self, rows: int):
        """Sampler arguments for a step that samples no row (greedy, neutral)."""
        meta = SamplingMetadata.build([None] * rows, [0] * rows, [0] * rows, rows)
        return [meta, np.zeros((rows, 1), np.int32), np.zeros((rows, 1), bool), None, None]

    @functools.cached_property
    def _no_prev(self) -> jax.Array:
        """prev_tokens of a step with no previous step to gather from (a host copy: no
        program to compile or load at start)."""
        return jax.device_put(np.zeros((self.prev_rows or 1,), np.int32))

    def _sample(self, logits, order, requests, token_bitmask=None):
        """Sample the sequence rows whose input row names a request (logits f32[S, V]);
        token_bitmask as StepBatch's."""
        n = len(requests)
        tokens: list[int | None] = [None] * n
        entries: list[dict | None] = [None] * n
        by_row, flags, inputs = self._sampler_inputs(order, requests, token_bitmask)
        if flags is None:
            return tokens, entries
        meta, counts, prompt_mask, banned, bias = inputs[:5]
        bitmask = inputs[5] if len(inputs) > 5 else None
        res = sample(
            logits,
            meta,
            jnp.asarray(counts),
            jnp.asarray(prompt_mask),
            flags=flags,
            banned_ids=None if banned is None else jnp.asarray(banned),
            logit_bias=None if bias is None else tuple(map(jnp.asarray, bias)),
            bitmask=None if bitmask is None else jnp.asarray(bitmask),
        )
        token_ids = np.asarray(res.token_ids)
        lp_rows = host_logprob_rows(res, flags.num_logprobs)
        for r, req in enumerate(by_row):
            if req is None:
                continue
            tok = int(token_ids[r])
            i = int(order[r])
            tokens[i] = tok
            entries[i] = logprob_entry(tok, req.sampling_params.logprobs, r, lp_rows)
        return tokens, entries
