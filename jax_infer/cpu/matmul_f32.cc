// The f32 matmul on column tiles, called from XLA through the FFI.
//
// y[M, N] = x[M, K] @ w for an f32 matrix stored like the int8 values, in tiles of 64 columns
// (w[k, n] = tiles[n / 64, k, n % 64]): the lossless "format" the model's projections take on
// the CPU (jax_infer/cpu/layout.py, TiledF32Array). XLA's dot (YNNPACK) runs the decode shapes at
// ~30-36 GFLOP/s a thread (a 32-row step of SmolLM2's layers: 63 ms); this loop keeps a block
// of 6 rows x 64 columns (24 vectors) of accumulators in registers and streams the tile's K
// rows once per block: 161 GFLOP/s at 32 rows (42 ms), 190-204 at 64-512 rows, and at 1-13
// rows it reads the weights at 24 GB/s, faster than XLA's matrix-vector path.
// Every output is one multiply-add chain over k = 0..K-1, whatever M is, so a row's result
// does not depend on the rows batched with it.

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace jax_infer {
namespace {

#ifdef JAX_INFER_F32_TILES
constexpr int64_t kF32Rows = 6;  // rows per register block: 6 x 4 accumulators

template <int R>
inline void f32_block(const float* x, const float* tile, float* y, int64_t K, int64_t N,
                      int64_t n0, int64_t m0) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = tile + k * kTile;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + (m0 + r) * N + n0 + 16 * j, acc[r][j]);
}

void f32_block_of(const float* x, const float* tile, float* y, int64_t K, int64_t N, int64_t n0,
                  int64_t m, int64_t rows) {
  switch (rows) {
    case 6: f32_block<6>(x, tile, y, K, N, n0, m); break;
    case 5: f32_block<5>(x, tile, y, K, N, n0, m); break;
    case 4: f32_block<4>(x, tile, y, K, N, n0, m); break;
    case 3: f32_block<3>(x, tile, y, K, N, n0, m); break;
    case 2: f32_block<2>(x, tile, y, K, N, n0, m); break;
    case 1: f32_block<1>(x, tile, y, K, N, n0, m); break;
    default: break;
  }
}

// Rows m0..m1-1 of one tile. A block of 5 or 6 rows runs ~2x the GFLOP/s of one of 1-4 (one
// thread, [576, 1536] on an AMD EPYC: 225-237 against 52-106: fewer FMAs per weight vector
// loaded), so where the rows split into blocks of 5 and 6 only (10-12 rows, 15 and up) they
// do: 16 rows as 6+5+5 ran 1.3x faster than 6+6+4, 32 as 6+6+5+5+5+5 1.05x faster than
// 6x5+2. Otherwise blocks of 6, then the remainder. The block sizes never change a row's
// arithmetic (each output is its own chain over k).
void f32_rows(const float* x, const float* tile, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t m0, int64_t m1) {
  const int64_t rows = m1 - m0, blocks = (rows + kF32Rows - 1) / kF32Rows;
  int64_t m = m0;
  if (blocks > 1 && rows >= (kF32Rows - 1) * blocks) {
    const int64_t six = rows - (kF32Rows - 1) * blocks;  // blocks of 6; the rest have 5
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r = b < six ? kF32Rows : kF32Rows - 1;
      f32_block_of(x, tile, y, K, N, n0, m, r);
      m += r;
    }
    return;
  }
  for (; m + kF32Rows <= m1; m += kF32Rows) f32_block<kF32Rows>(x, tile, y, K, N, n0, m);
  f32_block_of(x, tile, y, K, N, n0, m, m1 - m);
}

// Variadic: x, then the tiles of each matrix; one output per matrix (`parallel_tiled`).
ffi::Error F32TilesMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                              ffi::RemainingRets rets) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("f32 tiled matmul: expected x[M,K]");
  const int64_t M = xd[0], K = xd[1];
  std::vector<TiledMat<float, float>> mats;
  if (auto err = tiled_mats<ffi::F32, ffi::F32>("f32 tiled matmul", M, K, args, rets, &mats);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  parallel_tiled(mats, M, kF32Rows, [&](const TiledMat<float, float>& m, int64_t t, int64_t m0,
                                        int64_t m1) {
    f32_rows(xp, m.tiles + t * K * kTile, m.y, K, m.N, t * kTile, m0, m1);
  });
  return ffi::Error::Success();
}
#endif  // JAX_INFER_F32_TILES

}  // namespace
}  // namespace jax_infer

// kF32TilesMatmulBit: the f32 tiled matmul exists (needs AVX-512).
extern "C" int JaxInferF32MatmulFeatures() {
#ifdef JAX_INFER_F32_TILES
  return jax_infer::kF32TilesMatmulBit;
#else
  return 0;
#endif
}

#ifdef JAX_INFER_F32_TILES
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferF32TilesMatmul, jax_infer::F32TilesMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
#endif
