// GroupedMatMul on the CPU: output[m, j] = input[m] @ weights[g] (+ bias[g]), g = group_indices[m, j].
//
// The (m, j) rows are grouped by g, then one parallel pass over (group, column tile) items runs
// the GEMM core (gemm.h): each group's weights stream from memory once per call.  Constant
// weights are packed once, when the kernel is created (gemm::PackedWeights).
//
// Dense form, private to onnxgen.passes.bf16_linear (a session-time rewrite, never in a model
// file): a node with no group_indices is a linear layer, output = input @ weights with weights
// [K, N] of any float type (bf16 in practice) and input [..., K]: output [..., N] in the input's
// type.
#include <algorithm>
#include <vector>

#include "gemm.h"
#include "ops.h"

namespace onnxgen {
namespace {

constexpr const char* kOp = "GroupedMatMul";

struct GroupedMatMulKernel : KernelBase<GroupedMatMulKernel> {
  gemm::PackedWeights packed;  // constant weights, packed once (when packable)

  explicit GroupedMatMulKernel(const OrtKernelInfo* info) {
    const bool dense = Ort::ConstKernelInfo(info).GetInputCount() == 2;
    packed = gemm::PackedWeights::constant(info, 1, dense ? 2 : 3);
  }

  void Compute(Ort::KernelContext& ctx) {
    if (ctx.GetInputCount() == 2) return dense(ctx);
    grouped(ctx);
  }

  // output[..., 0:N] = input[..., 0:K] @ weights[K, N] (the dense form: see the top of the file).
  void dense(Ort::KernelContext& ctx) {
    const Input x = read_input(ctx, 0), w = read_input(ctx, 1);
    const DType T = float_type(kOp, "input", x.type), WT = float_type(kOp, "weights", w.type);
    if (x.shape.empty()) fail(kOp, "input must have rank >= 1, got a scalar");
    expect_rank(kOp, "weights", w, 2);
    const int64_t K = x.shape.back(), N = w.dim(1), M = K > 0 ? x.size() / K : 0;
    if (w.dim(0) != K)
      fail(kOp, "shapes do not agree: input ", shape_str(x.shape), ", weights ", shape_str(w.shape));
    std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    out_shape.push_back(N);
    Ort::UnownedValue out_value = ctx.GetOutput(0, out_shape);
    char* out = static_cast<char*>(out_value.GetTensorMutableRawData());
    if (M == 0 || N == 0) return;
    const float* xs = x.as<float>();
    if (T != DType::f32) {
      float* x32 = gemm::scratch(1, M * K);
      load_row(x.data, T, x32, M * K);
      xs = x32;
    }
    std::vector<const float*> rows(static_cast<size_t>(M));
    for (int64_t r = 0; r < M; ++r) rows[size_t(r)] = xs + r * K;
    float* c = T == DType::f32 ? reinterpret_cast<float*>(out) : gemm::scratch(0, M * N);
    constexpr int64_t tile = gemm::kTileColumns;
    const int64_t tiles = (N + tile - 1) / tile;
    const bool is_packed = packed.fits(1, K, N);
    if (is_packed && packed.amx_columns(0)) {  // A's rows staged once for every item
      const int64_t kp = amx::depth(K), mp = amx::rows_padded(M);
      uint16_t* a = amx::scratch16(0, mp * kp);  // this thread's; the items only read it
      amx::stage_rows(rows.data(), M, K, mp, kp, a);
      parallel_for(ctx, size_t(tiles), [&](size_t item) {
        const int64_t c0 = int64_t(item) * tile, nc = std::min<int64_t>(tile, N - c0);
        amx::multiply(a, M, kp, packed.amx_columns(0) + (c0 / 16) * kp * 16, int(nc), c + c0, N);
      });
    } else {
      const size_t es = dtype_size(WT);
      parallel_for(ctx, size_t(tiles), [&](size_t item) {
        const int64_t c0 = int64_t(item) * tile, nc = std::min<int64_t>(tile, N - c0);
        if (!is_packed || !packed.multiply(0, rows.data(), M, c0, int(nc), c + c0, N))
          gemm::gemm_tile(rows.data(), M, static_cast<const char*>(w.data) + size_t(c0) * es, WT, N, K, int(nc), c + c0, N);
      });
    }
    if (T != DType::f32)
      parallel_for(ctx, size_t((M + 63) / 64), [&](size_t chunk) {
        for (int64_t r = int64_t(chunk) * 64; r < std::min(M, int64_t(chunk + 1) * 64); ++r)
          store_row(c + r * N, T, out + size_t(r * N) * dtype_size(T), N);
      });
  }

  void grouped(Ort::KernelContext& ctx) {
    const Input x = read_input(ctx, 0), w = read_input(ctx, 1), ind = read_input(ctx, 2), bias = read_input(ctx, 3);
    const DType T = float_type(kOp, "input", x.type);
    float_type(kOp, "weights", w.type);
    if (w.type != x.type)
      fail(kOp, "input 'weights' must have the type of 'input' (element type ", int(x.type), "), got element type ",
           int(w.type));
    if (!ind.present()) fail(kOp, "input 'group_indices' is missing (only a dense node, with inputs input and weights alone, omits it)");
    expect_type(kOp, "group_indices", ind, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64");
    expect_rank(kOp, "input", x, 2);
    expect_rank(kOp, "weights", w, 3);
    expect_rank(kOp, "group_indices", ind, 2);
    if (bias.present()) {
      float_type(kOp, "bias", bias.type);
      if (bias.type != x.type)
        fail(kOp, "input 'bias' must have the type of 'input' (element type ", int(x.type), "), got element type ",
             int(bias.type));
      expect_rank(kOp, "bias", bias, 2);
    }
    const int64_t M = x.dim(0), K = x.dim(1), G = w.dim(0), N = w.dim(2), k = ind.dim(1);
    if (w.dim(1) != K || ind.dim(0) != M)
      fail(kOp, "shapes do not agree: input ", shape_str(x.shape), ", weights ", shape_str(w.shape), ", group_indices ",
           shape_str(ind.shape));
    if (bias.present() && (bias.dim(0) != G || bias.dim(1) != N))
      fail(kOp, "bias must have shape ", shape_str({G, N}), " (weights ", shape_str(w.shape), "), got ",
           shape_str(bias.shape));
    const int64_t rows = M * k;
    const int64_t* gi = ind.as<int64_t>();
    for (int64_t r = 0; r < rows; ++r)
      if (gi[r] < -G || gi[r] >= G)
        fail(kOp, "group_indices must lie in [-", G, ", ", G, "); got ", gi[r], " at [", r / k, ", ", r % k, "]");

    Ort::UnownedValue out_value = ctx.GetOutput(0, {M, k, N});
    char* out = static_cast<char*>(out_value.GetTensorMutableRawData());
    if (rows == 0 || N == 0) return;

    // Group the rows.
    std::vector<int64_t> start(size_t(G + 1), 0), row_of(static_cast<size_t>(rows));
    std::vector<const float*> arows(static_cast<size_t>(rows));
    auto group = [&](int64_t r) { return gi[r] < 0 ? gi[r] + G : gi[r]; };
    for (int64_t r = 0; r < rows; ++r) start[group(r) + 1]++;
    for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
    const float* xs = x.as<float>();
    if (T != DType::f32) {
      float* x32 = gemm::scratch(1, M * K);
      load_row(x.data, T, x32, M * K);
      xs = x32;
    }
    {
      std::vector<int64_t> cursor(start.begin(), start.end() - 1);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t g = cursor[group(r)]++;
        row_of[r] = g;
        arows[g] = xs + (r / k) * K;
      }
    }
    std::vector<int64_t> active;
    for (int64_t g = 0; g < G; ++g)
      if (start[g + 1] > start[g]) active.push_back(g);
    std::vector<float> b32;
    if (bias.present()) {
      b32.resize(static_cast<size_t>(G * N));
      load_row(bias.data, T, b32.data(), G * N);
    }

    const size_t es = dtype_size(T);
    const char* wd = static_cast<const char*>(w.data);
    float* obuf = gemm::scratch(0, rows * N);
    constexpr int64_t tile = gemm::kTileColumns;
    const int64_t tiles = (N + tile - 1) / tile;
    const bool is_packed = packed.fits(G, K, N);
    parallel_for(ctx, size_t(int64_t(active.size()) * tiles), [&](size_t item) {
      const int64_t g = active[item / tiles], c0 = int64_t(item % tiles) * tile;
      const int64_t r0 = start[g], m = start[g + 1] - r0, nc = std::min<int64_t>(tile, N - c0);
      float* o = obuf + r0 * N + c0;
      if (!is_packed || !packed.multiply(g, arows.data() + r0, m, c0, int(nc), o, N))
        gemm::gemm_tile(arows.data() + r0, m, wd + (size_t(g) * K * N + c0) * es, T, N, K, int(nc), o, N);
      if (!b32.empty())
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < nc; ++j) o[r * N + j] += b32[g * N + c0 + j];
    });
    parallel_for(ctx, size_t((rows + 63) / 64), [&](size_t c) {
      for (int64_t r = int64_t(c) * 64; r < std::min(rows, int64_t(c + 1) * 64); ++r)
        store_row(obuf + row_of[r] * N, T, out + size_t(r) * N * es, N);
    });
  }
};

struct GroupedMatMulOp : OpBase<GroupedMatMulOp, GroupedMatMulKernel> {
  // group_indices is optional here only for the dense form (see the top of the file).
  static constexpr uint32_t kOptionalInputs = 0b1100, kOptionalOutputs = 0;
  static constexpr OutputSpec kOutputs[] = {{0, -1, 3}};
  GroupedMatMulOp() {
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      size_t inputs = 0;
      if (OrtStatus* s = Ort::GetApi().ShapeInferContext_GetInputCount(ctx, &inputs)) return s;
      if (inputs >= 3) return infer_outputs(ctx, kOutputs, 1);
      OrtTensorTypeAndShapeInfo* info = nullptr;  // dense: the input's rank
      if (OrtStatus* s = Ort::GetApi().ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return s;
      size_t rank = 0;
      if (OrtStatus* s = Ort::GetApi().GetDimensionsCount(info, &rank)) return s;
      const OutputSpec dense[] = {{0, -1, int(rank)}};
      return infer_outputs(ctx, dense, 1);
    };
  }
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
