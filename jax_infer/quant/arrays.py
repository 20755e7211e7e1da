"""Quantized weight matrices: the formats, quantize/dequantize, and int4 packing.

Every quantized matrix stands for a projection kernel [in, out] = [K, N] (`x @ w`), with
groups of `g` consecutive rows along K sharing a scale (G = K / g groups). A tied embedding
[V, D] is stored transposed, as the LM head [D, V] it doubles as, so that the head's matmul
and the kernels see one layout; `transposed` records that.

The weight bytes are stored in column tiles of T = 64 columns (T = N when 64 does not divide
N), each tile contiguous: the layout of jax_infer/cpu/layout.py, whose helpers this uses. A
decode kernel computes T outputs at a time from T columns of every row; in the [K, N] layout
those are 64 bytes every N bytes, which one core streams from memory at 8.5 GB/s, against
18 GB/s for a contiguous tile (scripts/bench_quant_matmul.py).
Scales stay [G, N]: they are read once per group, not once per row.

Formats (w is the float matrix the quantized one stands for; t = n // T, c = n % T):

* `Int8Array`, symmetric:  w[k, n] ~= values[t, k, c] * scales[k // g, n]
      values s8[N/T, K, T] in [-127, 127], scales f32[G, N]; G = 1 is per output channel.
* `Int4Array`, asymmetric, two levels of scale:
      w[k, n] ~= u[k, n] * block_scale[j, n] * scale_step[n] + block_min[j, n] * min_step[n]
      with j = k // g and u in [0, 15], block_scale u8[G, N], block_min s8[G, N],
      scale_step f32[N], min_step f32[N], and u packed two per byte in packed u8[N/T, K/8, 4T]:
          packed[t, i, 4c + b] = u[8i + b, n] | u[8i + 4 + b, n] << 4      (b in 0..3)
      so that a 32-bit word holds eight consecutive rows of one column: the low nibbles are
      four rows, the high nibbles the next four, which is what VPDPBUSD multiplies at once
      (see jax_infer/cpu/matmul_quant.cc). `pack_int4` / `unpack_int4` convert from / to [K, N].
  Asymmetric because a group's range is rarely centred on zero: 16 levels over [min, max]
  are finer than 16 levels over [-absmax, absmax]. SmolLM2's GGUF weights are themselves
  Q4_1 (asymmetric, 32-row blocks), so int4-g32 lands on their grid: measured on 4k tokens of
  GPL-3, asymmetric g32 keeps perplexity within 0.4% while symmetric g64 loses 25%. The
  per-group scale and minimum are 8-bit codes times a per-column f32 step (4.5 bits per
  weight at g32, against 5 for f16 scale and minimum), which is what lets a whole int4 model,
  embedding included, stay under 0.15x of its f32 bytes.

The arrays are pytrees (so they pass through `jit` and orbax) and flax metadata boxes: flax
compares a stored param's shape with the shape the module asks for, and a packed array has
another shape, so `unbox()` hands the module a `QuantizedView`, which reports the logical
shape and carries the arrays to the `model.layers` seams.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jax_infer.cpu.layout import from_tiles, take_tiled, tile_width, to_tiles

INT8_MAX = 127
INT4_LEVELS = 15  # u in [0, 15]
CODE_MAX = 255  # block_scale codes are u8
MIN_CODE_MAX = 127  # block_min codes are s8, symmetric


class QuantizedArray(meta.AxisMetadata):
    """Base of the quantized formats. Subclasses are frozen dataclasses registered as pytrees:
    array fields are children, `shape` (logical, of the float leaf it replaces) and
    `transposed` are static."""

    bits: ClassVar[int]
    shape: tuple[int, ...]
    transposed: bool

    # -- flax metadata box ------------------------------------------------------------
    def unbox(self) -> QuantizedView:
        return QuantizedView(self)

    def replace_boxed(self, val):
        if not isinstance(val, QuantizedView):
            raise TypeError(f"a quantized param can only be replaced by its view, got {type(val)}")
        return val.array

    def add_axis(self, index, params):
        raise NotImplementedError("quantized params cannot be scanned or vmapped over by flax")

    def remove_axis(self, index, params):
        raise NotImplementedError("quantized params cannot be scanned or vmapped over by flax")

    # -- shapes -----------------------------------------------------------------------
    @property
    def stored_shape(self) -> tuple[int, int]:
        """(K, N) of the [in, out] matrix the arrays encode."""
        return tuple(reversed(self.shape)) if self.transposed else tuple(self.shape)

    @property
    def groups(self) -> int:
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        return self.stored_shape[0] // self.groups

    @property
    def nbytes(self) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    def take_columns(self, idx) -> QuantizedArray:
        """The same format restricted to output columns idx i32[C] (an embedding lookup)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class QuantizedView:
    """What a flax module receives for a quantized param: the logical shape for flax's check
    and the arrays for the seams. Not a pytree: it only lives inside a module call."""

    array: QuantizedArray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def as_quantized(w) -> QuantizedArray | None:
    """The QuantizedArray behind a param (boxed or unboxed), or None for a plain array."""
    if isinstance(w, QuantizedView):
        return w.array
    if isinstance(w, QuantizedArray):
        return w
    return None


def _register(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    static = ("shape", "transposed")
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f not in static], meta_fields=list(static)
    )


@_register
@dataclasses.dataclass(frozen=True)
class Int8Array(QuantizedArray):
    values: jax.Array  # s8[N/T, K, T]
    scales: jax.Array  # f32[G, N]
    shape: tuple[int, ...]
    transposed: bool = False
    bits: ClassVar[int] = 8

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def take_columns(self, idx) -> Int8Array:
        k = self.stored_shape[0]
        return Int8Array(
            take_tiled(self.values, idx),
            jnp.take(self.scales, idx, axis=1),
            (k, int(idx.shape[0])),
        )


@_register
@dataclasses.dataclass(frozen=True)
class Int4Array(QuantizedArray):
    packed: jax.Array  # u8[N/T, K/8, 4T]
    block_scale: jax.Array  # u8[G, N]
    block_min: jax.Array  # s8[G, N]
    scale_step: jax.Array  # f32[N]
    min_step: jax.Array  # f32[N]
    shape: tuple[int, ...]
    transposed: bool = False
    bits: ClassVar[int] = 4

    @property
    def groups(self) -> int:
        return self.block_scale.shape[0]

    def take_columns(self, idx) -> Int4Array:
        k = self.stored_shape[0]
        tiles, steps, width = self.packed.shape
        t = width // 4
        cols = self.packed.reshape(tiles, steps, t, 4)[idx // t, :, idx % t]  # [C, K/8, 4]
        return Int4Array(
            cols.transpose(1, 0, 2).reshape(1, steps, 4 * idx.shape[0]),
            *(jnp.take(a, idx, axis=-1) for a in (self.block_scale, self.block_min)),
            *(jnp.take(a, idx) for a in (self.scale_step, self.min_step)),
            shape=(k, int(idx.shape[0])),
        )


FORMATS: dict[int, type[QuantizedArray]] = {8: Int8Array, 4: Int4Array}


# -- int4 packing ---------------------------------------------------------------------


def pack_int4(u):
    """u8[K, N] with values in [0, 15] -> the packed u8[N/T, K/8, 4T] of `Int4Array` (see the
    module docstring). Works on numpy and jax arrays alike; K must be a multiple of 8."""
    xp = jnp if isinstance(u, jax.Array) else np
    k, n = u.shape
    if k % 8:
        raise ValueError(f"pack_int4 needs K to be a multiple of 8; got shape {u.shape}")
    t = tile_width(n)
    u = u.astype(xp.uint8).reshape(k // 8, 2, 4, n // t, t)  # [i, half, b, tile, c]
    u = u.transpose(3, 0, 4, 2, 1)  # [tile, i, c, b, half]
    packed = (u[..., 0] & 15) | (u[..., 1] << 4)  # [tile, i, c, b]
    return packed.reshape(n // t, k // 8, 4 * t)


def unpack_int4(packed):
    """Inverse of `pack_int4`: u8[N/T, K/8, 4T] -> u8[K, N] in [0, 15]."""
    xp = jnp if isinstance(packed, jax.Array) else np
    tiles, steps, width = packed.shape
    t = width // 4
    p = packed.reshape(tiles, steps, t, 4)
    u = xp.stack([p & 15, p >> 4], axis=-1)  # [tile, i, c, b, half]
    return u.transpose(1, 4, 3, 0, 2).reshape(8 * steps, tiles * t)


# -- quantize / dequantize ------------------------------------------------------------


def _check_groups(name: str, k: int, group: int | None) -> int:
    if group is None:
        return 1
    if not isinstance(group, int) or group < 1 or k % group:
        raise ValueError(
            f"{name}: group={group!r} does not divide the input dim K={k}; "
            "allowed are positive divisors of K (or None for one group per column)"
        )
    return k // group


def _grouped(w, groups: int):
    k, n = w.shape
    return w.reshape(groups, k // groups, n)


def _nonzero(s):
    # An all-zero group or column quantizes to zeros under any scale; 1 avoids 0/0.
    return jnp.where(s == 0, 1.0, s)


@functools.partial(jax.jit, static_argnames="groups")
def _quantize_int8(w, groups: int):
    wg = _grouped(w.astype(jnp.float32), groups)  # [G, g, N]
    scales = _nonzero(jnp.max(jnp.abs(wg), axis=1) / INT8_MAX)  # [G, N]
    values = jnp.clip(jnp.round(wg / scales[:, None]), -INT8_MAX, INT8_MAX)
    return to_tiles(values.astype(jnp.int8).reshape(w.shape)), scales


@functools.partial(jax.jit, static_argnames="groups")
def _quantize_int4(w, groups: int):
    wg = _grouped(w.astype(jnp.float32), groups)  # [G, g, N]
    lo = jnp.min(wg, axis=1)  # [G, N]
    step = (jnp.max(wg, axis=1) - lo) / INT4_LEVELS
    scale_step = _nonzero(jnp.max(step, axis=0) / CODE_MAX)  # [N]
    min_step = _nonzero(jnp.max(jnp.abs(lo), axis=0) / MIN_CODE_MAX)
    block_scale = jnp.clip(jnp.round(step / scale_step), 0, CODE_MAX)
    block_min = jnp.clip(jnp.round(lo / min_step), -MIN_CODE_MAX, MIN_CODE_MAX)
    # Levels are chosen against the coded scale and minimum, the ones dequantize will use.
    d = block_scale * scale_step
    m = block_min * min_step
    u = jnp.round((wg - m[:, None]) / jnp.where(d == 0, 1.0, d)[:, None])
    u = jnp.where(d[:, None] == 0, 0, jnp.clip(u, 0, INT4_LEVELS)).astype(jnp.uint8)
    return (
        pack_int4(u.reshape(w.shape)),
        block_scale.astype(jnp.uint8),
        block_min.astype(jnp.int8),
        scale_step,
        min_step,
    )


def quantize_matrix(
    w, bits: int, group: int | None, *, transposed: bool = False, name: str = "w"
) -> QuantizedArray:
    """Quantize one float matrix. w is the logical matrix ([K, N], or [N, K] when transposed,
    as a tied embedding [V, D] is); group rows along K share a scale (None: the whole column,
    int8 only)."""
    if bits not in FORMATS:
        raise ValueError(f"bits={bits!r} is not supported: allowed are {sorted(FORMATS)}")
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a 2-D float matrix, got {w.dtype}{list(w.shape)}")
    logical = tuple(int(d) for d in w.shape)
    kn = jnp.asarray(w).T if transposed else jnp.asarray(w)
    k = kn.shape[0]
    if bits == 4:
        if group is None or group % 8:
            raise ValueError(
                f"{name}: int4 needs a group size that is a multiple of 8, got group={group!r}"
            )
        groups = _check_groups(name, k, group)
        arrays = _quantize_int4(kn, groups=groups)
        return Int4Array(*arrays, shape=logical, transposed=transposed)
    groups = _check_groups(name, k, group)
    values, scales = _quantize_int8(kn, groups=groups)
    return Int8Array(values, scales, shape=logical, transposed=transposed)


def dequantize_stored(q: QuantizedArray, dtype=jnp.float32):
    """The [K, N] float matrix the arrays encode (the stored layout). The pure-jnp reference
    of the CPU kernels, and the prefill path's first step."""
    k, n = q.stored_shape
    groups = q.groups
    if isinstance(q, Int8Array):
        w = _grouped(from_tiles(q.values).astype(jnp.float32), groups) * q.scales[:, None]
    elif isinstance(q, Int4Array):
        u = _grouped(unpack_int4(q.packed).astype(jnp.float32), groups)
        d = q.block_scale.astype(jnp.float32) * q.scale_step
        m = q.block_min.astype(jnp.float32) * q.min_step
        w = u * d[:, None] + m[:, None]
    else:
        raise TypeError(f"unknown quantized format {type(q).__name__}")
    return w.reshape(k, n).astype(dtype)


def dequantize(q: QuantizedArray, dtype=jnp.float32):
    """The logical float matrix (the shape of the leaf that was quantized)."""
    w = dequantize_stored(q, dtype)
    return w.T if q.transposed else w


def bits_per_weight(q: QuantizedArray) -> float:
    return 8 * q.nbytes / math.prod(q.shape)


def describe(q: QuantizedArray) -> dict[str, Any]:
    """The static part of q, as JSON (what a checkpoint needs to rebuild it)."""
    return {"bits": q.bits, "shape": list(q.shape), "transposed": q.transposed}


def rebuild(arrays: dict, description: dict) -> QuantizedArray:
    """Inverse of (data fields as a dict, `describe`): what orbax restores without a target."""
    bits = description.get("bits")
    if bits not in FORMATS:
        raise ValueError(f"quantized leaf has bits={bits!r}: allowed are {sorted(FORMATS)}")
    cls = FORMATS[bits]
    data = {f.name for f in dataclasses.fields(cls)} - {"shape", "transposed"}
    if set(arrays) != data:
        raise ValueError(f"a {cls.__name__} needs arrays {sorted(data)}, got {sorted(arrays)}")
    return cls(
        **{name: jnp.asarray(arrays[name]) for name in data},
        shape=tuple(description["shape"]),
        transposed=bool(description["transposed"]),
    )
