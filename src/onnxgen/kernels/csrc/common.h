// Shared pieces of onnxgen's custom-op kernels: errors, element types, vector math, threads.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace onnxgen {

constexpr const char* kDomain = "onnxgen.preview";

// ---- errors ------------------------------------------------------------------------------
// Kernels throw Invalid; the op wrappers turn it into an OrtStatus, so no C++ exception ever
// crosses into onnxruntime.

struct Invalid : std::exception {
  std::string message;
  explicit Invalid(std::string m) : message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

template <typename... Parts>
[[noreturn]] void fail(const char* op, const Parts&... parts) {
  std::ostringstream out;
  out << op << ": ";
  (out << ... << parts);
  throw Invalid(out.str());
}

template <typename F>
OrtStatus* as_status(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Invalid& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// ---- tensors -----------------------------------------------------------------------------

enum class DType { f32, f16, bf16 };

inline size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// An input as the kernels see it: present or not, element type, shape, raw data.
struct Input {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  bool present() const { return data != nullptr || !shape.empty(); }
  int64_t dim(size_t i) const { return shape[i]; }
  int64_t size() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  template <typename T>
  const T* as() const { return static_cast<const T*>(data); }
};

inline Input read_input(const Ort::KernelContext& ctx, size_t index) {
  Input in;
  if (index >= ctx.GetInputCount()) return in;
  Ort::ConstValue value = ctx.GetInput(index);
  if (static_cast<const OrtValue*>(value) == nullptr) return in;
  auto info = value.GetTensorTypeAndShapeInfo();
  in.type = info.GetElementType();
  in.shape = info.GetShape();
  in.data = value.GetTensorRawData();
  return in;
}

inline DType float_type(const char* op, const char* name, ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::f32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::f16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return DType::bf16;
    default: fail(op, "input '", name, "' must be float32, float16 or bfloat16 (element type ", int(t), ")");
  }
}

inline void expect_type(const char* op, const char* name, const Input& in, ONNXTensorElementDataType t,
                        const char* type_name) {
  if (in.type != t) fail(op, "input '", name, "' must be ", type_name, " (got element type ", int(in.type), ")");
}

inline void expect_rank(const char* op, const char* name, const Input& in, size_t rank) {
  if (in.shape.size() != rank) fail(op, "input '", name, "' must have rank ", rank, ", got shape ", shape_str(in.shape));
}

// ---- element conversion ------------------------------------------------------------------

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float f16_to_f32(uint16_t v) { return _cvtsh_ss(v); }
inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// dst[0:n] = float(src[0:n]) for any of the float element types.
inline void load_row(const void* src, DType type, float* dst, int64_t n) {
  if (type == DType::f32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (type == DType::f16) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  } else {
    for (; i + 8 <= n; i += 8) {
      __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  }
}

// dst[0:n] = src[0:n] converted to `type`.
inline void store_row(const float* src, DType type, void* dst, int64_t n) {
  if (type == DType::f32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (type == DType::f16) {
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  }
}

// An output row: dst[0:n] = src[0:n] in `type`.  fp32 rows that start on a cache line and fill
// whole lines go out with non-temporal stores: written once and read by no one soon, their lines
// need not be read in first (a 1024-token prefill's 16 MiB output: 2.0 -> 1.5 ms).  The caller
// fences (_mm_sfence) once its rows are written, before anything tells another thread so; a
// fence per row of 128 floats cost 2 ms of a 32 ms prefill.
inline void store_output_row(const float* src, DType type, void* dst, int64_t n) {
  if (type != DType::f32 || n % 16 || reinterpret_cast<uintptr_t>(dst) % 64) return store_row(src, type, dst, n);
  float* d = static_cast<float*>(dst);
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(d + i, _mm256_loadu_ps(src + i));
}

// Copies a row between element types (same type: a memcpy).
inline void convert_row(const void* src, DType from, void* dst, DType to, int64_t n, float* scratch) {
  if (from == to) {
    std::memcpy(dst, src, size_t(n) * dtype_size(from));
    return;
  }
  load_row(src, from, scratch, n);
  store_row(scratch, to, dst, n);
}

// ---- vector math (AVX2 + FMA: the x86-64-v3 baseline) -------------------------------------

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// max(m, x[0:n]): eight lanes at a time (a scalar loop is one long chain of dependent maxes).
inline float max_of(float m, const float* x, int64_t n) {
  int64_t t = 0;
  if (n >= 8) {
    __m256 v = _mm256_set1_ps(m);
    for (; t + 8 <= n; t += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + t));
    m = hmax(v);
  }
  for (; t < n; ++t) m = std::max(m, x[t]);
  return m;
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += a * x[0:n]
inline void axpy(float* y, float a, const float* x, int64_t n) {
  __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// y[0:n] *= a
inline void scale_row(float* y, float a, int64_t n) {
  __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] *= a;
}

// e^x for 8 lanes (Cephes-style: 2^n * polynomial), relative error ~2e-7; x <= -88 gives ~0.
inline __m256 exp256(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// ---- AVX-512 paths, chosen at run time (the build baseline is x86-64-v3) --------------------

#define ONNXGEN_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))

// exp256 on 16 lanes (the same polynomial).
ONNXGEN_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n in one instruction (exact, as the exponent bits were)
}

// s[t] = e^(s[t] - m) for t in [0, n), 0 where s[t] is -inf (a key a score_mod masked); returns
// their sum.  Sixteen lanes at a time, the tail under a mask.
ONNXGEN_AVX512 inline float exp_sum_avx512(float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(live, s + t);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, x, neg_inf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp512(_mm512_sub_ps(x, vm)));
    _mm512_mask_storeu_ps(s + t, live, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// ONNXGEN_NO_AVX512=1 forces the AVX2 paths (to test them on a machine that has AVX-512).
inline bool has_avx512() {
  static const bool yes = [] {
    const char* off = std::getenv("ONNXGEN_NO_AVX512");
    if (off && *off && std::string(off) != "0") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}

// Loads of 16 (AVX-512) or 8 (AVX2) floats from rows of any float element type, the tail masked.
template <DType T>
ONNXGEN_AVX512 inline __m512 load16(const void* row, int64_t i, __mmask16 m = 0xffff) {
  if constexpr (T == DType::f32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + i);
    if constexpr (T == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <DType T>
inline __m256 load8(const void* row, int64_t i) {
  if constexpr (T == DType::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(row) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i));
    if constexpr (T == DType::f16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <DType T>
inline float load1(const void* row, int64_t i) {
  if constexpr (T == DType::f32) return static_cast<const float*>(row)[i];
  else if constexpr (T == DType::f16) return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
  else return bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
}

// out[i * out_stride] = q[i] . k for the nq fp32 query vectors q (each n long, contiguous)
// against one key row k of element type T, loaded (and converted) once for all of them.
template <DType T>
ONNXGEN_AVX512 void dots_avx512(const float* q, int64_t nq, const void* k, int64_t n, float* out, int64_t out_stride) {
  const int64_t full = n & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (n - full)) - 1);
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4) {
    const float *q0 = q + i * n, *q1 = q0 + n, *q2 = q1 + n, *q3 = q2 + n;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = d < full ? __mmask16(0xffff) : tail;
      const __m512 kv = load16<T>(k, d, m);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q0 + d), kv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q1 + d), kv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q2 + d), kv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q3 + d), kv, a3);
    }
    out[(i + 0) * out_stride] = _mm512_reduce_add_ps(a0);
    out[(i + 1) * out_stride] = _mm512_reduce_add_ps(a1);
    out[(i + 2) * out_stride] = _mm512_reduce_add_ps(a2);
    out[(i + 3) * out_stride] = _mm512_reduce_add_ps(a3);
  }
  for (; i < nq; ++i) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = d < full ? __mmask16(0xffff) : tail;
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i * n + d), load16<T>(k, d, m), a);
    }
    out[i * out_stride] = _mm512_reduce_add_ps(a);
  }
}

// Element i of the result = the sum of the lanes of a[i], for sixteen accumulators: one
// transpose-add tree (45 shuffles and adds, not 16 reductions).
ONNXGEN_AVX512 inline __m512 sums16(const __m512* a) {
  // Level 1: within each 128-bit lane, pairwise sums of neighbours' elements.
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  // Level 2: each 128-bit lane of y[j] holds that lane's sums of a[4j .. 4j+3].
  for (int j = 0; j < 4; ++j)
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Levels 3 and 4: add the four 128-bit lanes; element i of the result is the sum of a[i].
  for (int j = 0; j < 2; ++j)
    z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * j], y[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[2 * j], y[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[v * out_stride + t] = the sum of the lanes of a[v * Keys + t] (Q * Keys = 16).
template <int Q>
ONNXGEN_AVX512 inline void store_sums(const __m512* a, float* out, int64_t out_stride) {
  constexpr int Keys = 16 / Q;
  alignas(64) float flat[16];
  _mm512_store_ps(flat, sums16(a));
  for (int v = 0; v < Q; ++v) std::memcpy(out + v * out_stride, flat + v * Keys, Keys * sizeof(float));
}

// out[v * out_stride + t] = q_v . k_t for Q query vectors (contiguous, `n` apart) and 16 / Q key
// rows (`k_stride` elements apart) of type T: sixteen accumulators, reduced by store_sums.  Q is
// the number of query heads that read one KV head (4 for grouped attention with four or more
// per group; 2 or 1 otherwise, so each key row is still loaded once).
template <DType T, int Q>
ONNXGEN_AVX512 void dots_block(const float* q, const void* k, int64_t k_stride, int64_t n, float* out,
                               int64_t out_stride) {
  constexpr int Keys = 16 / Q;
  const size_t width = dtype_size(T);
  const void* rows[Keys];
  for (int t = 0; t < Keys; ++t) rows[t] = static_cast<const char*>(k) + size_t(t * k_stride) * width;
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  const int64_t full = n & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (n - full)) - 1);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = d < full ? __mmask16(0xffff) : tail;
    __m512 kt[Keys];
#pragma GCC unroll 16
    for (int t = 0; t < Keys; ++t) kt[t] = load16<T>(rows[t], d, m);
#pragma GCC unroll 4
    for (int v = 0; v < Q; ++v) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + v * n + d);
#pragma GCC unroll 16
      for (int t = 0; t < Keys; ++t) a[v * Keys + t] = _mm512_fmadd_ps(qv, kt[t], a[v * Keys + t]);
    }
  }
  store_sums<Q>(a, out, out_stride);
}

// bf16 rows, 32 elements per load: a shift and a mask give the even and the odd elements as
// fp32 (half the work of widening 16 at a time).  Dot products are order-free, so queries are
// stored in the same even/odd order per 32 elements (split_even_odd); depth must be a multiple
// of 32.
ONNXGEN_AVX512 inline void split_bf16(const void* row, int64_t i, __m512& even, __m512& odd) {
  const __m512i x = _mm512_loadu_si512(static_cast<const uint16_t*>(row) + i);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))));
}

// dst[32c + j] = src[32c + 2j], dst[32c + 16 + j] = src[32c + 2j + 1] for each chunk c.
inline void split_even_odd(const float* src, float* dst, int64_t n) {
  for (int64_t c = 0; c < n; c += 32)
    for (int64_t j = 0; j < 16; ++j) dst[c + j] = src[c + 2 * j], dst[c + 16 + j] = src[c + 2 * j + 1];
}

// dots4x4 for bf16 keys with queries in even/odd order (see split_bf16).
ONNXGEN_AVX512 inline void dots4x4_bf16_split(const float* q, const void* k, int64_t k_stride, int64_t n, float* out,
                                              int64_t out_stride) {
  const void* rows[4];
  for (int t = 0; t < 4; ++t) rows[t] = static_cast<const uint16_t*>(k) + t * k_stride;
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 32) {
    __m512 ke[4], ko[4];
    for (int t = 0; t < 4; ++t) split_bf16(rows[t], d, ke[t], ko[t]);
    for (int v = 0; v < 4; ++v) {
      const __m512 qe = _mm512_loadu_ps(q + v * n + d), qo = _mm512_loadu_ps(q + v * n + d + 16);
      for (int t = 0; t < 4; ++t) a[v * 4 + t] = _mm512_fmadd_ps(qo, ko[t], _mm512_fmadd_ps(qe, ke[t], a[v * 4 + t]));
    }
  }
  store_sums<4>(a, out, out_stride);
}

// The probability rows of a block of up to Q queries (past `count`, the last row again: its
// sums are computed and dropped), and how many leading keys any of them weighs.  Masked keys
// have probability 0 and causal masking zeroes a suffix of the segment, so the products stop
// there.  The inner loops then broadcast straight from memory (a load, not a shuffle competing
// with the FMAs for a port) with no per-key test.
template <int Q>
struct ProbRows {
  const float* p[Q];
  int64_t keys;
};

template <int Q>
inline ProbRows<Q> prob_rows(const float* const* probs, int64_t count, int64_t n) {
  ProbRows<Q> r{{}, 0};
  for (int64_t v = 0; v < Q; ++v) r.p[v] = probs[std::min<int64_t>(v, count - 1)];
  for (int64_t v = 0; v < count; ++v) {
    int64_t t = n;
    while (t > r.keys && r.p[v][t - 1] == 0.f) --t;
    r.keys = std::max(r.keys, t);
  }
  return r;
}

// weighted_rows for bf16 rows with dv a multiple of 32: sums kept in even/odd order, interleaved
// back once at the end.  Pairs (1 or 2 of 32 columns) is a template argument so the sums stay in
// registers (see weighted_block).
template <int Pairs>
ONNXGEN_AVX512 inline void weighted_block_bf16_split(const float* const* probs, int64_t count, const void* rows,
                                                     int64_t row_stride, int64_t n, int64_t c, float* const* acc) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  __m512 s[4][2 * Pairs];  // [query][even0, odd0, even1, odd1]
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v)
#pragma GCC unroll 4
    for (int j = 0; j < 2 * Pairs; ++j) s[v][j] = _mm512_setzero_ps();
  const ProbRows<4> pr = prob_rows<4>(probs, count, n);
  for (int64_t t = 0; t < pr.keys; ++t) {
    __m512 b[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) b[v] = _mm512_set1_ps(pr.p[v][t]);
    const uint16_t* row = static_cast<const uint16_t*>(rows) + t * row_stride + c;
#pragma GCC unroll 2
    for (int j = 0; j < Pairs; ++j) {
      __m512 even, odd;
      split_bf16(row, 32 * j, even, odd);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        s[v][2 * j] = _mm512_fmadd_ps(b[v], even, s[v][2 * j]);
        s[v][2 * j + 1] = _mm512_fmadd_ps(b[v], odd, s[v][2 * j + 1]);
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    if (v >= count) break;
#pragma GCC unroll 2
    for (int j = 0; j < Pairs; ++j) {
      float* a = acc[v] + c + 32 * j;
      const __m512 first = _mm512_permutex2var_ps(s[v][2 * j], lo, s[v][2 * j + 1]);
      const __m512 second = _mm512_permutex2var_ps(s[v][2 * j], hi, s[v][2 * j + 1]);
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), first));
      _mm512_storeu_ps(a + 16, _mm512_add_ps(_mm512_loadu_ps(a + 16), second));
    }
  }
}

ONNXGEN_AVX512 inline void weighted_rows_bf16_split(const float* const* probs, int64_t nq, const void* rows,
                                                    int64_t row_stride, int64_t n, int64_t dv, float* const* acc) {
  for (int64_t c = 0; c < dv; c += 64) {
    const int64_t pairs = std::min<int64_t>(64, dv - c) / 32;  // 1 or 2 pairs of even/odd sums
    for (int64_t v0 = 0; v0 < nq; v0 += 4) {
      const int64_t count = std::min<int64_t>(4, nq - v0);
      if (pairs == 2)
        weighted_block_bf16_split<2>(probs + v0, count, rows, row_stride, n, c, acc + v0);
      else
        weighted_block_bf16_split<1>(probs + v0, count, rows, row_stride, n, c, acc + v0);
    }
  }
}

using DotsBlockFn = void (*)(const float*, const void*, int64_t, int64_t, float*, int64_t);

template <int Q>
inline DotsBlockFn dots_block_for(DType t) {
  return t == DType::f32 ? dots_block<DType::f32, Q> : t == DType::f16 ? dots_block<DType::f16, Q>
                                                                       : dots_block<DType::bf16, Q>;
}

template <DType T>
void dots_avx2(const float* q, int64_t nq, const void* k, int64_t n, float* out, int64_t out_stride) {
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = q + i * n;
    __m256 a = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8<T>(k, d), a);
    float sum = hsum(a);
    for (; d < n; ++d) sum += qi[d] * load1<T>(k, d);
    out[i * out_stride] = sum;
  }
}

// y[0:n] += a * x[0:n] for a row x of element type T.
template <DType T>
ONNXGEN_AVX512 void axpy_avx512(float* y, float a, const void* x, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16<T>(x, i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, load16<T>(x, i, m), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

template <DType T>
void axpy_avx2(float* y, float a, const void* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8<T>(x, i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * load1<T>(x, i);
}

// ---- tiles for many queries per key block (prefill), AVX-512 ------------------------------

// r[i] = column i of the 16 x 16 matrix whose rows are r[0..15] (four rounds of shuffles).
ONNXGEN_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// kt[d * kt_stride + t] = float(rows[t * row_stride + d]) for t < n (<= 16), zero for n <= t < 16:
// sixteen columns at a time, transposed in registers (element-wise stores cost a quarter of
// the score products at head size 128).
template <DType T>
ONNXGEN_AVX512 void transpose_rows16(const void* rows, int64_t row_stride, int64_t n, int64_t depth, float* kt,
                                     int64_t kt_stride) {
  const size_t width = dtype_size(T);
  for (int64_t d = 0; d < depth; d += 16) {
    const int64_t m = std::min<int64_t>(16, depth - d);
    __m512 r[16];
#pragma GCC unroll 16
    for (int64_t t = 0; t < 16; ++t)
      r[t] = t < n ? load16<T>(static_cast<const char*>(rows) + size_t(t * row_stride) * width, d, __mmask16((1u << m) - 1))
                   : _mm512_setzero_ps();
    transpose16x16(r);
    for (int64_t i = 0; i < m; ++i) _mm512_storeu_ps(kt + (d + i) * kt_stride, r[i]);
  }
}

// out[v][t] = q[v] . k_t for nq query vectors q[v] (each `depth` long) and the 16 * C keys of
// kt (depth x 16C, from transpose_rows16), t < n: broadcast-FMAs, no horizontal sums.  Eight
// queries at a time: an FMA's result is ready four cycles on and two issue per cycle, so eight
// independent sums per key vector keep both FMA units busy.  C = 2 (32 keys) loads each
// broadcast query element once for two FMAs: 1.2x the rate of C = 1, measured in isolation.
template <int C>
ONNXGEN_AVX512 inline void scores_tile(const float* const* q, int64_t nq, const float* kt, int64_t depth,
                                       float* const* out, int64_t n) {
  __mmask16 keep[C];
  for (int c = 0; c < C; ++c) {
    const int64_t k = std::clamp<int64_t>(n - 16 * c, 0, 16);
    keep[c] = __mmask16((1u << k) - 1);
  }
  int64_t v = 0;
  for (; v + 8 <= nq; v += 8) {
    __m512 a[8][C];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) a[j][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < depth; ++d) {
      __m512 k[C];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) k[c] = _mm512_loadu_ps(kt + (d * C + c) * 16);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512 x = _mm512_set1_ps(q[v + j][d]);
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) a[j][c] = _mm512_fmadd_ps(x, k[c], a[j][c]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(out[v + j] + 16 * c, keep[c], a[j][c]);
  }
  for (; v < nq; ++v) {
    __m512 a[C];
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < depth; ++d) {
      const __m512 x = _mm512_set1_ps(q[v][d]);
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kt + (d * C + c) * 16), a[c]);
    }
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(out[v] + 16 * c, keep[c], a[c]);
  }
}

// acc[v][c:c + 16 * Chunks] += sum_{t < n} probs[v][t] * row_t for Q queries x 16 * Chunks
// columns of sums held in registers (row_t at `columns` + t * row_stride elements), so each value
// row is loaded (and converted) once per Q queries.
// The column chunks are a template argument: with a run-time count GCC kept the sixteen sums on
// the stack (a load and a store around every FMA), and the P.V product ran at half speed.
template <DType T, int Chunks, int Q>
ONNXGEN_AVX512 inline void weighted_block(const float* const* probs, int64_t count, const void* columns,
                                          int64_t row_stride, int64_t n, int64_t c, __mmask16 tail,
                                          float* const* acc) {
  const size_t width = dtype_size(T);
  __m512 s[Q][Chunks];
#pragma GCC unroll 8
  for (int v = 0; v < Q; ++v)
#pragma GCC unroll 4
    for (int j = 0; j < Chunks; ++j) s[v][j] = _mm512_setzero_ps();
  const ProbRows<Q> pr = prob_rows<Q>(probs, count, n);
  for (int64_t t = 0; t < pr.keys; ++t) {
    __m512 b[Q];
#pragma GCC unroll 8
    for (int v = 0; v < Q; ++v) b[v] = _mm512_set1_ps(pr.p[v][t]);
    const void* row = static_cast<const char*>(columns) + size_t(t * row_stride) * width;
#pragma GCC unroll 4
    for (int j = 0; j < Chunks; ++j) {
      const __m512 x = load16<T>(row, j * 16, j + 1 < Chunks ? __mmask16(0xffff) : tail);
#pragma GCC unroll 8
      for (int v = 0; v < Q; ++v) s[v][j] = _mm512_fmadd_ps(b[v], x, s[v][j]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < Q; ++v) {
    if (v >= count) break;
#pragma GCC unroll 4
    for (int j = 0; j < Chunks; ++j) {
      const __mmask16 m = j + 1 < Chunks ? __mmask16(0xffff) : tail;
      float* a = acc[v] + c + j * 16;
      _mm512_mask_storeu_ps(a, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), s[v][j]));
    }
  }
}

template <DType T, int Q>
ONNXGEN_AVX512 inline void weighted_chunks(int64_t chunks, const float* const* p, int64_t count, const void* columns,
                                           int64_t row_stride, int64_t n, int64_t c, __mmask16 tail, float* const* a) {
  if constexpr (Q <= 4) {  // eight queries take at most two chunks: 16 sums in registers
    if (chunks == 4) return weighted_block<T, 4, Q>(p, count, columns, row_stride, n, c, tail, a);
    if (chunks == 3) return weighted_block<T, 3, Q>(p, count, columns, row_stride, n, c, tail, a);
  }
  if (chunks == 2) return weighted_block<T, 2, Q>(p, count, columns, row_stride, n, c, tail, a);
  weighted_block<T, 1, Q>(p, count, columns, row_stride, n, c, tail, a);
}

// acc[v][0:dv] += sum_{t < n} probs[v][t] * row_t, in blocks of `width` columns (32 or 64);
// columns(c) is where the rows' columns [c, c + width) begin, row_stride elements per row.
template <DType T, typename Columns>
ONNXGEN_AVX512 void weighted_columns(const float* const* probs, int64_t nq, int64_t width, Columns columns,
                                     int64_t row_stride, int64_t n, int64_t dv, float* const* acc) {
  for (int64_t c = 0; c < dv; c += width) {
    const int64_t span = std::min<int64_t>(width, dv - c), chunks = (span + 15) / 16;
    const __mmask16 tail = __mmask16((1u << (span - (chunks - 1) * 16)) - 1);
    const void* at = columns(c);
    for (int64_t v0 = 0; v0 < nq;) {
      const int64_t count = std::min<int64_t>(nq >= 8 ? 8 : 4, nq - v0);
      const float* const* p = probs + v0;
      float* const* a = acc + v0;
      // Q: queries per block, 8 or 4 or (for the last one or two) 2 or 1: no FMAs for absent ones.
      if (count > 4) weighted_chunks<T, 8>(chunks, p, count, at, row_stride, n, c, tail, a);
      else if (count > 2) weighted_chunks<T, 4>(chunks, p, count, at, row_stride, n, c, tail, a);
      else if (count == 2) weighted_chunks<T, 2>(chunks, p, count, at, row_stride, n, c, tail, a);
      else weighted_chunks<T, 1>(chunks, p, count, at, row_stride, n, c, tail, a);
      v0 += count;
    }
  }
}

template <DType T>
ONNXGEN_AVX512 void weighted_rows(const float* const* probs, int64_t nq, const void* rows, int64_t row_stride,
                                  int64_t n, int64_t dv, float* const* acc) {
  // Many queries (prefill): blocks of 8 queries x 32 columns load each value row once per
  // eight queries, half the row bytes per FMA of 4 x 64 (1.26x its rate, measured in isolation).
  const size_t bytes = dtype_size(T);
  weighted_columns<T>(probs, nq, nq >= 8 ? 32 : 64,
                      [&](int64_t c) { return static_cast<const char*>(rows) + size_t(c) * bytes; }, row_stride, n, dv, acc);
}

// weighted_rows for fp32 values packed in strips of 32 columns, strip_stride elements apart,
// each [n][32] (see pack_segment in paged_attention.cc): every row of a strip is one cache line
// pair after the last, where rows 4 KiB apart (8 KV heads x 128) all fall in one L1 set and
// escape the stride prefetcher.  In isolation 1.15x (rows 512 B apart) to 1.33x (4 KiB) the rate.
ONNXGEN_AVX512 inline void weighted_strips(const float* const* probs, int64_t nq, const float* strips,
                                           int64_t strip_stride, int64_t n, int64_t dv, float* const* acc) {
  weighted_columns<DType::f32>(probs, nq, 32, [&](int64_t c) { return strips + (c / 32) * strip_stride; }, 32, n, dv, acc);
}

using TransposeFn = void (*)(const void*, int64_t, int64_t, int64_t, float*, int64_t);
using WeightedRowsFn = void (*)(const float* const*, int64_t, const void*, int64_t, int64_t, int64_t, float* const*);

inline TransposeFn transpose_for(DType t) {
  return t == DType::f32 ? transpose_rows16<DType::f32> : t == DType::f16 ? transpose_rows16<DType::f16>
                                                                          : transpose_rows16<DType::bf16>;
}

inline WeightedRowsFn weighted_rows_for(DType t) {
  return t == DType::f32 ? weighted_rows<DType::f32> : t == DType::f16 ? weighted_rows<DType::f16>
                                                                       : weighted_rows<DType::bf16>;
}

// The best dots/axpy for rows of a given element type on this CPU.
using DotsFn = void (*)(const float*, int64_t, const void*, int64_t, float*, int64_t);
using AxpyFn = void (*)(float*, float, const void*, int64_t);

inline DotsFn dots_for(DType t) {
  const bool wide = has_avx512();
  switch (t) {
    case DType::f32: return wide ? dots_avx512<DType::f32> : dots_avx2<DType::f32>;
    case DType::f16: return wide ? dots_avx512<DType::f16> : dots_avx2<DType::f16>;
    default: return wide ? dots_avx512<DType::bf16> : dots_avx2<DType::bf16>;
  }
}

inline AxpyFn axpy_for(DType t) {
  const bool wide = has_avx512();
  switch (t) {
    case DType::f32: return wide ? axpy_avx512<DType::f32> : axpy_avx2<DType::f32>;
    case DType::f16: return wide ? axpy_avx512<DType::f16> : axpy_avx2<DType::f16>;
    default: return wide ? axpy_avx512<DType::bf16> : axpy_avx2<DType::bf16>;
  }
}

// ---- scratch memory ------------------------------------------------------------------------

// n floats (uninitialised) that the calling thread keeps between calls, one buffer per `slot`:
// a fresh allocation of megabytes is mapped anew by the C library each call and faults in page
// by page, measured at 0.75 ms of a 2 ms prefill (B 4 x 200 tokens).  Valid until the thread
// asks for the same slot again; a buffer only grows.  Slots: 0 PagedAttention's states, 1 its
// packs, 2 one pack's gathered keys (on the pool threads that write packs), 3 one task's states.  Aligned to a cache
// line: the C library's large blocks start 16 bytes past one, so every 64-byte load of a pack
// straddled two lines.
inline float* workspace(size_t slot, size_t n) {
  constexpr size_t kLine = 16;  // floats
  struct Buffer {
    std::unique_ptr<float[]> data;
    size_t size = 0;
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  if (b.size < n) b.data.reset(new float[n + kLine]), b.size = n;
  const uintptr_t at = reinterpret_cast<uintptr_t>(b.data.get());
  return b.data.get() + (kLine - at / sizeof(float) % kLine) % kLine;
}

// `bytes` of memory for a long-lived buffer, aligned to a cache line, freed with std::free.  A
// block of 2 MiB or more is aligned to 2 MiB and asked for huge pages (transparent huge pages
// in "madvise" mode give none unless asked): two threads read one at 30 GB/s here, at 23 GB/s
// in 4 KiB pages.
inline void* huge_page_alloc(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20, kLine = 64;
  const size_t align = bytes >= kHuge ? kHuge : kLine;
  bytes = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, std::max(bytes, align));
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: no huge pages is no error
#endif
  return p;
}

// ---- constant inputs ---------------------------------------------------------------------

// Input `index` of a kernel being created, when it is a constant (an initializer): its data,
// element type and shape, for re-laying out once.  data is null when it is not constant.
struct ConstantInput {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

inline ConstantInput constant_input(const OrtKernelInfo* info, size_t index) {
  ConstantInput c;
  Ort::ConstKernelInfo ki(info);
  if (ki.GetInputCount() <= index) return c;
  int constant = 0;
  Ort::ConstValue value = ki.GetTensorConstantInput(index, &constant);
  if (!constant) return c;
  auto type_shape = value.GetTensorTypeAndShapeInfo();
  c.type = type_shape.GetElementType();
  c.shape = type_shape.GetShape();
  c.data = value.GetTensorRawData();
  return c;
}

// ---- threads -----------------------------------------------------------------------------
// onnxruntime's intra-op pool: f(i) for i in [0, n), spread over the session's threads.

template <typename F>
void parallel_for(const Ort::KernelContext& ctx, size_t n, F&& f) {
  if (n == 0) return;
  if (n == 1) {
    f(size_t(0));
    return;
  }
  struct Closure {
    F* f;
    std::exception_ptr error;
  } closure{&f, nullptr};
  ctx.ParallelFor(
      [](void* data, size_t i) {
        auto* c = static_cast<Closure*>(data);
        try {
          (*c->f)(i);
        } catch (...) {
          c->error = std::current_exception();  // rethrown on the calling thread
        }
      },
      n, 0, &closure);
  if (closure.error) std::rethrow_exception(closure.error);
}

// ---- attributes --------------------------------------------------------------------------

template <typename T>
T attribute_or(const OrtKernelInfo* info, const char* name, T fallback) {
  Ort::ConstKernelInfo ki(info);
  try {
    return ki.GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

inline std::string string_attribute_or(const OrtKernelInfo* info, const char* name, const std::string& fallback) {
  Ort::ConstKernelInfo ki(info);
  try {
    return ki.GetAttribute<std::string>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

}  // namespace onnxgen
