// What the CPU kernels of jax_infer/cpu share: the vector type of the build, the column tile
// width of the stored matrices, the worker pool that runs a kernel's tasks, the feature macros
// and the feature bits each kernel family reports to Python (jax_infer/cpu/build.py).
//
// The sources (matmul_f32.cc, matmul_bf16.cc, matmul_quant.cc, attention.cc) are compiled into one shared
// library, so `Workers::get()` is one pool for all of them: XLA may call a projection and an
// attention kernel from two threads at once, and they must queue on one pool rather than run
// two pools' spinning threads on the same cores (see `Workers::run`).

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Feature macros, from the compiler's target (the library is built with -march=native).
#if defined(__AVX512F__)
#define JAX_INFER_F32_TILES 1  // the f32 tiled matmul (AVX-512 registers)
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAX_INFER_VNNI 1  // integer dot products: int8 by VPDPBUSD, and the int4 kernel
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define JAX_INFER_DPBF16 1  // bf16 pair dot products (VDPBF16PS): bf16 x bf16 tiles
#endif

namespace jax_infer {

// Bits of the JaxInfer*Features() functions each source exports: which kernels this build
// holds. build.py ORs them; a family is available when its bit is set.
constexpr int kInt8MatmulBit = 1;
constexpr int kInt4MatmulBit = 2;      // needs JAX_INFER_VNNI
constexpr int kF32TilesMatmulBit = 4;  // needs JAX_INFER_F32_TILES
constexpr int kPagedAttentionBit = 8;
constexpr int kBf16TilesMatmulBit = 16;  // AVX2 + FMA or AVX-512 (matmul_bf16.cc)
constexpr int kBf16DotMatmulBit = 32;    // needs JAX_INFER_DPBF16 (matmul_bf16.cc)

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
#error "jax_infer CPU kernels need AVX2+FMA or AVX-512; the XLA path is used instead"
#endif

constexpr int64_t kTile = 64;  // output columns per stored tile (TILE in jax_infer/cpu/layout.py)

// A small pool of our own for the tiles of one product. XLA's intra-op pool (the FFI's
// ThreadPool) did not help: a task scheduled from inside a thunk started only after the
// calling thread had finished all tiles (~1 ms later for the LM head), as the pool's other
// thread was not looking for work. These workers spin for a short while after each job, so
// the back-to-back products of a decode step find them awake, then sleep on a condition
// variable (a decode step is ~200 products a few microseconds apart).
class Workers {
 public:
  static Workers& get() {
    // One pool per library: an inline function's static is shared by every source that
    // includes this header. Never destroyed: the threads outlive main.
    static Workers* workers = new Workers();
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

// body(t) for the tasks t in [0, num_tiles), on the shared pool.
template <typename Body>
void parallel_tiles(int64_t num_tiles, const Body& body) {
  Workers::get().run(num_tiles, body);
}

// One matrix of a float kernel call (matmul_f32.cc, matmul_bf16.cc): T column tiles of the
// [K, N = 64 T] matrix, and its output rows y[M, N].
template <typename W, typename Out>
struct TiledMat {
  const W* tiles;
  Out* y;
  int64_t T, N;
};

// rows(mat, tile, m0, m1) for every column tile of every matrix in one job on the pool: the
// products of one input (a layer's q, k and v, or its gate and up) are one FFI call and one
// pool hand-off instead of one each, and the split evens out (SmolLM2's k and v have 3 tiles
// each). With few tiles in all the rows are split too, into whole register blocks of
// block_rows, so both threads have work. How the tasks fall never changes an output: each
// is one multiply-add chain over k whatever the rows and matrices beside it.
template <typename Mat, typename Rows>
void parallel_tiled(const std::vector<Mat>& mats, int64_t M, int64_t block_rows,
                    const Rows& rows) {
  std::vector<int64_t> start{0};  // first task tile of each matrix, then the total
  for (const Mat& m : mats) start.push_back(start.back() + m.T);
  const int64_t T = start.back();
  if (M <= 0 || T <= 0) return;
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const int64_t slices = std::min<int64_t>(blocks, std::max<int64_t>(1, (16 + T - 1) / T));
  const int64_t per = (blocks + slices - 1) / slices * block_rows;
  parallel_tiles(T * slices, [&](int64_t task) {
    const int64_t g = task / slices, m0 = (task % slices) * per;
    if (m0 >= M) return;
    size_t i = 0;
    while (start[i + 1] <= g) ++i;
    rows(mats[i], g - start[i], m0, std::min(M, m0 + per));
  });
}

// The matrices of a variadic float kernel call: args are one tiles[N_i/64, K, 64] per
// matrix, rets one y[M, N_i] each. `what` names the kernel in errors.
template <ffi::DataType WT, ffi::DataType YT, typename W, typename Out>
ffi::Error tiled_mats(const char* what, int64_t M, int64_t K, ffi::RemainingArgs& args,
                      ffi::RemainingRets& rets, std::vector<TiledMat<W, Out>>* mats) {
  if (rets.size() < 1 || args.size() != rets.size())
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": expected x[M,K], then one tiles array per output");
  for (size_t i = 0; i < rets.size(); ++i) {
    auto tiles = args.get<ffi::Buffer<WT>>(i);
    auto y = rets.get<ffi::Buffer<YT>>(i);
    if (tiles.has_error() || y.has_error())
      return ffi::Error::InvalidArgument(std::string(what) + ": wrong tiles or output dtype");
    const auto td = tiles->dimensions();
    const auto yd = (*y)->dimensions();
    if (td.size() != 3 || td[2] != kTile || td[1] != K || yd.size() != 2 || yd[0] != M ||
        yd[1] != td[0] * kTile)
      return ffi::Error::InvalidArgument(std::string(what) +
                                         ": expected x[M,K], tiles[N/64,K,64], y[M,N]");
    mats->push_back({reinterpret_cast<const W*>(tiles->untyped_data()),
                     reinterpret_cast<Out*>((*y)->untyped_data()), td[0], td[0] * kTile});
  }
  return ffi::Error::Success();
}

}  // namespace jax_infer
