// GroupedMatMul on the CPU: output[m, j] = input[m] @ weights[g] (+ bias[g]), g = group_indices[m, j].
//
// The (m, j) rows are grouped by g, then one parallel pass over (group, 64-column tile) items
// runs the GEMM core (gemm.h): each group's weights stream from memory once per call.
#include <algorithm>
#include <vector>

#include "gemm.h"
#include "ops.h"

namespace onnxgen {
namespace {

constexpr const char* kOp = "GroupedMatMul";

struct GroupedMatMulKernel : KernelBase<GroupedMatMulKernel> {
  explicit GroupedMatMulKernel(const OrtKernelInfo*) {}

  void Compute(Ort::KernelContext& ctx) {
    const Input x = read_input(ctx, 0), w = read_input(ctx, 1), ind = read_input(ctx, 2), bias = read_input(ctx, 3);
    const DType T = float_type(kOp, "input", x.type);
    float_type(kOp, "weights", w.type);
    if (w.type != x.type)
      fail(kOp, "input 'weights' must have the type of 'input' (element type ", int(x.type), "), got element type ",
           int(w.type));
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
    int64_t most_rows = 0;
    for (int64_t g : active) most_rows = std::max(most_rows, start[g + 1] - start[g]);
    const int64_t tile = gemm::tile_columns(most_rows), tiles = (N + tile - 1) / tile;
    parallel_for(ctx, size_t(int64_t(active.size()) * tiles), [&](size_t item) {
      const int64_t g = active[item / tiles], c0 = int64_t(item % tiles) * tile;
      const int64_t r0 = start[g], m = start[g + 1] - r0, nc = std::min<int64_t>(tile, N - c0);
      float* o = obuf + r0 * N + c0;
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
