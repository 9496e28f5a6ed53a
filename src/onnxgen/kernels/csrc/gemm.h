// The GEMM core of the MoE and GroupedMatMul kernels: one column tile of C = A @ B.
//
// A is given as row pointers (fp32, so gathered token rows need no copy); B is a [K, N]
// row-major weight matrix in fp32, fp16 or bf16 (streamed row by row, converted on the fly).
// A tile is at most kMaxNT = 512 columns of B.  B is read in panels of rows: each panel is
// converted once into fp32 (32 KiB, stays in L1) while every block of kMR rows of A runs over
// it in 64-column slices (register-blocked: kMR rows x 64 columns of accumulators); the next
// panel is prefetched (into L2) a few lines per micro-kernel iteration, so the memory traffic
// overlaps the arithmetic.  (Reading fp32 weights in place instead of packing them measured
// the same, so every type takes the one path.)  B's tile is read from memory
// exactly once however many rows A has.
//
// bf16 weights on a CPU with AMX take amx.h's tile path instead (A rounded to bf16).
//
// Two micro-kernels: AVX-512 (6 rows x 4 zmm) chosen at run time when the CPU has it, and
// the AVX2 + FMA baseline (6 rows x 2 ymm, four column slices).  ONNXGEN_NO_AVX512=1 forces
// the baseline (tests use it).
#pragma once

#include <algorithm>
#include <cstdlib>

#include "amx.h"
#include "common.h"

namespace onnxgen {
namespace gemm {

constexpr int kNR = 64;           // columns per micro-kernel call
constexpr int kMaxNT = 512;       // most columns per tile
constexpr int64_t kPanel = 8192;  // floats in a packed panel (32 KiB: stays in L1)
constexpr int kMR = 6;            // rows of A per micro-kernel call


// An fp32 work buffer of at least n floats, kept per calling thread and reused across calls
// (slot picks one of several): no allocation, page faults or zero-filling per call.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& b = buffers[slot];
  if (b.size() < size_t(n)) b.resize(size_t(n));
  return b.data();
}

// Columns per tile for a GEMM whose experts/groups have at most `rows` rows.  Wider tiles give
// longer contiguous runs of each weight row (a 1-row GEMM over 277 MB of fp32 weights streamed
// at 15 GB/s with 256 columns, 10 GB/s with 128; 64 was slower still), narrower ones deeper
// panels (fewer reloads of C) and more items to share out.  512 measured no better than 256,
// even for decode, so 256 throughout for now.
inline int tile_columns(int64_t /*rows*/) { return 256; }

// P[kk, 0:ldp] = float(B[kk, 0:n]) (zero beyond n) for kk < kc.
inline void pack_panel(const char* B, DType bt, int64_t ldb_bytes, int64_t kc, int n, float* P, int64_t ldp) {
  for (int64_t kk = 0; kk < kc; ++kk) {
    load_row(B + kk * ldb_bytes, bt, P + kk * ldp, n);
    if (n < ldp) std::memset(P + kk * ldp + n, 0, size_t(ldp - n) * 4);
  }
}

// Prefetches of the next panel, spread evenly over the micro-kernel iterations of this one so
// the memory requests overlap the arithmetic: `per_step` cache lines per iteration, walking
// the panel's rows (`rows` of `lines` lines, `stride` bytes apart) from `pf`.
struct Prefetch {
  const char* pf = nullptr;
  int64_t stride = 0, rows = 0, row = 0;
  int lines = 0, line = 0, per_step = 0;
  inline void step() {
    for (int i = 0; i < per_step && row < rows; ++i) {
      _mm_prefetch(pf + row * stride + 64 * line, _MM_HINT_T1);
      if (++line == lines) {
        line = 0;
        ++row;
      }
    }
  }
};

// ---- AVX-512 micro-kernel: C[r, 0:n] (+)= sum_kk A[r][koff + kk] * P[kk, 0:n] -------------

template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void micro_avx512(
    const float* const* A, int64_t koff, const float* P, int64_t ldp, int64_t kc, float* C, int64_t ldc, int n,
    bool accumulate, Prefetch& pf) {
  __mmask16 mask[4];
  for (int v = 0; v < 4; ++v) {
    int rem = n - 16 * v;
    mask[v] = rem >= 16 ? __mmask16(0xffff) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
  }
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = A[r] + koff;
  __m512 c[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v)
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc; ++kk) {
    pf.step();
    const float* p = P + kk * ldp;
    __m512 b0 = _mm512_load_ps(p), b1 = _mm512_load_ps(p + 16), b2 = _mm512_load_ps(p + 32),
           b3 = _mm512_load_ps(p + 48);  // the panel is zero padded to a multiple of 64 columns
    for (int r = 0; r < MR; ++r) {
      __m512 x = _mm512_set1_ps(a[r][kk]);
      c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(x, b2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(x, b3, c[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, mask[v], c[r][v]);
}

// ---- AVX2 micro-kernel: the same, 16 columns at a time -----------------------------------

template <int MR>
void micro_avx2(const float* const* A, int64_t koff, const float* P, int64_t ldp, int64_t kc, float* C, int64_t ldc,
                int n, bool accumulate, Prefetch& pf) {
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = A[r] + koff;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c0 = 0; c0 < n; c0 += 16) {
    __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - c0), lanes);
    __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - c0 - 8), lanes);
    __m256 c[MR][2];
    for (int r = 0; r < MR; ++r) {
      if (accumulate) {
        c[r][0] = _mm256_maskload_ps(C + r * ldc + c0, m0);
        c[r][1] = _mm256_maskload_ps(C + r * ldc + c0 + 8, m1);
      } else {
        c[r][0] = c[r][1] = _mm256_setzero_ps();
      }
    }
    for (int64_t kk = 0; kk < kc; ++kk) {
      if (c0 == 0) pf.step();
      const float* p = P + kk * ldp + c0;
      __m256 b0 = _mm256_load_ps(p), b1 = _mm256_load_ps(p + 8);
      for (int r = 0; r < MR; ++r) {
        __m256 x = _mm256_broadcast_ss(a[r] + kk);
        c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm256_maskstore_ps(C + r * ldc + c0, m0, c[r][0]);
      _mm256_maskstore_ps(C + r * ldc + c0 + 8, m1, c[r][1]);
    }
  }
}

using MicroKernel = void (*)(const float* const*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int, bool,
                             Prefetch&);

inline MicroKernel micro_kernel(int rows) {
  static const MicroKernel wide[kMR + 1] = {nullptr, micro_avx512<1>, micro_avx512<2>, micro_avx512<3>,
                                            micro_avx512<4>, micro_avx512<5>, micro_avx512<6>};
  static const MicroKernel narrow[kMR + 1] = {nullptr, micro_avx2<1>, micro_avx2<2>, micro_avx2<3>,
                                              micro_avx2<4>, micro_avx2<5>, micro_avx2<6>};
  return has_avx512() ? wide[rows] : narrow[rows];
}

// C[r, 0:n] = sum_k A[r][k] * B[k, 0:n] for r < m, k < K.  B points at the tile's first column
// (element type bt, row stride ldb elements), n <= kMaxNT; C has row stride ldc.
inline void gemm_tile(const float* const* A, int64_t m, const void* B, DType bt, int64_t ldb, int64_t K, int n,
                      float* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (K <= 0) {
    for (int64_t r = 0; r < m; ++r) std::memset(C + r * ldc, 0, size_t(n) * 4);
    return;
  }
  if (bt == DType::bf16 && amx::available()) {  // the rows are rounded to bf16 too: see amx.h
    amx::gemm_tile(A, m, static_cast<const uint16_t*>(B), ldb, K, n, C, ldc);
    return;
  }
  alignas(64) float P[kPanel];
  const int64_t ldp = (n + kNR - 1) / kNR * kNR;  // panel row: n rounded up to whole slices
  const int64_t kc_max = std::min<int64_t>(128, kPanel / ldp);
  const int64_t es = int64_t(dtype_size(bt));
  const int64_t ldb_bytes = ldb * es;
  const char* b = static_cast<const char*>(B);
  const int64_t blocks = (m + kMR - 1) / kMR, slices = ldp / kNR;
  for (int64_t kb = 0; kb < K; kb += kc_max) {
    const int64_t kc = std::min(kc_max, K - kb);
    pack_panel(b + kb * ldb_bytes, bt, ldb_bytes, kc, n, P, ldp);
    Prefetch pf;  // the next panel, spread over every micro-kernel call on this one
    const int64_t next = kb + kc_max;
    if (next < K) {
      pf.pf = b + next * ldb_bytes;
      pf.stride = ldb_bytes;
      pf.rows = std::min(kc_max, K - next);
      pf.lines = int((n * es + 63) / 64);
      const int64_t steps = blocks * slices * kc;
      pf.per_step = int((pf.rows * pf.lines + steps - 1) / steps);
    }
    for (int c0 = 0; c0 < n; c0 += kNR) {
      const int nc = std::min(kNR, n - c0);
      for (int64_t r0 = 0; r0 < m; r0 += kMR) {
        const int rows = int(std::min<int64_t>(kMR, m - r0));
        micro_kernel(rows)(A + r0, kb, P + c0, ldp, kc, C + r0 * ldc + c0, ldc, nc, kb > 0, pf);
      }
    }
  }
}

// gemm_tile over a weight matrix packed once by amx::pack_columns (all its columns, K deep):
// the tile's columns start at `col`, a multiple of 16.  A's rows are staged per call.
inline void gemm_tile_packed(const float* const* A, int64_t m, const uint16_t* packed, int64_t K, int64_t col, int n,
                             float* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const int64_t kp = amx::depth(K), mp = amx::rows_padded(m);
  uint16_t* a = amx::scratch16(0, mp * kp);
  amx::stage_rows(A, m, K, mp, kp, a);
  amx::multiply(a, m, kp, packed + (col / 16) * kp * 16, n, C, ldc);
}

}  // namespace gemm
}  // namespace onnxgen
