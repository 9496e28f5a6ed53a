// Shared pieces of onnxgen's custom-op kernels: errors, element types, vector math, threads.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <exception>
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
