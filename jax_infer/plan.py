"""The memory plan of a deployment, from shapes alone: no weights read, no device touched.

    plan = make_plan(LLAMA31_70B, dtype="bfloat16", quantization="int8", mesh_data=4,
                     mesh_model=8, kv_cache_gb=32, device=DeviceSpec(kind="tpu-v5e"))
    print(plan.format()); plan.fits

What a `--dry_run` prints. Every number is arithmetic over the `ModelConfig`, written to
match what the loaders, `quant.quantize`, `sharding` and `LLMEngine` will allocate:

* weights: every params leaf of `model/llama.py` (`param_shapes`), floats in the model dtype,
  the matrices a quantization scheme selects in its stored arrays (`stored_arrays`: int8
  values and f32 scales, packed int4 and its codes, in column tiles). Per device, each array
  is divided by the ways its `sharding` spec splits it: the split decisions are the
  library's own (`sharding.logical_to_spec`, `sharding.quantized_specs`, evaluated on shapes
  with mesh axis sizes only), so `model` splits heads, MLP channels and the vocabulary where
  they divide, and `data` replicates the weights.
* KV cache: the page pool the engine sizes from `kv_cache_gb` (or `num_pages`), every page
  holding K and V of all layers (`quant.kv.kv_bytes_per_head`: int8 pages carry one f32
  scale per token and head), split over `model` by kv heads where K divides it and
  replicated over `data` (the continuous engine's pool has no batch axis).
* capacity: pages, tokens and whole `max_model_len` requests the pool holds at once.
* fit: weights + KV per device against `memory_gib x memory_utilization` of the device
  (the rest is left to activations, XLA's workspace and the runtime).

A plan lists `problems` (what LLM/LLMEngine would refuse, or memory that does not fit);
`fits` is True when there are none. Tests compare every figure to arrays actually created
(`init_params`, `quantize`, sharded on simulated devices) and to `model.cache`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer import sharding
from jax_infer.config import ModelConfig
from jax_infer.cpu.layout import tile_width
from jax_infer.quant.arrays import Int4Array, Int8Array
from jax_infer.quant.kv import KV_DTYPES, kv_bytes_per_head
from jax_infer.quant.transform import EMBEDDING_NAMES, parse_scheme

GIB = 2**30

# High-bandwidth memory per chip, GiB (vendor figures). `cpu` has none: give memory_gib.
DEVICE_MEMORY_GIB: dict[str, float | None] = {
    "cpu": None,
    "tpu-v4": 32,
    "tpu-v5e": 16,
    "tpu-v5p": 95,
    "tpu-v6e": 32,
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100": 80,
    "h200": 141,
    "l4": 24,
}

FLOAT_DTYPES = {"float32": 4, "f32": 4, "bfloat16": 2, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """The accelerator a plan is checked against.

    kind: a key of DEVICE_MEMORY_GIB (its HBM per chip), or None. memory_gib: memory per
    device, overriding the kind's (needed for `cpu`). memory_utilization: the share of it
    weights and KV cache may take (vLLM's gpu_memory_utilization). Neither kind nor
    memory_gib: the plan is printed, the fit not checked.
    """

    kind: str | None = None
    memory_gib: float | None = None
    memory_utilization: float = 0.9

    def __post_init__(self):
        if self.kind is not None and self.kind not in DEVICE_MEMORY_GIB:
            raise ValueError(
                f"device.kind={self.kind!r} is not known: allowed are "
                f"{sorted(DEVICE_MEMORY_GIB)} (or None, giving memory_gib)"
            )
        m = self.memory_gib
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0):
            raise ValueError(f"device.memory_gib={m!r} is invalid: must be a number > 0 or None")
        u = self.memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"device.memory_utilization={u!r} is invalid: must be in (0, 1]")

    @property
    def capacity_gib(self) -> float | None:
        """Memory per device, GiB (None: unknown)."""
        if self.memory_gib is not None:
            return float(self.memory_gib)
        return None if self.kind is None else DEVICE_MEMORY_GIB[self.kind]

    @property
    def platform(self) -> str | None:
        if self.kind is None:
            return None
        return "cpu" if self.kind == "cpu" else "tpu" if self.kind.startswith("tpu") else "gpu"


# -- weights ---------------------------------------------------------------------------


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every params leaf `model.llama.init_params` creates (and the loaders
    fill): 'embed', 'layers_3/wq', ..."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (v, d), "final_norm": (d,)}
    for i in range(config.num_layers):
        layer = {
            "attn_norm": (d,),
            "mlp_norm": (d,),
            "wq": (d, q),
            "wk": (d, kv),
            "wv": (d, kv),
            "wo": (q, d),
            "w_gate": (d, f),
            "w_up": (d, f),
            "w_down": (f, d),
        }
        if config.attention_bias:
            layer.update(bq=(q,), bk=(kv,), bv=(kv,))
        shapes.update({f"layers_{i}/{name}": shape for name, shape in layer.items()})
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def stored_arrays(
    path: str, shape: tuple[int, ...], dtype: str, quantization: str | None
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], str | None, bool]:
    """(name -> (shape, dtype) of the arrays that store one leaf, format, transposed).

    format is None for a plain float leaf (one array, "value"), else "int8" / "int4" with the
    arrays of `quant.arrays.Int8Array` / `Int4Array` (see `quant.quantize` for which leaves a
    scheme selects)."""
    float_dtype = np.dtype(np.float32) if FLOAT_DTYPES[dtype] == 4 else jnp.dtype(jnp.bfloat16)
    name = path.rsplit("/", 1)[-1]
    scheme = None if quantization is None else parse_scheme(quantization)
    selected = scheme is not None and len(shape) == 2
    if selected and name in EMBEDDING_NAMES:
        selected = scheme.embedding
    if not selected:
        return {"value": (tuple(shape), float_dtype)}, None, False
    transposed = name == "embed"
    k, n = shape[::-1] if transposed else shape
    group = scheme.embed_group if name in EMBEDDING_NAMES else scheme.group
    if group is not None and k % group:
        raise ValueError(
            f"quantization={quantization!r}: group {group} does not divide the input dim "
            f"K={k} of {path}"
        )
    groups = 1 if group is None else k // group
    t = tile_width(n)
    f32, u8, s8 = np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int8)
    if scheme.bits == 8:
        arrays = {"values": ((n // t, k, t), s8), "scales": ((groups, n), f32)}
        return arrays, "int8", transposed
    if k % 8:
        raise ValueError(f"quantization={quantization!r}: int4 needs K={k} of {path} % 8 == 0")
    arrays = {
        "packed": ((n // t, k // 8, 4 * t), u8),
        "block_scale": ((groups, n), u8),
        "block_min": ((groups, n), s8),
        "scale_step": ((n,), f32),
        "min_step": ((n,), f32),
    }
    return arrays, "int4", transposed


def _ways(spec, mesh_shape) -> int:
    """How many pieces a PartitionSpec cuts an array into."""
    ways = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            ways *= mesh_shape[axis]
    return ways


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    total_bytes: int  # all leaves, stored once
    per_device_bytes: int  # what one device holds (every device holds the same)
    quantized_leaves: int
    replicated_bytes: int  # bytes of leaves no mesh axis splits (held whole by every device)


def plan_weights(
    config: ModelConfig,
    dtype: str = "float32",
    quantization: str | None = None,
    mesh_shape: dict[str, int] | None = None,
    rules: sharding.Rules | None = None,
) -> WeightPlan:
    """Bytes of the params, in total and per device of a (data, model) mesh."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: allowed are {sorted(FLOAT_DTYPES)}")
    mesh_shape = dict(mesh_shape or {sharding.DATA: 1, sharding.MODEL: 1})
    units = sharding.head_units(config)
    total = per_device = replicated = quantized = 0
    for path, shape in param_shapes(config).items():
        arrays, fmt, transposed = stored_arrays(path, shape, dtype, quantization)
        if fmt is None:
            axes = sharding.logical_axes(path, shape)
            specs = {"value": sharding.logical_to_spec(axes, shape, mesh_shape, rules, units)}
        else:
            quantized += 1
            cls = Int8Array if fmt == "int8" else Int4Array
            stand_in = cls(
                **{n: jax.ShapeDtypeStruct(s, d) for n, (s, d) in arrays.items()},
                shape=tuple(shape),
                transposed=transposed,
            )
            q = sharding.quantized_specs(path, stand_in, mesh_shape, rules, units)
            specs = {n: getattr(q, n) for n in arrays}
        for n, (s, d) in arrays.items():
            b, ways = _nbytes(s, d), _ways(specs[n], mesh_shape)
            total += b
            per_device += b // ways
            if ways == 1:
                replicated += b
    return WeightPlan(total, per_device, quantized, replicated)


# -- KV cache --------------------------------------------------------------------------


def kv_cache_dtype_name(kv_cache_dtype: str, dtype: str) -> str:
    """The pool's element type for an EngineConfig.kv_cache_dtype ("auto": the model's)."""
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_DTYPES}")
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    return "float32" if FLOAT_DTYPES[dtype] == 4 else "bfloat16"


def kv_bytes_per_token(config: ModelConfig, cache_dtype: str) -> int:
    """K and V of one token over all layers (int8: values and scales)."""
    dt = jnp.dtype(cache_dtype)
    return 2 * config.num_layers * config.num_kv_heads * kv_bytes_per_head(dt, config.head_dim)


def pool_pages(
    per_token: int, page_size: int, kv_cache_gb: float, num_pages: int | None = None
) -> int:
    """Pages of the pool, the null page included: `num_pages`, or as many as kv_cache_gb
    (GiB) holds (LLMEngine's rule)."""
    if num_pages is not None:
        return num_pages
    return int(kv_cache_gb * GIB) // (per_token * page_size)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    cache_dtype: str
    bytes_per_token: int  # all layers, whole (unsplit)
    num_pages: int  # the pool's, null page included
    page_size: int
    total_bytes: int
    per_device_bytes: int
    kv_head_ways: int  # how many devices share each token's heads (model split of K)
    tokens: int  # usable: (num_pages - 1) * page_size
    max_model_len: int
    full_requests: int  # requests of max_model_len tokens that fit at once


def plan_kv(
    config: ModelConfig,
    cache_dtype: str,
    page_size: int,
    kv_cache_gb: float,
    num_pages: int | None,
    max_model_len: int,
    mesh_shape: dict[str, int] | None = None,
    rules: sharding.Rules | None = None,
) -> KVPlan:
    mesh_shape = dict(mesh_shape or {sharding.DATA: 1, sharding.MODEL: 1})
    per_token = kv_bytes_per_token(config, cache_dtype)
    pages = pool_pages(per_token, page_size, kv_cache_gb, num_pages)
    shape = (pages, page_size, config.num_kv_heads, config.head_dim)
    spec = sharding.logical_to_spec(
        sharding.PAGED_CACHE_AXES, shape, mesh_shape, rules, sharding.head_units(config)
    )
    ways = _ways(spec, mesh_shape)
    total = pages * page_size * per_token
    pages_per_request = -(-max_model_len // page_size)
    return KVPlan(
        cache_dtype=cache_dtype,
        bytes_per_token=per_token,
        num_pages=pages,
        page_size=page_size,
        total_bytes=total,
        per_device_bytes=total // ways,
        kv_head_ways=ways,
        tokens=max(pages - 1, 0) * page_size,
        max_model_len=max_model_len,
        full_requests=max(pages - 1, 0) // pages_per_request,
    )


# -- the plan --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str  # a label: the preset name or path the config came from
    config: ModelConfig
    dtype: str
    quantization: str | None
    mesh_shape: dict[str, int]
    device: DeviceSpec
    weights: WeightPlan
    kv: KVPlan
    draft: WeightPlan | None  # a speculative draft's weights (one device)
    draft_kv_bytes: int  # a draft model's own pool (0 for a self-draft sharing the target's)
    max_num_seqs: int
    problems: tuple[str, ...]

    @property
    def per_device_bytes(self) -> int:
        draft = 0 if self.draft is None else self.draft.per_device_bytes
        return (
            self.weights.per_device_bytes + self.kv.per_device_bytes + draft + self.draft_kv_bytes
        )

    @property
    def budget_bytes(self) -> int | None:
        cap = self.device.capacity_gib
        return None if cap is None else int(cap * GIB * self.device.memory_utilization)

    @property
    def fits(self) -> bool:
        return not self.problems

    def format(self) -> str:
        gib = 1 / GIB
        d, m = self.mesh_shape[sharding.DATA], self.mesh_shape[sharding.MODEL]
        w, kv = self.weights, self.kv
        lines = [
            f"model        {self.model}: {self.config.num_params() / 1e9:.2f}B params, "
            f"{self.config.num_layers} layers, heads {self.config.num_heads}/"
            f"{self.config.num_kv_heads} (q/kv), vocab {self.config.vocab_size}",
            f"mesh         data={d} x model={m} = {d * m} device{'s' if d * m > 1 else ''}"
            + (f" of {self.device.kind}" if self.device.kind else ""),
            f"weights      {self.dtype}, quantization {self.quantization or 'none'}: "
            f"{w.total_bytes * gib:.2f} GiB in all, {w.per_device_bytes * gib:.2f} GiB per device"
            + (f" ({w.replicated_bytes * gib:.3f} GiB of it unsplit)" if d * m > 1 else ""),
            f"kv cache     {kv.cache_dtype}, {kv.bytes_per_token} B/token: {kv.num_pages} pages "
            f"x {kv.page_size} tokens = {kv.total_bytes * gib:.2f} GiB, "
            f"{kv.per_device_bytes * gib:.2f} GiB per device (kv heads split {kv.kv_head_ways} ways)",
            f"capacity     {kv.tokens} tokens = {kv.full_requests} requests of max_model_len="
            f"{kv.max_model_len} at once (max_num_seqs={self.max_num_seqs})",
        ]
        if self.draft is not None:
            lines.append(
                f"draft        {self.draft.per_device_bytes * gib:.2f} GiB weights"
                + (
                    f", {self.draft_kv_bytes * gib:.2f} GiB own KV pool"
                    if self.draft_kv_bytes
                    else ""
                )
            )
        budget = self.budget_bytes
        used = f"{self.per_device_bytes * gib:.2f} GiB per device"
        if budget is None:
            lines.append(f"memory       {used}; device memory not given: fit not checked")
        else:
            lines.append(
                f"memory       {used} of {budget * gib:.2f} GiB usable "
                f"({self.device.capacity_gib:g} GiB x {self.device.memory_utilization:g})"
            )
        lines.append("verdict      fits" if self.fits else "verdict      DOES NOT FIT / INVALID:")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def make_plan(
    config: ModelConfig,
    *,
    model: str = "",
    dtype: str = "float32",
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    page_size: int = 16,
    kv_cache_gb: float = 1.0,
    num_pages: int | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 1,
    attention_backend: str | None = None,
    mesh_data: int = 1,
    mesh_model: int = 1,
    device: DeviceSpec | None = None,
    draft_config: ModelConfig | None = None,
    draft_quantization: str | None = None,
    rules: sharding.Rules | None = None,
) -> Plan:
    """The plan of serving `config` so (engine knobs as in EngineConfig; `draft_config` the
    speculative draft's architecture: the target's own for a self-draft)."""
    device = device or DeviceSpec()
    mesh_shape = {sharding.DATA: mesh_data, sharding.MODEL: mesh_model}
    problems = []
    if max_model_len is None:
        max_model_len = min(config.max_position_embeddings, 4096)
    if not 2 <= max_model_len <= config.max_position_embeddings:
        problems.append(
            f"max_model_len={max_model_len} is outside [2, {config.max_position_embeddings}] "
            "(the model's max_position_embeddings)"
        )
    weights = plan_weights(config, dtype, quantization, mesh_shape, rules)
    cache_dtype = kv_cache_dtype_name(kv_cache_dtype, dtype)
    kv = plan_kv(
        config, cache_dtype, page_size, kv_cache_gb, num_pages, max_model_len, mesh_shape, rules
    )
    if kv.full_requests < 1:
        problems.append(
            f"the KV pool holds {kv.tokens} tokens ({kv.num_pages} pages of {page_size}), "
            f"less than one request of max_model_len={max_model_len}: raise "
            "engine.kv_cache_gb or engine.num_pages, or lower model.max_model_len"
        )
    backend = attention_backend
    if backend is None and device.platform in ("tpu", "gpu"):
        backend = "pallas"
    if cache_dtype == "int8" and backend == "pallas":
        problems.append(
            "engine.kv_cache_dtype='int8' needs attention_backend 'xla' (or 'cpu', "
            f"'reference'): the Pallas kernel reads float pages (on {device.kind} the default "
            "backend is pallas)"
        )
    draft = None
    draft_kv = 0
    if draft_config is not None:
        if mesh_data * mesh_model != 1:
            problems.append(
                f"speculative decoding runs on one device; the mesh is data={mesh_data} x "
                f"model={mesh_model}"
            )
        draft = plan_weights(draft_config, dtype, draft_quantization, None, rules)
        if draft_config != config:  # a draft model of its own keeps its own pool
            draft_kv = kv.num_pages * page_size * kv_bytes_per_token(draft_config, cache_dtype)
    plan = Plan(
        model=model,
        config=config,
        dtype=dtype,
        quantization=quantization,
        mesh_shape=mesh_shape,
        device=device,
        weights=weights,
        kv=kv,
        draft=draft,
        draft_kv_bytes=draft_kv,
        max_num_seqs=max_num_seqs,
        problems=(),
    )
    budget = plan.budget_bytes
    if budget is not None and plan.per_device_bytes > budget:
        problems.append(
            f"{plan.per_device_bytes / GIB:.2f} GiB per device (weights "
            f"{weights.per_device_bytes / GIB:.2f} + KV {kv.per_device_bytes / GIB:.2f}"
            + (f" + draft {(draft.per_device_bytes + draft_kv) / GIB:.2f}" if draft else "")
            + f") exceeds {budget / GIB:.2f} GiB usable of device.memory_gib="
            f"{device.capacity_gib:g} x memory_utilization={device.memory_utilization:g}: "
            "use more devices on the model axis, quantize, or shrink engine.kv_cache_gb"
        )
    return dataclasses.replace(plan, problems=tuple(problems))


__all__ = [
    "DEVICE_MEMORY_GIB",
    "DeviceSpec",
    "KVPlan",
    "Plan",
    "WeightPlan",
    "kv_bytes_per_token",
    "make_plan",
    "param_shapes",
    "plan_kv",
    "plan_weights",
    "pool_pages",
    "stored_arrays",
]
