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
// weights); `JaxInferKernelFeatures` tells Python which kernels exist.
//
// Work is split into column tiles of kTile outputs; each tile keeps its accumulators in
// registers while it streams its K rows, and tiles are handed out through an atomic counter
// to the calling thread and our worker threads (`Workers`).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector of floats, and loads that widen 8-bit integers into it. Written with intrinsics:
// GCC 12 scalarizes __builtin_convertvector from 8-bit to float lanes.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
typedef __m512 vf;
inline vf load_s8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline vf load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline void store_f32(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf splat(float x) { return _mm512_set1_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
typedef __m256 vf;
inline vf load_s8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline vf load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline void store_f32(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf splat(float x) { return _mm256_set1_ps(x); }
#else
#error "jax_infer quantized kernels need AVX2+FMA or AVX-512; the XLA path is used instead"
#endif

constexpr int64_t kTile = 64;              // output columns per tile
constexpr int64_t kVecs = kTile / kLanes;  // vectors per tile row
constexpr int64_t kRows = 4;               // activation rows per pass (register budget)

// A small pool of our own for the tiles of one product. XLA's intra-op pool (the FFI's
// ThreadPool) did not help: a task scheduled from inside a thunk started only after the
// calling thread had finished all tiles (~1 ms later for the LM head), as the pool's other
// thread was not looking for work. These workers spin for a short while after each job, so
// the back-to-back products of a decode step find them awake, then sleep on a condition
// variable (a decode step is ~200 products a few microseconds apart).
class Workers {
 public:
  static Workers& get() {
    static Workers* workers = new Workers();  // never destroyed: threads outlive main
    return *workers;
  }

  // Runs body(t) for t in [0, n) on the calling thread plus the workers.
  template <typename Body>
  void run(int64_t n, const Body& body) {
    if (threads_.empty() || n < 2) {
      for (int64_t t = 0; t < n; ++t) body(t);
      return;
    }
    // A second caller (XLA runs independent thunks on its own threads at once, e.g. the q, k
    // and v projections) waits for the running job: working alone beside it would put three
    // busy threads on two cores, and the pool's spinning worker would lose its core mid-job.
    std::unique_lock<std::mutex> busy(run_mu_);
    auto job = std::make_shared<Job>();
    job->n = n;
    job->fn = [&body](int64_t t) { body(t); };
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < n) _mm_pause();
  }

 private:
  struct Job {
    int64_t n = 0;
    std::function<void(int64_t)> fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void work() {
      int64_t t;
      while ((t = next.fetch_add(1, std::memory_order_relaxed)) < n) {
        fn(t);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  Workers() {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i + 1 < cores; ++i) threads_.emplace_back([this] { loop(); });
    for (auto& t : threads_) t.detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint64_t g;
      int spins = 0;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) {
        _mm_pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_release);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_release);
        }
      }
      seen = g;
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
      }
      // A job that finished before we looked has next >= n: nothing to do.
      if (job) job->work();
    }
  }

  static constexpr std::chrono::microseconds kSpin{300};
  std::vector<std::thread> threads_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<Job> job_;
};

template <typename Body>
void parallel_tiles(int64_t num_tiles, const Body& body) {
  Workers::get().run(num_tiles, body);
}

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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAX_INFER_VNNI 1

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

ffi::Error Int8MatvecImpl(ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> values, ffi::Buffer<ffi::F32> scales,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto vd = values.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || vd.size() != 3 || sd.size() != 2 || vd[2] != kTile || xd[1] != vd[1] ||
      sd[1] != vd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "int8 matvec: expected x[M,K], values[N/64,K,64], scales[G,N]");
  const int64_t M = xd[0], K = xd[1], N = vd[0] * kTile, G = sd[0];
  if (auto err = check_shapes(M, K, N, G); err.failure()) return err;
  const float* xp = x.typed_data();
  const int8_t* qp = values.typed_data();
  const float* sp = scales.typed_data();
  float* yp = y->typed_data();
  const int64_t group = K / G;
#ifdef JAX_INFER_VNNI
  const QuantizedRows a = quantize_rows(xp, M, K);
  const QuantizedRows* ap = &a;
  parallel_tiles(N / kTile, [=](int64_t t) {
    vnni_rows(M, [&](auto rows, int64_t m0) {
      int8_tile_vnni<decltype(rows)::value>(*ap, qp, sp, yp, K, N, group, t * kTile, m0);
    });
  });
#else
  parallel_tiles(N / kTile, [=](int64_t t) {
    all_rows<Int8Tile>(M, xp, qp, sp, yp, K, N, group, t * kTile);
  });
#endif
  return ffi::Error::Success();
}

ffi::Error Int4MatvecImpl(ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::U8> block_scale,
                          ffi::Buffer<ffi::S8> block_min, ffi::Buffer<ffi::F32> scale_step,
                          ffi::Buffer<ffi::F32> min_step, ffi::ResultBuffer<ffi::F32> y) {
#ifdef JAX_INFER_VNNI
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  const auto bd = block_scale.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || bd.size() != 2 || pd[2] != 4 * kTile ||
      xd[1] != 8 * pd[1] || bd[1] != pd[0] * kTile)
    return ffi::Error::InvalidArgument(
        "int4 matvec: expected x[M,K], packed[N/64,K/8,256], block_scale[G,N]");
  const int64_t M = xd[0], K = xd[1], N = pd[0] * kTile, G = bd[0];
  if (auto err = check_shapes(M, K, N, G); err.failure()) return err;
  const int64_t group = K / G;
  if (group % 8 != 0)
    return ffi::Error::InvalidArgument("int4 matvec: groups must be a multiple of 8 rows");
  const float* xp = x.typed_data();
  // Per-row group sums of x carry the block minimums: sum_k x_k (d u_k + m) = d sum x u + m sum x.
  std::vector<float> xsum(M * G, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group] += xp[m * K + k];
  const float* xs = xsum.data();
  const uint8_t* pp = packed.typed_data();
  const uint8_t* bs = block_scale.typed_data();
  const int8_t* bm = block_min.typed_data();
  const float* ss = scale_step.typed_data();
  const float* ms = min_step.typed_data();
  float* yp = y->typed_data();
  const QuantizedRows a = quantize_rows(xp, M, K);
  const QuantizedRows* ap = &a;
  parallel_tiles(N / kTile, [=](int64_t t) {
    vnni_rows(M, [&](auto rows, int64_t m0) {
      int4_tile_vnni<decltype(rows)::value>(*ap, xs, pp, bs, bm, ss, ms, yp, K, N, group,
                                            t * kTile, m0);
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("int4 matvec needs AVX-512 VNNI (see JaxInferKernelFeatures)");
#endif
}

// ---- f32 matmul on column tiles ----------------------------------------------------------
//
// y[M, N] = x[M, K] @ w for an f32 matrix stored like the int8 values, in tiles of 64 columns
// (w[k, n] = tiles[n / 64, k, n % 64]): the lossless "format" the model's projections take on
// the CPU (quant/arrays.py, TiledF32Array). XLA's dot (YNNPACK) runs the decode shapes at
// ~30-36 GFLOP/s a thread (a 32-row step of SmolLM2's layers: 63 ms); this loop keeps a block
// of 6 rows x 64 columns (24 vectors) of accumulators in registers and streams the tile's K
// rows once per block: 161 GFLOP/s at 32 rows (42 ms), 190-204 at 64-512 rows, and at 1-13
// rows it reads the weights at 24 GB/s, faster than XLA's matrix-vector path.
// Every output is one multiply-add chain over k = 0..K-1, whatever M is, so a row's result
// does not depend on the rows batched with it.

#if defined(__AVX512F__)
#define JAX_INFER_F32_TILES 1
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

// Rows m0..m1-1 of one tile: blocks of kF32Rows, then the remainder.
void f32_rows(const float* x, const float* tile, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + kF32Rows <= m1; m += kF32Rows) f32_block<kF32Rows>(x, tile, y, K, N, n0, m);
  switch (m1 - m) {
    case 5: f32_block<5>(x, tile, y, K, N, n0, m); break;
    case 4: f32_block<4>(x, tile, y, K, N, n0, m); break;
    case 3: f32_block<3>(x, tile, y, K, N, n0, m); break;
    case 2: f32_block<2>(x, tile, y, K, N, n0, m); break;
    case 1: f32_block<1>(x, tile, y, K, N, n0, m); break;
    default: break;
  }
}

ffi::Error F32TilesMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> tiles,
                              ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto td = tiles.dimensions();
  if (xd.size() != 2 || td.size() != 3 || td[2] != kTile || xd[1] != td[1])
    return ffi::Error::InvalidArgument("f32 tiled matmul: expected x[M,K], tiles[N/64,K,64]");
  const int64_t M = xd[0], K = xd[1], T = td[0], N = T * kTile;
  if (M <= 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* tp = tiles.typed_data();
  float* yp = y->typed_data();
  // Tasks: tiles x row slices. With few tiles (a [576, 192] projection has 3) the rows are
  // split too, so both threads have work; a slice is a whole number of register blocks.
  const int64_t blocks = (M + kF32Rows - 1) / kF32Rows;
  const int64_t slices = std::min<int64_t>(blocks, std::max<int64_t>(1, (16 + T - 1) / T));
  const int64_t per = (blocks + slices - 1) / slices * kF32Rows;
  parallel_tiles(T * slices, [=](int64_t task) {
    const int64_t t = task / slices, m0 = (task % slices) * per;
    if (m0 < M) f32_rows(xp, tp + t * K * kTile, yp, K, N, t * kTile, m0, std::min(M, m0 + per));
  });
  return ffi::Error::Success();
}
#endif  // AVX-512

// ---- paged attention, decode rows ---------------------------------------------------------
//
// One query token per sequence against its K/V pages, read in place through the block table.
// The XLA formulation (attention/paged.py, backend "xla") gathers every row's pages into a
// [D, S, K, H] copy for K and for V, then runs small batched dots: with 32 sequences of 256
// tokens that took 2.5-3 ms a layer against 0.7 ms to read the bytes once. Here a task is a
// sequence (all its KV heads, so a page is read as one run) or, with few sequences, one KV
// head of one: per chunk of tokens the scores of each KV head's G query heads, an online
// softmax (running max and sum) and the V rows accumulated in place.
//
// The loops are written for the registers: the head dimension is a template parameter (HV
// vectors per row), the scores of 16 tokens are summed together (`sum16`, a transpose-and-add
// tree, where a horizontal sum per token costs ~8 dependent steps) and the exponentials are
// vector polynomials (`exp16`). The next chunk's rows are requested from memory (prefetch)
// while this one is computed, into L2: a chunk's K and V rows of all heads (48 KB for
// SmolLM2) would push the chunk being computed out of a 32 KB L1.
//
// Measured (32 sequences of 192 tokens, SmolLM2's 30 layers, pools in memory): 18-19 ms a
// decode step, against 36-42 ms for the previous form of this loop (per-token horizontal
// sums, scalar exp, head dimension a runtime loop, rows fetched right before use).

constexpr int64_t kAttnChunk = 32;     // tokens scored before their softmax and V pass
constexpr int64_t kAttnMaxGroup = 16;  // query heads per KV head
constexpr int64_t kAttnMaxDim = 256;   // head_dim
constexpr int64_t kAttnMaxHeads = 64;  // query heads one task handles together
constexpr int64_t kAttnAhead = 1;      // chunks requested from memory ahead of use

#if defined(__AVX512F__)
// exp(x) for the softmax's x <= 0: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7
// Taylor polynomial (relative error < 1e-8 before rounding), times 2^n by VSCALEFPS. Below
// -87 the result is clamped to ~1e-38 (the running sum it joins is >= 1).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of the 16 lanes of v[i]: pairs of vectors interleaved and
// added within 128-bit lanes, then across them (15 shuffle-and-add steps for all 16 sums).
inline __m512 sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128 bits: the 128-bit lane sums of v[4i..4i+3]
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
#endif

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#endif
}

// at[i]: where the row (all KV heads, K * H floats) of token s + i starts in the pools, for
// i < n; entries n..kAttnChunk-1 repeat at[0] (scored in whole blocks of 16, then masked).
// Requests floats from..from+row of each row of K and V from memory.
inline void chunk_rows(const float* kp, const float* vp, const int32_t* table, int64_t s,
                       int64_t n, int64_t K, int64_t H, int64_t L, int64_t from, int64_t row,
                       int64_t* at) {
  int64_t page = s / L, slot = s % L;
  for (int64_t i = 0; i < n; ++i) {
    at[i] = (static_cast<int64_t>(table[page]) * L + slot) * K * H;
    if (++slot == L) slot = 0, ++page;
    for (int64_t c = from; c < from + row; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(kp + at[i] + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(vp + at[i] + c), _MM_HINT_T1);
    }
  }
  for (int64_t i = n; i < kAttnChunk; ++i) at[i] = at[0];
}

// p[0:n] <- exp(p - m) with m = max(old_max, max p[0:n]); returns m, *sum_p = sum p[0:n].
inline float chunk_softmax(float* p, int64_t n, float old_max, float* sum_p) {
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(old_max);
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const __mmask16 live = n - i0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i0)) - 1);
    mv = _mm512_mask_max_ps(mv, live, mv, _mm512_loadu_ps(p + i0));
  }
  const float m = _mm512_reduce_max_ps(mv);
  const __m512 ms = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const __mmask16 live = n - i0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i0)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(p + i0), ms)));
    _mm512_storeu_ps(p + i0, e);
    total = _mm512_add_ps(total, e);
  }
  *sum_p = _mm512_reduce_add_ps(total);
  return m;
#else
  float m = old_max;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, p[i]);
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    total += p[i];
  }
  *sum_p = total;
  return m;
#endif
}

// One chunk for one query head: q (HV vectors), the KV head's K and V rows at kh_k/kh_v +
// at[i]; updates its running max, sum and accumulator acc[HV].
template <int HV>
inline void chunk_query_head(const float* q, const float* kh_k, const float* kh_v,
                             const int64_t* at, int64_t n, float scale, float* mx, float* sum,
                             vf* acc) {
  alignas(64) float p[kAttnChunk];
  vf qv[HV];
  for (int v = 0; v < HV; ++v) qv[v] = load_f32(q + v * kLanes);
#if defined(__AVX512F__)
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    __m512 d[16];
    for (int i = 0; i < 16; ++i) d[i] = _mm512_setzero_ps();
    for (int v = 0; v < HV; ++v)
      for (int i = 0; i < 16; ++i)
        d[i] = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(kh_k + at[i0 + i] + v * kLanes), d[i]);
    _mm512_store_ps(p + i0, _mm512_mul_ps(sum16(d), _mm512_set1_ps(scale)));
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    vf d = splat(0.0f);
    for (int v = 0; v < HV; ++v) d += qv[v] * load_f32(kh_k + at[i] + v * kLanes);
    p[i] = hsum(d) * scale;
  }
#endif
  float chunk_sum;
  const float m = chunk_softmax(p, n, *mx, &chunk_sum);
  const float correction = std::exp(*mx - m);  // 0 on the first chunk (mx = -inf)
  *mx = m, *sum = *sum * correction + chunk_sum;
  // Two sets of accumulators (even and odd tokens): a multiply-add waits on the previous one
  // into the same register, and HV chains alone leave the FMA units idle.
  vf a[HV], b[HV];
  const vf cv = splat(correction);
  for (int v = 0; v < HV; ++v) a[v] = acc[v] * cv, b[v] = splat(0.0f);
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const vf w0 = splat(p[i]), w1 = splat(p[i + 1]);
    const float* r0 = kh_v + at[i];
    const float* r1 = kh_v + at[i + 1];
    for (int v = 0; v < HV; ++v) {
      a[v] += w0 * load_f32(r0 + v * kLanes);
      b[v] += w1 * load_f32(r1 + v * kLanes);
    }
  }
  if (i < n) {
    const vf w = splat(p[i]);
    for (int v = 0; v < HV; ++v) a[v] += w * load_f32(kh_v + at[i] + v * kLanes);
  }
  for (int v = 0; v < HV; ++v) acc[v] = a[v] + b[v];
}

// out[h, :] for the query heads of KV heads kh0..kh1-1 (G each) of one sequence: q and out
// are the sequence's [N, H] rows, kp/vp the pools; H = HV * kLanes.
template <int HV>
void decode_heads(const float* q, const float* kp, const float* vp, const int32_t* table,
                  int64_t first, int64_t kv_len, int64_t K, int64_t kh0, int64_t kh1, int64_t G,
                  int64_t L, float scale, float* out) {
  constexpr int64_t H = HV * kLanes;
  const int64_t n_heads = (kh1 - kh0) * G;
  vf acc[kAttnMaxHeads * HV];
  float mx[kAttnMaxHeads], sum[kAttnMaxHeads];
  int64_t at_buf[kAttnAhead + 1][kAttnChunk];  // rows of this chunk and the next ones (fetching)
  for (int64_t i = 0; i < n_heads * HV; ++i) acc[i] = splat(0.0f);
  for (int64_t h = 0; h < n_heads; ++h) mx[h] = -INFINITY, sum[h] = 0.0f;
  const int64_t from = kh0 * H, row = (kh1 - kh0) * H;
  q += kh0 * G * H, out += kh0 * G * H;
  for (int64_t j = 0; j < kAttnAhead; ++j) {
    const int64_t s = first + j * kAttnChunk;
    if (s < kv_len)
      chunk_rows(kp, vp, table, s, std::min(kAttnChunk, kv_len - s), K, H, L, from, row, at_buf[j]);
  }
  for (int64_t s = first, c = 0; s < kv_len; s += kAttnChunk, c = (c + 1) % (kAttnAhead + 1)) {
    const int64_t n = std::min(kAttnChunk, kv_len - s);
    const int64_t ahead = s + kAttnAhead * kAttnChunk;
    if (ahead < kv_len)
      chunk_rows(kp, vp, table, ahead, std::min(kAttnChunk, kv_len - ahead), K, H, L, from, row,
                 at_buf[(c + kAttnAhead) % (kAttnAhead + 1)]);
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t kh = kh0 + h / G;
      chunk_query_head<HV>(q + h * H, kp + kh * H, vp + kh * H, at_buf[c], n, scale, &mx[h],
                           &sum[h], acc + h * HV);
    }
  }
  for (int64_t h = 0; h < n_heads; ++h) {
    const vf inv = splat(sum[h] > 0.0f ? 1.0f / sum[h] : 0.0f);
    for (int v = 0; v < HV; ++v) store_f32(out + h * H + v * kLanes, acc[h * HV + v] * inv);
  }
}

// fn(std::integral_constant<int, hv>()): the head dimension as a compile-time count of vectors
// (1..HV), for the attention loops' templates.
template <int HV, typename Fn>
void with_head_vectors(int64_t hv, const Fn& fn) {
  if (hv == HV) {
    fn(std::integral_constant<int, HV>());
  } else if constexpr (HV > 1) {
    with_head_vectors<HV - 1>(hv, fn);
  }
}

// The checks both attention kernels share: float pools K and V of one shape [P, L, K, H] with
// q's head_dim, query heads a multiple of KV heads (at most kAttnMaxGroup per group), head_dim
// a multiple of the vector width up to kAttnMaxDim. nullptr when they hold.
template <typename Dims>
const char* attention_shape_error(const Dims& qd, const Dims& pd, const Dims& vd) {
  bool same_pools = vd.size() == pd.size();
  for (size_t i = 0; same_pools && i < pd.size(); ++i) same_pools = vd[i] == pd[i];
  if (qd.size() != 3 || pd.size() != 4 || !same_pools || pd[3] != qd[2])
    return "expected q[T,N,H] and K/V pools of one shape [P,L,K,H]";
  const int64_t N = qd[1], H = qd[2], K = pd[2];
  if (K < 1 || N % K != 0 || N / K > kAttnMaxGroup || H % kLanes != 0 || H > kAttnMaxDim)
    return "needs heads a multiple of kv heads (at most 16 per group) and head_dim a multiple "
           "of 16, at most 256";
  return nullptr;
}

// q[D, N, H], pools [P, L, K, H], tables[D, pages], kv_lens[D], positions[D] -> out[D, N, H].
// window > 0: a query at position p sees keys at positions > p - window (sliding window).
ffi::Error PagedDecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                                    ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> tables,
                                    ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> positions,
                                    int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto pd = k_pages.dimensions();
  const auto vd = v_pages.dimensions();
  const auto td = tables.dimensions();
  if (const char* error = attention_shape_error(qd, pd, vd))
    return ffi::Error::InvalidArgument(std::string("paged decode attention: ") + error);
  if (td.size() != 2 || td[0] != qd[0] || kv_lens.dimensions().size() != 1 ||
      kv_lens.dimensions()[0] != qd[0] || positions.dimensions().size() != 1 ||
      positions.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument(
        "paged decode attention: expected q[D,N,H], tables[D,pages], kv_lens[D], positions[D]");
  const int64_t D = qd[0], N = qd[1], H = qd[2], L = pd[1], K = pd[2], pages = td[1];
  const int64_t G = N / K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* lp = kv_lens.typed_data();
  const int32_t* pp = positions.typed_data();
  float* op = out->typed_data();
  // One task per sequence (its pages read whole) when there are enough sequences to share
  // out; otherwise one per (sequence, KV head), so that batch-1 decode uses every thread.
  const int64_t span = (N <= kAttnMaxHeads && D >= 4) ? K : 1;
  parallel_tiles(D * (K / span), [=](int64_t t) {
    const int64_t d = t / (K / span), kh0 = (t % (K / span)) * span;
    const int64_t len = std::clamp<int64_t>(lp[d], 0, pages * L);
    const int64_t first = window > 0 ? std::clamp<int64_t>(pp[d] - window + 1, 0, len) : 0;
    with_head_vectors<kAttnMaxDim / kLanes>(H / kLanes, [&](auto hv) {
      decode_heads<decltype(hv)::value>(qp + d * N * H, kp, vp, tp + d * pages, first, len, K,
                                        kh0, kh0 + span, G, L, scale, op + d * N * H);
    });
  });
  return ffi::Error::Success();
}

// ---- paged attention, prefill rows ---------------------------------------------------------
//
// A prefill row's queries sit at consecutive positions of one sequence and each sees the keys
// up to its own position (causal). Run as decode rows (one query each, the loop above) every
// query streams the sequence's K/V from L2 again: a 480-token prompt chunk read ~5 GB over
// SmolLM2's 30 layers. Here a task is a block of kPrefillBlock queries of one row and one KV
// head, and the chunk loop is outside the query loop: a chunk's K and V rows of that head
// (16 KB for head_dim 64) are loaded once and used by the block's queries x G heads from L1.
// Each query's arithmetic is exactly the decode loop's (chunks of kAttnChunk from key 0,
// `chunk_query_head`), so a prompt token's output equals what a decode step would give it.
// With a sliding window the queries' first keys differ, so each query runs the decode loop.

constexpr int64_t kPrefillBlock = 8;

// out rows of queries q[0..nq) (rows of N*H floats; positions pos, -1: padding, zero output)
// for KV head kh, whose keys are read through `table` (at most max_len tokens).
template <int HV>
void prefill_heads(const float* q, const int32_t* pos, int64_t nq, const float* kp,
                   const float* vp, const int32_t* table, int64_t max_len, int64_t window,
                   int64_t K, int64_t kh, int64_t G, int64_t L, float scale, float* out) {
  constexpr int64_t H = HV * kLanes;
  const int64_t N = K * G;
  int64_t lens[kPrefillBlock], end = 0;
  for (int64_t i = 0; i < nq; ++i) {
    lens[i] = pos[i] < 0 ? 0 : std::min<int64_t>(pos[i] + 1, max_len);
    end = std::max(end, lens[i]);
  }
  if (window > 0) {
    for (int64_t i = 0; i < nq; ++i) {
      if (lens[i] == 0) {
        std::fill(out + i * N * H + kh * G * H, out + i * N * H + (kh + 1) * G * H, 0.0f);
        continue;
      }
      const int64_t first = std::clamp<int64_t>(pos[i] - window + 1, 0, lens[i]);
      decode_heads<HV>(q + i * N * H, kp, vp, table, first, lens[i], K, kh, kh + 1, G, L, scale,
                       out + i * N * H);
    }
    return;
  }
  // Accumulators of the block's queries x G heads: up to 128 KB, so on the heap (aligned).
  const size_t acc_bytes = sizeof(vf) * nq * G * HV;
  vf* acc = static_cast<vf*>(::operator new(acc_bytes, std::align_val_t(alignof(vf))));
  for (int64_t j = 0; j < nq * G * HV; ++j) acc[j] = splat(0.0f);
  float mx[kPrefillBlock * kAttnMaxGroup], sum[kPrefillBlock * kAttnMaxGroup];
  for (int64_t j = 0; j < nq * G; ++j) mx[j] = -INFINITY, sum[j] = 0.0f;
  int64_t at[kAttnChunk];
  for (int64_t s = 0; s < end; s += kAttnChunk) {
    const int64_t n = std::min(kAttnChunk, end - s);
    chunk_rows(kp, vp, table, s, n, K, H, L, kh * H, H, at);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t ni = std::min(n, lens[i] - s);
      if (ni <= 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j = i * G + g;
        chunk_query_head<HV>(q + i * N * H + (kh * G + g) * H, kp + kh * H, vp + kh * H, at, ni,
                             scale, &mx[j], &sum[j], acc + j * HV);
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t j = i * G + g;
      const vf inv = splat(sum[j] > 0.0f ? 1.0f / sum[j] : 0.0f);
      float* o = out + i * N * H + (kh * G + g) * H;
      for (int v = 0; v < HV; ++v) store_f32(o + v * kLanes, acc[j * HV + v] * inv);
    }
  ::operator delete(acc, std::align_val_t(alignof(vf)));
}

// q[P * Q, N, H] (row r's queries at r * Q ..), pools [P_, L, K, H], tables[P, pages],
// positions[P * Q] (-1: padding) -> out[P * Q, N, H]. Query i of row r sees keys 0..pos
// (window > 0: only those at positions > pos - window).
ffi::Error PagedPrefillAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                                     ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> tables,
                                     ffi::Buffer<ffi::S32> positions, int64_t window,
                                     ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto pd = k_pages.dimensions();
  const auto vd = v_pages.dimensions();
  const auto td = tables.dimensions();
  if (const char* error = attention_shape_error(qd, pd, vd))
    return ffi::Error::InvalidArgument(std::string("paged prefill attention: ") + error);
  if (td.size() != 2 || td[0] < 1 || qd[0] % td[0] != 0 || positions.dimensions().size() != 1 ||
      positions.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument(
        "paged prefill attention: expected q[P*Q,N,H], tables[P,pages], positions[P*Q]");
  const int64_t T = qd[0], N = qd[1], H = qd[2], L = pd[1], K = pd[2], P = td[0], pages = td[1];
  const int64_t G = N / K, Q = T / P, blocks = (Q + kPrefillBlock - 1) / kPrefillBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* pp = positions.typed_data();
  float* op = out->typed_data();
  // Later blocks see more keys: hand them out first, so the last tasks are the short ones.
  parallel_tiles(blocks * P * K, [=](int64_t t) {
    const int64_t b = blocks - 1 - t / (P * K), r = (t / K) % P, kh = t % K;
    const int64_t i0 = r * Q + b * kPrefillBlock, nq = std::min(kPrefillBlock, Q - b * kPrefillBlock);
    with_head_vectors<kAttnMaxDim / kLanes>(H / kLanes, [&](auto hv) {
      prefill_heads<decltype(hv)::value>(qp + i0 * N * H, pp + i0, nq, kp, vp, tp + r * pages,
                                         pages * L, window, K, kh, G, L, scale, op + i0 * N * H);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

// Bit 0: the int8 kernel exists; bit 1: the int4 kernel exists (needs AVX-512 VNNI); bit 2:
// the f32 tiled matmul exists (needs AVX-512).
extern "C" int JaxInferKernelFeatures() {
  int features = 1;
#ifdef JAX_INFER_VNNI
  features |= 2;
#endif
#ifdef JAX_INFER_F32_TILES
  features |= 4;
#endif
  return features;
}

#ifdef JAX_INFER_F32_TILES
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferF32TilesMatmul, F32TilesMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferInt8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferPagedDecodeAttention, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferPagedPrefillAttention, PagedPrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferInt4Matvec, Int4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
