// The bf16-weight matmul on column tiles, called from XLA through the FFI.
//
// y[M, N] = x[M, K] @ w for a bf16 matrix stored in tiles of 64 columns like the f32 one
// (w[k, n] = tiles[n / 64, k, n % 64], jax_infer/cpu/layout.py): x and y are f32. It is the
// small-row path of dtype="bfloat16" on the CPU: batch-1 decode reads every weight once per
// token, so bf16 weights halve the bytes of f32's, but XLA's bf16 dot at a few rows runs far
// below the f32 path (0.09x at batch 1 on an AVX2 machine; it widens and repacks the whole
// matrix per call). Here each weight row of a tile is loaded as bf16 and widened to f32 in
// registers (a bf16 is the top half of an f32: zero-extend to 32 bits, shift left 16), then
// multiplied by f32 FMAs exactly as matmul_f32.cc does: the products are exact, accumulation
// is f32, one multiply-add chain over k = 0..K-1 per output whatever M is.
//
// Built for AVX-512 (6 rows x 4 vectors of accumulators) and for AVX2 + FMA (1 row x 8
// vectors): the vector width comes from common.h. With AVX512-BF16, bf16 activations (the
// model's in dtype="bfloat16") go to the VDPBF16PS kernel below instead, at every row count;
// with AMX, large row counts go to XLA's bf16 dot (jax_infer/cpu/matmul.py picks).

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace jax_infer {
namespace {

// kLanes bf16 values -> kLanes f32 lanes.
#if defined(__AVX512F__)
constexpr int64_t kBf16Rows = 6;  // rows per register block: 6 x 4 accumulators
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf load_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#else
constexpr int64_t kBf16Rows = 1;  // 16 ymm registers: 8 accumulators + 8 weight vectors
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf load_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#endif
constexpr int kVecs = kTile / kLanes;  // vectors per tile row

template <int R>
inline void bf16_block(const float* x, const uint16_t* tile, float* y, int64_t K, int64_t N,
                       int64_t n0, int64_t m0) {
  vf acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j] = splat(0.0f);
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* w = tile + k * kTile;
    vf wv[kVecs];
    for (int j = 0; j < kVecs; ++j) wv[j] = load_bf16(w + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const vf a = splat(xr[r * K + k]);
      for (int j = 0; j < kVecs; ++j) acc[r][j] = vfma(a, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) store_f32(y + (m0 + r) * N + n0 + kLanes * j, acc[r][j]);
}

// Rows m0..m1-1 of one tile: blocks of kBf16Rows, then the remainder.
void bf16_rows(const float* x, const uint16_t* tile, float* y, int64_t K, int64_t N, int64_t n0,
               int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + kBf16Rows <= m1; m += kBf16Rows) bf16_block<kBf16Rows>(x, tile, y, K, N, n0, m);
  switch (m1 - m) {
    case 5: bf16_block<5>(x, tile, y, K, N, n0, m); break;
    case 4: bf16_block<4>(x, tile, y, K, N, n0, m); break;
    case 3: bf16_block<3>(x, tile, y, K, N, n0, m); break;
    case 2: bf16_block<2>(x, tile, y, K, N, n0, m); break;
    case 1: bf16_block<1>(x, tile, y, K, N, n0, m); break;
    default: break;
  }
}

// Variadic: x, then the tiles of each matrix; one output per matrix (`parallel_tiled`).
ffi::Error Bf16TilesMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                               ffi::RemainingRets rets) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("bf16 tiled matmul: expected x[M,K]");
  const int64_t M = xd[0], K = xd[1];
  std::vector<TiledMat<uint16_t, float>> mats;
  if (auto err = tiled_mats<ffi::BF16, ffi::F32>("bf16 tiled matmul", M, K, args, rets, &mats);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  parallel_tiled(mats, M, kBf16Rows, [&](const TiledMat<uint16_t, float>& m, int64_t t,
                                         int64_t m0, int64_t m1) {
    bf16_rows(xp, m.tiles + t * K * kTile, m.y, K, m.N, t * kTile, m0, m1);
  });
  return ffi::Error::Success();
}

#if defined(JAX_INFER_DPBF16)
// bf16 activations times the same bf16 tiles by VDPBF16PS (AVX512-BF16): each instruction
// multiplies 16 pairs of bf16 and adds both products to 16 f32 lanes, twice the products of
// an f32 FMA and no widening. It wants the two k of a pair side by side in a 32-bit lane,
// while a tile row holds 64 columns of one k: rows k and k+1 are interleaved in registers
// (vpunpckl/hwd, within 128-bit lanes), so the accumulators hold the columns permuted
// (lo: 0-3, 8-11, 16-19, 24-27; hi: 4-7, 12-15, ...) and are put back in order on store. The
// stored layout is the one every other bf16 path reads; x is bf16 already (the model's
// activations in dtype="bfloat16"), so nothing is rounded that was not, and the accumulation
// is f32 as in the widening kernel (a pair's two products are added before the accumulator).

// Rows k and k+1 of 32 columns -> (lo, hi) pair vectors.
inline void pair_rows(const uint16_t* w0, const uint16_t* w1, __m512bh* lo, __m512bh* hi) {
  const __m512i a = _mm512_loadu_si512(w0), b = _mm512_loadu_si512(w1);
  *lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
  *hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
}

inline __m512bh bcast_pair(const uint16_t* x) {
  uint32_t v;
  __builtin_memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32((int)v);
}

// lo/hi accumulators of 32 columns -> columns in order at y[0..31].
inline void store_pairs(float* y, __m512 lo, __m512 hi) {
  // 128-bit groups: lo = G0 G2 G4 G6, hi = G1 G3 G5 G7 (Gi = columns 4i..4i+3).
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(y, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(y + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// The same, rounded to bf16 (to nearest even, as XLA's convert; VCVTNEPS2BF16 reads an f32
// denormal as zero, which only a |value| < 1.2e-38 can tell).
inline void store_pairs(uint16_t* y, __m512 lo, __m512 hi) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(lo, second, hi),
                                            _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_si512(y, (__m512i)both);
}

constexpr int64_t kDpRows = 6;  // rows per register block: 6 x 4 accumulators
constexpr int64_t kPrefetch = 16 * kTile;  // bf16 values ahead (8 pairs of rows, 2 KiB)

template <int R, typename Out>
inline void dp_block(const uint16_t* x, const uint16_t* tile, Out* y, int64_t K, int64_t N,
                     int64_t n0, int64_t m0) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint16_t* xr = x + m0 * K;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const uint16_t* w = tile + k * kTile;
    if (R <= 2) {  // few rows: bound by reading the tile, so ask for it ahead
      for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)(w + kPrefetch + 32 * l), _MM_HINT_T0);
    }
    __m512bh wv[4];
    pair_rows(w, w + kTile, &wv[0], &wv[1]);
    pair_rows(w + 32, w + kTile + 32, &wv[2], &wv[3]);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = bcast_pair(xr + r * K + k);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, wv[j]);
    }
  }
  if (k < K) {  // odd K: the last row paired with zeros
    const uint16_t* w = tile + k * kTile;
    const __m512i z = _mm512_setzero_si512();
    __m512bh wv[4];
    const __m512i a0 = _mm512_loadu_si512(w), a1 = _mm512_loadu_si512(w + 32);
    wv[0] = (__m512bh)_mm512_unpacklo_epi16(a0, z);
    wv[1] = (__m512bh)_mm512_unpackhi_epi16(a0, z);
    wv[2] = (__m512bh)_mm512_unpacklo_epi16(a1, z);
    wv[3] = (__m512bh)_mm512_unpackhi_epi16(a1, z);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[r * K + k]);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, wv[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Out* yr = y + (m0 + r) * N + n0;
    store_pairs(yr, acc[r][0], acc[r][1]);
    store_pairs(yr + 32, acc[r][2], acc[r][3]);
  }
}

template <typename Out>
void dp_rows(const uint16_t* x, const uint16_t* tile, Out* y, int64_t K, int64_t N, int64_t n0,
             int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + kDpRows <= m1; m += kDpRows) dp_block<kDpRows, Out>(x, tile, y, K, N, n0, m);
  switch (m1 - m) {
    case 5: dp_block<5, Out>(x, tile, y, K, N, n0, m); break;
    case 4: dp_block<4, Out>(x, tile, y, K, N, n0, m); break;
    case 3: dp_block<3, Out>(x, tile, y, K, N, n0, m); break;
    case 2: dp_block<2, Out>(x, tile, y, K, N, n0, m); break;
    case 1: dp_block<1, Out>(x, tile, y, K, N, n0, m); break;
    default: break;
  }
}

// y_i = x @ tiles_i for each matrix; Out: float (f32 y) or uint16_t (bf16 y, rounded once
// from the f32 sums). Variadic as the other float kernels (`parallel_tiled`).
template <typename Out, ffi::DataType YT>
ffi::Error Bf16DpMatmul(ffi::Buffer<ffi::BF16> x, ffi::RemainingArgs args,
                        ffi::RemainingRets rets) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("bf16 dot matmul: expected x[M,K]");
  const int64_t M = xd[0], K = xd[1];
  std::vector<TiledMat<uint16_t, Out>> mats;
  if (auto err = tiled_mats<ffi::BF16, YT>("bf16 dot matmul", M, K, args, rets, &mats);
      err.failure())
    return err;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.untyped_data());
  parallel_tiled(mats, M, kDpRows, [&](const TiledMat<uint16_t, Out>& m, int64_t t,
                                       int64_t m0, int64_t m1) {
    dp_rows(xp, m.tiles + t * K * kTile, m.y, K, m.N, t * kTile, m0, m1);
  });
  return ffi::Error::Success();
}

ffi::Error Bf16DpMatmulImpl(ffi::Buffer<ffi::BF16> x, ffi::RemainingArgs args,
                            ffi::RemainingRets rets) {
  return Bf16DpMatmul<float, ffi::F32>(x, args, rets);
}

// bf16 y: the model's activations in dtype="bfloat16" are bf16, and an f32 y fed to another
// kernel (attention, the next projection) costs XLA a separate convert pass over it.
ffi::Error Bf16DpMatmulBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::RemainingArgs args,
                                ffi::RemainingRets rets) {
  return Bf16DpMatmul<uint16_t, ffi::BF16>(x, args, rets);
}
#endif  // JAX_INFER_DPBF16

}  // namespace
}  // namespace jax_infer

// kBf16TilesMatmulBit: the bf16 tiled matmul exists (AVX2 + FMA or AVX-512).
// kBf16DotMatmulBit too where VDPBF16PS is built (AVX512-BF16).
extern "C" int JaxInferBf16MatmulFeatures() {
#if defined(JAX_INFER_DPBF16)
  return jax_infer::kBf16TilesMatmulBit | jax_infer::kBf16DotMatmulBit;
#else
  return jax_infer::kBf16TilesMatmulBit;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferBf16TilesMatmul, jax_infer::Bf16TilesMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

#if defined(JAX_INFER_DPBF16)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferBf16DotMatmul, jax_infer::Bf16DpMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .RemainingArgs()
                                  .RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferBf16DotMatmulBf16, jax_infer::Bf16DpMatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .RemainingArgs()
                                  .RemainingRets());
#endif
