// Quantized matrix-vector products for the CPU, called from XLA through the FFI.
//
// Why this exists: at batch 1 a decode step reads every weight once, so it is bound by memory
// bandwidth, and int8/int4 weights should make it 4x/8x cheaper than f32. XLA:CPU cannot get
// there: it converts a quantized matrix to a full f32 copy before its dot (more traffic than
// the f32 weights themselves), its fused multiply-reduce loops run at ~5 G elements/s, and its
// int8 x int8 library dot runs at ~10-20 G MAC/s on these shapes (scripts/bench_quant_matmul.py
// measures all three). These loops convert each weight in registers right before its
// multiply-add, so the bytes read are the quantized bytes.
//
// Layouts (see jax_infer/quant/arrays.py, which defines the formats and their pure-jnp
// reference `dequantize`). Weight bytes are stored in contiguous tiles of 64 columns, so a
// tile streams from memory sequentially; t = n / 64, c = n % 64:
//   x       f32[M, K]       activations, M small (decode rows)
//   int8:   values s8[N/64, K, 64], scales f32[G, N]
//           w[k, n] = values[t, k, c] * scales[k / g, n]
//   int4:   packed u8[N/64, K/8, 256]: byte 4c + b of step i holds rows 8i + b (low nibble)
//           and 8i + 4 + b (high nibble) of column c, so one 32-bit word is eight rows of
//           one column; block_scale u8[G, N], block_min s8[G, N], scale_step f32[N],
//           min_step f32[N]
//           w[k, n] = u[k, n] * block_scale[j, n] * scale_step[n]
//                     + block_min[j, n] * min_step[n]          with j = k / g, u in [0, 15]
//   y       f32[M, N]
// where g = K / G is the group size along K.
//
// With AVX-512 VNNI (Zen 4, Ice Lake and later) the products are integer: each activation row
// is quantized on the fly to two int8 rows, x ~= s * (hi + lo / 254) (a 16-bit-like
// precision, error <= max|x| / 64516), and VPDPBUSD multiplies four 8-bit weights by four int8
// activations per 32-bit lane. int4 is stored so that a lane's word already holds one column's
// rows (two AND/shifts give two VPDPBUSD operands); int8 keeps [K, 64] tiles, whose four rows
// are interleaved in registers, the lane order this leaves being undone by a 4x4 transpose of
// 128-bit lanes (`transpose_lanes`). Without VNNI only int8 has a kernel (f32 FMAs on widened
// weights); `JaxInferQuantMatmulFeatures` tells Python which kernels exist.
//
// Work is split into column tiles of kTile outputs; each tile keeps its accumulators in
// registers while it streams its K rows, and tiles are handed out through an atomic counter
// to the calling thread and our worker threads (`Workers`).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace jax_infer {
namespace {

constexpr int64_t kVecs = kTile / kLanes;  // vectors per tile row
constexpr int64_t kRows = 4;               // activation rows per pass (register budget)

// y[m, n0:n0+kTile] for int8 weights, rows m0..m0+R-1.
template <int R>
void int8_tile(const float* x, const int8_t* q, const float* scales, float* y, int64_t K,
               int64_t N, int64_t group, int64_t n0, int64_t m0) {
  vf acc[R][kVecs] = {};
  for (int64_t k0 = 0; k0 < K; k0 += group) {
    vf part[R][kVecs] = {};
    for (int64_t k = k0; k < k0 + group; ++k) {
      const int8_t* row = q + (n0 / kTile) * K * kTile + k * kTile;
      vf w[kVecs];
      for (int v = 0; v < kVecs; ++v) w[v] = load_s8(row + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const vf xv = splat(x[(m0 + r) * K + k]);
        for (int v = 0; v < kVecs; ++v) part[r][v] += xv * w[v];
      }
    }
    const float* s = scales + (k0 / group) * N + n0;
    for (int v = 0; v < kVecs; ++v) {
      const vf sv = load_f32(s + v * kLanes);
      for (int r = 0; r < R; ++r) acc[r][v] += part[r][v] * sv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) store_f32(y + (m0 + r) * N + n0 + v * kLanes, acc[r][v]);
}

#ifdef JAX_INFER_VNNI

// Activation rows as int8 pairs: x[m, k] ~= scale[m] * (hi[m, k] + lo[m, k] / 254).
struct QuantizedRows {
  std::vector<int8_t> hi, lo;
  std::vector<float> scale;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantizedRows a{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<float>(M)};
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (int64_t k = 0; k < K; ++k) {
      const float u = xr[k] * inv;  // |u| <= 127
      const float h = std::nearbyint(u);
      a.hi[m * K + k] = static_cast<int8_t>(std::clamp(h, -127.0f, 127.0f));
      a.lo[m * K + k] = static_cast<int8_t>(std::clamp(std::nearbyint((u - h) * 254.0f), -127.0f, 127.0f));
    }
    a.scale[m] = scale;
  }
  return a;
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __m512i load_bytes(const void* p) { return _mm512_loadu_si512(p); }

// Rows k..k+3 of a 64-column tile -> out[j] whose 32-bit lane 4L+p holds the four bytes of
// column 16L + 4j + p (unpack instructions work within 128-bit lanes).
inline void interleave4(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i out[4]) {
  const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
  out[0] = _mm512_unpacklo_epi16(t0, t2);
  out[1] = _mm512_unpackhi_epi16(t0, t2);
  out[2] = _mm512_unpacklo_epi16(t1, t3);
  out[3] = _mm512_unpackhi_epi16(t1, t3);
}

// 4x4 transpose of 128-bit lanes: maps natural column order (v[i] = columns 16i..16i+15) to
// the interleaved order of `interleave4` and back (it is its own inverse).
inline void transpose_lanes(__m512 v[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  v[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  v[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  v[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// y[m0:m0+R, n0:n0+64] for int8 weights. VPDPBUSD wants unsigned activations: hi + 128 (a
// xor of the sign bit), corrected by 128 * (sum of the group's weights), computed alongside.
// R rows share each interleaved block of weights (prefill, batched decode).
template <int R>
void int8_tile_vnni(const QuantizedRows& a, const int8_t* q, const float* scales, float* y,
                    int64_t K, int64_t N, int64_t group, int64_t n0, int64_t m0) {
  const int8_t* tile = q + (n0 / kTile) * K * kTile;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += group) {
    __m512i ph[R][4], pl[R][4], sum[4];
    for (int j = 0; j < 4; ++j) {
      sum[j] = _mm512_setzero_si512();
      for (int r = 0; r < R; ++r) ph[r][j] = pl[r][j] = _mm512_setzero_si512();
    }
    for (int64_t k = k0; k < k0 + group; k += 4) {
      const int8_t* row = tile + k * kTile;
      __m512i w[4];
      interleave4(load_bytes(row), load_bytes(row + kTile), load_bytes(row + 2 * kTile),
                  load_bytes(row + 3 * kTile), w);
      for (int j = 0; j < 4; ++j) sum[j] = _mm512_dpbusd_epi32(sum[j], ones, w[j]);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * K + k;
        const __m512i xh = _mm512_xor_si512(_mm512_set1_epi32(load4(a.hi.data() + at)), flip);
        const __m512i xl = _mm512_xor_si512(_mm512_set1_epi32(load4(a.lo.data() + at)), flip);
        for (int j = 0; j < 4; ++j) {
          ph[r][j] = _mm512_dpbusd_epi32(ph[r][j], xh, w[j]);
          pl[r][j] = _mm512_dpbusd_epi32(pl[r][j], xl, w[j]);
        }
      }
    }
    __m512 s[4];
    for (int v = 0; v < 4; ++v) s[v] = _mm512_loadu_ps(scales + (k0 / group) * N + n0 + 16 * v);
    transpose_lanes(s);
    for (int j = 0; j < 4; ++j) {
      const __m512i offset = _mm512_slli_epi32(sum[j], 7);
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(pl[r][j], offset)),
                                         inv254,
                                         _mm512_cvtepi32_ps(_mm512_sub_epi32(ph[r][j], offset)));
        acc[r][j] = _mm512_fmadd_ps(f, s[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    transpose_lanes(acc[r]);
    const __m512 xs = _mm512_set1_ps(a.scale[m0 + r]);
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(y + (m0 + r) * N + n0 + 16 * v, _mm512_mul_ps(acc[r][v], xs));
  }
}

// y[m0:m0+R, n0:n0+64] for int4 weights: the nibbles (unsigned) are VPDPBUSD's unsigned
// operand. Per 8-row step, the 64-column tile is 256 contiguous bytes: 16 columns per vector,
// one column per 32-bit lane, low nibbles rows 8i..8i+3, high nibbles rows 8i+4..8i+7.
template <int R>
void int4_tile_vnni(const QuantizedRows& a, const float* xsum, const uint8_t* packed,
                    const uint8_t* bscale, const int8_t* bmin, const float* sstep,
                    const float* mstep, float* y, int64_t K, int64_t N, int64_t group,
                    int64_t n0, int64_t m0) {
  const int64_t G = K / group;
  const uint8_t* tile = packed + (n0 / kTile) * (K / 8) * (4 * kTile);
  const __m512i nibble = _mm512_set1_epi8(15);
  const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < G; ++j) {
    __m512i ph[R][4], pl[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) ph[r][v] = pl[r][v] = _mm512_setzero_si512();
    for (int64_t k = j * group; k < (j + 1) * group; k += 8) {
      const uint8_t* step = tile + (k / 8) * (4 * kTile);
      for (int v = 0; v < 4; ++v) {
        const __m512i p = load_bytes(step + 64 * v);
        const __m512i w0 = _mm512_and_si512(p, nibble);
        const __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(p, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const int8_t* hi = a.hi.data() + (m0 + r) * K + k;
          const int8_t* lo = a.lo.data() + (m0 + r) * K + k;
          ph[r][v] = _mm512_dpbusd_epi32(ph[r][v], w0, _mm512_set1_epi32(load4(hi)));
          ph[r][v] = _mm512_dpbusd_epi32(ph[r][v], w1, _mm512_set1_epi32(load4(hi + 4)));
          pl[r][v] = _mm512_dpbusd_epi32(pl[r][v], w0, _mm512_set1_epi32(load4(lo)));
          pl[r][v] = _mm512_dpbusd_epi32(pl[r][v], w1, _mm512_set1_epi32(load4(lo + 4)));
        }
      }
    }
    for (int v = 0; v < 4; ++v) {
      const int64_t at = j * N + n0 + 16 * v;
      const __m512 d = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bscale + at)))),
          _mm512_loadu_ps(sstep + n0 + 16 * v));
      const __m512 mn = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(bmin + at)))),
          _mm512_loadu_ps(mstep + n0 + 16 * v));
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl[r][v]), inv254,
                                         _mm512_cvtepi32_ps(ph[r][v]));
        const __m512 xs = _mm512_set1_ps(a.scale[m0 + r]);
        acc[r][v] = _mm512_fmadd_ps(_mm512_mul_ps(f, xs), d, acc[r][v]);
        acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[(m0 + r) * G + j]), mn, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + (m0 + r) * N + n0 + 16 * v, acc[r][v]);
}

// Rows in pairs, then the odd one: a row holds 8 int32 accumulators, and the weight block
// (loaded, interleaved) is shared by the rows of a pass.
template <typename Tile>
void vnni_rows(int64_t M, const Tile& tile) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile(std::integral_constant<int, 2>(), m);
  if (m < M) tile(std::integral_constant<int, 1>(), m);
}
#endif  // VNNI

// Dispatches a full tile over all rows in passes of up to kRows.
template <template <int> class Tile, typename... Args>
void all_rows(int64_t M, Args... args) {
  int64_t m0 = 0;
  for (; m0 + kRows <= M; m0 += kRows) Tile<kRows>::run(args..., m0);
  switch (M - m0) {
    case 3: Tile<3>::run(args..., m0); break;
    case 2: Tile<2>::run(args..., m0); break;
    case 1: Tile<1>::run(args..., m0); break;
    default: break;
  }
}

template <int R>
struct Int8Tile {
  static void run(const float* x, const int8_t* q, const float* s, float* y, int64_t K,
                  int64_t N, int64_t g, int64_t n0, int64_t m0) {
    int8_tile<R>(x, q, s, y, K, N, g, n0, m0);
  }
};

ffi::Error check_shapes(int64_t M, int64_t K, int64_t N, int64_t G) {
  if (N % kTile != 0)
    return ffi::Error::InvalidArgument("quantized matvec: N must be a multiple of 64");
  if (G <= 0 || K % G != 0 || (K / G) % 4 != 0)
    return ffi::Error::InvalidArgument(
        "quantized matvec: K must split into groups of a multiple of 4 rows");
  if (M <= 0) return ffi::Error::InvalidArgument("quantized matvec: M must be >= 1");
  return ffi::Error::Success();
}

// One call takes several matrices that share the input x (a layer's q, k and v, or its gate
// and up projections): x is quantized once, and the column tiles of all of them are one job
// for the worker pool. Per matrix that saves a pool hand-off and an FFI call, and it evens
// out the split: SmolLM2's k and v have 3 tiles each, which two threads share 2:1, while q,
// k and v together have 15.
struct Segments {
  std::vector<int64_t> start;  // first global tile of each matrix, then the total
  int64_t total() const { return start.back(); }
  // (matrix, its tile) of global tile t; a linear scan, as there are at most a few matrices.
  std::pair<int64_t, int64_t> find(int64_t t) const {
    int64_t i = 0;
    while (start[i + 1] <= t) ++i;
    return {i, t - start[i]};
  }
};

template <typename Mat>
Segments segments(const std::vector<Mat>& mats) {
  Segments s{{0}};
  for (const Mat& m : mats) s.start.push_back(s.start.back() + m.N / kTile);
  return s;
}

struct Int8Mat {
  const int8_t* q;
  const float* scales;
  float* y;
  int64_t N, group;
};

// Variadic: x, then (values, scales) per matrix; one output per matrix.
ffi::Error Int8MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || rets.size() < 1 || args.size() != 2 * rets.size())
    return ffi::Error::InvalidArgument(
        "int8 matvec: expected x[M,K], then values and scales per matrix, one output each");
  const int64_t M = xd[0], K = xd[1];
  std::vector<Int8Mat> mats;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto values = args.get<ffi::Buffer<ffi::S8>>(2 * i);
    auto scales = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (values.has_error() || scales.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("int8 matvec: expected s8 values, f32 scales, f32 y");
    const auto vd = values->dimensions();
    const auto sd = scales->dimensions();
    if (vd.size() != 3 || sd.size() != 2 || vd[2] != kTile || vd[1] != K ||
        sd[1] != vd[0] * kTile)
      return ffi::Error::InvalidArgument(
          "int8 matvec: expected x[M,K], values[N/64,K,64], scales[G,N]");
    const int64_t N = vd[0] * kTile, G = sd[0];
    if (auto err = check_shapes(M, K, N, G); err.failure()) return err;
    mats.push_back({values->typed_data(), scales->typed_data(), (*y)->typed_data(), N, K / G});
  }
  const Segments seg = segments(mats);
  const float* xp = x.typed_data();
  const Int8Mat* mp = mats.data();
  const Segments* sp = &seg;
#ifdef JAX_INFER_VNNI
  const QuantizedRows a = quantize_rows(xp, M, K);
  const QuantizedRows* ap = &a;
  parallel_tiles(seg.total(), [=](int64_t t) {
    const std::pair<int64_t, int64_t> at = sp->find(t);
    const Int8Mat& m = mp[at.first];
    const int64_t tile = at.second;
    vnni_rows(M, [&](auto rows, int64_t m0) {
      int8_tile_vnni<decltype(rows)::value>(*ap, m.q, m.scales, m.y, K, m.N, m.group,
                                            tile * kTile, m0);
    });
  });
#else
  parallel_tiles(seg.total(), [=](int64_t t) {
    const std::pair<int64_t, int64_t> at = sp->find(t);
    const Int8Mat& m = mp[at.first];
    const int64_t tile = at.second;
    all_rows<Int8Tile>(M, xp, m.q, m.scales, m.y, K, m.N, m.group, tile * kTile);
  });
#endif
  return ffi::Error::Success();
}

#ifdef JAX_INFER_VNNI
struct Int4Mat {
  const uint8_t* packed;
  const uint8_t* bscale;
  const int8_t* bmin;
  const float* sstep;
  const float* mstep;
  float* y;
  int64_t N, group;
  const float* xsum;  // f32[M, G]: per-row group sums of x (see below)
};
#endif

// Variadic: x, then (packed, block_scale, block_min, scale_step, min_step) per matrix.
ffi::Error Int4MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets) {
#ifdef JAX_INFER_VNNI
  const auto xd = x.dimensions();
  if (xd.size() != 2 || rets.size() < 1 || args.size() != 5 * rets.size())
    return ffi::Error::InvalidArgument(
        "int4 matvec: expected x[M,K], then five arrays per matrix, one output each");
  const int64_t M = xd[0], K = xd[1];
  const float* xp = x.typed_data();
  std::vector<Int4Mat> mats;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto packed = args.get<ffi::Buffer<ffi::U8>>(5 * i);
    auto bscale = args.get<ffi::Buffer<ffi::U8>>(5 * i + 1);
    auto bmin = args.get<ffi::Buffer<ffi::S8>>(5 * i + 2);
    auto sstep = args.get<ffi::Buffer<ffi::F32>>(5 * i + 3);
    auto mstep = args.get<ffi::Buffer<ffi::F32>>(5 * i + 4);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (packed.has_error() || bscale.has_error() || bmin.has_error() || sstep.has_error() ||
        mstep.has_error() || y.has_error())
      return ffi::Error::InvalidArgument(
          "int4 matvec: expected u8 packed, u8 block_scale, s8 block_min, f32 steps, f32 y");
    const auto pd = packed->dimensions();
    const auto bd = bscale->dimensions();
    if (pd.size() != 3 || bd.size() != 2 || pd[2] != 4 * kTile || K != 8 * pd[1] ||
        bd[1] != pd[0] * kTile)
      return ffi::Error::InvalidArgument(
          "int4 matvec: expected x[M,K], packed[N/64,K/8,256], block_scale[G,N]");
    const int64_t N = pd[0] * kTile, G = bd[0];
    if (auto err = check_shapes(M, K, N, G); err.failure()) return err;
    const int64_t group = K / G;
    if (group % 8 != 0)
      return ffi::Error::InvalidArgument("int4 matvec: groups must be a multiple of 8 rows");
    mats.push_back({packed->typed_data(), bscale->typed_data(), bmin->typed_data(),
                    sstep->typed_data(), mstep->typed_data(), (*y)->typed_data(), N, group,
                    nullptr});
  }
  // Per-row group sums of x carry the block minimums: sum_k x_k (d u_k + m) = d sum x u + m
  // sum x. One f32[M, G] per distinct group size (the fused matrices usually share one).
  std::vector<std::pair<int64_t, std::vector<float>>> sums;
  for (const Int4Mat& mat : mats) {
    if (std::any_of(sums.begin(), sums.end(), [&](const auto& e) { return e.first == mat.group; }))
      continue;
    const int64_t G = K / mat.group;
    std::vector<float> xsum(M * G);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < G; ++j) {
        float total = 0.0f;
        for (int64_t k = j * mat.group; k < (j + 1) * mat.group; ++k) total += xp[r * K + k];
        xsum[r * G + j] = total;
      }
    sums.emplace_back(mat.group, std::move(xsum));
  }
  for (Int4Mat& mat : mats)
    for (const auto& e : sums)
      if (e.first == mat.group) mat.xsum = e.second.data();
  const Segments seg = segments(mats);
  const QuantizedRows a = quantize_rows(xp, M, K);
  const QuantizedRows* ap = &a;
  const Int4Mat* mp = mats.data();
  const Segments* sp = &seg;
  parallel_tiles(seg.total(), [=](int64_t t) {
    const std::pair<int64_t, int64_t> at = sp->find(t);
    const Int4Mat& m = mp[at.first];
    const int64_t tile = at.second;
    vnni_rows(M, [&](auto rows, int64_t m0) {
      int4_tile_vnni<decltype(rows)::value>(*ap, m.xsum, m.packed, m.bscale, m.bmin,
                                            m.sstep, m.mstep, m.y, K, m.N, m.group,
                                            tile * kTile, m0);
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("int4 matvec needs AVX-512 VNNI (see JaxInferKernelFeatures)");
#endif
}

}  // namespace
}  // namespace jax_infer

// kInt8MatmulBit: the int8 kernel exists (AVX2 or AVX-512); kInt4MatmulBit: the int4 kernel
// exists (needs AVX-512 VNNI).
extern "C" int JaxInferQuantMatmulFeatures() {
  int features = jax_infer::kInt8MatmulBit;
#ifdef JAX_INFER_VNNI
  features |= jax_infer::kInt4MatmulBit;
#endif
  return features;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferInt8Matvec, jax_infer::Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferInt4Matvec, jax_infer::Int4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
