// oneshot's CPU kernels, the part with no torch in it: y[M, N] = x[M, K] . W[N, K]^T for a dense weight
// and for a bitmask weight, three paths (AVX-512, AVX2, scalar). Included by cpu_kernels.cpp (the torch
// extension) and by benchmarks/kernels/cpu_gemv.cpp (a standalone binary for callgrind's counts).
#pragma once
#include <immintrin.h>

#include <algorithm>

#include <cstdint>
#include <cstring>

namespace oneshot_cpu {


enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
enum WType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi2"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return AVX2;
  return SCALAR;
}

// ------------------------------------------------------------------ scalar (portable, the reference)

inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int WT>
inline float wload(const void* p, int64_t i) {
  if (WT == F32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (WT == F16) return half_to_float(h);
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int WT>
__attribute__((noinline)) void dense_scalar(const void* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp,
                  int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++)
    for (int64_t m = 0; m < M; m++) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; k++) acc += wload<WT>(w, r * K + k) * x[m * Kp + k];
      y[m * N + r] = acc;
    }
}

// ------------------------------------------------------------------ AVX2 + FMA + F16C

struct Lut {  // per mask byte: where each column's value sits among the byte's kept values, and which lanes keep
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
  // bf16: one vpshufb turns the byte's kept values (16 bytes, broadcast to both 128-bit lanes) into the 8
  // columns as fp32 (a bf16 is the top half of its fp32), zeros where pruned (0x80 selects zero)
  alignas(32) uint8_t shuf[256][32];
  Lut() {
    for (int m = 0; m < 256; m++) {
      int count = 0;
      for (int j = 0; j < 8; j++) {
        bool on = m >> j & 1;
        idx[m][j] = on ? count : 0;
        keep[m][j] = on ? -1 : 0;
        uint8_t* out = shuf[m] + 4 * j;  // column j: lane j / 4, dword j % 4
        out[0] = out[1] = 0x80;
        out[2] = on ? (uint8_t)(2 * count) : 0x80;
        out[3] = on ? (uint8_t)(2 * count + 1) : 0x80;
        count += on;
      }
    }
  }
};
const Lut LUT;

template <int WT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* p, int64_t i) {
  if (WT == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (WT == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows at a time, MT rows of x each; x padded with zeros to Kp (a multiple of 32) columns.
template <int WT, int R, int MT>
__attribute__((target("avx2,fma,f16c"))) void dense_avx2_block(const void* w, const float* x, float* y, int64_t N,
                                                                int64_t K, int64_t Kp, int64_t r, int64_t m0) {
  __m256 acc[R][MT];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < MT; j++) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int i = 0; i < R; i++) {
      __m256 wv = load8<WT>(w, (r + i) * K + k);
      for (int j = 0; j < MT; j++) acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + j) * Kp + k), acc[i][j]);
    }
  }
  for (int i = 0; i < R; i++)
    for (int j = 0; j < MT; j++) {
      float s = hsum8(acc[i][j]);
      for (int64_t t = k; t < K; t++) s += wload<WT>(w, (r + i) * K + t) * x[(m0 + j) * Kp + t];
      y[(m0 + j) * N + r + i] = s;
    }
}

template <int WT>
__attribute__((target("avx2,fma,f16c"), noinline)) void dense_avx2(const void* w, const float* x, float* y, int64_t M,
                                                          int64_t N, int64_t K, int64_t Kp, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < M;) {
    int64_t left = M - m0;
    int64_t r = r0;
    if (left >= 4) {
      for (; r + 2 <= r1; r += 2) dense_avx2_block<WT, 2, 4>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx2_block<WT, 1, 4>(w, x, y, N, K, Kp, r, m0);
      m0 += 4;
    } else if (left >= 2) {
      for (; r + 4 <= r1; r += 4) dense_avx2_block<WT, 4, 2>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx2_block<WT, 1, 2>(w, x, y, N, K, Kp, r, m0);
      m0 += 2;
    } else {
      for (; r + 4 <= r1; r += 4) dense_avx2_block<WT, 4, 1>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx2_block<WT, 1, 1>(w, x, y, N, K, Kp, r, m0);
      m0 += 1;
    }
  }
}

// ------------------------------------------------------------------ AVX-512 (F, BW, VBMI2)

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt")))

template <int WT>
T512 inline __m512 widen16(__m256i h) {  // 16 16-bit weights -> fp32
  if (WT == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int WT>
T512 inline __m512 load16(const void* p, int64_t i) {
  if (WT == F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  return widen16<WT>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
}

template <int WT, int R, int MT>
T512 void dense_avx512_block(const void* w, const float* x, float* y, int64_t N, int64_t K, int64_t Kp, int64_t r,
                             int64_t m0) {
  __m512 acc[R][MT];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int i = 0; i < R; i++) {
      __m512 wv = load16<WT>(w, (r + i) * K + k);
      for (int j = 0; j < MT; j++) acc[i][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (m0 + j) * Kp + k), acc[i][j]);
    }
  for (int i = 0; i < R; i++)
    for (int j = 0; j < MT; j++) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t t = k; t < K; t++) s += wload<WT>(w, (r + i) * K + t) * x[(m0 + j) * Kp + t];
      y[(m0 + j) * N + r + i] = s;
    }
}

template <int WT>
T512 __attribute__((noinline)) void dense_avx512(const void* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp,
                       int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < M;) {
    int64_t left = M - m0;
    int64_t r = r0;
    if (left >= 4) {
      for (; r + 4 <= r1; r += 4) dense_avx512_block<WT, 4, 4>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx512_block<WT, 1, 4>(w, x, y, N, K, Kp, r, m0);
      m0 += 4;
    } else if (left >= 2) {
      for (; r + 4 <= r1; r += 4) dense_avx512_block<WT, 4, 2>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx512_block<WT, 1, 2>(w, x, y, N, K, Kp, r, m0);
      m0 += 2;
    } else {
      for (; r + 4 <= r1; r += 4) dense_avx512_block<WT, 4, 1>(w, x, y, N, K, Kp, r, m0);
      for (; r < r1; r++) dense_avx512_block<WT, 1, 1>(w, x, y, N, K, Kp, r, m0);
      m0 += 1;
    }
  }
}

// x [M, Kp] in the column order bitmask_avx512<BF16> reads (Kp a multiple of 32)
inline void permute_x_bf16(const float* x, float* out, int64_t M, int64_t Kp) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < Kp; g += 32)
      for (int half = 0; half < 2; half++)
        for (int lane = 0; lane < 4; lane++)
          for (int j = 0; j < 4; j++) out[m * Kp + g + half * 16 + lane * 4 + j] = x[m * Kp + g + lane * 8 + half * 4 + j];
}

// ------------------------------------------------------------------ the blocked bitmask layout and its kernels
//
// Built once per weight from the canonical parts (kept values row by row + the [N, ceil(K/8)] mask): rows in
// blocks of 4 (N padded with empty rows), and for each group of 32 columns of a block, 16 bytes of mask (one
// little-endian 32-bit word per row, column j of the group in bit j) followed by the group's kept values of
// row 0, then 1, 2, 3. A block is one sequential stream (the prefetchers follow it; four rows read with one
// x load), each row's values start where the popcounts of the words before it say, and the end is padded
// so whole-vector loads never fault. A side table holds each group's byte offset within its block: without
// it the next group's address waits on this group's mask words (load, popcount, add: a chain through the
// whole stream, which measured ~10 cycles a group and made the kernels latency-bound, not byte-bound).

constexpr int64_t ROWS = 4, GROUP_COLS = 32, PAD = 64;

inline int64_t groups_of(int64_t K) { return (K + GROUP_COLS - 1) / GROUP_COLS; }

inline uint32_t group_word(const uint8_t* mrow, int64_t ldm, int64_t g) {
  uint32_t w = 0;
  const int64_t c = g * 4, n = std::min<int64_t>(4, ldm - c);
  if (n > 0) std::memcpy(&w, mrow + c, n);
  return w;
}

// bytes of every block (blocks = ceil(N/4)), from the mask alone
inline void blocked_sizes(const uint8_t* mask, int64_t ldm, int64_t N, int64_t K, int64_t es, int64_t b0, int64_t b1,
                          int64_t* sizes) {
  const int64_t G = groups_of(K);
  for (int64_t b = b0; b < b1; b++) {
    int64_t kept = 0;
    for (int i = 0; i < ROWS && b * ROWS + i < N; i++)
      for (int64_t c = 0; c < ldm; c++) kept += __builtin_popcount(mask[(b * ROWS + i) * ldm + c]);
    sizes[b] = G * 16 + kept * es;
  }
}

inline void blocked_fill(const uint8_t* values, const uint8_t* mask, int64_t ldm, const int64_t* row_ptr, int64_t N,
                         int64_t K, int64_t es, const int64_t* start, uint8_t* out, uint32_t* goff, int64_t b0,
                         int64_t b1) {
  const int64_t G = groups_of(K);
  for (int64_t b = b0; b < b1; b++) {
    uint8_t* const base = out + start[b];
    uint8_t* p = base;
    int64_t off[ROWS];
    for (int i = 0; i < ROWS; i++) off[i] = b * ROWS + i < N ? row_ptr[b * ROWS + i] : 0;
    for (int64_t g = 0; g < G; g++) {
      goff[b * G + g] = (uint32_t)(p - base);
      uint32_t w[ROWS] = {0, 0, 0, 0};
      for (int i = 0; i < ROWS; i++)
        if (b * ROWS + i < N) w[i] = group_word(mask + (b * ROWS + i) * ldm, ldm, g);
      std::memcpy(p, w, 16);
      p += 16;
      for (int i = 0; i < ROWS; i++) {
        const int64_t n = __builtin_popcount(w[i]);
        std::memcpy(p, values + off[i] * es, n * es);
        p += n * es;
        off[i] += n;
      }
    }
  }
}

template <int WT>
__attribute__((noinline)) void blocked_scalar(const uint8_t* data, const int64_t* start, const uint32_t* goff, const float* x, float* y,
                                              int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t b0, int64_t b1) {
  const int64_t G = groups_of(K), es = WT == F32 ? 4 : 2;
  for (int64_t b = b0; b < b1; b++) {
    for (int64_t m = 0; m < M; m++) {
      const uint8_t* p = data + start[b];
      float acc[ROWS] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t g = 0; g < G; g++) {
        uint32_t w[ROWS];
        std::memcpy(w, p, 16);
        p += 16;
        for (int i = 0; i < ROWS; i++) {
          int64_t n = 0;
          for (int j = 0; j < 32; j++)
            if (w[i] >> j & 1) acc[i] += wload<WT>(p, n++) * x[m * Kp + g * 32 + j];
          p += n * es;
        }
      }
      for (int i = 0; i < ROWS; i++)
        if (b * ROWS + i < N) y[m * N + b * ROWS + i] = acc[i];
    }
  }
}

// 8 columns (one mask byte) as fp32 from their kept values at p, zeros where pruned
template <int WT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 byte8(const uint8_t* p, unsigned mb) {
  if (WT == BF16)
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                                   _mm256_load_si256(reinterpret_cast<const __m256i*>(LUT.shuf[mb]))));
  __m256 wv = load8<WT>(p, 0);
  wv = _mm256_permutevar8x32_ps(wv, _mm256_load_si256(reinterpret_cast<const __m256i*>(LUT.idx[mb])));
  return _mm256_and_ps(wv, _mm256_load_ps(reinterpret_cast<const float*>(LUT.keep[mb])));
}

// NB blocks at once: NB sequential streams per thread instead of one, so more of the weight's bytes are in
// flight (one stream per thread measured ~11 GB/s cold against dense's four-row 17 GB/s on the same cores)
template <int WT, int MT, int NB>
__attribute__((target("avx2,fma,f16c,popcnt"))) void blocked_avx2_block(const uint8_t* data, const int64_t* start, const uint32_t* goff,
                                                                         const float* x, float* y, int64_t N,
                                                                         int64_t K, int64_t Kp, int64_t b, int64_t m0) {
  const int64_t G = groups_of(K), es = WT == F32 ? 4 : 2;
  __m256 acc[NB][ROWS][MT];
  for (int n = 0; n < NB; n++)
    for (int i = 0; i < ROWS; i++)
      for (int j = 0; j < MT; j++) acc[n][i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const float* xk = x + m0 * Kp + g * 32;
    for (int n = 0; n < NB; n++) {
      const uint8_t* p = data + start[b + n] + goff[(b + n) * G + g];  // no chain from one group to the next
      uint32_t w[ROWS];
      std::memcpy(w, p, 16);
      const uint8_t* row = p + 16;
      for (int i = 0; i < ROWS; i++) {
        const uint32_t wi = w[i];
        for (int c = 0; c < 4; c++) {
          const unsigned mb = (wi >> (8 * c)) & 0xFF;
          const uint8_t* q = row + es * __builtin_popcount(wi & ((1u << (8 * c)) - 1u));  // c = 0: 0 (no shift by 32)
          __m256 wv = byte8<WT>(q, mb);
          for (int j = 0; j < MT; j++) acc[n][i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + j * Kp + c * 8), acc[n][i][j]);
        }
        row += es * __builtin_popcount(wi);
      }
    }
  }
  for (int n = 0; n < NB; n++)
    for (int i = 0; i < ROWS; i++)
      if ((b + n) * ROWS + i < N)
        for (int j = 0; j < MT; j++) y[(m0 + j) * N + (b + n) * ROWS + i] = hsum8(acc[n][i][j]);
}

template <int WT>
__attribute__((target("avx2,fma,f16c,popcnt"), noinline)) void blocked_avx2(const uint8_t* data, const int64_t* start, const uint32_t* goff,
                                                                             const float* x, float* y, int64_t M,
                                                                             int64_t N, int64_t K, int64_t Kp,
                                                                             int64_t b0, int64_t b1) {
  int64_t b = b0;
#ifndef ONESHOT_NB2
#define ONESHOT_NB2 2
#endif
  if (M == 1 && ONESHOT_NB2 > 1)
    for (; b + ONESHOT_NB2 <= b1; b += ONESHOT_NB2) blocked_avx2_block<WT, 1, ONESHOT_NB2>(data, start, goff, x, y, N, K, Kp, b, 0);
  for (; b < b1; b++)
    for (int64_t m0 = 0; m0 < M;) {
      if (M - m0 >= 2) {
        blocked_avx2_block<WT, 2, 1>(data, start, goff, x, y, N, K, Kp, b, m0);
        m0 += 2;
      } else {
        blocked_avx2_block<WT, 1, 1>(data, start, goff, x, y, N, K, Kp, b, m0);
        m0 += 1;
      }
    }
}

template <int WT, int MT, int NB>
T512 void blocked_avx512_block(const uint8_t* data, const int64_t* start, const uint32_t* goff, const float* x, float* y, int64_t N,
                               int64_t K, int64_t Kp, int64_t b, int64_t m0) {
  const int64_t G = groups_of(K), es = WT == F32 ? 4 : 2;
  __m512 acc[NB][ROWS][MT];
  for (int n = 0; n < NB; n++)
    for (int i = 0; i < ROWS; i++)
      for (int j = 0; j < MT; j++) acc[n][i][j] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g = 0; g < G; g++) {
    const float* xk = x + m0 * Kp + g * 32;
    for (int n = 0; n < NB; n++) {
      const uint8_t* p = data + start[b + n] + goff[(b + n) * G + g];  // no chain from one group to the next
      uint32_t w[ROWS];
      std::memcpy(w, p, 16);
      const uint8_t* row = p + 16;
      for (int i = 0; i < ROWS; i++) {
        const uint32_t wi = w[i];
        __m512 lo, hi;
        if (WT == F32) {
          lo = _mm512_loadu_ps(row);
          hi = _mm512_loadu_ps(row + 4 * __builtin_popcount(wi & 0xFFFF));
          asm("" : "+v"(lo), "+v"(hi));  // the register form of vexpandps (see below)
          lo = _mm512_maskz_expand_ps((__mmask16)wi, lo);
          hi = _mm512_maskz_expand_ps((__mmask16)(wi >> 16), hi);
        } else {
          __m512i h = _mm512_loadu_si512(row);
          asm("" : "+v"(h));  // keep the register form: compilers fold the load into vpexpandw's memory form, slow on Zen 4
          h = _mm512_maskz_expand_epi16((__mmask32)wi, h);
          if (WT == BF16) {  // interleaving with zeros widens a bf16 to its fp32; x comes in that order (permute_x_bf16)
            lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, h));
            hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, h));
          } else {
            lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
          }
        }
        for (int j = 0; j < MT; j++) {
          acc[n][i][j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xk + j * Kp), acc[n][i][j]);
          acc[n][i][j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xk + j * Kp + 16), acc[n][i][j]);
        }
        row += es * __builtin_popcount(wi);
      }
    }
  }
  for (int n = 0; n < NB; n++)
    for (int i = 0; i < ROWS; i++)
      if ((b + n) * ROWS + i < N)
        for (int j = 0; j < MT; j++) y[(m0 + j) * N + (b + n) * ROWS + i] = _mm512_reduce_add_ps(acc[n][i][j]);
}

#ifndef ONESHOT_NB512
#define ONESHOT_NB512 2
#endif

template <int WT>
T512 __attribute__((noinline)) void blocked_avx512(const uint8_t* data, const int64_t* start, const uint32_t* goff, const float* x, float* y,
                                                   int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t b0,
                                                   int64_t b1) {
  constexpr int NB = ONESHOT_NB512;
  int64_t b = b0;
  if (M <= 2 && NB > 1)
    for (; b + NB <= b1; b += NB) {
      if (M == 2) blocked_avx512_block<WT, 2, NB>(data, start, goff, x, y, N, K, Kp, b, 0);
      else blocked_avx512_block<WT, 1, NB>(data, start, goff, x, y, N, K, Kp, b, 0);
    }
  for (; b < b1; b++)
    for (int64_t m0 = 0; m0 < M;) {
      if (M - m0 >= 4) {
        blocked_avx512_block<WT, 4, 1>(data, start, goff, x, y, N, K, Kp, b, m0);
        m0 += 4;
      } else if (M - m0 >= 2) {
        blocked_avx512_block<WT, 2, 1>(data, start, goff, x, y, N, K, Kp, b, m0);
        m0 += 2;
      } else {
        blocked_avx512_block<WT, 1, 1>(data, start, goff, x, y, N, K, Kp, b, m0);
        m0 += 1;
      }
    }
}

}  // namespace oneshot_cpu
