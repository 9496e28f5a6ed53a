// GroupedMatMul kernel (stub: being written).
#include "ops.h"

namespace onnxgen {
namespace {

struct GroupedMatMulKernel : KernelBase<GroupedMatMulKernel> {
  explicit GroupedMatMulKernel(const OrtKernelInfo*) {}
  void Compute(Ort::KernelContext&) { fail("GroupedMatMul", "kernel not implemented yet"); }
};

struct GroupedMatMulOp : OpBase<GroupedMatMulOp, GroupedMatMulKernel> {
  static constexpr uint32_t kOptionalInputs = 0b1000, kOptionalOutputs = 0;
  static constexpr OutputSpec kOutputs[] = {{0, -1, 3}};
  const char* GetName() const { return "GroupedMatMul"; }
  size_t GetInputTypeCount() const { return 4; }
  size_t GetOutputTypeCount() const { return 1; }
};

}  // namespace

const OrtCustomOp* grouped_matmul_op() {
  static const GroupedMatMulOp op;
  return &op;
}

}  // namespace onnxgen
