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
// vectors): the vector width comes from common.h. Large row counts (prefill) go to XLA's bf16
// dot instead (jax_infer/cpu/matmul.py picks by rows), which uses AVX512-BF16 / AMX there.

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

ffi::Error Bf16TilesMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> tiles,
                               ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto td = tiles.dimensions();
  if (xd.size() != 2 || td.size() != 3 || td[2] != kTile || xd[1] != td[1])
    return ffi::Error::InvalidArgument("bf16 tiled matmul: expected x[M,K], tiles[N/64,K,64]");
  const int64_t M = xd[0], K = xd[1], T = td[0], N = T * kTile;
  if (M <= 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const uint16_t* tp = reinterpret_cast<const uint16_t*>(tiles.untyped_data());
  float* yp = y->typed_data();
  // Tasks: tiles x row slices, as the f32 kernel (few tiles: split the rows too).
  const int64_t blocks = (M + kBf16Rows - 1) / kBf16Rows;
  const int64_t slices = std::min<int64_t>(blocks, std::max<int64_t>(1, (16 + T - 1) / T));
  const int64_t per = (blocks + slices - 1) / slices * kBf16Rows;
  parallel_tiles(T * slices, [=](int64_t task) {
    const int64_t t = task / slices, m0 = (task % slices) * per;
    if (m0 < M) bf16_rows(xp, tp + t * K * kTile, yp, K, N, t * kTile, m0, std::min(M, m0 + per));
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_infer

// kBf16TilesMatmulBit: the bf16 tiled matmul exists (AVX2 + FMA or AVX-512).
extern "C" int JaxInferBf16MatmulFeatures() { return jax_infer::kBf16TilesMatmulBit; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferBf16TilesMatmul, jax_infer::Bf16TilesMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
