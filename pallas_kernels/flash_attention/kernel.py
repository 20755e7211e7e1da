"""Causal flash attention for prefill: a Mosaic TPU kernel and a Triton GPU kernel.

Both tile the queries, stream K/V tiles through an online softmax (running max ``m``,
running sum ``l`` and an unnormalized f32 accumulator) and skip the K/V tiles that
no query of the tile can see, so causal prefill does about half the work of dense
attention and never holds more than one score tile.

Grouped-query attention (N query heads, K kv heads, G = N // K) never repeats K/V:

- TPU: the wrapper lays the queries out as ``[B, K, T * G, H]``, token-major with
  the G heads of one kv head in consecutive rows. A query tile is then ``block_q * G``
  rows of one kv head, multiplied by each K/V tile in one MXU matmul, so each K/V
  tile is fetched once per group instead of once per query head. Mosaic wants the
  last two block dims to be (multiple of 8, full H), which this layout gives; the
  model's ``[B, T, N, H]`` would leave the small N axis second-minor. K/V become
  ``[B, K, S, H]``. The transposes cost one pass over q, k, v and the output,
  small beside the O(T S) attention work of a prefill.
- GPU: one Triton program per (batch row, query head, query tile); its K/V block
  spec points at kv head ``n // G`` of the unchanged ``[B, S, K, H]`` arrays, and the
  G programs that share a kv head read it through L2.

GPU lowering: Triton (``jax.experimental.pallas.triton``), chosen explicitly with
``triton.CompilerParams`` because jax 0.10 otherwise defaults ``pallas_call`` to Mosaic
GPU. Triton keeps the same BlockSpec/grid programming model as the TPU kernel, runs
on every CUDA generation (and ROCm), supports the masked loads/stores, dynamic loop
bounds and gathers these kernels need, and its ``interpret=True`` path runs on the
CPU. Mosaic GPU can be faster on Hopper (TMA, WGMMA, warp specialization) but wants
a different, warpgroup-level kernel (``plgpu.kernel``), its ``pallas_call`` entry is
deprecated, and it targets sm90+ only; it is the next step once a GPU is at hand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (
    LANES,
    MASK_VALUE,
    cdiv,
    div,
    is_power_of_2,
    next_power_of_2,
    normalize,
    online_softmax_step,
    round_up,
    soft_cap,
    tpu_interpret,
    visible,
)
from pallas_kernels.flash_attention.validate import validate_block_size

# Triton's tl.dot needs every matmul dimension to be at least 16.
_GPU_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes; hashable, so the jitted wrapper takes them as a static argument.

    block_q: query tokens per tile. On TPU a tile holds ``block_q * G`` rows (keep
      it a multiple of 16 for bf16, whose vregs pack 16 rows).
    block_kv: keys per K/V tile. On TPU a multiple of 128 fills the lanes of the
      score tile; on GPU both must be powers of two (Triton block shapes).
    Tiles shrink to the (padded) sequence length when that is shorter.
    """

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        validate_block_size("block_q", self.block_q)
        validate_block_size("block_kv", self.block_kv)


def kv_tile_range(q_offset, kv_len, i, *, T, block_q, block_kv, causal, sliding_window):
    """First and last K/V tile that query tile ``i`` needs; ``last < first`` when none.

    Scalar integer math only, so index maps and kernel bodies share it. Padding rows
    past ``T`` are left out so that they do not widen the causal range.
    """
    first_q = q_offset + i * block_q
    last_q = q_offset + jnp.minimum((i + 1) * block_q, T) - 1
    hi = kv_len - 1
    if causal:
        hi = jnp.minimum(hi, last_q)
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.maximum(first_q - (sliding_window - 1), 0)
    first = div(lo, block_kv)
    last = jnp.where(hi >= 0, div(jnp.maximum(hi, 0), block_kv), -1)
    return first, last


# --------------------------------------------------------------------------- TPU


def _tpu_kernel(
    q_offset_ref,  # i32[B], SMEM (scalar prefetch)
    kv_lens_ref,  # i32[B], SMEM (scalar prefetch)
    q_ref,  # [block_q * G, H]: rows token-major, the G heads of one kv head adjacent
    k_ref,  # [block_kv, H]
    v_ref,  # [block_kv, H]
    o_ref,  # [block_q * G, H]
    m_ref,  # f32[block_q * G, LANES] running max, replicated across lanes
    l_ref,  # f32[block_q * G, LANES] running sum, replicated across lanes
    acc_ref,  # f32[block_q * G, H] unnormalized output
    *,
    G: int,
    T: int,
    block_q: int,
    block_kv: int,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    logits_soft_cap: float | None,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_offset, kv_len = q_offset_ref[b], kv_lens_ref[b]
    first, last = kv_tile_range(
        q_offset,
        kv_len,
        i,
        T=T,
        block_q=block_q,
        block_kv=block_kv,
        causal=causal,
        sliding_window=sliding_window,
    )

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j <= last))
    def _step():
        s = lax.dot_general(
            q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # f32[block_q * G, block_kv]
        s = soft_cap(s * scale, logits_soft_cap)
        q_pos = q_offset + i * block_q + div(lax.broadcasted_iota(jnp.int32, s.shape, 0), G)
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = visible(q_pos, kv_pos, kv_len, causal=causal, sliding_window=sliding_window)
        v = v_ref[...]
        v_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where(v_pos < kv_len, v, jnp.zeros_like(v))
        m_i, l_i, acc = online_softmax_step(s, mask, m_ref[...], l_ref[...], acc_ref[...], v)
        m_ref[...] = m_i
        l_ref[...] = l_i
        acc_ref[...] = acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = normalize(acc_ref[...], l_ref[:, :1]).astype(o_ref.dtype)


def flash_attention_tpu(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_offset: jax.Array,  # i32[B]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [B, T, N, H]
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    block_q = min(block_sizes.block_q, round_up(T, 8))
    block_kv = min(block_sizes.block_kv, round_up(S, 8))
    Tp, Sp = round_up(T, block_q), round_up(S, block_kv)
    num_q_tiles, num_kv_tiles = Tp // block_q, Sp // block_kv

    qt = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    qt = qt.reshape(B, Tp, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, Tp * G, H)
    kt = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    tile_range = functools.partial(
        kv_tile_range,
        T=T,
        block_q=block_q,
        block_kv=block_kv,
        causal=causal,
        sliding_window=sliding_window,
    )

    def q_index(b, h, i, j, q_offset_ref, kv_lens_ref):
        return b, h, i, 0

    def kv_index(b, h, i, j, q_offset_ref, kv_lens_ref):
        # Tiles outside [first, last] map to the nearest needed tile: the pipeline
        # sees an unchanged block index and skips the copy, so skipped tiles cost
        # no HBM traffic.
        first, last = tile_range(q_offset_ref[b], kv_lens_ref[b], i)
        jj = jnp.minimum(jnp.maximum(j, first), jnp.maximum(last, first))
        return b, h, jnp.minimum(jj, num_kv_tiles - 1), 0

    rows = block_q * G
    kernel = functools.partial(
        _tpu_kernel,
        G=G,
        T=T,
        block_q=block_q,
        block_kv=block_kv,
        scale=scale,
        causal=causal,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, num_q_tiles, num_kv_tiles),
            in_specs=[
                pl.BlockSpec((None, None, rows, H), q_index),
                pl.BlockSpec((None, None, block_kv, H), kv_index),
                pl.BlockSpec((None, None, block_kv, H), kv_index),
            ],
            out_specs=pl.BlockSpec((None, None, rows, H), q_index),
            scratch_shapes=[
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.VMEM((rows, H), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((B, K, Tp * G, H), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=tpu_interpret(interpret),
        name="flash_attention_tpu",
    )(q_offset, kv_lens, qt, kt, vt)
    out = out.reshape(B, K, Tp, G, H).transpose(0, 2, 1, 3, 4).reshape(B, Tp, N, H)
    return out[:, :T]


# --------------------------------------------------------------------------- GPU


def _gpu_kernel(
    q_offset_ref,  # i32[1]: this batch row's offset
    kv_lens_ref,  # i32[1]: this batch row's kv length
    q_ref,  # [block_q, H]
    k_ref,  # [Sp, H]: the whole (padded) sequence of kv head n // G
    v_ref,  # [Sp, H]
    o_ref,  # [block_q, H]
    *,
    T: int,
    block_q: int,
    block_kv: int,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    logits_soft_cap: float | None,
):
    i = pl.program_id(2)
    q_offset, kv_len = q_offset_ref[0], kv_lens_ref[0]
    first, last = kv_tile_range(
        q_offset,
        kv_len,
        i,
        T=T,
        block_q=block_q,
        block_kv=block_kv,
        causal=causal,
        sliding_window=sliding_window,
    )
    q = q_ref[...]
    H = q.shape[-1]
    q_pos = q_offset + i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)

    def body(j, carry):
        m_i, l_i, acc = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = soft_cap(s * scale, logits_soft_cap)
        kv_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
        mask = visible(q_pos, kv_pos, kv_len, causal=causal, sliding_window=sliding_window)
        v = v_ref[pl.ds(start, block_kv), :]
        v_pos = start + lax.broadcasted_iota(jnp.int32, (block_kv, H), 0)
        v = jnp.where(v_pos < kv_len, v, jnp.zeros_like(v))
        return online_softmax_step(s, mask, m_i, l_i, acc, v)

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, H), jnp.float32),
    )
    _, l_i, acc = lax.fori_loop(first, last + 1, body, init)
    o_ref[...] = normalize(acc, l_i).astype(o_ref.dtype)


def flash_attention_gpu(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_offset: jax.Array,  # i32[B]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    block_sizes: BlockSizes,
    num_warps: int | None,
    num_stages: int,
    interpret: bool,
) -> jax.Array:  # [B, T, N, H]
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    for name, value in (("block_q", block_sizes.block_q), ("block_kv", block_sizes.block_kv)):
        if not is_power_of_2(value) or value < _GPU_MIN_BLOCK:
            raise ValueError(
                f"block_sizes.{name}={value}; allowed on GPU: a power of two >= {_GPU_MIN_BLOCK}"
            )
    block_q = min(block_sizes.block_q, max(_GPU_MIN_BLOCK, next_power_of_2(T)))
    block_kv = min(block_sizes.block_kv, max(_GPU_MIN_BLOCK, next_power_of_2(S)))
    Tp, Sp = round_up(T, block_q), round_up(S, block_kv)
    # Triton blocks are powers of two; zero columns do not change any dot product.
    Hp = max(_GPU_MIN_BLOCK, next_power_of_2(H))
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Hp - H)))
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Hp - H)))

    def row_index(b, n, i):
        return (b,)

    def q_index(b, n, i):
        return b, i, n, 0

    def kv_index(b, n, i):
        return b, 0, n // G, 0

    kernel = functools.partial(
        _gpu_kernel,
        T=T,
        block_q=block_q,
        block_kv=block_kv,
        scale=scale,
        causal=causal,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    if num_warps is None:
        num_warps = 4 if Hp <= 64 else 8
    out = pl.pallas_call(
        kernel,
        grid=(B, N, cdiv(Tp, block_q)),
        in_specs=[
            pl.BlockSpec((1,), row_index),
            pl.BlockSpec((1,), row_index),
            pl.BlockSpec((None, block_q, None, Hp), q_index),
            pl.BlockSpec((None, Sp, None, Hp), kv_index),
            pl.BlockSpec((None, Sp, None, Hp), kv_index),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, Hp), q_index),
        out_shape=jax.ShapeDtypeStruct((B, Tp, N, Hp), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention_gpu",
    )(q_offset, kv_lens, q, k, v)
    return out[:, :T, :, :H]
