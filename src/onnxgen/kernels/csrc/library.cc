// Entry point: onnxruntime calls RegisterCustomOps when a session registers this library.
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "ops.h"

namespace onnxgen {

OrtStatusPtr infer_outputs(OrtShapeInferContext* ctx, const OutputSpec* specs, size_t count) {
  const OrtApi& api = Ort::GetApi();
  size_t inputs = 0;
  if (OrtStatus* s = api.ShapeInferContext_GetInputCount(ctx, &inputs)) return s;
  for (size_t i = 0; i < count; ++i) {
    const OutputSpec& spec = specs[i];
    ONNXTensorElementDataType type = spec.fixed_type;
    std::vector<int64_t> dims(size_t(spec.rank), -1);
    std::vector<const char*> symbols(dims.size(), "");
    if (spec.type_from >= 0 && size_t(spec.type_from) < inputs) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // belongs to the context: not released
      if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, spec.type_from, &info)) return s;
      if (OrtStatus* s = api.GetTensorElementType(info, &type)) return s;
    }
    if (spec.shape_from >= 0 && size_t(spec.shape_from) < inputs) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, spec.shape_from, &info)) return s;
      size_t rank = 0;
      if (OrtStatus* s = api.GetDimensionsCount(info, &rank)) return s;
      dims.assign(rank, -1);
      symbols.assign(rank, "");
      if (OrtStatus* s = api.GetDimensions(info, dims.data(), rank)) return s;
      if (OrtStatus* s = api.GetSymbolicDimensions(info, symbols.data(), rank)) return s;
    }
    // An unknown dimension must be symbolic: onnxruntime takes a bare -1 for a size and then
    // warns that the run's shape differs.  Unnamed ones get a name of their own, unique in the
    // process: onnxruntime takes dimensions of one name to be equal (and shares buffers on it).
    static std::atomic<uint64_t> next_name{0};
    std::vector<std::string> names(dims.size());
    for (size_t d = 0; d < dims.size(); ++d) {
      if (dims[d] >= 0 || (symbols[d] && *symbols[d])) continue;
      names[d] = "onnxgen_dim" + std::to_string(next_name++);
      symbols[d] = names[d].c_str();
    }
    OrtTensorTypeAndShapeInfo* out = nullptr;
    if (OrtStatus* s = api.CreateTensorTypeAndShapeInfo(&out)) return s;
    OrtStatus* s = api.SetTensorElementType(out, type);
    if (!s) s = api.SetDimensions(out, dims.data(), dims.size());
    if (!s) s = api.SetSymbolicDimensions(out, symbols.data(), symbols.size());
    if (!s) s = api.ShapeInferContext_SetOutputTypeShape(ctx, i, out);
    api.ReleaseTensorTypeAndShapeInfo(out);
    if (s) return s;
  }
  return nullptr;
}

int64_t int_attribute(OrtShapeInferContext* ctx, const char* name, int64_t fallback) {
  const OrtApi& api = Ort::GetApi();
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* s = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    api.ReleaseStatus(s);
    return fallback;
  }
  int64_t value = fallback;
  size_t size = 0;
  if (!attr) return fallback;
  if (OrtStatus* s = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &value, sizeof(value), &size)) {
    api.ReleaseStatus(s);
    return fallback;
  }
  return value;
}

}  // namespace onnxgen

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  return onnxgen::as_status([&] {
    // One domain for the process, shared by every session that registers the library.
    static OrtCustomOpDomain* domain = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
      Ort::ThrowOnError(Ort::GetApi().CreateCustomOpDomain(onnxgen::kDomain, &domain));
      for (const OrtCustomOp* op : {onnxgen::paged_attention_op(), onnxgen::moe_op(), onnxgen::grouped_matmul_op()})
        Ort::ThrowOnError(Ort::GetApi().CustomOpDomain_Add(domain, op));
    });
    Ort::ThrowOnError(Ort::GetApi().AddCustomOpDomain(options, domain));
  });
}
