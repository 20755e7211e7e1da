"""`LLM`: the vLLM-style entry point.

    from jax_infer import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))
    print(out[0].text)

Requests run through the continuous-batching engine (`engine.LLMEngine`: paged KV cache,
chunked prefill, prefix caching). `engine="static"` selects the static-batch generator
instead (padded batches that wait for their slowest member), kept as the baseline the
benchmark compares against.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import compile_cache, sharding, weights
from jax_infer.engine import EngineConfig, LLMEngine, make_request, prepare_prompt
from jax_infer.generation import StaticBatchGenerator
from jax_infer.outputs import RequestOutput
from jax_infer.quant import quantize
from jax_infer.runner import canonical_params
from jax_infer.sampling import SamplingParams
from jax_infer.scheduler.request import Request
from jax_infer.speculative import config as spec_config
from jax_infer.tokenizer import Tokenizer
from jax_infer.weights import cache as weights_cache
from jax_infer.weights.cache import WeightsCache

DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}
ENGINES = ("continuous", "static")


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: allowed are {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={d} is not supported: allowed are float32 and bfloat16")
    return d


def resolve_mesh(mesh):
    """None, a Mesh with axes ("data", "model"), or (data, model) sizes -> Mesh or None."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        if mesh is not None and tuple(mesh.axis_names) != sharding.MESH_AXES:
            raise ValueError(
                f"mesh has axes {tuple(mesh.axis_names)}; allowed is a mesh with axes "
                f"{sharding.MESH_AXES} (sharding.make_mesh)"
            )
        return mesh
    if isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        return sharding.make_mesh(*mesh)
    raise ValueError(
        f"mesh={mesh!r} is invalid: allowed are None, a jax Mesh from sharding.make_mesh, or "
        "(data, model) sizes"
    )


def load_tokenizer(fmt: str, path: str, reader) -> Tokenizer:
    if fmt == "gguf":
        return Tokenizer.from_gguf(reader if reader is not None else path)
    return Tokenizer.from_dir(path)


class LLM:
    """Loads a model once and generates for batches of prompts.

    model: a name (`smollm2-135m`), a .gguf file, an HF directory or an orbax checkpoint dir.
    dtype: "float32" or "bfloat16" (weights and activations; softmax and norms run in f32).
    max_model_len: longest prompt + completion accepted (default: the model's, capped at 4096).
    max_num_seqs: most requests in one step (a batch, for the static engine).
    max_num_batched_tokens: token budget of one step (chunked prefill splits longer prompts).
    max_num_partial_prefills: most prompt chunks in one step (None: as many as the token budget
        holds); see `EngineConfig`.
    page_size, kv_cache_gb, num_pages: the paged KV cache (num_pages overrides kv_cache_gb).
    enable_prefix_caching: share the KV pages of identical prompt prefixes.
    kv_cache_dtype: "auto" (the model dtype), "float32", "bfloat16" or "int8" (per-token,
        per-head scales; about 1.9x the tokens of bf16 in the same kv_cache_gb).
    async_scheduling: schedule and lay out step n + 1 while step n computes (the continuous
        engine; steps it cannot overlap run synchronously, with the same results).
    attention_backend: "reference", "xla", "cpu" or "pallas" (default: pallas on TPU/GPU; on
        CPU "cpu", C++ kernels for decode and prefill rows, or "xla" with a mesh or where the
        kernels cannot be built). The static engine uses the kernels under "cpu" and the jnp
        attention otherwise.
    engine: "continuous" (default) or "static".
    seed: seeds the per-request seeds drawn for requests that set none.
    quantization: None, or a scheme name for `jax_infer.quant.quantize` ("int8", "int4", ...),
        applied on load.
    mesh: None (one device), a `sharding.make_mesh` Mesh, or (data, model) sizes for one. Params
        are placed by `sharding_rules` (loaded straight into their shards from HF safetensors,
        GGUF and orbax), the KV cache is split by kv heads; the continuous engine runs `data`
        replicas, each with its own pages (num_pages each) and rows, the static engine splits
        its batch over it (see engine.LLMEngine).
    sharding_rules: logical axis -> mesh axis table (default `sharding.DEFAULT_RULES`).
    precompile: compile every step bucket now, with a progress bar (`EngineConfig.precompile`;
        None: off here, on in the server), rather than each when a request first needs it.
    compilation_cache_dir: jax's persistent compilation cache, so a second start loads compiled
        programs instead of compiling: "auto" ($JAX_INFER_COMPILATION_CACHE_DIR, else
        ~/.cache/jax_infer/xla), a directory, or None/"off" (`compile_cache`; one per process).
        The step programs themselves are stored there too (program_store.py).
    weights_cache_dir: the cache of converted weights (weights/cache.py), so a second start
        maps the weights in their final layout instead of reading and converting the file:
        "auto" ($JAX_INFER_WEIGHTS_CACHE_DIR, else `weights/` in the compilation cache
        directory; off when that is off), a directory, or None/"off". Used on one device
        without speculative decoding, for the continuous engine.
    speculative_config: speculative decoding (speculative/config.py): a dict like vLLM's
        ({"method": "ngram" | "draft_model", "num_speculative_tokens": k, "model": draft path,
        "quantization": scheme for a self-draft, ...}) or "ngram", "self-int4", "self-int8",
        "draft:<path>". Greedy outputs are unchanged; sampled ones keep their distribution.
    batch_invariant: each request's logits bitwise the same whether it runs alone or beside
        any other requests, with any prefill chunk size and after a preemption (CPU kernels
        with fixed reduction orders, model/invariant.py). Needs the "cpu" attention backend,
        a float32 KV cache, unquantized weights and one device; ValueError otherwise.
    """

    def __init__(
        self,
        model: str = weights.DEFAULT_MODEL,
        *,
        dtype="float32",
        max_model_len: int | None = None,
        # Engine knobs: defaults written once, in EngineConfig.
        max_num_seqs: int = EngineConfig.max_num_seqs,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        max_num_partial_prefills: int | None = EngineConfig.max_num_partial_prefills,
        page_size: int = EngineConfig.page_size,
        kv_cache_gb: float = EngineConfig.kv_cache_gb,
        num_pages: int | None = EngineConfig.num_pages,
        enable_prefix_caching: bool = EngineConfig.enable_prefix_caching,
        attention_backend: str | None = EngineConfig.attention_backend,
        engine: str = "continuous",
        seed: int = 0,
        quantization: str | None = None,
        kv_cache_dtype: str = EngineConfig.kv_cache_dtype,
        async_scheduling: bool = EngineConfig.async_scheduling,
        precompile: bool | None = EngineConfig.precompile,
        compilation_cache_dir: str | None = EngineConfig.compilation_cache_dir,
        weights_cache_dir: str | None = "auto",
        progress: bool = True,
        mesh=None,
        sharding_rules=None,
        speculative_config=None,
        batch_invariant: bool = EngineConfig.batch_invariant,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
        if batch_invariant and engine != "continuous":
            raise ValueError(
                f"batch_invariant=True needs engine='continuous' (the paged step); got "
                f"engine={engine!r}"
            )
        spec = spec_config.normalize(speculative_config)
        if spec is not None and (engine != "continuous" or mesh is not None):
            raise ValueError(
                f"speculative_config={speculative_config!r} needs engine='continuous' on one "
                f"device; got engine={engine!r}, mesh={mesh!r}"
            )
        # Before any compile (loading compiles too): the persistent cache and its counters.
        compile_cache.enable(compilation_cache_dir)
        self.dtype = resolve_dtype(dtype)
        self.mesh = mesh = resolve_mesh(mesh)
        # In a multi-process job every process loads; only process 0 shows progress.
        progress = progress and jax.process_index() == 0
        self.sharding_rules = sharding_rules
        # A second start maps the converted weights (and tokenizer) from the weights cache.
        wcache = wkey = None
        if mesh is None and spec is None and engine == "continuous" and jax.process_count() == 1:
            wcache = WeightsCache.resolve(weights_cache_dir)
        else:
            weights_cache.resolve_dir(weights_cache_dir)  # raises on a bad value
        cached = None
        if wcache is not None:
            fmt, path = weights.resolve(model)
            wkey = wcache.key(
                path,
                dtype=str(self.dtype),
                quantization=quantization,
                batch_invariant=batch_invariant,
            )
            cached = wcache.load(wkey)
        self.weights_cache_hit = cached is not None
        if cached is not None:
            # Params already in the runner's layout (laying out again is a no-op).
            config, params, self.tokenizer, _ = cached
            draft = None
        else:
            # The path resolved once (a named model's may be assembled or checked on resolve).
            config, params, fmt, path, reader = weights.load(
                path if wcache is not None else model,
                self.dtype,
                progress,
                mesh=mesh,
                rules=sharding_rules,
            )
            params = jax.tree.map(self._cast_float, params)
            float_params = params
            if quantization is not None:
                params = quantize(params, quantization)
            # A quantized self-draft starts from the target's float weights (`quantize`
            # refuses quantized ones), so an int8 target can have an int4 self-draft; an
            # unquantized one is the target's weights as served.
            quantized_draft = spec is not None and spec["quantization"] is not None
            draft = self._draft_model(
                spec, config, float_params if quantized_draft else params, progress
            )
            del float_params
            self.tokenizer = load_tokenizer(fmt, path, reader)
        self.config = config
        self.model_path = path
        if max_model_len is None:
            max_model_len = min(config.max_position_embeddings, 4096)
        if (
            not isinstance(max_model_len, int)
            or isinstance(max_model_len, bool)
            or not 2 <= max_model_len <= config.max_position_embeddings
        ):
            raise ValueError(
                f"max_model_len={max_model_len!r} is invalid: must be an int in "
                f"[2, {config.max_position_embeddings}]"
            )
        self.max_model_len = max_model_len
        self.engine_config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_partial_prefills=max_num_partial_prefills,
            page_size=page_size,
            kv_cache_gb=kv_cache_gb,
            num_pages=num_pages,
            enable_prefix_caching=enable_prefix_caching,
            attention_backend=attention_backend,
            kv_cache_dtype=kv_cache_dtype,
            async_scheduling=async_scheduling,
            precompile=precompile,
            compilation_cache_dir=compilation_cache_dir,
            batch_invariant=batch_invariant,
            **(spec_config.engine_fields(spec) if spec else {}),
        )
        if engine == "static" and kv_cache_dtype not in ("auto", str(self.dtype)):
            raise ValueError(
                f"kv_cache_dtype={kv_cache_dtype!r} needs engine='continuous' (the paged "
                "cache); the static engine keeps K/V in the model dtype"
            )
        if engine == "static" and precompile:
            raise ValueError(
                "precompile=True needs engine='continuous' (the static engine compiles per "
                "batch shape on first use)"
            )
        self.engine_kind = engine
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        # The engine's runner (or the static generator) lays the params out for the backend
        # and keeps only that copy; `params` rebuilds the canonical ones when asked.
        if engine == "continuous":
            self.engine = LLMEngine(
                config,
                params,
                self.tokenizer,
                dtype=self.dtype,
                max_model_len=max_model_len,
                engine_config=self.engine_config,
                seed=seed,
                mesh=mesh,
                rules=sharding_rules,
                draft_model=draft,
                progress=progress,
            )
            if wkey is not None and cached is None:
                wcache.store(wkey, config, self.engine.params, self.tokenizer)
        else:
            self.generator = StaticBatchGenerator(
                config,
                params,
                self.tokenizer,
                self.dtype,
                max_model_len,
                mesh=mesh,
                rules=sharding_rules,
                attention_backend=self.engine_config.attention_backend,
            )

    def _draft_model(self, spec, config, params, progress):
        """(config, canonical params) of the draft for speculative_config, or None (config,
        params: the target's, for a self-draft)."""
        if spec is None or spec["method"] != "draft_model":
            return None
        if spec["model"] is not None:  # else a self-draft: the target's weights, quantized
            config, params, *_ = weights.load(spec["model"], self.dtype, progress)
            params = jax.tree.map(self._cast_float, params)
        if spec["quantization"] is not None:
            params = quantize(params, spec["quantization"])
        return config, params

    @property
    def params(self):
        """The params in the layout the model runs on this backend (`runner.backend_params`):
        what to pass to a model function or another engine (laying them out again is a
        no-op)."""
        return self.engine.params if self.engine_kind == "continuous" else self.generator.params

    def canonical_params(self):
        """The params as loaded (and quantized): what `save` writes and a self-draft starts
        from, rebuilt from the runner's layout on each call (only that copy is kept)."""
        return canonical_params(self.params, self.config)

    def _cast_float(self, leaf):
        # Only float leaves follow `dtype`: integer leaves are quantized values.
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != self.dtype:
            return leaf.astype(self.dtype)
        return leaf

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def save(self, path: str) -> None:
        """Write an orbax checkpoint (params, config, tokenizer): `LLM(model=path)` restores it
        without touching the original weights file."""
        weights.save_orbax(path, self.canonical_params(), self.config, tokenizer=self.tokenizer)

    # -- requests ----------------------------------------------------------------------

    def _requests(self, prompts, sampling_params) -> list[tuple]:
        """Validate every request before any runs: one bad prompt fails the call cleanly."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple))
            and prompts
            and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                "give one, or one per prompt"
            )
        out = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            try:
                text, ids = prepare_prompt(
                    prompt, params, self.tokenizer, self.config.vocab_size, self.max_model_len
                )
                if params.structured_outputs is not None:
                    if self.engine_kind != "continuous":
                        raise ValueError(
                            "SamplingParams.structured_outputs needs engine='continuous'; "
                            f"engine={self.engine_kind!r}"
                        )
                    self.engine.check_structured_outputs(params)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from e
            out.append((text, ids, params))
        return out

    def _static_requests(self, requests) -> list[Request]:
        for _, _, params in requests:
            if params.n > 1 or params.prompt_logprobs is not None:
                raise ValueError(
                    f"SamplingParams n={params.n}, prompt_logprobs={params.prompt_logprobs} "
                    "need engine='continuous' (the static engine runs n=1 without prompt logprobs)"
                )
        return [
            make_request(str(next(self._ids)), text, ids, params, self.tokenizer, self._rng)
            for text, ids, params in requests
        ]

    # -- generation --------------------------------------------------------------------

    def _run(self, requests) -> tuple[list[str], Iterator[RequestOutput]]:
        if self.engine_kind == "static":
            seqs = self._static_requests(requests)
            size = self.engine_config.max_num_seqs

            def chunks():
                for i in range(0, len(seqs), size):
                    yield from self.generator.run(seqs[i : i + size])

            return [s.request_id for s in seqs], chunks()
        ids = []
        for text, token_ids, params in requests:
            ids.append(self.engine.add_prepared(text, token_ids, params))
        samples = {rid: self.engine.sample_ids(rid) for rid in ids}

        def steps():
            pending = {sid for rid in ids for sid in samples[rid]}
            try:
                while pending:
                    for chunk in self.engine.step():
                        if chunk.request_id in pending:
                            if chunk.finished:
                                pending.discard(chunk.request_id)
                            yield chunk
            finally:
                # A consumer that stops early (or an exception) must not leave its requests
                # holding pages in the engine.
                for rid in pending:
                    self.engine.abort(rid)

        return ids, steps()

    def generate(
        self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Completions for a prompt or a list of prompts (strings or token-id lists), in order:
        one RequestOutput per prompt. With SamplingParams.n > 1 its `outputs` holds the n
        samples (each a RequestOutput with its `index`), and its own fields are sample 0's."""
        ids, chunks = self._run(self._requests(prompts, sampling_params))
        continuous = self.engine_kind == "continuous"
        sample_ids = {rid: self.engine.sample_ids(rid) if continuous else [rid] for rid in ids}
        final: dict[str, RequestOutput] = {}
        for chunk in chunks:
            if chunk.finished:
                final[chunk.request_id] = chunk
        out = []
        for rid in ids:
            samples = [final[sid] for sid in sample_ids[rid]]
            if len(samples) == 1:
                out.append(samples[0])
            else:
                out.append(dataclasses.replace(samples[0], request_id=rid, samples=samples))
        return out

    def stream(self, prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Yields RequestOutput chunks as tokens arrive (`delta_text` is the new text); with
        n > 1 each chunk is one sample's (`group_id` the prompt's request, `index` the sample)."""
        _, chunks = self._run(self._requests(prompts, sampling_params))
        yield from chunks

    def _chat_prompts(self, messages) -> list[list[int]]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return [
            self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
            for conv in conversations
        ]

    def chat(self, messages, sampling_params=None) -> list[RequestOutput]:
        """messages: [{"role": ..., "content": ...}, ...] or a list of such conversations."""
        return self.generate(self._chat_prompts(messages), sampling_params)

    def chat_stream(self, messages, sampling_params=None) -> Iterator[RequestOutput]:
        yield from self.stream(self._chat_prompts(messages), sampling_params)
