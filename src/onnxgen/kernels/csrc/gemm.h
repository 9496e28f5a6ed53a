// The GEMM core of the MoE and GroupedMatMul kernels: one column tile of C = A @ B.
//
// A is given as row pointers (fp32, so gathered token rows need no copy); B is a [K, N]
// row-major weight matrix in fp32, fp16 or bf16 (streamed row by row, converted on the fly).
// A tile is at most kMaxNT = 512 columns of B.  B is read in panels of rows: each panel is
// converted once into fp32 (32 KiB, stays in L1) while every block of kMR rows of A runs over
// it in 64-column slices (register-blocked: kMR rows x 64 columns of accumulators); the next
// panel is prefetched (into L2) a few lines per micro-kernel iteration, so the memory traffic
// overlaps the arithmetic.  B's tile is read from memory exactly once however many rows A has.
//
// Constant weights (initializers) are re-laid out once, when the session is created
// (PackedWeights, at the end): into contiguous column tiles (fp32 ones gemm_streamed reads in
// place), or bf16 on a CPU with AMX into amx.h's tile layout (A rounded to bf16).
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

// Columns per tile (one work item's share of B).  Wider tiles give longer contiguous runs of each
// weight row (a 1-row GEMM over 277 MB of fp32 weights streamed at 15 GB/s with 256 columns,
// 10 GB/s with 128; 64 was slower still), narrower ones deeper panels (fewer reloads of C) and
// more items to share out.  512 measured no better than 256, even for decode.
constexpr int64_t kTileColumns = 256;

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

  Prefetch() = default;
  // `rows` runs of `lines` lines from `from`, spread over `steps` micro-kernel iterations.
  Prefetch(const void* from, int64_t stride, int64_t rows, int lines, int64_t steps)
      : pf(static_cast<const char*>(from)), stride(stride), rows(rows), lines(lines),
        per_step(int((rows * lines + steps - 1) / steps)) {}
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

// Micro-kernel iterations of one panel: blocks of rows x 64-column slices x its kc rows.
inline int64_t panel_steps(int64_t m, int n, int64_t kc) { return (m + kMR - 1) / kMR * ((n + kNR - 1) / kNR) * kc; }

// C[r, 0:n] (+)= sum_kk A[r][kb + kk] * P[kk, 0:n] for r < m, kk < kc (accumulating after the first
// panel, kb > 0): 64-column slices, each run over every block of kMR rows while it is in L1.
inline void multiply_panel(const float* const* A, int64_t m, int64_t kb, const float* P, int64_t ldp, int64_t kc, int n,
                           float* C, int64_t ldc, Prefetch& pf) {
  for (int c0 = 0; c0 < n; c0 += kNR) {
    const int nc = std::min(kNR, n - c0);
    for (int64_t r0 = 0; r0 < m; r0 += kMR) {
      const int rows = int(std::min<int64_t>(kMR, m - r0));
      micro_kernel(rows)(A + r0, kb, P + c0, ldp, kc, C + r0 * ldc + c0, ldc, nc, kb > 0, pf);
    }
  }
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
  for (int64_t kb = 0; kb < K; kb += kc_max) {
    const int64_t kc = std::min(kc_max, K - kb), next = kb + kc_max;
    pack_panel(b + kb * ldb_bytes, bt, ldb_bytes, kc, n, P, ldp);
    Prefetch pf;  // the next panel's rows, spread over every micro-kernel call on this one
    if (next < K)
      pf = Prefetch(b + next * ldb_bytes, ldb_bytes, std::min(kc_max, K - next), int((n * es + 63) / 64),
                    panel_steps(m, n, kc));
    multiply_panel(A, m, kb, P, ldp, kc, n, C, ldc, pf);
  }
}

// ---- constant weights, re-laid out once when the session is created ----------------------

constexpr int64_t kStreamPanel = 64;  // rows of a streamed tile per panel (64 KiB: stays in L2)

// C[r, 0:n] = sum_k A[r][k] * T[k, 0:n] for r < m, where T is one column tile of PackedWeights:
// K rows of kTileColumns fp32, contiguous and 64-byte aligned.  The micro-kernels read it in
// place, a panel at a time, while the next panel is prefetched (into L2) a few lines per step;
// during the last panel, the first one of `after` (the tile that follows in memory, which the
// calling thread's next item reads; null for none).
inline void gemm_streamed(const float* const* A, int64_t m, const float* T, int64_t K, int n, float* C, int64_t ldc,
                          const float* after) {
  constexpr int64_t ldp = kTileColumns;
  for (int64_t kb = 0; kb < K; kb += kStreamPanel) {
    const int64_t kc = std::min(kStreamPanel, K - kb), next = kb + kStreamPanel;
    const float* ahead = next < K ? T + next * ldp : after;
    const int64_t ahead_rows = std::min(kStreamPanel, next < K ? K - next : K);
    Prefetch pf;  // the rows ahead are one contiguous run: one line per "row"
    if (ahead) pf = Prefetch(ahead, 64, ahead_rows * ldp * 4 / 64, 1, panel_steps(m, n, kc));
    multiply_panel(A, m, kb, T + kb * ldp, ldp, kc, n, C, ldc, pf);
  }
}

// Constant weights (an initializer): `count` matrices B[g] [K, N] (MoE's experts, GroupedMatMul's
// groups; one for a dense layer), re-laid out once when the session is created so that every
// call reads them at full speed:
//  * fp32: column tiles of kTileColumns, each tile's K rows contiguous (zero padded to the full
//    width), all in one block of huge pages where the kernel gives them.  An item's weights are
//    then one contiguous run that gemm_streamed reads in place; in B's own layout they are 1 KiB
//    pieces a row apart, which the hardware prefetchers do not follow (a Mixtral-sized expert
//    layer, 16 rows per expert, streamed at 12 GB/s there and 18 GB/s here).  The tiles lie in
//    the order the items read them, so each item can prefetch the next one's start: per matrix,
//    left to right, except that with `split` (concatenated gate/up weights: the up half starts
//    at N / 2) the two halves' tiles alternate, gate 0, up 0, gate 1, ...
//    fp16 (and bf16 without AMX) are tiled alike, in their own type, and gemm_tile converts a
//    panel at a time from the contiguous tile.
//  * bf16 on a CPU with AMX: the tile unit's layout over all N columns (amx::pack_columns).
// The packed copy holds the weights' bytes once more, for the session's life.
class PackedWeights {
 public:
  PackedWeights() = default;
  PackedWeights(const void* B, DType type, int64_t count, int64_t K, int64_t N, bool split = false)
      : type_(type), count_(count), K_(K), N_(N), half_(split ? N / 2 : 0) {
    if (count <= 0 || (split && N % 2)) return;
    if (type != DType::bf16 || !amx::available()) {
      pack_tiles(static_cast<const char*>(B));
    } else {
      amx_.resize(size_t(count * amx::packed_size(K, N)));
      for (int64_t g = 0; g < count; ++g)
        amx::pack_columns(static_cast<const uint16_t*>(B) + g * K * N, N, K, int(N), amx::depth(K),
                          amx_.data() + g * amx::packed_size(K, N));
    }
  }

  // Input `index` of a kernel being created, packed when it is a constant float tensor with
  // `rank` dims ([K, N], or [count, K, N] for rank 3).
  static PackedWeights constant(const OrtKernelInfo* info, size_t index, size_t rank, bool split = false) {
    const ConstantInput w = constant_input(info, index);
    if (!w.data || w.shape.size() != rank) return {};
    DType type;
    switch (w.type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: type = DType::f32; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: type = DType::f16; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: type = DType::bf16; break;
      default: return {};
    }
    const int64_t count = rank == 3 ? w.shape[0] : 1;
    return PackedWeights(w.data, type, count, w.shape[rank - 2], w.shape[rank - 1], split);
  }

  bool fits(int64_t count, int64_t K, int64_t N) const {
    return (tiles_ || !amx_.empty()) && count == count_ && K == K_ && N == N_;
  }
  // Matrix g in the AMX layout (null unless bf16 on a CPU with AMX).
  const uint16_t* amx_columns(int64_t g) const { return amx_.empty() ? nullptr : amx_.data() + g * amx::packed_size(K_, N_); }

  // C[0:m, 0:n] = A[0:m, 0:K] @ B[g][:, col:col + n] if the packed form holds that column range
  // as one piece (a tile's start, n within the tile; for AMX a multiple of 16); else false, and
  // the caller runs gemm_tile on B itself.
  bool multiply(int64_t g, const float* const* A, int64_t m, int64_t col, int n, float* C, int64_t ldc) const {
    if (m <= 0 || n <= 0) return true;
    if (tiles_) {
      const int64_t index = K_ > 0 ? tile_index(col, n) : -1;  // gemm_tile zero-fills for K = 0
      if (index < 0) return false;
      const int64_t size = K_ * kTileColumns * int64_t(dtype_size(type_)), total = count_ * per_matrix();
      const int64_t at = g * per_matrix() + index;
      const char* tile = tiles_.get() + at * size;
      if (type_ != DType::f32) {
        gemm_tile(A, m, tile, type_, kTileColumns, K_, n, C, ldc);
        return true;
      }
      const char* after = at + 1 < total ? tile + size : nullptr;
      gemm_streamed(A, m, reinterpret_cast<const float*>(tile), K_, n, C, ldc, reinterpret_cast<const float*>(after));
      return true;
    }
    if (amx_.empty() || col % 16) return false;
    const int64_t kp = amx::depth(K_), mp = amx::rows_padded(m);
    uint16_t* a = amx::scratch16(0, mp * kp);
    amx::stage_rows(A, m, K_, mp, kp, a);
    amx::multiply(a, m, kp, amx_columns(g) + (col / 16) * kp * 16, n, C, ldc);
    return true;
  }

 private:
  int64_t tiles_per_half() const { return (half_ + kTileColumns - 1) / kTileColumns; }
  int64_t per_matrix() const { return half_ ? 2 * tiles_per_half() : (N_ + kTileColumns - 1) / kTileColumns; }

  // The position within a matrix of the tile that starts at column `col` and holds n columns, or -1.
  int64_t tile_index(int64_t col, int64_t n) const {
    if (!half_) return col % kTileColumns || col + n > std::min(N_, col + kTileColumns) ? -1 : col / kTileColumns;
    const int64_t up = col >= half_, offset = col - up * half_;
    if (offset % kTileColumns || offset + n > std::min(half_, offset + kTileColumns)) return -1;
    return 2 * (offset / kTileColumns) + up;
  }

  void pack_tiles(const char* B) {
    const int64_t es = int64_t(dtype_size(type_)), size = K_ * kTileColumns * es;
    tiles_.reset(static_cast<char*>(huge_page_alloc(size_t(count_ * per_matrix() * size))));
    // Each tile: from its first column to the end of its half (or of B), at most a tile.
    for (int64_t g = 0; g < count_; ++g)
      for (int64_t index = 0; index < per_matrix(); ++index) {
        const int64_t first = half_ ? (index / 2) * kTileColumns + (index % 2) * half_ : index * kTileColumns;
        const int64_t end = half_ && index % 2 == 0 ? half_ : N_;
        const int64_t n = std::min(kTileColumns, end - first);
        char* t = tiles_.get() + (g * per_matrix() + index) * size;
        const char* b = B + (g * K_ * N_ + first) * es;
        for (int64_t k = 0; k < K_; ++k) {
          std::memcpy(t + k * kTileColumns * es, b + k * N_ * es, size_t(n * es));
          std::memset(t + (k * kTileColumns + n) * es, 0, size_t((kTileColumns - n) * es));
        }
      }
  }

  DType type_ = DType::f32;
  int64_t count_ = 0, K_ = 0, N_ = 0, half_ = 0;
  std::unique_ptr<char, void (*)(void*)> tiles_{nullptr, std::free};
  std::vector<uint16_t> amx_;
};

}  // namespace gemm
}  // namespace onnxgen
