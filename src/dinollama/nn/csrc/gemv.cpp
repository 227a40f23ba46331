// Few-row matrix products for CPU decoding: y[m, n] = sum_k x[m, k] * W[n, k], with M (rows of x)
// small and W streamed from memory once per call. Decoding is bound by the bytes of W it reads; the
// stock torch kernels reach half of the bandwidth or less for these shapes and have no int8-in-groups
// product at all.
//
// Weights: f32, bf16, f16 (fp32 accumulation; a bf16 model's bf16 x bf16 through AVX512-BF16), Q8
// (int8 codes, one fp16 scale per group of G, G a multiple of 32) and Q4 (nibbles 0..15 stored
// pairwise, element 2j in the low half of byte j, w = d * (u - 8)). For Q8/Q4 each 32-block of x is
// rounded to int8 with its own scale, as llama.cpp does, and the products are integer dot products
// (AVX-512 VNNI, or AVX2's maddubs); from 17 rows (prompts) on VNNI an int8 matrix product over packed panels.
//
// Then the small ops of a decode step (RMSNorm, RoPE, silu * up, attention of one query per sequence
// over its KV cache row) and decode_layers, which runs the whole layer stack of a decode step in one
// call: from Python those ops cost more in dispatch than in arithmetic. Last, the two passes around
// torch._int_mm for vision's dynamic int8 linears (per-row quantization; dequantize, bias, GELU, residual).
//
// Every instruction-set path has a scalar twin; the caller's `isa` is clamped to what this CPU
// has, so a missing instruction means a slower path, never a crash.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DL_X86 1
#define T2 __attribute__((target("avx2,fma,f16c")))
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define T512BF __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum WType : int64_t { kF32 = 0, kBF16 = 1, kF16 = 2, kQ8 = 3, kQ4 = 4 };
constexpr int kBlock = 32;  // elements per activation scale
constexpr int kRows = 4;    // rows of x per pass over a weight row (accumulators in registers)
// AVX-512's float kernels take 8 (16 of its 32 registers as accumulators): the weight tiles are read half as
// often from L2, and 8 or 16 f32 rows of a 4096 x 768 product ran 15-25% faster than in passes of 4
constexpr int kRows512 = 8;
// Software prefetch distance in bytes of the weight stream: the hardware prefetcher alone leaves
// 10-15% of one core's bandwidth unused on these row-by-row streams (measured, bench/codellama_gguf.py).
#ifndef DL_AHEAD
#define DL_AHEAD 8192
#endif
// The prefetches go to L2 (T1): into L1 (T0) each holds one of L1's few fill buffers until memory answers,
// and the kernels that do more per byte fell behind: bf16 and f16 rows streamed at 17-20 GB/s instead of
// 24-26, f32 at 4 rows 17 instead of 22 (2 threads, Sapphire Rapids). A single f32 row is the exception,
// 4% faster with T0.
#define DL_PREFETCH(p, to_l1) _mm_prefetch((p), (to_l1) ? _MM_HINT_T0 : _MM_HINT_T1)

// Rows of x go through a kernel R (kRows, or kRows512) at a time, its accumulators in registers:
// f(std::integral_constant<int, rows>, first row, t0, t1) for each block of rows over weight rows [t0, t1),
// the row count a compile-time constant. With more than R rows the weight rows go in tiles of ~kTileBytes
// that stay in L2 for every block of rows, so the weights come from memory once, not once per block.
constexpr int64_t kTileBytes = 256 * 1024;
template <int R, typename F>
inline void with_rows(int64_t rows, F&& f) {  // f(std::integral_constant<int, rows>) for rows in 1..R
  if constexpr (R > 1) {
    if (rows < R) return with_rows<R - 1>(rows, std::forward<F>(f));
  }
  f(std::integral_constant<int, R>{});
}

template <int R = kRows, typename F>
void by_row_blocks(int64_t M, int64_t n0, int64_t n1, int64_t row_bytes, F&& f) {
  const int64_t tile = M > R ? std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, row_bytes)) : n1 - n0;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t m0 = 0; m0 < M; m0 += R)
      with_rows<R>(std::min<int64_t>(R, M - m0), [&](auto mb) { f(mb, m0, t0, t1); });
  }
}

int64_t detect_isa() {
#ifdef DL_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;  // F16C comes with both
#endif
  return kScalar;
}

// AMD: MKL runs its AVX2 code there on AVX-512 CPUs too, and the tiled AVX2 product beat it on a Zen 4 at every
// 134M prompt shape (48-128 rows, 2 threads: 135-203 against 93-180 GFLOP/s), so prompts take it there as well.
bool is_amd() {
#ifdef DL_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// AVX512-BF16 (Zen 4+, Sapphire Rapids+): bf16 x bf16 products summed in fp32 in one instruction.
bool has_bf16_dot() {
#ifdef DL_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- float weights ------------------------------------------------------------------------------

template <WType T>
inline float load_scalar(const void* w, int64_t i) {
  if constexpr (T == kF32) return static_cast<const float*>(w)[i];
  else if constexpr (T == kBF16) return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
  else return half_to_float(static_cast<const uint16_t*>(w)[i]);
}

template <WType T>
void float_scalar(const float* x, int64_t M, int64_t K, const void* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += load_scalar<T>(w, n * K + k) * x[m * K + k];
      y[m * N + n] = acc;
    }
}

#ifdef DL_X86
template <WType T>
T2 inline __m256 load8(const void* w, int64_t i) {
  if constexpr (T == kF32) return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
  if constexpr (T == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

T2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of x (a decode step) reads its weight rows from kStreams places at once: rows i, i + part, ...
// of the range go through the loop together. One stream at a time left a Zen 3 core at 10-12 GB/s (2
// threads 16-20) where it reads 17-19 (2 threads 21-30) from 4, f16 likewise 1.5x (bench: 134M decode
// shapes, in-process A/B); no software prefetch, which only took fill buffers from the hardware's.
constexpr int kStreams = 4;

template <WType T>
T2 int64_t float_streams_avx2(const float* x, int64_t K, const void* w, float* y, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    __m256 a0[kStreams], a1[kStreams];
    for (int s = 0; s < kStreams; ++s) a0[s] = a1[s] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int s = 0; s < kStreams; ++s) {
        const int64_t at = (n0 + s * part + i) * K + k;
        a0[s] = _mm256_fmadd_ps(load8<T>(w, at), x0, a0[s]);
        a1[s] = _mm256_fmadd_ps(load8<T>(w, at + 8), x1, a1[s]);
      }
    }
    for (int s = 0; s < kStreams; ++s) y[n0 + s * part + i] = hsum8(_mm256_add_ps(a0[s], a1[s]));
  }
  return n0 + kStreams * part;  // the first row left for the loop of one row at a time
}

template <WType T, int MB>
T2 void float_avx2(const float* x, int64_t K, const void* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t esz = T == kF32 ? 4 : 2;
  if constexpr (MB == 1) n0 = float_streams_avx2<T>(x, K, w, y, n0, n1);  // the same sums, in the same order
  for (int64_t n = n0; n < n1; ++n) {
    __m256 a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    const char* ahead = static_cast<const char*>(w) + n * K * esz + DL_AHEAD;
    for (int64_t k = 0; k < K; k += 16) {
      if (esz == 4 || k % 32 == 0) DL_PREFETCH(ahead + k * esz, esz == 4 && MB == 1);
      const __m256 w0 = load8<T>(w, n * K + k), w1 = load8<T>(w, n * K + k + 8);
      for (int m = 0; m < MB; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = hsum8(_mm256_add_ps(a0[m], a1[m]));
  }
}

template <WType T>
T512 inline __m512 load16(const void* w, int64_t i) {
  if constexpr (T == kF32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
  if constexpr (T == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

// kStreams weight rows at once, as float_streams_avx2: on a Zen 4 core one row with software prefetch read
// 21-23 GB/s and four 27 (2 threads 31-32 and 32-34; f32, f16 alike; 134M decode shapes, in-process A/B). In
// 256-bit halves, each with its half of float_avx512's 16 lanes, so the sums and their order are the same (and
// _mm512_reduce_add_ps is hsum8 of the two halves' sum); with 512-bit operations f32 streamed 10% slower.
template <WType T>
T512 int64_t float_streams_avx512(const float* x, int64_t K, const void* w, float* y, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    __m256 a0[kStreams], a1[kStreams], b0[kStreams], b1[kStreams];
    for (int s = 0; s < kStreams; ++s) a0[s] = a1[s] = b0[s] = b1[s] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
      for (int s = 0; s < kStreams; ++s) {
        const int64_t at = (n0 + s * part + i) * K + k;
        a0[s] = _mm256_fmadd_ps(load8<T>(w, at), x0, a0[s]);
        b0[s] = _mm256_fmadd_ps(load8<T>(w, at + 8), x1, b0[s]);
        a1[s] = _mm256_fmadd_ps(load8<T>(w, at + 16), x2, a1[s]);
        b1[s] = _mm256_fmadd_ps(load8<T>(w, at + 24), x3, b1[s]);
      }
    }
    for (int s = 0; s < kStreams; ++s)
      y[n0 + s * part + i] = hsum8(_mm256_add_ps(_mm256_add_ps(b0[s], b1[s]), _mm256_add_ps(a0[s], a1[s])));
  }
  return n0 + kStreams * part;
}
template <WType T, int MB>
T512 void float_avx512(const float* x, int64_t K, const void* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t esz = T == kF32 ? 4 : 2;
  if constexpr (MB == 1) n0 = float_streams_avx512<T>(x, K, w, y, n0, n1);  // the same sums, in the same order
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    const char* ahead = static_cast<const char*>(w) + n * K * esz + DL_AHEAD;
    for (int64_t k = 0; k < K; k += 32) {
      DL_PREFETCH(ahead + k * esz, esz == 4 && MB == 1);
      if constexpr (esz == 4) DL_PREFETCH(ahead + k * esz + 64, MB == 1);
      const __m512 w0 = load16<T>(w, n * K + k), w1 = load16<T>(w, n * K + k + 16);
      for (int m = 0; m < MB; ++m) {
        a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), a0[m]);
        a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), a1[m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
  }
}

// kStreams rows at once here too: a Zen 4 core read 19-22 GB/s of bf16 rows one at a time, 27-29 from four.
// Like float_streams_avx512, in 256-bit halves (lanes 0-7 and 8-15 of bf16_dot_avx512's accumulators, the
// same sums): with 512-bit loads the 4 streams read 17-24 GB/s of a Zen 4 core's ~28.
T512BF inline __m256 dot16(__m256 acc, const uint16_t* a, const uint16_t* b) {
  return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)),
                          (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}

T512BF int64_t bf16_dot_streams(const uint16_t* x, int64_t K, const uint16_t* w, float* y, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    __m256 a0[kStreams], a1[kStreams], b0[kStreams], b1[kStreams];  // a: lanes 0-7, b: lanes 8-15
    for (int s = 0; s < kStreams; ++s) a0[s] = a1[s] = b0[s] = b1[s] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
      for (int s = 0; s < kStreams; ++s) {
        const uint16_t* row = w + (n0 + s * part + i) * K + k;
        a0[s] = dot16(a0[s], row, x + k);
        b0[s] = dot16(b0[s], row + 16, x + k + 16);
        a1[s] = dot16(a1[s], row + 32, x + k + 32);
        b1[s] = dot16(b1[s], row + 48, x + k + 48);
      }
    if (k < K)
      for (int s = 0; s < kStreams; ++s) {
        const uint16_t* row = w + (n0 + s * part + i) * K + k;
        a0[s] = dot16(a0[s], row, x + k);
        b0[s] = dot16(b0[s], row + 16, x + k + 16);
      }
    for (int s = 0; s < kStreams; ++s)
      y[n0 + s * part + i] = hsum8(_mm256_add_ps(_mm256_add_ps(a0[s], a1[s]), _mm256_add_ps(b0[s], b1[s])));
  }
  return n0 + kStreams * part;
}

// bf16 weights against bf16 activations (a bf16 model's own, so nothing is rounded that was not):
// one dpbf16 per 32 weights instead of widening each to fp32 first.
template <int MB>
T512BF void bf16_dot_avx512(const uint16_t* x, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0,
                            int64_t n1) {
  if constexpr (MB == 1) n0 = bf16_dot_streams(x, K, w, y, n0, n1);  // the same sums, in the same order
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    const uint16_t* row = w + n * K;
    const char* ahead = reinterpret_cast<const char*>(row) + DL_AHEAD;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      DL_PREFETCH(ahead + k * 2, false);
      DL_PREFETCH(ahead + k * 2 + 64, false);
      const __m512i w0 = _mm512_loadu_si512(row + k), w1 = _mm512_loadu_si512(row + k + 32);
      for (int m = 0; m < MB; ++m) {
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
        a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
      }
    }
    if (k < K) {  // K is a multiple of 32
      const __m512i w0 = _mm512_loadu_si512(row + k);
      for (int m = 0; m < MB; ++m)
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
  }
}

void bf16_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  by_row_blocks<kRows512>(M, n0, n1, 2 * K, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
    bf16_dot_avx512<decltype(mb)::value>(x + m0 * K, K, w, y + m0 * N, N, t0, t1);
  });
}

// ---- prompt rows on AVX2: a tiled product ------------------------------------------------------------
// In the dot-product form above each FMA loads a vector of x too, and at prompt sizes that half-used AVX2's FMA
// rate (MKL does no better on AMD at 64 rows). Here kPanel weight rows at a time are widened to fp32 and
// transposed into a (K, kPanel) panel that stays in L2, and blocks of kMR rows of x run against it as outer
// products: 2 panel loads and kMR broadcasts feed 2 * kMR FMAs into accumulators held in registers.
constexpr int kPanel = 16, kMR = 6;

T2 inline void transpose8(__m256* r) {  // r[j][i] <- r[i][j]
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

// panel[k * kPanel + c] = W[n0 + c][k] in fp32, zero for the columns c >= cols (a last, partial panel)
template <WType T>
T2 void pack_panel(const void* w, int64_t K, int64_t n0, int64_t cols, float* panel) {
  for (int64_t k = 0; k < K; k += 8)
    for (int h = 0; h < kPanel; h += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = h + i < cols ? load8<T>(w, (n0 + h + i) * K + k) : _mm256_setzero_ps();
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (k + j) * kPanel + h, r[j]);
    }
}

// kMR rows of x (rows past `rows` repeat the last one) against a panel, the first `rows` rows stored. The
// accumulators are named variables: as arrays GCC kept a copy of each in memory, stored on every k (half speed).
T2 void panel_rows(const float* x, int64_t rows, int64_t K, const float* panel, float* y, int64_t N, int64_t n0,
                   int64_t cols) {
  const float* xr[kMR];
  for (int r = 0; r < kMR; ++r) xr[r] = x + std::min<int64_t>(r, rows - 1) * K;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 p0 = _mm256_loadu_ps(panel + k * kPanel), p1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#define DL_PANEL_ROW(R)                                          \
  {                                                              \
    const __m256 xb = _mm256_broadcast_ss(xr[R] + k);            \
    c##R##0 = _mm256_fmadd_ps(xb, p0, c##R##0);                  \
    c##R##1 = _mm256_fmadd_ps(xb, p1, c##R##1);                  \
  }
    DL_PANEL_ROW(0) DL_PANEL_ROW(1) DL_PANEL_ROW(2) DL_PANEL_ROW(3) DL_PANEL_ROW(4) DL_PANEL_ROW(5)
#undef DL_PANEL_ROW
  }
  alignas(32) float out[kMR * kPanel];
  const __m256 c[2 * kMR] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  for (int r = 0; r < 2 * kMR; ++r) _mm256_store_ps(out + r * 8, c[r]);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * N + n0, out + r * kPanel, cols * sizeof(float));
}

// Output columns [n0, n1) of x @ W.T for all M rows; n0 a multiple of kPanel.
template <WType T>
T2 void tiled_avx2(const float* x, int64_t M, int64_t K, const void* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  std::vector<float> panel(K * kPanel);
  // blocks of rows of x that stay in L2 while every panel passes (a panel is packed once per block)
  const int64_t block = std::max<int64_t>(8 * kMR, kTileBytes / (4 * K) / kMR * kMR);
  for (int64_t b0 = 0; b0 < M; b0 += block) {
    const int64_t b1 = std::min(M, b0 + block);
    for (int64_t p = n0; p < n1; p += kPanel) {
      const int64_t cols = std::min<int64_t>(kPanel, n1 - p);
      pack_panel<T>(w, K, p, cols, panel.data());
      for (int64_t m0 = b0; m0 < b1; m0 += kMR)
        panel_rows(x + m0 * K, std::min<int64_t>(kMR, b1 - m0), K, panel.data(), y + m0 * N, N, p, cols);
    }
  }
}
#endif

template <WType T>
void float_rows(const float* x, int64_t M, int64_t K, const void* w, float* y, int64_t N, int64_t n0, int64_t n1,
                int64_t isa) {
#ifdef DL_X86
  constexpr int64_t esz = T == kF32 ? 4 : 2;
  if (isa == kAvx512)
    return by_row_blocks<kRows512>(M, n0, n1, esz * K, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
      float_avx512<T, decltype(mb)::value>(x + m0 * K, K, w, y + m0 * N, N, t0, t1);
    });
  if (isa == kAvx2)
    return by_row_blocks(M, n0, n1, esz * K, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
      float_avx2<T, decltype(mb)::value>(x + m0 * K, K, w, y + m0 * N, N, t0, t1);
    });
#endif
  float_scalar<T>(x, M, K, w, y, N, n0, n1);
}

// ---- quantized weights --------------------------------------------------------------------------

// Where element i of block b of a row of x goes for Q4: blocks go in pairs, 64 bytes as [first block's
// even elements | second's even | first's odd | second's odd], the order in which 32 bytes of nibbles
// unpack (low nibbles: even elements; high: odd); a last unpaired block is [even | odd].
inline int64_t q4_slot(int64_t b, int i, int64_t nb) {
  const int64_t half = kBlock / 2;
  if (b == nb - 1 && nb % 2) return b * kBlock + (i % 2) * half + i / 2;
  return (b / 2) * 2 * kBlock + (i % 2) * kBlock + (b % 2) * half + i / 2;
}

// One 32-block of x rounded to int8 with scale amax / 127, the codes in element order; returns the scale.
inline float quantize_block(const float* src, int8_t* codes, int32_t* sum) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *sum = 0;
  for (int i = 0; i < kBlock; ++i) {
    codes[i] = static_cast<int8_t>(std::nearbyint(src[i] * inv));
    *sum += codes[i];
  }
  return amax / 127.f;
}

#ifdef DL_X86
// quantize_block 8 lanes at a time (the same products, rounded to nearest even as nearbyint): the scalar loop was
// 2 ns an element, a sixth of a q4_0 134M decode step's time outside its products at 2 threads (Zen 4).
T2 float quantize_block_avx2(const float* src, int8_t* codes, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(src + 8 * j);
    mx = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), mx);  // max_ps keeps its second operand against a NaN
  }
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i c[4];
  for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
  // packs work per 128-bit lane: [c0 lo, c1 lo, c0 hi, c1 hi] then bytes; the permute puts them in order
  const __m256i w01 = _mm256_packs_epi32(c[0], c[1]), w23 = _mm256_packs_epi32(c[2], c[3]);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), b);
  return amax / 127.f;
}
#endif

// Round each 32-block of x to int8 with scale amax / 127 (Q8: in place; Q4: q4_slot). Per pair of
// blocks p, dx8[p] holds the two scales as [d0 x4, d1 x4] and corr[p] the Q4 offset -8 sum(x) of each
// block in lanes 0 and 4 (a last unpaired block: its scale in all 8 lanes, its offset in lane 0).
void quantize_activations(const float* x, int64_t M, int64_t K, bool q4, int8_t* q, float* d, float* dx8,
                          int32_t* corr, int64_t isa) {
  const int64_t nb = K / kBlock, nq = (nb + 1) / 2;
  std::fill(corr, corr + M * nq * 8, 0);
  int8_t codes[kBlock];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = x + m * K + b * kBlock;
      int8_t* out = q4 ? codes : q + m * K + b * kBlock;
      int32_t sum;
#ifdef DL_X86
      const float scale = isa >= kAvx2 ? quantize_block_avx2(src, out, &sum) : quantize_block(src, out, &sum);
#else
      const float scale = quantize_block(src, out, &sum);
#endif
      d[m * nb + b] = scale;
      const bool single = b == nb - 1 && nb % 2;
      if (q4) {  // q4_slot's order: even elements, then 16 (single) or 32 (pair) bytes on, the odd ones
        int8_t* even = q + m * K + (single ? b * kBlock : (b / 2) * 2 * kBlock + (b % 2) * (kBlock / 2));
        int8_t* odd = even + (single ? kBlock / 2 : kBlock);
        for (int j = 0; j < kBlock / 2; ++j) {
          even[j] = codes[2 * j];
          odd[j] = codes[2 * j + 1];
        }
      }
      float* d8 = dx8 + (m * nq + b / 2) * 8;
      std::fill(d8 + (single ? 0 : (b % 2) * 4), d8 + (single ? 8 : (b % 2) * 4 + 4), scale);
      corr[(m * nq + b / 2) * 8 + (single ? 0 : (b % 2) * 4)] = -8 * sum;
    }
}

struct QuantArgs {
  const int8_t* qx;      // (M, K) int8 activations
  const float* dx;       // (M, K / 32) their scales
  const float* dx8;      // (M, pairs, 8) and
  const int32_t* corr;   // (M, pairs, 8): see quantize_activations
  int64_t K;
  const uint8_t* w;      // (N, K) int8 or (N, K / 2) nibble pairs
  const uint16_t* ws;    // (N, K / G) fp16 weight scales
  int64_t G;
  float* y;
  int64_t N;
};

template <bool Q4>
inline int block_code(const uint8_t* row, int64_t b, int i) {  // element i of block b, as a signed value
  if constexpr (Q4) {
    const uint8_t byte = row[b * (kBlock / 2) + i / 2];
    return (i % 2 ? (byte >> 4) : (byte & 15)) - 8;
  } else {
    return static_cast<int8_t>(row[b * kBlock + i]);
  }
}

template <bool Q4>
void quant_scalar(const QuantArgs& a, int64_t M, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, ng = a.K / a.G, per = a.G / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * (Q4 ? a.K / 2 : a.K);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int i = 0; i < kBlock; ++i)
          dot += block_code<Q4>(row, b, i) * a.qx[m * a.K + (Q4 ? q4_slot(b, i, nb) : b * kBlock + i)];
        acc += half_to_float(a.ws[n * ng + b / per]) * a.dx[m * nb + b] * static_cast<float>(dot);
      }
      a.y[m * a.N + n] = acc;
    }
  }
}

#ifdef DL_X86
T2 inline __m256i udot_avx2(__m256i acc, __m256i u, __m256i s) {  // acc + u . s, unsigned x signed bytes
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
T512 inline __m256i udot_vnni(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
// acc + u0 . s0 + u1 . s1 for nibbles u (< 16): both maddubs' pair sums (|.| <= 2 * 15 * 128 each) add in
// int16 without saturating, so the pair costs one widening instead of two
T2 inline __m256i udot2_avx2(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
T512 inline __m256i udot2_vnni(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, u0, s0), u1, s1);
}

template <int MB>
T2 inline __attribute__((always_inline)) void q8_step_avx2(const uint8_t* row, int64_t b, const int8_t* qx,
                                                           const float* sd, int64_t nb, int64_t K, __m256* acc) {
  // |w| . (x * sign(w)), the unsigned x signed form of maddubs; |w| is shared by every row of x
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  const __m256i aw = _mm256_sign_epi8(w, w), ones = _mm256_set1_epi16(1);
  for (int m = 0; m < MB; ++m) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * K + b * kBlock));
    const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(sd + m * nb + b), acc[m]);
  }
}

// Each weight row's group scales times the activations' block scales, per (row of x, block): a broadcast
// load per block in the loop, no scalar product there. One scale a block (Q8_0) takes 8 blocks a vector.
template <int MB>
T2 inline void q8_scales_avx2(const uint16_t* ws, const float* dx, int64_t nb, int64_t per, float* sd) {
  for (int m = 0; m < MB; ++m) {
    int64_t b = 0;
    if (per == 1)
      for (; b + 8 <= nb; b += 8)
        _mm256_storeu_ps(sd + m * nb + b,
                         _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + b))),
                                       _mm256_loadu_ps(dx + m * nb + b)));
    for (; b < nb; ++b) sd[m * nb + b] = _cvtsh_ss(ws[b / per]) * dx[m * nb + b];
  }
}

// Q8 on AVX2: two accumulators per row of x (even and odd blocks), so consecutive blocks do not wait on
// one FMA chain.
template <int MB>
T2 void q8_avx2(const QuantArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, ng = a.K / a.G, per = a.G / kBlock;
  const int8_t* qx = a.qx + m0 * a.K;
  const float* dx = a.dx + m0 * nb;
  std::vector<float> sd(MB * nb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.K;
    q8_scales_avx2<MB>(a.ws + n * ng, dx, nb, per, sd.data());
    __m256 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    const char* ahead = reinterpret_cast<const char*>(row) + DL_AHEAD;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
      DL_PREFETCH(ahead + b * kBlock, false);
      q8_step_avx2<MB>(row, b, qx, sd.data(), nb, a.K, acc0);
      q8_step_avx2<MB>(row, b + 1, qx, sd.data(), nb, a.K, acc1);
    }
    if (b < nb) q8_step_avx2<MB>(row, b, qx, sd.data(), nb, a.K, acc0);
    for (int m = 0; m < MB; ++m) a.y[(m0 + m) * a.N + n] = hsum8(_mm256_add_ps(acc0[m], acc1[m]));
  }
}

// Q8 on AVX-512: two blocks (64 bytes) per instruction, lanes 0-7 summing the first block and 8-15 the
// second; the sign of w moves onto x with a mask. A last unpaired block runs in the lower half.
#define DL_Q8_STEP(P, ACC)                                                                                   \
  {                                                                                                          \
    DL_PREFETCH(ahead + (P) * 2 * kBlock, false);                                                   \
    const __m512i w = _mm512_loadu_si512(row + (P) * 2 * kBlock);                                            \
    const __m512i aw = _mm512_abs_epi8(w);                                                                   \
    const __mmask64 neg = _mm512_movepi8_mask(w);                                                            \
    __m512 sw;                                                                                               \
    if (per == 1) {                                                                                          \
      int32_t two;                                                                                           \
      std::memcpy(&two, ws + 2 * (P), 4);                                                                    \
      sw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));      \
    } else {                                                                                                 \
      sw = _mm512_set1_ps(_cvtsh_ss(ws[2 * (P) / per]));                                                     \
    }                                                                                                        \
    for (int m = 0; m < MB; ++m) {                                                                           \
      const __m512i xv = _mm512_loadu_si512(qx + m * a.K + (P) * 2 * kBlock);                                \
      const __m512i d = _mm512_dpbusd_epi32(zero, aw, _mm512_mask_sub_epi8(xv, neg, zero, xv));              \
      const __m128 d2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx + m * nb + 2 * (P))));  \
      const __m512 s = _mm512_mul_ps(sw, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d2)));         \
      ACC[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, ACC[m]);                                            \
    }                                                                                                        \
  }

// The weight rows (row_bytes each) and group scales (ng each) of the kStreams rows that step i of a stream kernel
// reads: rows n0 + s * part + i.
inline void stream_rows(const QuantArgs& a, int64_t row_bytes, int64_t ng, int64_t n0, int64_t part, int64_t i,
                        const uint8_t** row, const uint16_t** ws) {
  for (int s = 0; s < kStreams; ++s) {
    row[s] = a.w + (n0 + s * part + i) * row_bytes;
    ws[s] = a.ws + (n0 + s * part + i) * ng;
  }
}

// One row of x against kStreams weight rows at once (as float_streams_avx512): each row's sums exactly as
// q8_vnni512<1> makes them, the activations' loads shared.
T512 inline __attribute__((always_inline)) void q8_pair_streams(const uint8_t* const* row, const uint16_t* const* ws,
                                                               int64_t p, int64_t per, const int8_t* qx,
                                                               const float* dx, __m512i spread, __m512* acc) {
  const __m512i zero = _mm512_setzero_si512(), xv = _mm512_loadu_si512(qx + p * 2 * kBlock);
  const __m128 d2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx + 2 * p)));
  const __m512 dxs = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d2));
  for (int s = 0; s < kStreams; ++s) {
    const __m512i w = _mm512_loadu_si512(row[s] + p * 2 * kBlock);
    const __mmask64 neg = _mm512_movepi8_mask(w);
    __m512 sw;
    if (per == 1) {
      int32_t two;
      std::memcpy(&two, ws[s] + 2 * p, 4);
      sw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
    } else {
      sw = _mm512_set1_ps(_cvtsh_ss(ws[s][2 * p / per]));
    }
    const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w), _mm512_mask_sub_epi8(xv, neg, zero, xv));
    acc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, dxs), acc[s]);
  }
}

T512 int64_t q8_streams_vnni512(const QuantArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, np = nb / 2, ng = a.K / a.G, per = a.G / kBlock;
  const int8_t* qx = a.qx + m0 * a.K;
  const float* dx = a.dx + m0 * nb;
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i zero = _mm512_setzero_si512();
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    const uint8_t* row[kStreams];
    const uint16_t* ws[kStreams];
    stream_rows(a, a.K, ng, n0, part, i, row, ws);
    __m512 acc0[kStreams], acc1[kStreams];
    for (int s = 0; s < kStreams; ++s) acc0[s] = acc1[s] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 1 < np; p += 2) {
      q8_pair_streams(row, ws, p, per, qx, dx, spread, acc0);
      q8_pair_streams(row, ws, p + 1, per, qx, dx, spread, acc1);
    }
    if (p < np) q8_pair_streams(row, ws, p, per, qx, dx, spread, acc0);
    if (nb % 2) {
      const int64_t b = nb - 1;
      const __m512i xv = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock)));
      for (int s = 0; s < kStreams; ++s) {
        const __m512i w = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[s] + b * kBlock)));
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w), _mm512_mask_sub_epi8(xv, neg, zero, xv));
        acc0[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(_cvtsh_ss(ws[s][b / per]) * dx[b]), acc0[s]);
      }
    }
    for (int s = 0; s < kStreams; ++s)
      a.y[m0 * a.N + n0 + s * part + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[s], acc1[s]));
  }
  return n0 + kStreams * part;
}

template <int MB>
T512 void q8_vnni512(const QuantArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, np = nb / 2, ng = a.K / a.G, per = a.G / kBlock;
  const int8_t* qx = a.qx + m0 * a.K;
  const float* dx = a.dx + m0 * nb;
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i zero = _mm512_setzero_si512();
  if constexpr (MB == 1) n0 = q8_streams_vnni512(a, m0, n0, n1);  // the same sums, in the same order
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.K;
    const uint16_t* ws = a.ws + n * ng;
    const char* ahead = reinterpret_cast<const char*>(row) + DL_AHEAD;
    __m512 acc0[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 1 < np; p += 2) {
      DL_Q8_STEP(p, acc0)
      DL_Q8_STEP(p + 1, acc1)
    }
    if (p < np) DL_Q8_STEP(p, acc0)
    if (nb % 2) {
      const int64_t b = nb - 1;
      const __m512i w = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock)));
      const __m512i aw = _mm512_abs_epi8(w);
      const __mmask64 neg = _mm512_movepi8_mask(w);
      const float dw = _cvtsh_ss(ws[b / per]);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv =
            _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * a.K + b * kBlock)));
        const __m512i d = _mm512_dpbusd_epi32(zero, aw, _mm512_mask_sub_epi8(xv, neg, zero, xv));
        acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(dw * dx[m * nb + b]), acc0[m]);
      }
    }
    for (int m = 0; m < MB; ++m) a.y[(m0 + m) * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
  }
}

// Q4, two blocks at a time: 32 bytes of nibbles unpack with one AND and one shift into the low nibbles
// (even elements of both blocks) and the high ones (odd elements), each a dot product against 32
// activation bytes laid out to match (q4_slot). The nibbles u are unsigned, as maddubs/VNNI want, and
// (u - 8) . x = u . x - 8 sum(x) starts from `corr`. Lanes 0-3 sum the first block, 4-7 the second.
#define DL_Q4_STEP(UDOT2, P, ACC)                                                                                   \
  {                                                                                                          \
    const __m256i pw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (P) * kBlock));             \
    const __m256i lo = _mm256_and_si256(pw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(pw, 4), m4);        \
    __m256 sw;                                                                                               \
    if (per == 1) {                                                                                          \
      int32_t two;                                                                                           \
      std::memcpy(&two, ws + 2 * (P), 4);                                                                    \
      sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))), spread);   \
    } else {                                                                                                 \
      sw = _mm256_set1_ps(_cvtsh_ss(ws[2 * (P) / per]));                                                     \
    }                                                                                                        \
    for (int m = 0; m < MB; ++m) {                                                                           \
      const int8_t* xm = qx + m * a.K + (P) * 2 * kBlock;                                                    \
      const int64_t i = (m * nq + (P)) * 8;                                                                  \
      const __m256i d = UDOT2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + i)), lo,            \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm)), hi,                                      \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + kBlock)));                                \
      ACC[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sw, _mm256_loadu_ps(dx8 + i)), ACC[m]);  \
    }                                                                                                        \
  }

// Q4 with VNNI: kStreams weight rows at once for one row of x, each row's sums as in q4_vnni<1>.
T512 inline __attribute__((always_inline)) void q4_pair_streams(const uint8_t* const* row, const uint16_t* const* ws,
                                                               int64_t p, int64_t per, const int8_t* qx,
                                                               const int32_t* corr, const float* dx8, __m256* acc) {
  const __m256i m4 = _mm256_set1_epi8(15), spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + p * 8));
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + p * 2 * kBlock));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + p * 2 * kBlock + kBlock));
  const __m256 d8 = _mm256_loadu_ps(dx8 + p * 8);
  for (int s = 0; s < kStreams; ++s) {
    const __m256i pw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[s] + p * kBlock));
    const __m256i lo = _mm256_and_si256(pw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(pw, 4), m4);
    __m256 sw;
    if (per == 1) {
      int32_t two;
      std::memcpy(&two, ws[s] + 2 * p, 4);
      sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))), spread);
    } else {
      sw = _mm256_set1_ps(_cvtsh_ss(ws[s][2 * p / per]));
    }
    const __m256i d = udot2_vnni(c, lo, x0, hi, x1);
    acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sw, d8), acc[s]);
  }
}

// Pairs p and p + 1 at once in 512-bit registers: the low half holds what q4_pair_streams adds for pair p (acc0's
// lanes), the high half pair p + 1's (acc1's), so every lane sees the same operations in the same order.
T512 inline __attribute__((always_inline)) void q4_quad_streams(const uint8_t* const* row, const uint16_t* const* ws,
                                                               int64_t p, int64_t per, const int8_t* qx,
                                                               const int32_t* corr, const float* dx8, __m512* acc) {
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i c = _mm512_loadu_si512(corr + p * 8);
  const int8_t* xa = qx + p * 2 * kBlock;
  const __m512i x0 = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + 2 * kBlock)), 1);
  const __m512i x1 = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + kBlock))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + 3 * kBlock)), 1);
  const __m512 d8 = _mm512_loadu_ps(dx8 + p * 8);
  for (int s = 0; s < kStreams; ++s) {
    const __m512i pw = _mm512_loadu_si512(row[s] + p * kBlock);
    const __m512i lo = _mm512_and_si512(pw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(pw, 4), m4);
    __m512 sw;
    if (per == 1) {
      int64_t four;
      std::memcpy(&four, ws[s] + 2 * p, 8);
      sw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(four))));
    } else {
      const __m256 s0 = _mm256_set1_ps(_cvtsh_ss(ws[s][2 * p / per]));
      const __m256 s1 = _mm256_set1_ps(_cvtsh_ss(ws[s][2 * (p + 1) / per]));
      sw = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(s0)), _mm256_castps_pd(s1), 1));
    }
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, lo, x0), hi, x1);
    acc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, d8), acc[s]);
  }
}

T512 int64_t q4_streams_vnni(const QuantArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, np = nb / 2, nq = (nb + 1) / 2, ng = a.K / a.G, per = a.G / kBlock;
  const int8_t* qx = a.qx + m0 * a.K;
  const float* dx8 = a.dx8 + m0 * nq * 8;
  const int32_t* corr = a.corr + m0 * nq * 8;
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    const uint8_t* row[kStreams];
    const uint16_t* ws[kStreams];
    stream_rows(a, a.K / 2, ng, n0, part, i, row, ws);
    __m512 acc[kStreams];
    for (int s = 0; s < kStreams; ++s) acc[s] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 1 < np; p += 2) q4_quad_streams(row, ws, p, per, qx, corr, dx8, acc);
    __m256 acc0[kStreams], acc1[kStreams];  // the halves: what q4_pair_streams' acc0 and acc1 would hold
    for (int s = 0; s < kStreams; ++s) {
      acc0[s] = _mm512_castps512_ps256(acc[s]);
      acc1[s] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[s]), 1));
    }
    if (p < np) q4_pair_streams(row, ws, p, per, qx, corr, dx8, acc0);
    if (nb % 2) {  // the last, unpaired block: 16 bytes, activations [even | odd]
      const __m128i l4 = _mm_set1_epi8(15);
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + np * 8));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (nb - 1) * kBlock));
      for (int s = 0; s < kStreams; ++s) {
        const __m128i pw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[s] + (nb - 1) * (kBlock / 2)));
        const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(pw, 4), l4), _mm_and_si128(pw, l4));
        const __m256i d = udot_vnni(c, u, xv);
        acc0[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(_cvtsh_ss(ws[s][(nb - 1) / per]) * dx8[np * 8]),
                                  acc0[s]);
      }
    }
    for (int s = 0; s < kStreams; ++s) a.y[m0 * a.N + n0 + s * part + i] = hsum8(_mm256_add_ps(acc0[s], acc1[s]));
  }
  return n0 + kStreams * part;
}
inline int64_t q4_no_streams(const QuantArgs&, int64_t, int64_t n0, int64_t) { return n0; }

#define DL_Q4_KERNEL(NAME, ATTR, UDOT, UDOT2, STREAMS)                                                                       \
  template <int MB>                                                                                          \
  ATTR void NAME(const QuantArgs& a, int64_t m0, int64_t n0, int64_t n1) {                                   \
    const int64_t nb = a.K / kBlock, np = nb / 2, nq = (nb + 1) / 2, ng = a.K / a.G, per = a.G / kBlock;     \
    const int8_t* qx = a.qx + m0 * a.K;                                                                      \
    const float* dx8 = a.dx8 + m0 * nq * 8;                                                                  \
    const int32_t* corr = a.corr + m0 * nq * 8;                                                              \
    const __m256i m4 = _mm256_set1_epi8(15), spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);             \
    if constexpr (MB == 1) n0 = STREAMS(a, m0, n0, n1); /* the same sums, in the same order */               \
    for (int64_t n = n0; n < n1; ++n) {                                                                      \
      const uint8_t* row = a.w + n * (a.K / 2);                                                              \
      const uint16_t* ws = a.ws + n * ng;                                                                    \
      const char* ahead = reinterpret_cast<const char*>(row) + DL_AHEAD;                                     \
      __m256 acc0[MB], acc1[MB];                                                                             \
      for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();                                  \
      int64_t p = 0;                                                                                         \
      for (; p + 1 < np; p += 2) {                                                                           \
        DL_PREFETCH(ahead + p * kBlock, false);                                                     \
        DL_Q4_STEP(UDOT2, p, acc0)                                                                                \
        DL_Q4_STEP(UDOT2, p + 1, acc1)                                                                              \
      }                                                                                                      \
      if (p < np) DL_Q4_STEP(UDOT2, p, acc0)                                                                      \
      if (nb % 2) { /* the last, unpaired block: 16 bytes, activations [even | odd] */                       \
        const __m128i pw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (nb - 1) * (kBlock / 2)));  \
        const __m128i l4 = _mm_set1_epi8(15);                                                                \
        const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(pw, 4), l4), _mm_and_si128(pw, l4));  \
        const float dw = _cvtsh_ss(ws[(nb - 1) / per]);                                                      \
        for (int m = 0; m < MB; ++m) {                                                                       \
          const int64_t i = (m * nq + np) * 8;                                                               \
          const __m256i d = UDOT(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + i)), u,          \
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * a.K + (nb - 1) * kBlock)));       \
          acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(dw * dx8[i]), acc0[m]);            \
        }                                                                                                    \
      }                                                                                                      \
      for (int m = 0; m < MB; ++m) a.y[(m0 + m) * a.N + n] = hsum8(_mm256_add_ps(acc0[m], acc1[m]));         \
    }                                                                                                        \
  }

DL_Q4_KERNEL(q4_avx2, T2, udot_avx2, udot2_avx2, q4_no_streams)
DL_Q4_KERNEL(q4_vnni, T512, udot_vnni, udot2_vnni, q4_streams_vnni)
#endif

template <bool Q4>
void quant_rows(const QuantArgs& a, int64_t M, int64_t n0, int64_t n1, int64_t isa) {
#ifdef DL_X86
  if (isa != kScalar) {
    const bool vnni = isa == kAvx512;
    const int64_t row_bytes = (Q4 ? a.K / 2 : a.K) + 2 * (a.G > 0 ? a.K / a.G : 1);
    return by_row_blocks(M, n0, n1, row_bytes, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
      constexpr int R = decltype(mb)::value;
      if constexpr (Q4) vnni ? q4_vnni<R>(a, m0, t0, t1) : q4_avx2<R>(a, m0, t0, t1);
      else vnni ? q8_vnni512<R>(a, m0, t0, t1) : q8_avx2<R>(a, m0, t0, t1);
    });
  }
#endif
  quant_scalar<Q4>(a, M, n0, n1);
}

constexpr int64_t kGrain = 16;  // output rows per task at least: a few KB of weights
// From here AVX2 runs the tiled product (native.TILED_ROWS): decode steps of up to 16 rows keep the row kernels,
// whose sums per row do not depend on how many rows share the step.
constexpr int64_t kTiledRows = 17;

#ifdef DL_X86
// ---- quantized prompts with VNNI: an int8 matrix product ---------------------------------------------------
// From kTiledRows rows the row kernels above unpack every weight once per 4 rows of x, and the other path, a
// dequantized bf16 copy into oneDNN's product, left q4_0 64-token prefill at 0.70-0.86x llama.cpp (Zen 4). Here
// x's 32-blocks are rounded to int8 as for decoding, kGN weight rows at a time are unpacked once into a panel
// laid out for VPDPBUSD (64 bytes: 16 columns' 4 consecutive k; the codes unsigned, Q4's nibbles as they are and
// Q8's plus 128), and up to kGR rows of x run against it: per 32-block and row, 8 VPDPBUSD per 16 columns into
// int32 sums that start from -offset * sum(x) of the block, then the block's two scales in fp32.
constexpr int kGR = 4, kGN = 32;  // rows of x per pass over a panel; columns in a panel (two 16-lane vectors)

struct GemmX {  // x rounded per 32-block: codes (M, K) in element order, scales and offset corrections (M, K / 32)
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> corr;
};

// One stage of an 8 x 8 transpose: in[p] and in[p + gap] interleaved by Lo and Hi into out, pair by pair.
T2 inline __m256i lo16(__m256i a, __m256i b) { return _mm256_unpacklo_epi16(a, b); }
T2 inline __m256i hi16(__m256i a, __m256i b) { return _mm256_unpackhi_epi16(a, b); }
T2 inline __m256i lo32(__m256i a, __m256i b) { return _mm256_unpacklo_epi32(a, b); }
T2 inline __m256i hi32(__m256i a, __m256i b) { return _mm256_unpackhi_epi32(a, b); }
T2 inline __m256i lo64(__m256i a, __m256i b) { return _mm256_unpacklo_epi64(a, b); }
T2 inline __m256i hi64(__m256i a, __m256i b) { return _mm256_unpackhi_epi64(a, b); }
template <__m256i (*Lo)(__m256i, __m256i), __m256i (*Hi)(__m256i, __m256i)>
T2 inline void butterfly(const __m256i* in, __m256i* out, int gap) {
  int k = 0;
  for (int p = 0; p < 8; ++p)
    if ((p / gap) % 2 == 0) {
      out[k++] = Lo(in[p], in[p + gap]);
      out[k++] = Hi(in[p], in[p + gap]);
    }
}

// 8 x 8 transposes of 16-bit words in each 128-bit lane: o[t] word c = r[c] word t.
T2 inline void transpose8x16(const __m256i* r, __m256i* o) {
  __m256i a[8], b[8];
  butterfly<lo16, hi16>(r, a, 1);
  butterfly<lo32, hi32>(a, b, 2);
  butterfly<lo64, hi64>(b, o, 4);
}

// 8 x 8 transpose of 32-bit words: o[t] dword c = r[c] dword t.
T2 inline void transpose8x32(const __m256i* r, __m256i* o) {
  __m256i a[8], b[8];
  butterfly<lo32, hi32>(r, a, 1);
  butterfly<lo64, hi64>(a, b, 2);
  for (int i = 0; i < 4; ++i) {
    o[i] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x20);
    o[i + 4] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x31);
  }
}

// One block of 16 full columns (rows[c] their code rows) into the panel's 8 quads of 64 bytes for that half
// (`out` at quad 0, quads 128 bytes apart). Q4: a quad is bytes 2t and 2t + 1 of a column's block, one 16-bit
// word, so the block is an 8 x 8 word transpose per 8 columns, then each word's two bytes become four nibbles.
T2 void pack_block16(const uint8_t* const* rows, int64_t b, bool q4, uint8_t* out) {
  if (q4) {
    __m256i r[8], o[8];  // lane 0: columns 0-7, lane 1: columns 8-15
    for (int c = 0; c < 8; ++c)
      r[c] = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[c + 8] + b * (kBlock / 2))),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[c] + b * (kBlock / 2))));
    transpose8x16(r, o);
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int t = 0; t < 8; ++t) {
      const __m256i lo = _mm256_and_si256(o[t], m4), hi = _mm256_and_si256(_mm256_srli_epi16(o[t], 4), m4);
      const __m256i e0 = _mm256_unpacklo_epi8(lo, hi), e1 = _mm256_unpackhi_epi8(lo, hi);  // columns 0-3 | 8-11, 4-7 | 12-15
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + t * 128), _mm256_permute2x128_si256(e0, e1, 0x20));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + t * 128 + 32), _mm256_permute2x128_si256(e0, e1, 0x31));
    }
    return;
  }
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // Q8: the codes plus 128, unsigned
  for (int g = 0; g < 2; ++g) {
    __m256i r[8], o[8];
    for (int c = 0; c < 8; ++c)
      r[c] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[8 * g + c] + b * kBlock)), flip);
    transpose8x32(r, o);
    for (int t = 0; t < 8; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(out + t * 128 + 32 * g), o[t]);
  }
}

// Panel rows n0.. (cols <= kGN) as [block][quad][half][16 columns][4 codes] and the fp32 scales [block][kGN];
// missing columns get zero codes and scales. Full halves of 16 columns go through pack_block16 (scalar stores
// of each quad took half of a 64-row q4_0 prefill's time), a partial one column by column.
T512 void pack_gemm_panel(const QuantArgs& a, bool q4, int64_t n0, int64_t cols, uint8_t* pw, float* ps) {
  const int64_t nb = a.K / kBlock, ng = a.K / a.G, per = a.G / kBlock, row_bytes = q4 ? a.K / 2 : a.K;
  if (cols < kGN) {
    std::memset(pw, 0, nb * kBlock * kGN);
    std::memset(ps, 0, nb * kGN * sizeof(float));
  }
  for (int64_t j = 0; j < cols; ++j) {
    const uint16_t* ws = a.ws + (n0 + j) * ng;
    for (int64_t b = 0; b < nb; ++b) ps[b * kGN + j] = _cvtsh_ss(ws[b / per]);
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t c0 = 16 * h, full = std::min<int64_t>(16, std::max<int64_t>(0, cols - c0));
    if (full == 16) {
      const uint8_t* rows[16];
      for (int c = 0; c < 16; ++c) rows[c] = a.w + (n0 + c0 + c) * row_bytes;
      for (int64_t b = 0; b < nb; ++b) pack_block16(rows, b, q4, pw + b * 8 * 128 + 64 * h);
      continue;
    }
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    alignas(32) uint32_t quads[8];
    for (int64_t j = c0; j < c0 + full; ++j) {
      const uint8_t* row = a.w + (n0 + j) * row_bytes;
      uint32_t* dst = reinterpret_cast<uint32_t*>(pw) + h * 16 + j % 16;
      for (int64_t b = 0; b < nb; ++b) {
        __m256i u;
        if (q4) {  // element 2i is byte i's low nibble
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * (kBlock / 2)));
          const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
          u = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
        } else {
          u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock)), flip);
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(quads), u);
        for (int t = 0; t < 8; ++t) dst[(b * 8 + t) * 2 * 16] = quads[t];
      }
    }
  }
}

// y rows m0..m0+MR, panel columns n0..n0+cols: see above. The int32 sums of a block go to fp32 once per block.
template <int MR>
T512 void gemm_panel_rows(const GemmX& x, int64_t K, int64_t m0, const uint8_t* pw, const float* ps, float* y,
                          int64_t N, int64_t n0, int64_t cols) {
  const int64_t nb = K / kBlock;
  __m512 f[MR][2];
  for (int m = 0; m < MR; ++m) f[m][0] = f[m][1] = _mm512_setzero_ps();
  const int8_t* xq = x.q.data() + m0 * K;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_set1_epi32(x.corr[(m0 + m) * nb + b]);
    const __m512i* wv = reinterpret_cast<const __m512i*>(pw) + b * 16;
    for (int t = 0; t < 8; ++t) {
      const __m512i w0 = _mm512_load_si512(wv + 2 * t), w1 = _mm512_load_si512(wv + 2 * t + 1);
      for (int m = 0; m < MR; ++m) {
        int32_t four;
        std::memcpy(&four, xq + m * K + b * kBlock + 4 * t, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xb);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(ps + b * kGN), s1 = _mm512_loadu_ps(ps + b * kGN + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 d = _mm512_set1_ps(x.d[(m0 + m) * nb + b]);
      f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), _mm512_mul_ps(s0, d), f[m][0]);
      f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), _mm512_mul_ps(s1, d), f[m][1]);
    }
  }
  const __mmask16 k0 = cols >= 16 ? 0xffff : (1u << cols) - 1, k1 = cols >= 32 ? 0xffff : cols > 16 ? (1u << (cols - 16)) - 1 : 0;
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, k0, f[m][0]);
    _mm512_mask_storeu_ps(y + (m0 + m) * N + n0 + 16, k1, f[m][1]);
  }
}

void quant_gemm_vnni(const float* x, int64_t M, int64_t K, const QuantArgs& a, bool q4) {
  const int64_t nb = K / kBlock, N = a.N;
  GemmX gx{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<int32_t>(M * nb)};
  const int32_t offset = q4 ? 8 : 128;
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum;
        gx.d[m * nb + b] = quantize_block_avx2(x + m * K + b * kBlock, gx.q.data() + m * K + b * kBlock, &sum);
        gx.corr[m * nb + b] = -offset * sum;
      }
  });
  at::parallel_for(0, (N + kGN - 1) / kGN, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> buf(nb * kBlock * kGN + 64);  // one panel, 64-byte aligned for its vector loads
    uint8_t* pw = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
    std::vector<float> ps(nb * kGN);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kGN, cols = std::min<int64_t>(kGN, N - n0);
      pack_gemm_panel(a, q4, n0, cols, pw, ps.data());
      for (int64_t m0 = 0; m0 < M; m0 += kGR)
        with_rows<kGR>(std::min<int64_t>(kGR, M - m0), [&](auto mb) {
          gemm_panel_rows<decltype(mb)::value>(gx, K, m0, pw, ps.data(), a.y, N, n0, cols);
        });
    }
  });
}
#endif

// The products on raw rows, y (M, N) in fp32, for gemv and the fused decode step (which owns its buffers).
void float_product(const float* xp, int64_t M, int64_t K, const torch::Tensor& w, float* yp, int64_t isa) {
  const int64_t N = w.size(0);
  const void* wp = w.data_ptr();
  const auto t = w.scalar_type();
#ifdef DL_X86
  static const bool amd = is_amd();
  if ((isa == kAvx2 || (isa == kAvx512 && amd)) && M >= kTiledRows) {  // kPanel columns a task
    at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
      const int64_t n0 = p0 * kPanel, n1 = std::min(N, p1 * kPanel);
      if (t == at::kFloat) tiled_avx2<kF32>(xp, M, K, wp, yp, N, n0, n1);
      else if (t == at::kBFloat16) tiled_avx2<kBF16>(xp, M, K, wp, yp, N, n0, n1);
      else tiled_avx2<kF16>(xp, M, K, wp, yp, N, n0, n1);
    });
    return;
  }
#endif
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    if (t == at::kFloat) float_rows<kF32>(xp, M, K, wp, yp, N, n0, n1, isa);
    else if (t == at::kBFloat16) float_rows<kBF16>(xp, M, K, wp, yp, N, n0, n1, isa);
    else float_rows<kF16>(xp, M, K, wp, yp, N, n0, n1, isa);
  });
}

void quant_product(const float* x, int64_t M, int64_t K, const torch::Tensor& w, const torch::Tensor& scales, bool q4,
                   float* y, int64_t isa) {
  const int64_t N = w.size(0), G = K / scales.size(1);
#ifdef DL_X86
  if (isa == kAvx512 && M >= kTiledRows) {
    const QuantArgs a{nullptr, nullptr, nullptr, nullptr, K, static_cast<const uint8_t*>(w.data_ptr()),
                      reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), G, y, N};
    return quant_gemm_vnni(x, M, K, a, q4);
  }
#endif
  std::vector<int8_t> qx(M * K);
  const int64_t nq = (K / kBlock + 1) / 2;
  std::vector<float> dx(M * (K / kBlock)), dx8(M * nq * 8);
  std::vector<int32_t> corr(M * nq * 8);
  quantize_activations(x, M, K, q4, qx.data(), dx.data(), dx8.data(), corr.data(), isa);
  const QuantArgs a{qx.data(), dx.data(), dx8.data(), corr.data(), K, static_cast<const uint8_t*>(w.data_ptr()),
                    reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), G, y, N};
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    if (q4) quant_rows<true>(a, M, n0, n1, isa);
    else quant_rows<false>(a, M, n0, n1, isa);
  });
}

#ifdef DL_X86
void bf16_product(const uint16_t* xp, int64_t M, int64_t K, const torch::Tensor& w, float* yp) {
  const int64_t N = w.size(0);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { bf16_rows(xp, M, K, wp, yp, N, n0, n1); });
}
#endif

// A weight of kind `wtype` (0 float, 3 Q8, 4 Q4) with its scales, for rows of K.
void check_weight(int64_t K, const torch::Tensor& w, const torch::Tensor& scales, int64_t wtype) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv: the weight must be a contiguous matrix");
  TORCH_CHECK(K % kBlock == 0, "gemv: K must be a multiple of 32, got ", K);
  if (wtype == kQ8 || wtype == kQ4) {
    const bool q4 = wtype == kQ4;
    TORCH_CHECK(w.scalar_type() == (q4 ? at::kByte : at::kChar), "gemv: Q8 weights are int8, Q4 weights uint8");
    TORCH_CHECK(w.size(1) == (q4 ? K / 2 : K), "gemv: weight columns do not match K");
    TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                    scales.size(0) == w.size(0) && scales.size(1) > 0 && K % scales.size(1) == 0 &&
                    (K / scales.size(1)) % kBlock == 0,
                "gemv: scales must be contiguous float16 (N, K / G), G a multiple of 32");
    return;
  }
  TORCH_CHECK(wtype == kF32, "gemv: unknown weight type ", wtype);
  TORCH_CHECK(w.size(1) == K, "gemv: weight columns do not match K");
  const auto t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "gemv: float weights are f32, bf16 or f16");
}

// Whether x of dtype t runs AVX512-BF16's bf16 x bf16 product against w (a bf16 model's float weights).
bool takes_bf16_dot(at::ScalarType t, const torch::Tensor& w, int64_t wtype, int64_t isa) {
#ifdef DL_X86
  static const bool bf16_dot = has_bf16_dot();
  return wtype == kF32 && t == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && isa >= kAvx512 && bf16_dot &&
         detect_isa() >= kAvx512;
#else
  return false;
#endif
}

// fp32 x (M, K) against a checked weight, into y (M, N).
void product(const float* x, int64_t M, int64_t K, const torch::Tensor& w, const torch::Tensor& scales, int64_t wtype,
             float* y, int64_t isa) {
  if (wtype == kQ8 || wtype == kQ4) return quant_product(x, M, K, w, scales, wtype == kQ4, y, isa);
  float_product(x, M, K, w, y, isa);
}

// y = x @ W.T for x (..., K), in x's dtype (the product in fp32). `wtype`: 0 float weights (f32/bf16/f16,
// by dtype), 3 Q8, 4 Q4.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t wtype, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1, "gemv: x needs a last dimension");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "gemv: x must be f32, bf16 or f16");
  const int64_t K = x.size(-1);
  check_weight(K, w, scales, wtype);
  isa = std::min(isa, detect_isa());
  auto x2 = x.reshape({-1, K});
  auto y = torch::empty({x2.size(0), w.size(0)}, x.options().dtype(at::kFloat));
#ifdef DL_X86
  if (takes_bf16_dot(t, w, wtype, isa)) {
    x2 = x2.contiguous();
    bf16_product(reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()), x2.size(0), K, w, y.data_ptr<float>());
  }
#endif
  if (!takes_bf16_dot(t, w, wtype, isa)) {
    x2 = x2.to(at::kFloat).contiguous();
    product(x2.data_ptr<float>(), x2.size(0), K, w, scales, wtype, y.data_ptr<float>(), isa);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.to(t).view(shape);
}


// ---- the small decode-step ops ------------------------------------------------------------------
// At one token per step a layer's elementwise work is tiny and what costs is the number of torch ops
// (each a few microseconds of dispatch). Each op here does in one call what the reference does in
// several, with its numerics: math in fp32, rounded to the tensor dtype where the reference rounds.

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }

#define DL_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Rows to and from fp32 buffers, where the ops do their math. f16 goes through F16C 8 at a time where the
// CPU has AVX2: c10::Half's scalar conversions (bit manipulation, outside the F16C-compiled functions) made
// a f16 model's norm, RoPE and silu 3-4x slower than a bf16 model's (0.7 against 0.2 ms a token).
#ifdef DL_X86
T2 void half_row_to_float(const c10::Half* src, float* dst, int64_t n) {
  const auto* h = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(h[i]);
}
T2 void float_row_to_half(const float* src, c10::Half* dst, int64_t n) {
  auto* h = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) h[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

template <typename T>
void load_row(const T* src, float* dst, int64_t n, bool avx2) {
#ifdef DL_X86
  if constexpr (std::is_same_v<T, c10::Half>)
    if (avx2) return half_row_to_float(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n, bool avx2) {
#ifdef DL_X86
  if constexpr (std::is_same_v<T, c10::Half>)
    if (avx2) return float_row_to_half(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f<T>(src[i]);
}

// Round a fp32 buffer to T and back, where the reference rounds an intermediate to the tensor dtype.
template <typename T>
void round_row(float* buf, T* tmp, int64_t n, bool avx2) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    store_row(buf, tmp, n, avx2);
    load_row(tmp, buf, n, avx2);
  }
}

inline bool has_avx2(int64_t isa) { return std::min(isa, detect_isa()) >= kAvx2; }

// Llama's RMSNorm: (x * rsqrt(mean(x^2) + eps)) rounded to x's dtype, then times the weight (same dtype).
template <typename T>
void rmsnorm_rows(const T* xp, const T* wp, int64_t rows, int64_t dim, float eps, bool avx2, T* yp) {
  std::vector<float> xb(dim), wb(dim);
  std::vector<T> tmp(dim);
  load_row(wp, wb.data(), dim, avx2);
  for (int64_t r = 0; r < rows; ++r) {
    load_row(xp + r * dim, xb.data(), dim, avx2);
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += xb[i] * xb[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) xb[i] *= inv;
    round_row(xb.data(), tmp.data(), dim, avx2);
    for (int64_t i = 0; i < dim; ++i) xb[i] *= wb[i];
    store_row(xb.data(), yp + r * dim, dim, avx2);
  }
}

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps, int64_t isa) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(-1) == w.numel() && w.scalar_type() == x.scalar_type(),
              "rmsnorm: contiguous x (..., dim) and weight (dim) of one dtype");
  auto y = torch::empty_like(x);
  const int64_t dim = x.size(-1);
  DL_DISPATCH(x.scalar_type(), "rmsnorm", [&] {
    rmsnorm_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), x.numel() / dim, dim, static_cast<float>(eps),
                 has_avx2(isa), y.data_ptr<scalar_t>());
  });
  return y;
}

// Rotary embedding in place on the q and k heads of a fused projection output qkv (T, >= (H + Hkv) * d):
// pair j of token t turns by rot[t, j] = (cos, sin) (one rot row: the same for every token), Meta's
// interleaved layout, fp32 math.
template <typename T>
void rope_rows(T* base, int64_t rows, int64_t ld, int64_t heads, int64_t head_dim, const float* r, bool one_rot,
               bool avx2) {
  const int64_t half = head_dim / 2, rstep = one_rot ? 0 : half, width = heads * head_dim;
  std::vector<float> buf(width);
  for (int64_t t = 0; t < rows; ++t) {
    load_row(base + t * ld, buf.data(), width, avx2);
    for (int64_t h = 0; h < heads; ++h) {
      float* v = buf.data() + h * head_dim;
      for (int64_t j = 0; j < half; ++j) {
        const float c = r[(t * rstep + j) * 2], sn = r[(t * rstep + j) * 2 + 1];
        const float a = v[2 * j], b = v[2 * j + 1];
        v[2 * j] = a * c - b * sn;
        v[2 * j + 1] = a * sn + b * c;
      }
    }
    store_row(buf.data(), base + t * ld, width, avx2);
  }
}

void rope_qk_(torch::Tensor qkv, int64_t heads, int64_t head_dim, torch::Tensor rot, int64_t isa) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= heads * head_dim && head_dim % 2 == 0,
              "rope_qk_: qkv (T, width) with unit column stride");
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.is_contiguous() && rot.dim() == 3 &&
                  (rot.size(0) == qkv.size(0) || rot.size(0) == 1) && rot.size(1) == head_dim / 2 && rot.size(2) == 2,
              "rope_qk_: rot must be contiguous float32 (T or 1, head_dim / 2, 2)");
  const bool one = rot.size(0) == 1;
  DL_DISPATCH(qkv.scalar_type(), "rope_qk_", [&] {
    rope_rows(qkv.data_ptr<scalar_t>(), qkv.size(0), qkv.stride(0), heads, head_dim, rot.data_ptr<float>(), one,
              has_avx2(isa));
  });
}

// e^x for x <= 0 (softmax after the max is subtracted), to about 2 ulp: e^x = 2^i * e^r with
// r = x - i ln 2 in [-ln2/2, ln2/2] and a degree-6 polynomial for e^r; branch-free (std::exp was half of
// the attention time). exp_neg8 below is the same for 8 lanes.
inline float exp_neg(float x) {
  x = std::max(x, -87.f);
  const float i = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - i * 0.693359375f + i * 2.12194440e-4f;
  float e = 1.f / 720 * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &e, 4);
  bits += static_cast<int32_t>(i) << 23;
  std::memcpy(&e, &bits, 4);
  return e;
}

// silu(gate) * up for gu = [gate | up] (T, 2h): silu rounded to the dtype, then the product, as torch does.
// With AVX2 silu(a) = a * sigmoid(a) comes from e = e^-|a| (exp_neg's range) 8 lanes at a time (silu_avx2;
// std::exp, one call per element, was 1.3% of a bf16 decode step on a Zen 4); silu_vec is its scalar tail.
inline float silu_vec(float a) {
  const float e = exp_neg(-std::fabs(a));
  return a * (a >= 0.f ? 1.f : e) / (1.f + e);
}

#ifdef DL_X86
// exp_neg for 8 lanes, the same operations in the same order (the compiler kept exp_neg's loops scalar)
T2 inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 i = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(i, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(i, _mm256_set1_ps(2.12194440e-4f)));
  __m256 e = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(1.f / 720), r), _mm256_set1_ps(1.f / 120));
  for (const float c : {1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(c));
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(e), _mm256_slli_epi32(_mm256_cvtps_epi32(i), 23));
  return _mm256_castsi256_ps(bits);
}

T2 void silu_avx2(float* a, int64_t n) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(a + i);
    const __m256 e = exp_neg8(_mm256_or_ps(x, sign));  // e^-|x|
    const __m256 sel = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, zero, _CMP_GE_OQ));
    _mm256_storeu_ps(a + i, _mm256_div_ps(_mm256_mul_ps(x, sel), _mm256_add_ps(one, e)));
  }
  for (; i < n; ++i) a[i] = silu_vec(a[i]);
}
#endif

template <typename T>
void silu_mul_rows(const T* g, int64_t rows, int64_t h, bool avx2, T* yp) {
  std::vector<float> buf(h), ub(h);
  std::vector<T> tmp(h);
  for (int64_t r = 0; r < rows; ++r) {
    load_row(g + r * 2 * h, buf.data(), h, avx2);
    load_row(g + r * 2 * h + h, ub.data(), h, avx2);
#ifdef DL_X86
    if (avx2) silu_avx2(buf.data(), h);
#endif
    if (!avx2)
      for (int64_t i = 0; i < h; ++i) buf[i] = buf[i] / (1.f + std::exp(-buf[i]));
    round_row(buf.data(), tmp.data(), h, avx2);
    for (int64_t i = 0; i < h; ++i) buf[i] *= ub[i];
    store_row(buf.data(), yp + r * h, h, avx2);
  }
}

torch::Tensor silu_mul(torch::Tensor gu, int64_t isa) {
  TORCH_CHECK(gu.is_contiguous() && gu.size(-1) % 2 == 0, "silu_mul: contiguous (..., 2 * hidden)");
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  const int64_t h = shape.back() / 2, rows = gu.numel() / (2 * h);
  shape.back() = h;
  auto y = torch::empty(shape, gu.options());
  DL_DISPATCH(gu.scalar_type(), "silu_mul", [&] {
    silu_mul_rows(gu.data_ptr<scalar_t>(), rows, h, has_avx2(isa), y.data_ptr<scalar_t>());
  });
  return y;
}

// The body of attend_one, compiled for any CPU and, for head sizes that are not a multiple of 16, inside
// attend_one_avx2.
#define DL_ATTEND_BODY                                                                                \
  for (int64_t j = 0; j < d; ++j) qf[j] = to_f(q[j]);                                                 \
  float mx = -INFINITY;                                                                               \
  for (int64_t l = 0; l < len; ++l) {                                                                 \
    float s = 0.f;                                                                                    \
    _Pragma("omp simd reduction(+ : s)") for (int64_t j = 0; j < d; ++j) s += qf[j] * to_f(k[l * d + j]); \
    p[l] = s * scale;                                                                                 \
    mx = std::max(mx, p[l]);                                                                          \
  }                                                                                                   \
  float total = 0.f;                                                                                  \
  _Pragma("omp simd reduction(+ : total)") for (int64_t l = 0; l < len; ++l) {                        \
    p[l] = exp_neg(p[l] - mx);                                                                        \
    total += p[l];                                                                                    \
  }                                                                                                   \
  for (int64_t j = 0; j < d; ++j) acc[j] = 0.f;                                                       \
  for (int64_t l = 0; l < len; ++l) {                                                                 \
    const float e = p[l];                                                                             \
    _Pragma("omp simd") for (int64_t j = 0; j < d; ++j) acc[j] += e * to_f(v[l * d + j]);             \
  }                                                                                                   \
  for (int64_t j = 0; j < d; ++j) out[j] = from_f<Q>(acc[j] / total);

template <typename Q, typename C>
void attend_one(const Q* q, const C* k, const C* v, int64_t len, int64_t d, float scale, float* p, float* qf,
                float* acc, Q* out) {
  DL_ATTEND_BODY
}

#ifdef DL_X86
template <typename C>
constexpr WType cache_wtype() {
  return std::is_same_v<C, float> ? kF32 : std::is_same_v<C, c10::BFloat16> ? kBF16 : kF16;
}

// q . k[at..at+d) as 8 lane sums (d % 16 == 0), two FMA chains
template <WType T>
T2 inline __m256 key_dot(const float* qf, const void* k, int64_t at, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + j), load8<T>(k, at + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + j + 8), load8<T>(k, at + j + 8), s1);
  }
  return _mm256_add_ps(s0, s1);
}

// lane t: the sum of r[t]'s lanes
T2 inline __m256 hsum8x8(const __m256* r) {
  const __m256 t0 = _mm256_hadd_ps(r[0], r[1]), t1 = _mm256_hadd_ps(r[2], r[3]);
  const __m256 t2 = _mm256_hadd_ps(r[4], r[5]), t3 = _mm256_hadd_ps(r[6], r[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

T2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// acc[j0..j0+8NV) = sum_l p[l] v[l, j0..]: NV accumulators held in registers over the keys
template <WType T, int NV>
T2 inline void weighted_values(const float* p, const void* v, int64_t len, int64_t d, int64_t j0, float* acc) {
  __m256 a[NV];
  for (int i = 0; i < NV; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {
    const __m256 e = _mm256_set1_ps(p[l]);
    for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(e, load8<T>(v, l * d + j0 + 8 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + j0 + 8 * i, a[i]);
}

// With AVX2 the key and value rows load 8 at a time, widened in registers: the compiler does not
// vectorize the bf16/f16 conversions of the generic body (2.8 GFLOP/s there, 3-4% of a bf16 decode
// step at 64 positions on a Zen 4). Scores go 8 keys at a time (d=64 heads 1.2-1.35x on a Zen 4) and the
// weighted values stay in registers.
template <typename Q, typename C>
T2 void attend_one_avx2(const Q* q, const C* k, const C* v, int64_t len, int64_t d, float scale, float* p, float* qf,
                        float* acc, Q* out) {
  if constexpr (std::is_same_v<C, double>) {
    DL_ATTEND_BODY
  } else {
    if (d % 16) {
      DL_ATTEND_BODY
      return;
    }
    constexpr WType T = cache_wtype<C>();
    for (int64_t j = 0; j < d; ++j) qf[j] = to_f(q[j]);
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t l = 0;
    for (; l + 8 <= len; l += 8) {  // 8 keys' scores, summed across lanes together
      __m256 r[8];
      for (int t = 0; t < 8; ++t) r[t] = key_dot<T>(qf, k, (l + t) * d, d);
      const __m256 sc = _mm256_mul_ps(hsum8x8(r), _mm256_set1_ps(scale));
      _mm256_storeu_ps(p + l, sc);
      vmax = _mm256_max_ps(vmax, sc);
    }
    float mx = hmax8(vmax);
    for (; l < len; ++l) {
      p[l] = hsum8(key_dot<T>(qf, k, l * d, d)) * scale;
      mx = std::max(mx, p[l]);
    }
    __m256 sum = _mm256_setzero_ps();
    l = 0;
    for (; l + 8 <= len; l += 8) {
      const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(p + l), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(p + l, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; l < len; ++l) {
      p[l] = exp_neg(p[l] - mx);
      total += p[l];
    }
    int64_t j0 = 0;
    for (; j0 + 64 <= d; j0 += 64) weighted_values<T, 8>(p, v, len, d, j0, acc);
    switch ((d - j0) / 8) {  // d % 16 == 0
      case 6: weighted_values<T, 6>(p, v, len, d, j0, acc); break;
      case 4: weighted_values<T, 4>(p, v, len, d, j0, acc); break;
      case 2: weighted_values<T, 2>(p, v, len, d, j0, acc); break;
      default: break;
    }
    for (int64_t j = 0; j < d; ++j) out[j] = from_f<Q>(acc[j] / total);
  }
}
#endif

// The shapes of one query per sequence: n rows of H heads of d (q's strides for rows and heads) against
// caches (B, Hkv, L, d).
struct Heads {
  int64_t n, H, d, Hkv, L, q_row, q_head;
};

template <typename Q, typename C>
void attend_rows(const Q* qp, const C* kp, const C* vp, const Heads& s, const int64_t* len, int64_t row0, bool avx2,
                 Q* op) {
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  at::parallel_for(0, s.n * s.H, 1, [&](int64_t a0, int64_t a1) {
    std::vector<float> buf(s.L + 2 * s.d);
    float *p = buf.data(), *qf = p + s.L, *acc = qf + s.d;
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t i = a / s.H, h = a % s.H, kvh = h / (s.H / s.Hkv);
      const int64_t off = ((row0 + i) * s.Hkv + kvh) * s.L * s.d;
      const Q* qa = qp + i * s.q_row + h * s.q_head;
      Q* oa = op + (i * s.H + h) * s.d;
#ifdef DL_X86
      if (avx2) {
        attend_one_avx2<Q, C>(qa, kp + off, vp + off, len[i], s.d, scale, p, qf, acc, oa);
        continue;
      }
#endif
      attend_one<Q, C>(qa, kp + off, vp + off, len[i], s.d, scale, p, qf, acc, oa);
    }
  });
}

// One query per sequence against its cache row: q (n, H, d) (a strided view is fine), cache k/v
// (B, Hkv, L, d), row i of the batch in cache row row0 + i with lengths[i] keys. Scores, softmax and the
// weighted sum of values all in fp32; the output (n, H * d) in q's dtype. Grouped-query heads share
// their KV head without a copy.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths, int64_t row0,
                               int64_t isa) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "decode_attention: q (n, H, d) with unit last stride");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type() && k.size(3) == q.size(2),
              "decode_attention: contiguous caches (B, Hkv, L, d) matching q");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == q.size(0), "decode_attention: int64 lengths (n)");
  const int64_t n = q.size(0), H = q.size(1), d = q.size(2), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(H % Hkv == 0 && row0 >= 0 && row0 + n <= k.size(0), "decode_attention: heads or rows out of range");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(len[i] >= 1 && len[i] <= L, "decode_attention: a length is out of the cache");
  auto out = torch::empty({n, H * d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const Heads hs{n, H, d, Hkv, L, q.stride(0), q.stride(1)};
  DL_DISPATCH(q.scalar_type(), "decode_attention", [&] {
    using Q = scalar_t;
    DL_DISPATCH(k.scalar_type(), "decode_attention_cache", [&] {
      attend_rows(q.data_ptr<Q>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), hs, len, row0, has_avx2(isa),
                  out.data_ptr<Q>());
    });
  });
  return out;
}

// ---- int8 matrix products: the passes around torch._int_mm -------------------------------------
// Dynamic int8 linears (vision) spend more time in torch's elementwise passes around the int32
// product than in the product itself (~10 passes over the activations). These two functions are
// one pass each: per-row quantization in, and dequantization + bias + GELU + residual out. Their
// numerics follow Int8Linear's torch code op for op (the GELU's erf is the A&S 7.1.26 polynomial
// that ATen's vectorized erf also uses, |error| < 1.5e-7).

// Row r of x (M, K): scale = max(amax|x_r| / 127, 1e-12), q = round_half_even(x / scale).
#define DL_QUANT_ROW_BODY                                                              \
  float amax = 0.f;                                                                    \
  _Pragma("omp simd reduction(max : amax)") for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k])); \
  const float s = std::max(amax / 127.f, 1e-12f);                                      \
  *scale = s;                                                                          \
  _Pragma("omp simd") for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(static_cast<int32_t>(std::nearbyint(x[k] / s)));

inline void quant_row(const float* x, int64_t K, int8_t* q, float* scale) { DL_QUANT_ROW_BODY }
#ifdef DL_X86
T2 void quant_row_avx2(const float* x, int64_t K, int8_t* q, float* scale) { DL_QUANT_ROW_BODY }
T512 void quant_row_avx512(const float* x, int64_t K, int8_t* q, float* scale) { DL_QUANT_ROW_BODY }
#endif

std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "quantize_rows: contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = torch::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t level = std::min(isa, detect_isa());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#ifdef DL_X86
      if (level >= kAvx512) { quant_row_avx512(xp + m * K, K, qp + m * K, sp + m); continue; }
      if (level >= kAvx2) { quant_row_avx2(xp + m * K, K, qp + m * K, sp + m); continue; }
#endif
      quant_row(xp + m * K, K, qp + m * K, sp + m);
    }
  });
  return {q, scale};
}

// 0.5 x (1 + erf(x / sqrt 2)), erf by A&S 7.1.26 with exp_neg (gelu_erf8 below: the same for 8 lanes).
inline float gelu_erf(float x) {
  const float z = x * 0.70710678118654752f, a = std::fabs(z);
  const float t = 1.f / (1.f + 0.3275911f * a);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const float e = 1.f - poly * exp_neg(-a * a);
  return x * 0.5f * (1.f + (z < 0.f ? -e : e));
}

#define DL_DEQUANT_ROW_BODY                                                               \
  _Pragma("omp simd") for (int64_t n = 0; n < N; ++n) {                                   \
    float v = static_cast<float>(acc[n]) * xs * ws[n];                                    \
    if (bias) v += bias[n];                                                               \
    if (gelu) v = gelu_erf(v);                                                            \
    y[n] = res ? res[n] + v : v;                                                          \
  }

inline void dequant_row(const int32_t* acc, float xs, const float* ws, const float* bias, bool gelu, const float* res,
                        int64_t N, float* y) { DL_DEQUANT_ROW_BODY }
#ifdef DL_X86
T2 void dequant_row_avx2(const int32_t* acc, float xs, const float* ws, const float* bias, bool gelu, const float* res,
                         int64_t N, float* y) { DL_DEQUANT_ROW_BODY }
T512 void dequant_row_avx512(const int32_t* acc, float xs, const float* ws, const float* bias, bool gelu,
                             const float* res, int64_t N, float* y) { DL_DEQUANT_ROW_BODY }

// gelu_erf for 8 lanes, the same operations in the same order: the compiler kept the rows above scalar
// where they call gelu_erf (1 ms of a 257 x 1536 epilogue, a quarter of a ViT-S/14 int8 image on a Zen 4).
T2 inline __m256 gelu_erf8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)), a = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(0.3275911f), a)));
  __m256 poly = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(1.061405429f), t), _mm256_set1_ps(1.453152027f));
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(1.421413741f));
  poly = _mm256_sub_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(0.284496736f));
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(0.254829592f));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = _mm256_sub_ps(one, _mm256_mul_ps(poly, exp_neg8(_mm256_xor_ps(_mm256_mul_ps(a, a), sign))));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(one, _mm256_xor_ps(e, _mm256_and_ps(z, sign))));
}

T2 void dequant_gelu_row_avx2(const int32_t* acc, float xs, const float* ws, const float* bias, const float* res,
                              int64_t N, float* y) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + n))),
                                           _mm256_set1_ps(xs)), _mm256_loadu_ps(ws + n));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
    v = gelu_erf8(v);
    _mm256_storeu_ps(y + n, res ? _mm256_add_ps(_mm256_loadu_ps(res + n), v) : v);
  }
  for (; n < N; ++n) {
    const float v = gelu_erf(static_cast<float>(acc[n]) * xs * ws[n] + (bias ? bias[n] : 0.f));
    y[n] = res ? res[n] + v : v;
  }
}
#endif

// y = gelu?(acc * x_scale[m] * w_scale[n] + bias[n]) (+ residual), acc (M, N) int32; empty bias or
// residual tensors mean none.
torch::Tensor int8_epilogue(torch::Tensor acc, torch::Tensor x_scale, torch::Tensor w_scale, torch::Tensor bias,
                            bool gelu, torch::Tensor residual, int64_t isa) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt, "int8_epilogue: int32 (M, N)");
  const int64_t M = acc.size(0), N = acc.size(1);
  auto f32 = [](const torch::Tensor& t) { return t.is_contiguous() && t.scalar_type() == at::kFloat; };
  TORCH_CHECK(f32(x_scale) && x_scale.numel() == M && f32(w_scale) && w_scale.numel() == N,
              "int8_epilogue: float32 scales (M) and (N)");
  TORCH_CHECK(bias.numel() == 0 || (f32(bias) && bias.numel() == N), "int8_epilogue: float32 bias (N)");
  TORCH_CHECK(residual.numel() == 0 || (f32(residual) && residual.numel() == M * N), "int8_epilogue: float32 residual (M, N)");
  auto y = torch::empty({M, N}, acc.options().dtype(at::kFloat));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *xs = x_scale.data_ptr<float>(), *ws = w_scale.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* rp = residual.numel() ? residual.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t level = std::min(isa, detect_isa());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* res = rp ? rp + m * N : nullptr;
#ifdef DL_X86
      if (level >= kAvx2 && gelu) { dequant_gelu_row_avx2(ap + m * N, xs[m], ws, bp, res, N, yp + m * N); continue; }
      if (level >= kAvx512) { dequant_row_avx512(ap + m * N, xs[m], ws, bp, gelu, res, N, yp + m * N); continue; }
      if (level >= kAvx2) { dequant_row_avx2(ap + m * N, xs[m], ws, bp, gelu, res, N, yp + m * N); continue; }
#endif
      dequant_row(ap + m * N, xs[m], ws, bp, gelu, res, N, yp + m * N);
    }
  });
  return y;
}

// ---- quantized weights as a float matrix, for prefill ---------------------------------------------
// Many rows go through one dequantized copy and oneDNN's (AMX) product faster than through any integer
// kernel, but torch's copy (codes to fp32, times the scales, then the cast: three full-size temporaries)
// took 7-10 ms for a 4096 x 768 matrix, more than the product. One pass here, with its numerics: the code
// (minus 8 for symmetric Q4) times the fp16 group scale in fp32, plus the group min (Q4_1), rounded once.
template <typename Out, bool Q4>
void dequant_rows(const uint8_t* w, const uint16_t* ws, const uint16_t* mins, int64_t K, int64_t G, Out* y,
                  int64_t n0, int64_t n1) {
  const int64_t groups = K / G, row_bytes = Q4 ? K / 2 : K;
  const float offset = Q4 && mins == nullptr ? 8.f : 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* out = y + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float d = half_to_float(ws[n * groups + g]), m = mins ? half_to_float(mins[n * groups + g]) : 0.f;
      for (int64_t i = g * G; i < (g + 1) * G; ++i) {
        const float c = Q4 ? static_cast<float>(i % 2 ? row[i / 2] >> 4 : row[i / 2] & 15)
                           : static_cast<float>(static_cast<int8_t>(row[i]));
        out[i] = static_cast<Out>((c - offset) * d + m);
      }
    }
  }
}

#ifdef DL_X86
// The same per 32-code group with AVX-512 (and AVX2 below): codes widened to fp32, the same multiply-add, then the store in
// the output type with the scalar path's rounding (bf16: round to nearest even on the bits; f16: IEEE).
// One group's 32 codes as two vectors of 16 bytes, in element order (Q4: element 2j is byte j's low nibble,
// 2j + 1 its high one; Q8: signed bytes as they are), for both dequantize paths to widen.
template <bool Q4>
T2 inline void group_codes(const uint8_t* row, int64_t i, __m128i c[2]) {
  if constexpr (Q4) {
    const __m128i low = _mm_set1_epi8(15), b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i / 2));
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    c[0] = _mm_unpacklo_epi8(lo, hi);
    c[1] = _mm_unpackhi_epi8(lo, hi);
  } else {
    c[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
    c[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i + 16));
  }
}

// AVX2 + F16C (AVX2 laptops: Zen 3, Intel client CPUs): 8 values per store, the same rounding.
template <typename Out>
T2 inline void store8(Out* y, __m256 v) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm256_storeu_ps(y, v);
  } else if constexpr (std::is_same_v<Out, at::BFloat16>) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), packed);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

template <typename Out, bool Q4>
T2 void dequant_rows_avx2(const uint8_t* w, const uint16_t* ws, const uint16_t* mins, int64_t K, int64_t G, Out* y,
                          int64_t n0, int64_t n1) {
  const int64_t groups = K / G, row_bytes = Q4 ? K / 2 : K;
  const __m256 offset = _mm256_set1_ps(Q4 && mins == nullptr ? 8.f : 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* out = y + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 d = _mm256_set1_ps(half_to_float(ws[n * groups + g]));
      const __m256 m = _mm256_set1_ps(mins ? half_to_float(mins[n * groups + g]) : 0.f);
      for (int64_t i = g * G; i < (g + 1) * G; i += 32) {
        __m128i c[2];
        group_codes<Q4>(row, i, c);
        for (int h = 0; h < 2; ++h)
          for (int q = 0; q < 2; ++q) {
            const __m128i part = q ? _mm_srli_si128(c[h], 8) : c[h];
            const __m256i wide = Q4 ? _mm256_cvtepu8_epi32(part) : _mm256_cvtepi8_epi32(part);
            const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(wide), offset), d), m);
            store8(out + i + 16 * h + 8 * q, v);
          }
      }
    }
  }
}

template <typename Out>
T512 inline void store16(Out* y, __m512 v) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm512_storeu_ps(y, v);
  } else if constexpr (std::is_same_v<Out, at::BFloat16>) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

template <typename Out, bool Q4>
T512 void dequant_rows_avx512(const uint8_t* w, const uint16_t* ws, const uint16_t* mins, int64_t K, int64_t G,
                              Out* y, int64_t n0, int64_t n1) {
  const int64_t groups = K / G, row_bytes = Q4 ? K / 2 : K;
  const __m512 offset = _mm512_set1_ps(Q4 && mins == nullptr ? 8.f : 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* out = y + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 d = _mm512_set1_ps(half_to_float(ws[n * groups + g]));
      const __m512 m = _mm512_set1_ps(mins ? half_to_float(mins[n * groups + g]) : 0.f);
      for (int64_t i = g * G; i < (g + 1) * G; i += 32) {
        __m128i c[2];
        group_codes<Q4>(row, i, c);
        const __m512i c0 = Q4 ? _mm512_cvtepu8_epi32(c[0]) : _mm512_cvtepi8_epi32(c[0]);
        const __m512i c1 = Q4 ? _mm512_cvtepu8_epi32(c[1]) : _mm512_cvtepi8_epi32(c[1]);
        // (c - offset) * d + m rounded twice, as torch does (the build turns off contraction into FMA)
        store16(out + i, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c0), offset), d), m));
        store16(out + i + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c1), offset), d), m));
      }
    }
  }
}
#endif

// (N, K) in `wtype`'s dtype (0 f32, 1 bf16, 2 f16) from Q8 (int8) or Q4 (uint8 nibble pairs, low first)
// codes with fp16 scales (N, K / G) and, for asymmetric Q4, fp16 mins of the same shape (else empty).
torch::Tensor dequantize(torch::Tensor w, torch::Tensor scales, torch::Tensor mins, bool q4, int64_t wtype, int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == (q4 ? at::kByte : at::kChar),
              "dequantize: contiguous codes, int8 (Q8) or uint8 (Q4)");
  const int64_t N = w.size(0), K = q4 ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kHalf &&
                  scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0,
              "dequantize: contiguous float16 scales (N, K / G)");
  TORCH_CHECK(mins.numel() == 0 || (q4 && mins.sizes() == scales.sizes() && mins.is_contiguous() &&
                                    mins.scalar_type() == at::kHalf), "dequantize: mins like the scales, Q4 only");
  TORCH_CHECK(wtype == kF32 || wtype == kBF16 || wtype == kF16, "dequantize: the output is f32, bf16 or f16");
  const auto dtype = wtype == kF32 ? at::kFloat : wtype == kBF16 ? at::kBFloat16 : at::kHalf;
  auto y = torch::empty({N, K}, w.options().dtype(dtype));
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mp = mins.numel() ? reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()) : nullptr;
  const int64_t G = K / scales.size(1);
  const int64_t level = std::min(isa, detect_isa());
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    DL_DISPATCH(dtype, "dequantize", [&] {
      auto* yp = y.data_ptr<scalar_t>();
#ifdef DL_X86
      if (level >= kAvx512 && G % kBlock == 0) {
        if (q4) dequant_rows_avx512<scalar_t, true>(wp, sp, mp, K, G, yp, n0, n1);
        else dequant_rows_avx512<scalar_t, false>(wp, sp, mp, K, G, yp, n0, n1);
        return;
      }
      if (level >= kAvx2 && G % kBlock == 0) {
        if (q4) dequant_rows_avx2<scalar_t, true>(wp, sp, mp, K, G, yp, n0, n1);
        else dequant_rows_avx2<scalar_t, false>(wp, sp, mp, K, G, yp, n0, n1);
        return;
      }
#endif
      if (q4) dequant_rows<scalar_t, true>(wp, sp, mp, K, G, yp, n0, n1);
      else dequant_rows<scalar_t, false>(wp, sp, mp, K, G, yp, n0, n1);
    });
  });
  return y;
}


// ---- a whole decode step of the layer stack ------------------------------------------------------
// One call runs every layer for the decode rows: the ~25 torch ops a layer costs from Python (each a
// few microseconds, 4-6 ms a token at 12 layers) become C++ loops over row buffers the step owns. (As ATen
// calls from C++ — conversions, views, cache copies — they were still ~50 a layer: 1.0 of the 3.1 ms of a
// q4_0 134M token besides its products, 2 threads on a Zen 4.) The numerics are those of the ops one by one.
// Per layer, `weights` holds 12 tensors: attention norm, wqkv (weight, scales), wo (weight, scales), ffn norm,
// w13 (weight, scales), w2 (weight, scales), cache k, cache v; `kinds` the 4 linears' weight types (0 float,
// 3 Q8, 4 Q4). Row i of h decodes into cache row row0 + i at position positions[i].
template <typename T>
struct StepRows {  // a step's buffers, reused by every layer
  std::vector<float> xf, y;
  std::vector<T> xn, qkv, attn, gate_up, act, out;
};

// out (n, N) = x (n, K) @ W.T rounded to T, as gemv returns it.
template <typename T>
void product_rows(const T* x, int64_t n, int64_t K, const torch::Tensor& w, const torch::Tensor& s, int64_t wtype,
                  int64_t isa, bool avx2, StepRows<T>& b, std::vector<T>& out) {
  check_weight(K, w, s, wtype);
  const int64_t N = w.size(0);
  out.resize(n * N);
  if constexpr (std::is_same_v<T, float>) {
    return product(x, n, K, w, s, wtype, out.data(), isa);
  } else {
    b.y.resize(n * N);
#ifdef DL_X86
    if (std::is_same_v<T, c10::BFloat16> && takes_bf16_dot(at::kBFloat16, w, wtype, isa)) {
      bf16_product(reinterpret_cast<const uint16_t*>(x), n, K, w, b.y.data());
      return store_row(b.y.data(), out.data(), n * N, avx2);
    }
#endif
    b.xf.resize(n * K);
    load_row(x, b.xf.data(), n * K, avx2);
    product(b.xf.data(), n, K, w, s, wtype, b.y.data(), isa);
    store_row(b.y.data(), out.data(), n * N, avx2);
  }
}

// h += y in T: each sum in fp32, rounded to T, as torch adds two T tensors.
template <typename T>
void add_rows(T* h, const T* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) h[i] = from_f<T>(to_f(h[i]) + to_f(y[i]));
}

// The k and v heads of qkv row i into cache row row0 + i at positions[i] (cache (B, Hkv, L, d) of type C).
template <typename T, typename C>
void write_cache(const T* qkv, int64_t width, const Heads& s, const int64_t* pos, int64_t row0, C* k, C* v) {
  for (int64_t i = 0; i < s.n; ++i)
    for (int64_t j = 0; j < s.Hkv; ++j) {
      const T* src = qkv + i * width + (s.H + j) * s.d;
      const int64_t at = (((row0 + i) * s.Hkv + j) * s.L + pos[i]) * s.d;
      for (int64_t e = 0; e < s.d; ++e) {
        k[at + e] = from_f<C>(to_f(src[e]));
        v[at + e] = from_f<C>(to_f(src[s.Hkv * s.d + e]));
      }
    }
}

template <typename T>
void decode_step(T* h, int64_t n, int64_t dim, const std::vector<torch::Tensor>& weights, const int64_t* kinds,
                 const int64_t* pos, int64_t row0, const float* rot, bool one_rot, int64_t n_heads, int64_t n_kv,
                 float eps, int64_t isa) {
  const int64_t hd = dim / n_heads, width = (n_heads + 2 * n_kv) * hd;
  const bool avx2 = has_avx2(isa);
  std::vector<int64_t> lengths(pos, pos + n);
  for (auto& l : lengths) ++l;
  StepRows<T> b;
  b.xn.resize(n * dim);
  for (size_t l = 0; l < weights.size() / 12; ++l) {
    const torch::Tensor* w = weights.data() + l * 12;
    const int64_t* kind = kinds + l * 4;
    const torch::Tensor &k_cache = w[10], &v_cache = w[11];
    const Heads hs{n, n_heads, hd, n_kv, k_cache.size(2), width, hd};
    rmsnorm_rows(h, w[0].data_ptr<T>(), n, dim, eps, avx2, b.xn.data());
    product_rows(b.xn.data(), n, dim, w[1], w[2], kind[0], isa, avx2, b, b.qkv);
    TORCH_CHECK(b.qkv.size() == static_cast<size_t>(n * width), "decode_layers: wqkv has ", b.qkv.size() / n,
                " rows, not (heads + 2 kv heads) * head_dim = ", width);
    rope_rows(b.qkv.data(), n, width, n_heads + n_kv, hd, rot, one_rot, avx2);
    DL_DISPATCH(k_cache.scalar_type(), "decode_layers_cache", [&] {
      write_cache(b.qkv.data(), width, hs, pos, row0, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
      b.attn.resize(n * n_heads * hd);
      attend_rows(b.qkv.data(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), hs, lengths.data(), row0,
                  avx2, b.attn.data());
    });
    product_rows(b.attn.data(), n, n_heads * hd, w[3], w[4], kind[1], isa, avx2, b, b.out);
    TORCH_CHECK(b.out.size() == static_cast<size_t>(n * dim), "decode_layers: wo does not give dim rows");
    add_rows(h, b.out.data(), n * dim);
    rmsnorm_rows(h, w[5].data_ptr<T>(), n, dim, eps, avx2, b.xn.data());
    product_rows(b.xn.data(), n, dim, w[6], w[7], kind[2], isa, avx2, b, b.gate_up);
    const int64_t hidden = b.gate_up.size() / n / 2;
    b.act.resize(n * hidden);
    silu_mul_rows(b.gate_up.data(), n, hidden, avx2, b.act.data());
    product_rows(b.act.data(), n, hidden, w[8], w[9], kind[3], isa, avx2, b, b.out);
    TORCH_CHECK(b.out.size() == static_cast<size_t>(n * dim), "decode_layers: w2 does not give dim rows");
    add_rows(h, b.out.data(), n * dim);
  }
}

// The tensors' shapes and types, once per step, so that decode_step only reads memory it was given.
void check_layers(const torch::Tensor& h, const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                  const torch::Tensor& positions, int64_t row0, const torch::Tensor& rot, int64_t n_heads, int64_t n_kv) {
  const auto t = h.scalar_type();
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decode_layers: h must be contiguous (n, dim)");
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "decode_layers: h must be f32, bf16 or f16");
  TORCH_CHECK(weights.size() % 12 == 0 && kinds.size() == weights.size() / 12 * 4, "decode_layers: 12 tensors and 4 kinds a layer");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == h.size(0) &&
                  positions.is_contiguous(), "decode_layers: int64 positions (n)");
  const int64_t n = h.size(0), dim = h.size(1), hd = dim / n_heads;
  TORCH_CHECK(n_heads > 0 && n_kv > 0 && dim % n_heads == 0 && n_heads % n_kv == 0 && hd % 2 == 0,
              "decode_layers: heads do not divide dim");
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.is_contiguous() && rot.dim() == 3 &&
                  (rot.size(0) == n || rot.size(0) == 1) && rot.size(1) == hd / 2 && rot.size(2) == 2,
              "decode_layers: rot must be contiguous float32 (n or 1, head_dim / 2, 2)");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (size_t l = 0; l < weights.size() / 12; ++l) {
    const torch::Tensor* w = weights.data() + l * 12;
    for (int i : {0, 5})
      TORCH_CHECK(w[i].scalar_type() == t && w[i].is_contiguous() && w[i].numel() == dim,
                  "decode_layers: norm weights (dim) in h's dtype");
    const torch::Tensor &k = w[10], &v = w[11];
    TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                    k.scalar_type() == v.scalar_type() && k.size(1) == n_kv && k.size(3) == hd,
                "decode_layers: contiguous caches (B, kv heads, L, head_dim)");
    TORCH_CHECK(row0 >= 0 && row0 + n <= k.size(0), "decode_layers: rows out of the cache");
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(pos[i] >= 0 && pos[i] < k.size(2), "decode_layers: a position is out of the cache");
  }
}

torch::Tensor decode_layers(torch::Tensor h, const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                            torch::Tensor positions, int64_t row0, torch::Tensor rot, int64_t n_heads, int64_t n_kv,
                            double eps, int64_t isa) {
  check_layers(h, weights, kinds, positions, row0, rot, n_heads, n_kv);
  isa = std::min(isa, detect_isa());
  auto out = h.clone();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float e = static_cast<float>(eps);
  const bool one = rot.size(0) == 1;
  if (h.scalar_type() == at::kFloat)
    decode_step(out.data_ptr<float>(), h.size(0), h.size(1), weights, kinds.data(), pos, row0, rot.data_ptr<float>(), one,
                n_heads, n_kv, e, isa);
  else if (h.scalar_type() == at::kBFloat16)
    decode_step(out.data_ptr<c10::BFloat16>(), h.size(0), h.size(1), weights, kinds.data(), pos, row0,
                rot.data_ptr<float>(), one, n_heads, n_kv, e, isa);
  else
    decode_step(out.data_ptr<c10::Half>(), h.size(0), h.size(1), weights, kinds.data(), pos, row0, rot.data_ptr<float>(),
                one, n_heads, n_kv, e, isa);
  return out;
}

}  // namespace

// Every entry point runs without the GIL: a decode step's products take tens of milliseconds, in which
// the server's other threads stream the last step's tokens and parse new requests.
template <typename F>
void def(py::module_& m, const char* name, F&& f, const char* doc) {
  m.def(name, std::forward<F>(f), doc, py::call_guard<py::gil_scoped_release>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  def(m, "gemv", gemv, "y = x @ W.T for few rows of x (float, Q8 or Q4 weights)");
  def(m, "best_isa", detect_isa, "0 scalar, 1 AVX2+FMA, 2 AVX-512 with VNNI");
  def(m, "is_amd", is_amd, "an AMD CPU: prompts take the tiled AVX2 product on AVX-512 too");
  def(m, "has_bf16_dot", has_bf16_dot, "AVX512-BF16: bf16 x bf16 products for bf16 models");
  def(m, "rmsnorm", rmsnorm, "Llama's RMSNorm of the last dimension");
  def(m, "rope_qk_", rope_qk_, "rotary embedding in place on the first `heads` heads of each row");
  def(m, "silu_mul", silu_mul, "silu(gate) * up of [gate | up]");
  def(m, "decode_attention", decode_attention, "one query per sequence against its KV cache row");
  def(m, "quantize_rows", quantize_rows, "per-row symmetric int8 quantization: (codes, scales)");
  def(m, "int8_epilogue", int8_epilogue, "int32 products to float: scales, bias, GELU, residual in one pass");
  def(m, "dequantize", dequantize, "Q8/Q4 codes and scales to a float matrix, in one pass");
  def(m, "decode_layers", decode_layers, "every layer of a decode step for the decode rows");
}
