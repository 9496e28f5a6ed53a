// Entry point: onnxruntime calls RegisterCustomOps when a session registers this library.
#include <mutex>

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
    if (spec.type_from >= 0 && size_t(spec.type_from) < inputs) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, spec.type_from, &info)) return s;
      if (OrtStatus* s = api.GetTensorElementType(info, &type)) return s;  // `info` belongs to the context
    }
    if (spec.shape_from >= 0 && size_t(spec.shape_from) < inputs) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, spec.shape_from, &info)) return s;
      size_t rank = 0;
      if (OrtStatus* s = api.GetDimensionsCount(info, &rank)) return s;
      dims.assign(rank, -1);
      if (OrtStatus* s = api.GetDimensions(info, dims.data(), rank)) return s;
    }
    OrtTensorTypeAndShapeInfo* out = nullptr;
    if (OrtStatus* s = api.CreateTensorTypeAndShapeInfo(&out)) return s;
    OrtStatus* s = api.SetTensorElementType(out, type);
    if (!s) s = api.SetDimensions(out, dims.data(), dims.size());
    if (!s) s = api.ShapeInferContext_SetOutputTypeShape(ctx, i, out);
    api.ReleaseTensorTypeAndShapeInfo(out);
    if (s) return s;
  }
  return nullptr;
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
