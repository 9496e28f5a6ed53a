// PagedAttention kernel (stub: being written).
#include "ops.h"

namespace onnxgen {
namespace {

struct PagedAttentionKernel : KernelBase<PagedAttentionKernel> {
  explicit PagedAttentionKernel(const OrtKernelInfo*) {}
  void Compute(Ort::KernelContext&) { fail("PagedAttention", "kernel not implemented yet"); }
};

struct PagedAttentionOp : OpBase<PagedAttentionOp, PagedAttentionKernel> {
  static constexpr uint32_t kOptionalInputs = 0b1100000000, kOptionalOutputs = 0;
  static constexpr OutputSpec kOutputs[] = {{0, -1, 2}, {3, 3, 4}, {4, 4, 4}};
  const char* GetName() const { return "PagedAttention"; }
  size_t GetInputTypeCount() const { return 10; }
  size_t GetOutputTypeCount() const { return 3; }
};

}  // namespace

const OrtCustomOp* paged_attention_op() {
  static const PagedAttentionOp op;
  return &op;
}

}  // namespace onnxgen
