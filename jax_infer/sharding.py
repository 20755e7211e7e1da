"""Sharding: logical axis names on every array, one rules table, and the mesh they map onto.

Model code never names a device. Each parameter and cache array carries *logical* axes
(`("embed", "q_heads")` for wq); `DEFAULT_RULES`, the one table, maps logical axes to the two
mesh axes `data` and `model`; `NamedSharding`s are derived from the two. Changing the
parallelism layout means changing the table (or passing another), never the model. Inside
`jit`, XLA's SPMD partitioner propagates these input shardings through the program and
inserts every collective: there is no hand-written communication.

Layout (Megatron-style tensor parallelism over `model`, data parallelism over `data`):

    embed   [V, D]       ("vocab", "embed")      split by vocabulary
    wq      [D, N*H]     ("embed", "q_heads")    column-parallel, split by query heads
    wk, wv  [D, K*H]     ("embed", "kv_heads")   column-parallel, split by kv heads
    wo      [N*H, D]     ("q_heads", "embed")    row-parallel: partial sums, one all-reduce
    w_gate, w_up [D, F]  ("embed", "mlp")        column-parallel, split by channels
    w_down  [F, D]       ("mlp", "embed")        row-parallel: one all-reduce
    norms   [D]          ("embed",)              replicated (Gemma's post norms too)
    q_norm, k_norm [H]   ("head_dim",)           replicated (Gemma 3's QK-norm, per head)
    lm_head [D, V]       ("embed", "vocab")      split by vocabulary
    cache k, v [B, S, K, H]  ("batch", "seq", "kv_heads", "head_dim")
    page pool  [P, L, K, H]  ("pages", "page", "kv_heads", "head_dim")   (int8 scales [P, L, K])

Head-split rule. A dimension labelled `q_heads` / `kv_heads` is split only at head
boundaries: it is sharded over `model` only when the number of heads (N, resp. K) divides
the mesh axis size, and is replicated otherwise. Why not shard the flat N*H dimension
whenever it divides: a split inside a head cuts both the [N*H] -> [N, H] reshape and RoPE's
rotate-half pairing (dims h and h + H/2), so XLA would have to re-shard q, k and v inside
every layer; replicating costs memory and redundant attention FLOPs but no communication.
Since N = K * G, kv heads that split imply query heads that split; the converse does not
hold, and then K/V projections and the cache are replicated over `model` while queries
are split (each device holds every kv head it needs, as vLLM does when tp > K). SmolLM2
(N=9, K=3) at model=3 splits both; at model=2 or 4 its attention is replicated and its MLP
(F=1536), embedding and LM head (V=49152) are still split.

The same fallback holds for every axis: a dimension whose size the mesh axis does not
divide (a vocabulary of 97, a batch of 3 over data=2) is replicated, so any model runs on
any mesh, only less split. A mesh axis of size 1 is never named in a spec, so a spec says
exactly which dimensions are split.

Structured leaves. A plain leaf's logical axes come from its path and shape alone
(`logical_axes`): the parameter is the last path component that names one
(`layers_0/wq/scales` -> wq), and the leaf's dims are aligned with the weight's axes the
way numpy broadcasting aligns them, from the right, with size-1 dims unnamed.

Quantized matrices (`jax_infer.quant.Int8Array` / `Int4Array`) store their bytes in
column tiles, so their arrays do not line up with the float weight: `QUANT_LAYOUTS` says
which dim of each stored array indexes the input rows K ("in"), their groups ("groups")
or the output columns N ("out": columns, or tiles of 64 of them). The matrix's logical
(in, out) axes (swapped for a tied embedding stored transposed as the head [D, V]) are
mapped by the rules as for the float weight, then each role is split only if every stored
dim it names divides (tile count N/64, K, K/8 for packed int4, group count G); otherwise
that role is replicated in all of the matrix's arrays, so shards always hold whole tiles
and whole groups, and the arrays of one matrix are split at the same rows and columns.
A single group (per-channel scales [1, N]) is replicated along it (a broadcast). An f32
matrix in the CPU kernel's column tiles (`jax_infer.cpu.layout.TiledF32Array`) is split the
same way, by its tile count and rows.
Pruned params are plain, smaller arrays: the same rules apply, and a head or channel count
the mesh no longer divides falls back to replication.

On a CPU mesh the quantized product is the native kernel (`jax_infer.cpu.matmul`), an FFI
custom call XLA cannot partition: the SPMD partitioner all-gathers the weight's shards and
runs the kernel whole on every device. The result is exact (tested), only the memory and
traffic of tensor parallelism are lost; CPU meshes are simulations for tests, and on GPU
and TPU `quantized_matmul` takes its XLA formulation, which partitions like a float dot.
Under `jit` every layout is numerically the same program; the rules only decide where
bytes live and what moves.

What `data` splits. The static engine and `model.step.forward` have a batch axis: tokens
and the contiguous cache split over `data`. The continuous engine has none: a step is one
flat run of tokens from every sequence over a page pool shared through block tables. So
there (`LLMEngine(mesh=...)`) `data` makes replicas that each own a slice of the pool: the
runner maps the logical "pages" axis to `data` (`DEFAULT_RULES` leave it replicated), each
replica's scheduler hands out page ids local to its slice (`scheduler/replicas.py`), and
one step runs every replica's rows (`runner.data_parallel_step`). The pool is pinned to its
sharding across steps (`runner.sharded_step`) so that its donation updates it in place.

What lives elsewhere. This module is rules and specs only and imports no model code:
caches created in their sharding are `model.cache.init_sharded_cache` /
`init_sharded_paged_cache`; multi-process start-up is `distributed.initialize_distributed`
(before anything touches the backend; the mesh then spans every process's devices, and the
sharded loaders, `load_hf(..., mesh=...)`, read on each host only the slices its devices
hold); the scripts' --mesh_* flags are `scripts/shared_flags.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_infer.config import ModelConfig
from jax_infer.cpu.layout import TiledF32Array
from jax_infer.quant.arrays import Int4Array, Int8Array, QuantizedArray

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (a name, a tuple of names, or None for replicated).
Rules = Mapping[str, "str | tuple[str, ...] | None"]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "seq": None,
    "head_dim": None,
    "pages": None,
    "page": None,
}

# Parameter name (last path component naming a weight) -> logical axes of the weight.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "post_attn_norm": ("embed",),
    "post_mlp_norm": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "wq": ("embed", "q_heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
    "bq": ("q_heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}

# The contiguous cache of model/cache.py: per layer (k, v), each [B, S, K, H].
CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")
# A page pool [P, L, K, H]: split by kv heads; the continuous engine also splits "pages"
# over `data` (one slice per data replica, see runner.ModelRunner).
PAGED_CACHE_AXES = ("pages", "page", "kv_heads", "head_dim")

# Stored arrays of a quantized [K, N] matrix (quant/arrays.py), or of an f32 one in column
# tiles (cpu/layout.py): what each dim indexes.
# "in": rows K (or K/8 packed words), "groups": row groups G, "out": columns N or their
# tiles N/64, None: within a tile.
QUANT_LAYOUTS: dict[type, dict[str, tuple[str | None, ...]]] = {
    Int8Array: {"values": ("out", "in", None), "scales": ("groups", "out")},
    TiledF32Array: {"values": ("out", "in", None)},
    Int4Array: {
        "packed": ("out", "in", None),
        "block_scale": ("groups", "out"),
        "block_min": ("groups", "out"),
        "scale_step": ("out",),
        "min_step": ("out",),
    },
}


# -- mesh ------------------------------------------------------------------------------


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")


def make_mesh(data: int = 1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, model) mesh.

    devices=None takes all devices when data * model equals their number (ordered by
    `mesh_utils.create_device_mesh`, which puts `model`, the chattier axis, on the fastest
    links), or the first data * model of them on a single process (tests, partial use of a
    host). Explicit devices must number exactly data * model.
    """
    _check_size("data", data)
    _check_size("model", model)
    n = data * model
    if devices is None:
        available = jax.devices()
        if n == len(available):
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh((data, model), available)
            return Mesh(grid, MESH_AXES)
        if n > len(available) or jax.process_count() > 1:
            raise ValueError(
                f"mesh data={data} x model={model} needs {n} devices; this "
                f"{'job' if jax.process_count() > 1 else 'process'} has {len(available)} "
                "(a multi-process mesh must use every device)"
            )
        devices = available[:n]
    devices = list(devices)
    if len(devices) != n:
        raise ValueError(
            f"devices has {len(devices)} entries, but mesh data={data} x model={model} "
            f"needs exactly {n}"
        )
    return Mesh(np.array(devices, dtype=object).reshape(data, model), MESH_AXES)


# -- logical axes ----------------------------------------------------------------------


def path_str(keypath) -> str:
    """'layers_0/wq/values' for a jax key path (dict keys, attribute names, indices)."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of the params leaf at `path` ('layers_3/w_up', 'layers_0/wq/scales').

    The weight is the last path component in `PARAM_AXES`; the leaf's dims align with the
    weight's axes from the right (numpy broadcasting), extra leading dims and size-1 dims
    unnamed.
    """
    weight = next((p for p in reversed(path.split("/")) if p in PARAM_AXES), None)
    if weight is None:
        raise ValueError(
            f"params leaf {path!r} names no known parameter, so it has no logical axes: "
            f"known are {sorted(PARAM_AXES)}"
        )
    axes = PARAM_AXES[weight]
    rank = len(shape)
    aligned = (None,) * max(rank - len(axes), 0) + axes[max(len(axes) - rank, 0) :]
    return tuple(None if size == 1 else a for a, size in zip(aligned, shape))


def head_units(config: ModelConfig) -> dict[str, int]:
    """Logical axes that may only be split at whole units: the head counts N and K."""
    return {"q_heads": config.num_heads, "kv_heads": config.num_kv_heads}


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Rules | None = None,
    units: Mapping[str, int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes.

    A dim is split over its rule's mesh axes only when their total size (ways) divides both
    the dim and its unit count (`units`, e.g. heads), each mesh axis at most once per array;
    otherwise the dim is replicated. Mesh axes of size 1 are left out.
    """
    rules = DEFAULT_RULES if rules is None else rules
    units = {} if units is None else units
    if len(axes) != len(shape):
        raise ValueError(f"axes={tuple(axes)} has {len(axes)} entries for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no entry in rules: the rules map {sorted(rules)}"
            )
        target = rules[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else target
        for a in mesh_axes:
            if a not in mesh_shape:
                raise ValueError(
                    f"rules[{name!r}]={target!r} names mesh axis {a!r}; the mesh has "
                    f"{tuple(mesh_shape)}"
                )
        mesh_axes = tuple(a for a in mesh_axes if mesh_shape[a] > 1)
        ways = math.prod(mesh_shape[a] for a in mesh_axes)
        if not mesh_axes or used & set(mesh_axes) or size % ways or units.get(name, size) % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules | None = None,
    config: ModelConfig | None = None,
) -> NamedSharding:
    """NamedSharding for any array with logical axes (inputs such as tokens: ("batch", None))."""
    units = head_units(config) if config is not None else None
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh.shape, rules, units))


# -- parameters and cache --------------------------------------------------------------


def param_sharding(
    path: str, shape: Sequence[int], config: ModelConfig, mesh: Mesh, rules: Rules | None = None
) -> NamedSharding:
    """Sharding of one params leaf, from its path and shape (what the loaders use)."""
    return named_sharding(logical_axes(path, shape), shape, mesh, rules, config)


def quantized_specs(
    path: str,
    q: QuantizedArray | TiledF32Array,
    mesh_shape: Mapping[str, int],
    rules: Rules | None = None,
    units: Mapping[str, int] | None = None,
) -> QuantizedArray | TiledF32Array:
    """The same QuantizedArray (or TiledF32Array) with a PartitionSpec in place of each stored
    array.

    The matrix's (in, out) logical axes are mapped as for its float weight; a role is kept
    split only if every stored dim it names divides its ways (see the module docstring)."""
    layout = QUANT_LAYOUTS.get(type(q))
    if layout is None:
        raise ValueError(
            f"params leaf {path!r} is a {type(q).__name__}, which has no stored layout: "
            f"known are {sorted(c.__name__ for c in QUANT_LAYOUTS)}"
        )
    axes = logical_axes(path, q.shape)
    if len(axes) != 2:
        raise ValueError(f"quantized leaf {path!r} has shape {q.shape}; expected a matrix")
    stored_axes = axes[::-1] if q.transposed else axes
    want = logical_to_spec(stored_axes, q.stored_shape, mesh_shape, rules, units)
    split = {"in": want[0], "out": want[1]}
    arrays = {name: getattr(q, name) for name in layout}

    def role(dim: str | None, size: int) -> str | None:
        # Group dims follow the rows; a single group is a broadcast, never split.
        if dim == "groups":
            return None if size == 1 else "in"
        return dim

    for name, dims in layout.items():
        for size, dim in zip(arrays[name].shape, dims):
            r = role(dim, size)
            target = split.get(r)
            if target is None:
                continue
            names = (target,) if isinstance(target, str) else target
            if size % math.prod(mesh_shape[a] for a in names):
                split[r] = None

    def spec(array, dims) -> PartitionSpec:
        return PartitionSpec(*(split.get(role(d, n)) for n, d in zip(array.shape, dims)))

    return dataclasses.replace(q, **{name: spec(arrays[name], layout[name]) for name in layout})


def param_specs(
    params, config: ModelConfig, mesh_shape: Mapping[str, int], rules: Rules | None = None
):
    """PartitionSpecs for a params pytree: needs only mesh axis sizes, no devices. A
    quantized matrix gets a QuantizedArray of specs (`quantized_specs`)."""
    units = head_units(config)

    def spec(keypath, leaf):
        path = path_str(keypath)
        if _is_quantized(leaf):
            return quantized_specs(path, leaf, mesh_shape, rules, units)
        return logical_to_spec(logical_axes(path, leaf.shape), leaf.shape, mesh_shape, rules, units)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=_is_quantized)


def param_shardings(params, config: ModelConfig, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings for a params pytree (plain arrays, QuantizedArrays, other NamedTuples)."""

    def to_sharding(spec):
        return NamedSharding(mesh, spec)

    specs = param_specs(params, config, mesh.shape, rules)
    return jax.tree.map(to_sharding, specs, is_leaf=_is_spec)


def shard_params(params, config: ModelConfig, mesh: Mesh, rules: Rules | None = None):
    """Params placed on the mesh. The source arrays are read whole here; loading with
    `load_hf(..., mesh=...)` instead creates each device's slice directly."""
    return jax.device_put(params, param_shardings(params, config, mesh, rules))


def cache_shardings(
    cache,
    config: ModelConfig,
    mesh: Mesh,
    rules: Rules | None = None,
    axes: Sequence[str | None] = CACHE_AXES,
):
    """NamedShardings for a cache pytree whose every leaf has logical `axes` (default: the
    contiguous [B, S, K, H] cache; a paged cache passes `PAGED_CACHE_AXES`). A leaf of lower
    rank takes the leading axes: the per-token scales [P, L, K] of an int8 pool
    (`attention.paged.QuantizedPages`) split by kv heads like its values [P, L, K, H]."""
    units = head_units(config)

    def to_sharding(leaf):
        leaf_axes = tuple(axes)[: leaf.ndim]
        return NamedSharding(mesh, logical_to_spec(leaf_axes, leaf.shape, mesh.shape, rules, units))

    return jax.tree.map(to_sharding, cache)


def shard_cache(
    cache,
    config: ModelConfig,
    mesh: Mesh,
    rules: Rules | None = None,
    axes: Sequence[str | None] = CACHE_AXES,
):
    return jax.device_put(cache, cache_shardings(cache, config, mesh, rules, axes))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _is_quantized(x) -> bool:
    """A matrix stored in arrays of its own layout: a quantized format or f32 column tiles."""
    return isinstance(x, (QuantizedArray, TiledF32Array))


__all__ = [
    "CACHE_AXES",
    "DATA",
    "DEFAULT_RULES",
    "MESH_AXES",
    "MODEL",
    "PAGED_CACHE_AXES",
    "PARAM_AXES",
    "QUANT_LAYOUTS",
    "cache_shardings",
    "head_units",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "param_sharding",
    "param_shardings",
    "param_specs",
    "quantized_specs",
    "shard_cache",
    "shard_params",
]
