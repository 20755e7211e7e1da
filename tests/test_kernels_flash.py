"""Flash attention kernels (TPU and GPU variants, in interpret mode) against the references.

The dense reference is itself checked against an explicit numpy loop, and the
blockwise jnp path against the reference. Shapes are small because interpret mode
compiles every shape anew (a second or two each on the CPU); block sizes are small
so that every case still spans several query and K/V tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import resolve_backend
from pallas_kernels.flash_attention import (
    BlockSizes,
    attention_reference,
    blockwise_attention,
    flash_attention,
    flash_attention_gpu,
    flash_attention_tpu,
)

TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    # bf16 inputs, bf16 probabilities in the second matmul, bf16 output.
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}
SMALL_BLOCKS = BlockSizes(block_q=16, block_kv=16)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    dtype: str = "float32"
    q_offset: tuple[int, ...] | None = None
    kv_lens: tuple[int, ...] | None = None
    causal: bool = True
    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    def __str__(self):
        return (
            f"B{self.B}-T{self.T}-S{self.S}-N{self.N}-K{self.K}-H{self.H}-{self.dtype}"
            f"{'' if self.q_offset is None else '-offset'}"
            f"{'' if self.causal else '-noncausal'}"
            f"{'' if self.sliding_window is None else '-window'}"
            f"{'' if self.logits_soft_cap is None else '-softcap'}"
        )

    def semantics(self) -> dict:
        return dict(
            q_offset=None if self.q_offset is None else np.array(self.q_offset, np.int32),
            kv_lens=None if self.kv_lens is None else np.array(self.kv_lens, np.int32),
            causal=self.causal,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )


CASES = [
    # Single token; group ratio 1.
    Case(B=1, T=1, S=1, N=4, K=4, H=64),
    # Lengths not multiples of the block; ratio 3.
    Case(B=2, T=37, S=37, N=6, K=2, H=64),
    # Ratio 4, head dim 128, bf16.
    Case(B=1, T=40, S=40, N=8, K=2, H=128, dtype="bfloat16"),
    # Ratio 8, bf16.
    Case(B=1, T=24, S=24, N=8, K=1, H=64, dtype="bfloat16"),
    # A prefill chunk continuing a cached prefix; keys past kv_lens hold NaN.
    Case(B=2, T=20, S=53, N=4, K=1, H=128, q_offset=(33, 10), kv_lens=(53, 30)),
    # Sliding window and soft-capping; ratio 3.
    Case(B=1, T=45, S=45, N=3, K=1, H=64, sliding_window=16, logits_soft_cap=20.0),
    # Non-causal, one row with no keys at all (its output must be zeros).
    Case(B=2, T=17, S=29, N=2, K=2, H=64, kv_lens=(29, 0), causal=False),
    # The remaining ratio / head dim / dtype pairings.
    Case(B=1, T=33, S=33, N=2, K=2, H=128, dtype="bfloat16"),
    Case(B=1, T=19, S=19, N=6, K=2, H=128, dtype="bfloat16"),
    Case(B=1, T=26, S=26, N=8, K=1, H=128),
]
LONG_CASE = Case(B=1, T=3000, S=3000, N=2, K=1, H=64)


@functools.cache
def make_inputs(case: Case, seed: int = 0):
    """Random q, k, v (host RNG: eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((case.B, case.T, case.N, case.H), np.float32)
    k = rng.standard_normal((case.B, case.S, case.K, case.H), np.float32)
    v = rng.standard_normal((case.B, case.S, case.K, case.H), np.float32)
    if case.kv_lens is not None:
        # Slots past kv_len are stale cache: a kernel that reads them must fail.
        for b, kv_len in enumerate(case.kv_lens):
            k[b, kv_len:] = np.nan
            v[b, kv_len:] = np.nan
    dtype = jnp.dtype(case.dtype)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def assert_close(actual, expected, dtype):
    assert not np.isnan(np.asarray(actual, np.float32)).any(), "NaN in output"
    np.testing.assert_allclose(
        np.asarray(actual, np.float32),
        np.asarray(expected, np.float32),
        **TOLERANCES[jnp.dtype(dtype)],
    )


def numpy_attention(q, k, v, *, q_offset, kv_lens, causal, sliding_window, logits_soft_cap):
    """One query token at a time in float64: independent of the jnp reference."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            pos, keys = q_offset[b] + t, np.arange(S)
            seen = keys < kv_lens[b]
            if causal:
                seen &= keys <= pos
            if sliding_window is not None:
                seen &= keys > pos - sliding_window
            if not seen.any():
                continue
            kk, vv = k[b, seen], v[b, seen]  # [S', K, H]
            scores = np.einsum("kgh,skh->kgs", q[b, t].reshape(K, G, H), kk) / np.sqrt(H)
            if logits_soft_cap is not None:
                scores = logits_soft_cap * np.tanh(scores / logits_soft_cap)
            w = np.exp(scores - scores.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[b, t] = np.einsum("kgs,skh->kgh", w, vv).reshape(N, H)
    return out


@functools.cache
def expected_output(case: Case) -> np.ndarray:
    """The jnp reference's answer, computed once per case (jitted: one compile)."""
    q, k, v = make_inputs(case)
    sem = case.semantics()
    lengths = dict(q_offset=sem.pop("q_offset"), kv_lens=sem.pop("kv_lens"))
    reference = jax.jit(functools.partial(attention_reference, **sem))
    return np.asarray(reference(q, k, v, **lengths), np.float32)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_numpy_loop(case):
    q, k, v = make_inputs(case)
    sem = case.semantics()
    expected = numpy_attention(
        q,
        k,
        v,
        q_offset=sem["q_offset"] if sem["q_offset"] is not None else [0] * case.B,
        kv_lens=sem["kv_lens"] if sem["kv_lens"] is not None else [case.S] * case.B,
        causal=case.causal,
        sliding_window=case.sliding_window,
        logits_soft_cap=case.logits_soft_cap,
    )
    assert_close(expected_output(case), expected.astype(np.float32), case.dtype)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case, backend):
    q, k, v = make_inputs(case)
    out = flash_attention(
        q, k, v, **case.semantics(), block_sizes=SMALL_BLOCKS, backend=backend, interpret=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected_output(case), case.dtype)


def test_chunked_prefill_matches_whole_prefill():
    """A chunk that continues a prefix (q_offset) gives the rows of the whole prefill."""
    case = Case(B=1, T=40, S=40, N=4, K=2, H=64)
    q, k, v = make_inputs(case)
    whole = expected_output(case)
    split = 23
    chunk = flash_attention(
        q[:, split:],
        k,
        v,
        q_offset=split,
        block_sizes=SMALL_BLOCKS,
        backend="gpu",
        interpret=True,
    )
    assert_close(chunk, whole[:, split:], case.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_long_prompt(backend):
    q, k, v = make_inputs(LONG_CASE)
    blocks = BlockSizes(block_q=128, block_kv=256)
    out = flash_attention(q, k, v, block_sizes=blocks, backend=backend, interpret=True)
    assert_close(out, expected_output(LONG_CASE), LONG_CASE.dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_blockwise_matches_reference(case):
    q, k, v = make_inputs(case)
    out = blockwise_attention(q, k, v, block_q=16, block_kv=8, **case.semantics())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected_output(case), case.dtype)


@pytest.mark.slow
def test_blockwise_long_prompt():
    q, k, v = make_inputs(LONG_CASE)
    assert_close(blockwise_attention(q, k, v), expected_output(LONG_CASE), LONG_CASE.dtype)


def test_blockwise_memory_is_linear_in_length():
    """No intermediate of the compiled blockwise path grows like T * S."""
    T = S = 2048
    q = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, S, 1, 64), jnp.float32)
    fn = functools.partial(blockwise_attention, block_q=256, block_kv=256)
    compiled = jax.jit(fn).lower(q, k, k).compile()
    analysis = compiled.memory_analysis()
    dense_scores = 2 * T * S * 4
    assert analysis.temp_size_in_bytes < dense_scores / 8


def test_reference_backend_on_cpu_is_the_fallback():
    case = CASES[1]
    q, k, v = make_inputs(case)
    np.testing.assert_array_equal(
        np.asarray(flash_attention(q, k, v, backend="reference")),
        np.asarray(attention_reference(q, k, v)),
    )
    if jax.default_backend() == "cpu":
        assert resolve_backend(None, interpret=False) == "reference"
        assert resolve_backend(None, interpret=True) == "tpu"


def _lowering_args():
    q = jax.ShapeDtypeStruct((2, 100, 12, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    sem = dict(scale=0.125, causal=True, sliding_window=64, logits_soft_cap=30.0)
    return (q, k, k, lens, lens), sem


def test_tpu_kernel_lowers_to_mosaic():
    """Cross-platform lowering runs Pallas' Mosaic lowering rules without a TPU."""
    args, sem = _lowering_args()
    fn = functools.partial(
        flash_attention_tpu,
        block_sizes=BlockSizes(block_q=32, block_kv=128),
        interpret=False,
        **sem,
    )
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_gpu_kernel_lowers_to_triton():
    args, sem = _lowering_args()
    fn = functools.partial(
        flash_attention_gpu,
        block_sizes=BlockSizes(block_q=32, block_kv=64),
        num_warps=4,
        num_stages=2,
        interpret=False,
        **sem,
    )
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def _bad(**changes):
    """Valid arguments with some replaced: (q, k, v, keyword arguments)."""
    q = jnp.zeros((2, 8, 4, 16), jnp.float32)
    k = jnp.zeros((2, 8, 2, 16), jnp.float32)
    args = dict(q=q, k=k, v=k)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(q=jnp.zeros((8, 4, 16))), r"q\.shape=\(8, 4, 16\); allowed: rank 4"),
        (dict(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), r"q\.dtype=int32; allowed"),
        (dict(v=jnp.zeros((2, 9, 2, 16))), r"v\.shape=\(2, 9, 2, 16\); allowed: equal to k"),
        (dict(v=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), r"v\.dtype=bfloat16"),
        (dict(k=jnp.zeros((3, 8, 2, 16)), v=jnp.zeros((3, 8, 2, 16))), r"k\.shape\[0\]=3"),
        (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))), r"k\.shape\[2\]=3 kv"),
        (dict(k=jnp.zeros((2, 8, 2, 32)), v=jnp.zeros((2, 8, 2, 32))), r"k\.shape\[3\]=32"),
        (dict(q_offset=np.zeros((3,), np.int32)), r"q_offset\.shape=\(3,\)"),
        (dict(q_offset=np.array([0, -1], np.int32)), r"q_offset=\[0, -1\]; allowed: >= 0"),
        (dict(kv_lens=np.array([8, 9], np.int32)), r"kv_lens=\[8, 9\]; allowed: 0 <= kv_lens"),
        (dict(kv_lens=np.zeros((2,), np.float32)), r"kv_lens has type ndarray dtype float32"),
        (dict(scale=-1.0), r"scale=-1\.0"),
        (dict(sliding_window=0), r"sliding_window=0"),
        (dict(logits_soft_cap=float("inf")), r"logits_soft_cap=inf"),
        (dict(block_sizes=(16, 16)), r"block_sizes=\(16, 16\); allowed: a BlockSizes"),
        (dict(backend="cuda"), r"backend='cuda'"),
    ],
)
def test_validation_errors(changes, match):
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=12), r"block_q=12; allowed: a multiple of 8"),
        (dict(block_kv=0), r"block_kv=0; allowed: a positive int"),
        (dict(block_kv=16.0), r"block_kv=16\.0; allowed: a positive int"),
    ],
)
def test_block_sizes_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSizes(**kwargs)


def test_block_sizes_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        BlockSizes(16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockSizes().block_q = 8


def test_gpu_kernel_rejects_non_power_of_2_blocks():
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"block_sizes\.block_q=24; allowed on GPU"):
        flash_attention(q, q, q, block_sizes=BlockSizes(block_q=24), backend="gpu", interpret=True)
