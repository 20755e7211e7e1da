// The machine's read bandwidth as the kernels see it: a streaming sum over a buffer, split
// into chunks that the shared worker pool (common.h) runs, so it reads with the same threads
// as a batch-1 decode step, whose matmul kernels stream every weight once per token.
//
// Called from Python through ctypes (jax_infer/eval/speed.py), not through XLA: the probe
// must not depend on how XLA lowers a reduction (its jitted f32 sum ran on one thread in some
// runs and on two in others, 35.7 against 71.5 GB/s on the same machine).

#include <cstdint>
#include <vector>

#include "common.h"

namespace jax_infer {
namespace {

// Sum of p[0..n) (n a multiple of 8 * kLanes): 8 independent accumulators, so the loop is
// bound by the loads, not by the add latency.
float stream_sum(const float* p, int64_t n) {
  vf acc[8];
  for (auto& a : acc) a = splat(0.0f);
  for (int64_t i = 0; i < n; i += 8 * kLanes)
    for (int j = 0; j < 8; ++j) acc[j] = acc[j] + load_f32(p + i + j * kLanes);
  for (int j = 1; j < 8; ++j) acc[0] = acc[0] + acc[j];
  alignas(64) float lanes[kLanes];
  store_f32(lanes, acc[0]);
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace
}  // namespace jax_infer

// The sum of data[0..n) (the caller times it; the result only keeps the reads alive), read in
// chunks of chunk_floats on the worker pool. n and chunk_floats: multiples of 128.
extern "C" float JaxInferReadSum(const float* data, int64_t n, int64_t chunk_floats) {
  if (n <= 0 || chunk_floats <= 0) return 0.0f;
  const int64_t tasks = (n + chunk_floats - 1) / chunk_floats;
  std::vector<float> partial(static_cast<size_t>(tasks), 0.0f);
  float* out = partial.data();
  jax_infer::parallel_tiles(tasks, [=](int64_t t) {
    const int64_t lo = t * chunk_floats, hi = std::min(n, lo + chunk_floats);
    out[t] = jax_infer::stream_sum(data + lo, hi - lo);
  });
  float total = 0.0f;
  for (float v : partial) total += v;
  return total;
}
