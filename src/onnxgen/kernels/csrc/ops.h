// The custom ops the library registers; each .cc file defines one.
#pragma once

#include "common.h"

namespace onnxgen {

const OrtCustomOp* paged_attention_op();
const OrtCustomOp* moe_op();
const OrtCustomOp* grouped_matmul_op();

// How an output's type and shape follow from the inputs, for onnxruntime's type inference
// (outputs of dynamically typed custom ops need it): the element type of input `type_from`
// (or `fixed_type` when type_from < 0), and the shape of input `shape_from` (or `rank`
// unknown dimensions when shape_from < 0).
struct OutputSpec {
  int type_from;
  int shape_from;
  int rank;
  ONNXTensorElementDataType fixed_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};

OrtStatusPtr infer_outputs(OrtShapeInferContext* ctx, const OutputSpec* specs, size_t count);

// An int attribute of the node being inferred, or `fallback` when it is absent.
int64_t int_attribute(OrtShapeInferContext* ctx, const char* name, int64_t fallback);

// The boilerplate every op shares: CPU provider, kernels created and run through OrtStatus,
// output types inferred from `Op::kOutputs`.
//   Kernel(const OrtKernelInfo*) and void Compute(Ort::KernelContext&) are all an op writes.
template <typename Op, typename Kernel>
struct OpBase : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  OpBase() {
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return infer_outputs(ctx, Op::kOutputs, sizeof(Op::kOutputs) / sizeof(Op::kOutputs[0]));
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return as_status([&] { *kernel = new Kernel(info); });
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  // Float inputs accept any of float32/float16/bfloat16; the kernels dispatch at run time.
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  // Op::kOptionalInputs / kOptionalOutputs: bit i set when input/output i may be omitted.
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (Op::kOptionalInputs >> i) & 1u ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return (Op::kOptionalOutputs >> i) & 1u ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

// Kernel side: ComputeV2 catches everything and reports it as an onnxruntime error.
template <typename Derived>
struct KernelBase {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return as_status([&] {
      Ort::KernelContext ctx(context);
      static_cast<Derived*>(this)->Compute(ctx);
    });
  }
};

}  // namespace onnxgen
