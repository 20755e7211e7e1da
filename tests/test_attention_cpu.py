"""The "cpu" attention backend: decode rows and causal prefill rows by the C++ kernels
(jax_infer/cpu/attention.cc), which read K/V pages in place through the block table with an online
softmax.

Checked against a numpy loop over each sequence's pages (independent of both jnp backends),
and against the "xla" backend on mixed decode + prefill steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer.attention import build_metadata
from jax_infer.attention.paged import cpu_attention, default_backend, xla_attention
from jax_infer.cpu import attention as kernels
from jax_infer.model.llama import attend, native_contiguous_attend
from jax_infer.quant.kv import QuantizedPages, quantize_kv

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="the C++ kernels did not build here (see test_quant)"
)


def numpy_decode(q, k_pages, v_pages, tables, kv_lens, positions, window=0):
    """q [D, N, H]; pools [P, L, K, H]; one query per row at the end of its kv_len tokens."""
    d_rows, n, h = q.shape
    page_size, kh = k_pages.shape[1], k_pages.shape[2]
    g = n // kh
    out = np.zeros_like(q, dtype=np.float64)
    for d in range(d_rows):
        tokens = np.arange(kv_lens[d])
        if window:
            tokens = tokens[tokens > positions[d] - window]
        pages = np.asarray(tables[d])[tokens // page_size]
        k = k_pages[pages, tokens % page_size].astype(np.float64)  # [S, K, H]
        v = v_pages[pages, tokens % page_size].astype(np.float64)
        for head in range(n):
            s = k[:, head // g] @ q[d, head] / np.sqrt(h)
            p = np.exp(s - s.max())
            out[d, head] = (p / p.sum()) @ v[:, head // g]
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_size,window",
    [
        (9, 3, 64, 16, 0),  # SmolLM2's shape
        (4, 4, 16, 8, 0),  # no grouping
        (8, 2, 128, 16, 0),
        (16, 1, 32, 4, 0),  # 16 query heads share one KV head
        (9, 3, 64, 16, 37),  # sliding window
        (6, 2, 48, 16, 0),  # head_dim of 3 vectors
        (4, 2, 256, 8, 0),  # the largest head_dim
        (72, 8, 16, 16, 0),  # more query heads than one task takes together (64)
    ],
)
# Four or more rows: one task per sequence (all its KV heads); fewer: one per (row, KV head).
@pytest.mark.parametrize("few_rows", [False, True])
def test_decode_kernel_matches_numpy(heads, kv_heads, head_dim, page_size, window, few_rows):
    rng = np.random.default_rng(heads * 1000 + head_dim + window)
    num_pages = 64
    # Lengths around the kernel's 32-token chunks and the page size; 1 = a padding-like row.
    kv_lens = np.array([1, 2, 31, 32, 33, 64, 65, 100, 7], np.int32)
    if few_rows:
        kv_lens = kv_lens[[6, 2, 4]]
    rows = len(kv_lens)
    max_pages = int(-(-kv_lens.max() // page_size))
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((rows, max_pages + 2), np.int32)  # extra columns: the null page
    at = 0
    for r, n in enumerate(kv_lens):
        need = -(-int(n) // page_size)
        tables[r, :need] = perm[at : at + need] if at + need <= len(perm) else perm[:need]
        at = (at + need) % (len(perm) - max_pages)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    q = (2 * rng.standard_normal((rows, heads, head_dim))).astype(np.float32)
    positions = kv_lens - 1
    got = kernels.paged_decode_attention(
        jnp.asarray(q),
        jnp.asarray(k_pages),
        jnp.asarray(v_pages),
        jnp.asarray(tables),
        jnp.asarray(kv_lens),
        jnp.asarray(positions),
        window=window,
    )
    want = numpy_decode(q, k_pages, v_pages, tables, kv_lens, positions, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def numpy_prefill(q, k_pages, v_pages, tables, positions, window=0):
    """Causal prefill: q [P * Q, N, H], row r's queries at r * Q.., each query a decode row
    over keys 0..its position (numpy_decode); position -1 is padding (zero output)."""
    rows = tables.shape[0]
    per_row = q.shape[0] // rows
    out = np.zeros_like(q, dtype=np.float64)
    live = positions >= 0
    row_tables = np.repeat(tables, per_row, axis=0)
    out[live] = numpy_decode(
        q[live], k_pages, v_pages, row_tables[live], positions[live] + 1, positions[live], window
    )
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_size,window",
    [
        (9, 3, 64, 16, 0),  # SmolLM2's shape
        (8, 2, 128, 8, 0),
        (16, 1, 32, 4, 0),  # 16 query heads share one KV head
        (9, 3, 64, 16, 21),  # sliding window (each query from its own first key)
        (4, 2, 256, 16, 0),  # the largest head_dim
    ],
)
def test_prefill_kernel_matches_numpy(heads, kv_heads, head_dim, page_size, window):
    """Three rows of a 45-query bucket (blocks of 8 and a remainder of 5): a chunk from the
    start of its prompt, one continuing at position 70 (past two 32-key chunks), one of 3
    queries padded with -1; pages in shuffled order."""
    rng = np.random.default_rng(heads * 100 + head_dim + window)
    num_pages, q_pad = 80, 45
    rows = [(0, 45), (70, 30), (5, 3)]  # (start, queries)
    max_pages = max(-(-(s + n) // page_size) for s, n in rows)
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(rows), max_pages + 1), np.int32)
    positions = np.full(len(rows) * q_pad, -1, np.int32)
    for r, (s, n) in enumerate(rows):
        need = -(-(s + n) // page_size)
        tables[r, :need] = perm[r * 20 : r * 20 + need] if need <= 20 else perm[:need]
        positions[r * q_pad : r * q_pad + n] = np.arange(s, s + n)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    q = (2 * rng.standard_normal((len(positions), heads, head_dim))).astype(np.float32)
    args = [jnp.asarray(a) for a in (q, k_pages, v_pages, tables)]
    got = np.asarray(kernels.paged_prefill_attention(*args, jnp.asarray(positions), window=window))
    want = numpy_prefill(q, k_pages, v_pages, tables, positions, window)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert not got[positions < 0].any()
    # Each query's result is the decode kernel's for that position, bit for bit.
    live = positions >= 0
    decode = kernels.paged_decode_attention(
        jnp.asarray(q[live]),
        *args[1:3],
        jnp.asarray(np.repeat(tables, q_pad, axis=0)[live]),
        jnp.asarray(positions[live] + 1),
        jnp.asarray(positions[live]),
        window=window,
    )
    np.testing.assert_array_equal(got[live], np.asarray(decode))


@pytest.mark.parametrize("window", [0, 21])
def test_prefill_kernel_rows_back_to_back(window):
    """starts: rows of 45, 30 and 3 queries back to back in a flat run of 88 (the prefill
    region of a ragged step, as the engine passes it), 10 padding queries after them at
    position 0. Each row's outputs equal, bit for bit, the same queries laid out in padded
    [3, 45] rows (checked against numpy above) and numpy here; the padding queries are zero."""
    rng = np.random.default_rng(7 + window)
    heads, kv_heads, head_dim, page_size, num_pages, q_pad = 9, 3, 64, 16, 80, 45
    rows = [(0, 45), (70, 30), (5, 3)]
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((3, 8), np.int32)
    for r, (s, n) in enumerate(rows):
        need = -(-(s + n) // page_size)
        tables[r, :need] = perm[r * 20 : r * 20 + need]
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    total = sum(n for _, n in rows)
    q_flat = (2 * rng.standard_normal((total + 10, heads, head_dim))).astype(np.float32)
    pos_flat = np.zeros(total + 10, np.int32)
    starts = np.zeros(4, np.int32)
    q_rows = np.zeros((3 * q_pad, heads, head_dim), np.float32)
    pos_rows = np.full(3 * q_pad, -1, np.int32)
    for r, (s, n) in enumerate(rows):
        starts[r + 1] = starts[r] + n
        pos_flat[starts[r] : starts[r + 1]] = np.arange(s, s + n)
        q_rows[r * q_pad : r * q_pad + n] = q_flat[starts[r] : starts[r + 1]]
        pos_rows[r * q_pad : r * q_pad + n] = np.arange(s, s + n)
    pools = [jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables)]
    got = np.asarray(
        kernels.paged_prefill_attention(
            jnp.asarray(q_flat),
            *pools,
            jnp.asarray(pos_flat),
            window=window,
            starts=jnp.asarray(starts),
        )
    )
    padded = np.asarray(
        kernels.paged_prefill_attention(
            jnp.asarray(q_rows), *pools, jnp.asarray(pos_rows), window=window
        )
    )
    want = numpy_prefill(q_rows, k_pages, v_pages, tables, pos_rows, window)
    for r, (_, n) in enumerate(rows):
        np.testing.assert_array_equal(
            got[starts[r] : starts[r + 1]], padded[r * q_pad : r * q_pad + n]
        )
        np.testing.assert_allclose(
            got[starts[r] : starts[r + 1]], want[r * q_pad : r * q_pad + n], atol=2e-5, rtol=1e-5
        )
    assert not got[total:].any()


def test_prefill_kernel_rejects_bad_starts():
    q = jnp.ones((10, 9, 64), jnp.float32)
    pool = jnp.zeros((4, 16, 3, 64), jnp.float32)
    tables, pos = jnp.zeros((3, 2), jnp.int32), jnp.zeros(10, jnp.int32)
    with pytest.raises(ValueError, match=r"starts has shape \(3,\), expected \(4,\)"):
        kernels.paged_prefill_attention(q, pool, pool, tables, pos, starts=jnp.zeros(3))
    for bad in ([0, 5, 3, 10], [0, 4, 8, 11], [-1, 2, 4, 6]):
        with pytest.raises(Exception, match="starts must be nondecreasing within"):
            kernels.paged_prefill_attention(
                q, pool, pool, tables, pos, starts=jnp.asarray(bad, jnp.int32)
            ).block_until_ready()


def test_prefill_kernel_rejects_ragged_query_count():
    q = jnp.zeros((10, 9, 64), jnp.float32)
    pool = jnp.zeros((4, 16, 3, 64), jnp.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        kernels.paged_prefill_attention(q, pool, pool, jnp.zeros((3, 2), jnp.int32), jnp.zeros(10))


@pytest.mark.parametrize("window", [None, 7])
def test_contiguous_cache_through_the_prefill_kernel(window):
    """The static engine's attention (`native_contiguous_attend`: each row's contiguous cache
    read as one page) against the jnp `attend`, for prefill rows with padding and decode rows
    at different offsets. Padding queries (at or past kv_valid_len) are zero, unused."""
    rng = np.random.default_rng(3)
    b, s_len, kh, h, n = 3, 80, 2, 32, 6
    k = jnp.asarray(rng.standard_normal((b, s_len, kh, h)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((b, s_len, kh, h)).astype(np.float32))
    for t, start, num_valid in [(20, [0, 0, 0], [20, 13, 1]), (1, [0, 40, 79], [1, 1, 1])]:
        start, valid = jnp.asarray(start, jnp.int32), jnp.asarray(start) + jnp.asarray(num_valid)
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        q = jnp.asarray(rng.standard_normal((b, t, n, h)).astype(np.float32))
        want = np.asarray(attend(q, k, v, positions, valid, window))
        got = np.asarray(native_contiguous_attend(q, k, v, positions, valid, sliding_window=window))
        live = np.asarray(positions < valid[:, None])
        np.testing.assert_allclose(got[live], want[live], atol=2e-5, rtol=1e-5)
        assert not got[~live].any()


def _mixed_step(rng, page_size=16, kv_heads=3, head_dim=64, heads=9, dtype=np.float32):
    """A ragged step with five decode rows and two prefill chunks over random pools."""
    num_pages = 96
    starts = [0, 17, 40, 95, 150, 0, 33]
    q_lens = [1, 1, 1, 1, 1, 20, 9]
    tables, next_page = [], 1
    for s, n in zip(starts, q_lens):
        need = -(-(s + n) // page_size)
        tables.append(list(range(next_page, next_page + need)))
        next_page += need
    meta, _, _ = build_metadata(starts, q_lens, tables, page_size, max_decode_rows=8)
    meta = jax.tree.map(jnp.asarray, meta)
    t = meta.positions.shape[0]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    v_pages = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    q = jnp.asarray(rng.standard_normal((t, heads, head_dim)).astype(np.float32))
    return q, k_pages, v_pages, meta


@pytest.mark.parametrize("window", [None, 24])
def test_cpu_backend_matches_xla_backend(window):
    q, k_pages, v_pages, meta = _mixed_step(np.random.default_rng(1))
    xla = jax.jit(lambda *a: xla_attention(*a, sliding_window=window))
    cpu = jax.jit(lambda *a: cpu_attention(*a, sliding_window=window))
    want = np.asarray(xla(q, k_pages, v_pages, meta))
    got = np.asarray(cpu(q, k_pages, v_pages, meta))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # The rows really are computed another way (not the same program twice): the kernels'
    # sums run in another order, so some entries differ in the last bits, decode rows (the
    # first five tokens) and prefill rows alike.
    assert not np.array_equal(got[:5], want[:5])
    assert not np.array_equal(got[8:], want[8:])


def test_cpu_backend_int8_pool_takes_the_xla_path():
    """An int8 KV pool is not the kernel's format: the backend is exactly the xla one."""
    q, k_pages, v_pages, meta = _mixed_step(np.random.default_rng(2))
    k_pool, v_pool = QuantizedPages(*quantize_kv(k_pages)), QuantizedPages(*quantize_kv(v_pages))
    got = np.asarray(cpu_attention(q, k_pool, v_pool, meta))
    want = np.asarray(xla_attention(q, k_pool, v_pool, meta))
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0.1


def test_default_backend_on_cpu():
    assert default_backend() == "cpu"
    assert default_backend(sharded=True) == "xla"
