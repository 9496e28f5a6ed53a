// MoE kernel (stub: being written).
#include "ops.h"

namespace onnxgen {
namespace {

struct MoEKernel : KernelBase<MoEKernel> {
  explicit MoEKernel(const OrtKernelInfo*) {}
  void Compute(Ort::KernelContext&) { fail("MoE", "kernel not implemented yet"); }
};

struct MoEOp : OpBase<MoEOp, MoEKernel> {
  static constexpr uint32_t kOptionalInputs = 0b1111100, kOptionalOutputs = 0b110;
  static constexpr OutputSpec kOutputs[] = {{0, 0, 2}, {-1, -1, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64}, {-1, -1, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}};
  const char* GetName() const { return "MoE"; }
  size_t GetInputTypeCount() const { return 7; }
  size_t GetOutputTypeCount() const { return 3; }
};

}  // namespace

const OrtCustomOp* moe_op() {
  static const MoEOp op;
  return &op;
}

}  // namespace onnxgen
