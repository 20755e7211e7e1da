// Paged attention for the CPU (attention backend "cpu"), called from XLA through the FFI:
// decode rows (one query each) and causal prefill rows, reading K/V pages in place through
// the block table (jax_infer/cpu/attention.py binds them; jax_infer/attention/paged.py uses
// them). Float32 pools [P, L, K, H] only; AVX2 or AVX-512.
//
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <type_traits>

#include "common.h"

namespace jax_infer {
namespace {

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

// q[T, N, H], pools [P_, L, K, H], tables[P, pages], positions[T] (-1: padding),
// starts[P + 1] -> out[T, N, H]. Row r's queries are q[starts[r] .. starts[r + 1]) (starts
// nondecreasing, in [0, T]): the flat prefill region of a ragged step as it is, chunks back
// to back, so the caller neither gathers q into padded [P, Q] rows nor scatters the output
// back. Query i of row r sees keys 0..pos (window > 0: only those at positions > pos -
// window); queries outside every row get a zero output, as padding queries do.
ffi::Error PagedPrefillAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                                     ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> tables,
                                     ffi::Buffer<ffi::S32> positions,
                                     ffi::Buffer<ffi::S32> starts, int64_t window,
                                     ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto pd = k_pages.dimensions();
  const auto vd = v_pages.dimensions();
  const auto td = tables.dimensions();
  if (const char* error = attention_shape_error(qd, pd, vd))
    return ffi::Error::InvalidArgument(std::string("paged prefill attention: ") + error);
  if (td.size() != 2 || td[0] < 1 || positions.dimensions().size() != 1 ||
      positions.dimensions()[0] != qd[0] || starts.dimensions().size() != 1 ||
      starts.dimensions()[0] != td[0] + 1)
    return ffi::Error::InvalidArgument(
        "paged prefill attention: expected q[T,N,H], tables[P,pages], positions[T], "
        "starts[P+1]");
  const int64_t T = qd[0], N = qd[1], H = qd[2], L = pd[1], K = pd[2], P = td[0], pages = td[1];
  const int32_t* sp = starts.typed_data();
  int64_t longest = 0;
  for (int64_t r = 0; r < P; ++r) {
    if (sp[r] < 0 || sp[r + 1] < sp[r] || sp[r + 1] > T)
      return ffi::Error::InvalidArgument(
          "paged prefill attention: starts must be nondecreasing within [0, T]");
    longest = std::max<int64_t>(longest, sp[r + 1] - sp[r]);
  }
  const int64_t G = N / K, blocks = (longest + kPrefillBlock - 1) / kPrefillBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* pp = positions.typed_data();
  float* op = out->typed_data();
  // Queries in no row: zero (the rows are back to back from starts[0] to starts[P]).
  std::fill(op, op + sp[0] * N * H, 0.0f);
  std::fill(op + sp[P] * N * H, op + T * N * H, 0.0f);
  // Later blocks see more keys: hand them out first, so the last tasks are the short ones.
  parallel_tiles(blocks * P * K, [=](int64_t t) {
    const int64_t b = blocks - 1 - t / (P * K), r = (t / K) % P, kh = t % K;
    const int64_t i0 = sp[r] + b * kPrefillBlock;
    const int64_t nq = std::min<int64_t>(kPrefillBlock, sp[r + 1] - i0);
    if (nq <= 0) return;
    with_head_vectors<kAttnMaxDim / kLanes>(H / kLanes, [&](auto hv) {
      prefill_heads<decltype(hv)::value>(qp + i0 * N * H, pp + i0, nq, kp, vp, tp + r * pages,
                                         pages * L, window, K, kh, G, L, scale, op + i0 * N * H);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_infer

// kPagedAttentionBit: both attention kernels exist (AVX2 or AVX-512).
extern "C" int JaxInferAttentionFeatures() { return jax_infer::kPagedAttentionBit; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferPagedDecodeAttention, jax_infer::PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxInferPagedPrefillAttention, jax_infer::PagedPrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
