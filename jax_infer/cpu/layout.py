"""Column tiles: the stored layout the CPU kernels read, and f32 matrices kept in it.

A [K, N] matrix in column tiles of T = 64 columns (T = N when 64 does not divide N) is stored
as [N/T, K, T], each tile contiguous: w[k, n] = tiles[n // T, k, n % T]. A kernel computes T
outputs at a time from T columns of every row; in the [K, N] layout those are 64 values every
N, which one core streams from memory at less than half the speed of a contiguous tile
(scripts/bench_quant_matmul.py). The quantized formats (quant/arrays.py) store their weight
bytes in these tiles too, and import the helpers from here.

`TiledF32Array` is an f32 matrix, unchanged, in this layout: not a quantization (nothing is
lost), the layout the CPU's f32 kernel (matmul_f32.cc) reads, which runs the model's
projections faster than XLA's dot does. A bf16 matrix (dtype="bfloat16") is kept the same way,
values bf16, for the bf16 kernel (matmul_bf16.cc); the name stays for the f32 case it began
with, and `values.dtype` says which. `tile_f32_params` puts a model's projections in it
on the CPU; `untile_f32_params` undoes it (before saving a checkpoint, or for another
backend). Like the quantized formats it is a pytree (its tiles pass through `jit`) and a flax
metadata box: flax checks a stored param's shape against the module's, so `unbox()` hands the
module a `TiledF32View` with the logical shape, which the `model.layers` seams recognise.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax.core import meta

from jax_infer.cpu import build

TILE = 64  # output columns per stored tile (and per kernel tile: kTile in common.h)


def tile_width(n: int) -> int:
    return TILE if n % TILE == 0 else n


def to_tiles(a):
    """[R, N] -> [N/T, R, T] (the stored layout of weight bytes)."""
    r, n = a.shape
    t = tile_width(n)
    return a.reshape(r, n // t, t).transpose(1, 0, 2)


def from_tiles(a):
    """[N/T, R, T] -> [R, N]."""
    tiles, r, t = a.shape
    return a.transpose(1, 0, 2).reshape(r, tiles * t)


def take_tiled(a, idx):
    """Columns idx i32[C] of a tiled [N/T, R, T] array, as one tile [1, R, C]."""
    t = a.shape[2]
    return a[idx // t, :, idx % t].T[None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiledF32Array(meta.AxisMetadata):
    """An f32 [K, N] matrix in column tiles: w[k, n] = values[n // T, k, n % T]. `shape` is
    the logical [K, N] (static); the matrix is never stored transposed."""

    values: jax.Array  # f32[N/T, K, T] (or bf16[N/T, K, T])
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    transposed: ClassVar[bool] = False  # as the quantized formats' field (sharding reads it)

    # -- flax metadata box ------------------------------------------------------------
    def unbox(self) -> TiledF32View:
        return TiledF32View(self)

    def replace_boxed(self, val):
        if not isinstance(val, TiledF32View):
            raise TypeError(f"a tiled f32 param can only be replaced by its view, got {type(val)}")
        return val.array

    def add_axis(self, index, params):
        raise NotImplementedError("tiled f32 params cannot be scanned or vmapped over by flax")

    def remove_axis(self, index, params):
        raise NotImplementedError("tiled f32 params cannot be scanned or vmapped over by flax")

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(K, N) of the [in, out] matrix the tiles hold (the logical shape)."""
        return tuple(self.shape)

    @property
    def nbytes(self) -> int:
        return self.values.size * self.values.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TiledF32View:
    """What a flax module receives for a tiled param: the logical shape for flax's check and
    the array for the seams. Not a pytree: it only lives inside a module call."""

    array: TiledF32Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def as_tiled(w) -> TiledF32Array | None:
    """The TiledF32Array behind a param (boxed or unboxed), or None for anything else."""
    if isinstance(w, TiledF32View):
        return w.array
    if isinstance(w, TiledF32Array):
        return w
    return None


def tile_f32(w) -> TiledF32Array:
    """An f32 or bf16 [K, N] matrix (N a multiple of 64) in the tiled layout of
    `TiledF32Array`, dtype kept."""
    if w.ndim != 2 or w.dtype not in (jnp.float32, jnp.bfloat16) or w.shape[1] % TILE:
        raise ValueError(
            f"tile_f32 needs an f32 or bf16 [K, N] matrix with N a multiple of {TILE}; "
            f"got {w.dtype}{list(w.shape)}"
        )
    return TiledF32Array(jnp.asarray(to_tiles(w)), tuple(int(d) for d in w.shape))


def untile(t: TiledF32Array):
    """The [K, N] matrix of t in its dtype (inverse of `tile_f32`)."""
    return from_tiles(t.values)


def _is_boxed(x) -> bool:
    # Quantized formats and tiled arrays alike: leaves already in a layout of their own.
    return isinstance(x, meta.AxisMetadata)


def tile_f32_params(params):
    """Params for the CPU's f32 kernel: every f32 projection [K, N] with N a multiple of 64
    (the untied LM head included) as a TiledF32Array, the same values in column tiles; the
    embedding table, quantized matrices and everything else as they are. Unchanged where the
    kernel is not built (`build.has(build.F32_TILES_MATMUL)`). bf16 projections likewise,
    for the bf16 kernel (`build.BF16_TILES_MATMUL`), whose small-row path they take. Call it
    for a CPU without a mesh: elsewhere the XLA dot on [K, N] is the fast path."""
    kinds = set()
    if build.has(build.F32_TILES_MATMUL):
        kinds.add(jnp.dtype(jnp.float32))
    if build.has(build.BF16_TILES_MATMUL):
        kinds.add(jnp.dtype(jnp.bfloat16))
    if not kinds:
        return params

    def convert(path, leaf):
        if _is_boxed(leaf) or not hasattr(leaf, "ndim"):
            return leaf
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", last)))
        if name == "embed" or leaf.ndim != 2 or leaf.dtype not in kinds or leaf.shape[1] % TILE:
            return leaf
        return tile_f32(leaf)

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_boxed)


def untile_f32_params(params):
    """Inverse of `tile_f32_params`: every TiledF32Array back to its [K, N] f32 matrix."""
    return jax.tree.map(
        lambda x: untile(x) if isinstance(x, TiledF32Array) else x, params, is_leaf=_is_boxed
    )
