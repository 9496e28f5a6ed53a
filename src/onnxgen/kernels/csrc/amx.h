// The GEMM core's path for bf16 weights on CPUs with AMX (Intel Sapphire Rapids and later):
// C[0:m, 0:n] = A[0:m, 0:K] @ B[0:K, 0:n], A's rows rounded to bf16, products summed in fp32 by
// the tile unit (tdpbf16ps: a 16 x 32 by 32 x 16 block product per instruction, sixteen times
// the work of an AVX-512 FMA).
//
// Per call: A's rows are converted to bf16 once (zero padded to whole tiles); B's tile of up to
// 512 columns is read once, row by row, and repacked into the tile unit's layout (pairs of K
// rows interleaved, 16 columns per tile row); then each 32 x 32 block of C is four tile
// accumulators over the whole K.  ONNXGEN_NO_AMX=1 turns the path off (tests use it).
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace onnxgen {
namespace amx {

// AMX-TILE and AMX-BF16 in CPUID, and the kernel's permission to use the tile state (Linux grants
// it per process on request).
inline bool available() {
  static const bool yes = [] {
    const char* off = std::getenv("ONNXGEN_NO_AMX");
    if (off && *off && std::string(off) != "0") return false;
    if (!has_avx512()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!tile || !bf16) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return yes;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C accumulators (16 x 16 fp32); 4-5: A (16 rows x 32 bf16); 6-7: B (16 pairs of K
// rows x 16 columns, interleaved).  Every tile is 16 rows of 64 bytes.
#define ONNXGEN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

// Sixteen floats rounded (to nearest even) to bf16.
ONNXGEN_AMX inline __m256i f32x16_to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

ONNXGEN_AMX inline void configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

inline uint16_t* scratch16(int slot, int64_t n) {
  thread_local std::vector<uint16_t> buffers[2];
  std::vector<uint16_t>& b = buffers[slot];
  if (b.size() < size_t(n)) b.resize(size_t(n));
  return b.data();
}

// a[r * kp + k] = bf16(A[r][k]) for r < m, k < K; zero up to kp columns and mp rows.
ONNXGEN_AMX inline void stage_rows(const float* const* A, int64_t m, int64_t K, int64_t mp, int64_t kp, uint16_t* a) {
  for (int64_t r = 0; r < mp; ++r) {
    uint16_t* dst = a + r * kp;
    if (r >= m) {
      std::memset(dst, 0, size_t(kp) * 2);
      continue;
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), f32x16_to_bf16(_mm512_loadu_ps(A[r] + k)));
    if (k < K) {
      const __mmask16 m16 = __mmask16((1u << (K - k)) - 1);
      _mm256_mask_storeu_epi16(dst + k, m16, f32x16_to_bf16(_mm512_maskz_loadu_ps(m16, A[r] + k)));
    }
    std::memset(dst + K, 0, size_t(kp - K) * 2);
  }
}

// b[(c * kp / 2 + p) * 32 + 2j + h] = B[2p + h, 16c + j]: column block c of 16 columns, pair p of
// K rows; zero past K and n.  Each row pair is read once, 32 columns per load.
ONNXGEN_AMX inline void pack_columns(const uint16_t* B, int64_t ldb, int64_t K, int n, int64_t kp, uint16_t* b) {
  alignas(64) static const uint16_t interleave[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                      8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(interleave);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t pairs = kp / 2, blocks = (n + 15) / 16;
  const int64_t lines = (int64_t(n) * 2 + 63) / 64, ahead = 8;  // rows are far apart: prefetch 16 rows on
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* r0 = B + 2 * p * ldb;
    if (2 * (p + ahead) + 1 < K)
      for (int64_t l = 0; l < lines; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + 2 * ahead * ldb) + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(r0 + (2 * ahead + 1) * ldb) + 64 * l, _MM_HINT_T0);
      }
    const bool has0 = 2 * p < K, has1 = 2 * p + 1 < K;
    for (int64_t c = 0; c < blocks; c += 2) {  // 32 columns: blocks c and c + 1
      const int64_t col = 16 * c, left = n - col;
      const __mmask32 m32 = left >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << left) - 1);
      const __m512i x0 = has0 ? _mm512_maskz_loadu_epi16(m32, r0 + col) : _mm512_setzero_si512();
      const __m512i x1 = has1 ? _mm512_maskz_loadu_epi16(m32, r0 + ldb + col) : _mm512_setzero_si512();
      _mm512_storeu_si512(b + (c * pairs + p) * 32, _mm512_permutex2var_epi16(x0, lo, x1));
      if (c + 1 < blocks) _mm512_storeu_si512(b + ((c + 1) * pairs + p) * 32, _mm512_permutex2var_epi16(x0, hi, x1));
    }
  }
}

// One block of C: rows [i0, i0 + 16 * RowTiles), columns [16c, 16c + 16 * ColTiles).
template <int RowTiles, int ColTiles>
ONNXGEN_AMX inline void block(const uint16_t* a, int64_t kp, int64_t i0, const uint16_t* b, int64_t c, float* out) {
  const int64_t pairs = kp / 2;
  _tile_zero(0);
  if (ColTiles > 1) _tile_zero(1);
  if (RowTiles > 1) _tile_zero(2);
  if (RowTiles > 1 && ColTiles > 1) _tile_zero(3);
  for (int64_t k = 0; k < kp; k += 32) {
    _tile_loadd(4, a + i0 * kp + k, kp * 2);
    _tile_loadd(6, b + (c * pairs + k / 2) * 32, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (ColTiles > 1) {
      _tile_loadd(7, b + ((c + 1) * pairs + k / 2) * 32, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (RowTiles > 1) {
      _tile_loadd(5, a + (i0 + 16) * kp + k, kp * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (ColTiles > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  // out: 32 x 32 fp32, row stride 32
  _tile_stored(0, out, 128);
  if (ColTiles > 1) _tile_stored(1, out + 16, 128);
  if (RowTiles > 1) _tile_stored(2, out + 16 * 32, 128);
  if (RowTiles > 1 && ColTiles > 1) _tile_stored(3, out + 16 * 32 + 16, 128);
}

// C[r, 0:n] += nothing, = a @ b: a staged by stage_rows (m rows, kp deep), b packed by
// pack_columns (its first column block at b; n columns); C fp32 with row stride ldc.  Configures
// the tiles and releases them.
ONNXGEN_AMX inline void multiply(const uint16_t* a, int64_t m, int64_t kp, const uint16_t* b, int n, float* C,
                                 int64_t ldc) {
  const int64_t mp = (m + 15) / 16 * 16, blocks = (n + 15) / 16;
  configure();
  alignas(64) float out[32 * 32];
  for (int64_t i0 = 0; i0 < mp; i0 += 32) {
    const bool two_rows = i0 + 16 < mp;
    for (int64_t c = 0; c < blocks; c += 2) {
      const bool two_cols = c + 1 < blocks;
      if (two_rows && two_cols) block<2, 2>(a, kp, i0, b, c, out);
      else if (two_rows) block<2, 1>(a, kp, i0, b, c, out);
      else if (two_cols) block<1, 2>(a, kp, i0, b, c, out);
      else block<1, 1>(a, kp, i0, b, c, out);
      const int64_t rows = std::min<int64_t>(32, m - i0), cols = std::min<int64_t>(32, n - 16 * c);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(C + (i0 + r) * ldc + 16 * c, out + r * 32, size_t(cols) * 4);
    }
  }
  _tile_release();
}

inline int64_t depth(int64_t K) { return (K + 31) / 32 * 32; }    // K padded to whole tiles
inline int64_t rows_padded(int64_t m) { return (m + 15) / 16 * 16; }
// Packed size (elements) of n columns: whole pairs of 16-column blocks, kp deep.
inline int64_t packed_size(int64_t K, int64_t n) { return (n + 31) / 32 * 2 * depth(K) * 16; }

// C[r, 0:n] = sum_k bf16(A[r][k]) * B[k, 0:n] for r < m; B bf16 with row stride ldb; C row
// stride ldc; n <= 512.
ONNXGEN_AMX inline void gemm_tile(const float* const* A, int64_t m, const uint16_t* B, int64_t ldb, int64_t K, int n,
                                  float* C, int64_t ldc) {
  const int64_t kp = depth(K), mp = rows_padded(m);
  uint16_t* a = scratch16(0, mp * kp);
  uint16_t* b = scratch16(1, packed_size(K, n));
  stage_rows(A, m, K, mp, kp, a);
  pack_columns(B, ldb, K, n, kp, b);
  multiply(a, m, kp, b, n, C, ldc);
}

}  // namespace amx
}  // namespace onnxgen
