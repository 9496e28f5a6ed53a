// MoE on the CPU: route (fp32), group the (token, slot) rows by expert, then two GEMM phases
// over onnxruntime's threads, each split into (expert, column tile) items so every
// expert's weights stream from memory once per call and even one expert fills every thread:
//   1. h = x @ gate_up_weights[e] (+ bias) per tile, then the activation of that tile -> a
//   2. o = a @ down_weights[e] (+ bias) per tile of H
// and a last pass sums each token's k rows (weighted when weight_position="output").
// fp16/bf16 weights are converted while packed; all arithmetic is fp32.  Constant weights are
// re-laid out once, when the session is created (gemm::PackedWeights).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gemm.h"
#include "ops.h"

namespace onnxgen {
namespace {

constexpr const char* kOp = "MoE";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class Act { silu, gelu, gelu_tanh, relu, swiglu_clamped };

int index_of(const std::string& value, std::initializer_list<const char*> allowed) {
  int i = 0;
  for (const char* a : allowed) {
    if (value == a) return i;
    ++i;
  }
  return -1;
}

struct Attributes {
  bool has_k = false;
  int64_t k = 0, normalize = 0, softmax_after_topk = 0, n_group = 0, topk_group = 0, gated = 1;
  std::string scoring, group_scoring, activation, layout, weight_position;
  float scale = 1.0f, alpha = 1.702f, limit = 7.0f;

  explicit Attributes(const OrtKernelInfo* info) {
    k = attribute_or<int64_t>(info, "k", std::numeric_limits<int64_t>::min());
    has_k = k != std::numeric_limits<int64_t>::min();
    normalize = attribute_or<int64_t>(info, "normalize", 0);
    softmax_after_topk = attribute_or<int64_t>(info, "softmax_after_topk", 0);
    n_group = attribute_or<int64_t>(info, "n_group", 0);
    topk_group = attribute_or<int64_t>(info, "topk_group", 0);
    gated = attribute_or<int64_t>(info, "gated", 1);
    scoring = string_attribute_or(info, "scoring", "softmax");
    group_scoring = string_attribute_or(info, "group_scoring", "top2_sum");
    activation = string_attribute_or(info, "activation", "silu");
    layout = string_attribute_or(info, "gate_up_layout", "concatenated");
    weight_position = string_attribute_or(info, "weight_position", "output");
    scale = attribute_or<float>(info, "routed_scaling_factor", 1.0f);
    alpha = attribute_or<float>(info, "activation_alpha", 1.702f);
    limit = attribute_or<float>(info, "activation_limit", 7.0f);
  }

  // The reference's check_attributes, E known.
  void check(int64_t experts) const {
    std::vector<std::string> errors;
    auto unknown = [&](const char* name, const std::string& value, std::initializer_list<const char*> allowed) {
      if (index_of(value, allowed) >= 0) return;
      std::string list;
      for (const char* a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      errors.push_back("unknown " + std::string(name) + " '" + value + "'; expected one of " + list);
    };
    unknown("scoring", scoring, {"softmax", "sigmoid"});
    unknown("group_scoring", group_scoring, {"top2_sum", "max"});
    unknown("activation", activation, {"silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped"});
    unknown("gate_up_layout", layout, {"concatenated", "interleaved"});
    unknown("weight_position", weight_position, {"output", "input"});
    if (!has_k) errors.push_back("attribute 'k' is required");
    else if (k < 1) errors.push_back("k must be >= 1, got " + std::to_string(k));
    if (softmax_after_topk && scoring != "softmax") errors.push_back("softmax_after_topk=1 needs scoring='softmax'");
    if (activation == "swiglu_clamped" && !gated) errors.push_back("activation 'swiglu_clamped' needs gated=1");
    if (n_group < 0 || topk_group < 0) {
      errors.push_back("n_group and topk_group must be >= 0, got " + std::to_string(n_group) + " and " +
                       std::to_string(topk_group));
    } else if (n_group > 0) {
      if (topk_group < 1 || topk_group > n_group)
        errors.push_back("topk_group must lie in [1, n_group=" + std::to_string(n_group) + "], got " +
                         std::to_string(topk_group));
    } else if (topk_group) {
      errors.push_back("topk_group=" + std::to_string(topk_group) + " needs n_group > 0");
    }
    if (errors.empty()) {
      if (k > experts) {
        errors.push_back("k=" + std::to_string(k) + " exceeds the number of experts E=" + std::to_string(experts));
      } else if (n_group > 0) {
        if (experts % n_group) {
          errors.push_back("E=" + std::to_string(experts) + " experts do not split into n_group=" +
                           std::to_string(n_group) + " groups");
        } else {
          int64_t per_group = experts / n_group;
          if (group_scoring == "top2_sum" && per_group < 2)
            errors.push_back("group_scoring 'top2_sum' needs >= 2 experts per group, got " + std::to_string(per_group));
          if (k > topk_group * per_group)
            errors.push_back("k=" + std::to_string(k) + " exceeds the " + std::to_string(topk_group * per_group) +
                             " experts of the topk_group=" + std::to_string(topk_group) + " kept groups");
        }
      }
    }
    if (!errors.empty()) {
      std::string all;
      for (auto& e : errors) all += (all.empty() ? "" : "; ") + e;
      fail(kOp, all);
    }
  }
};

// ---- routing (fp32, per token) ----------------------------------------------------------

// The k best of c[0:n], best first, ties to the lower index (as TopK).
void top_k(const float* c, int64_t n, int64_t k, int64_t* out, std::vector<char>& taken) {
  taken.assign(size_t(n), 0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e)
      if (!taken[e] && (best < 0 || c[e] > c[best] || (std::isnan(c[e]) && !std::isnan(c[best])))) best = e;
    taken[best] = 1;
    out[j] = best;
  }
}

struct RouteScratch {
  std::vector<float> logits, scores, choice, groups, bias;
  std::vector<int64_t> kept;
  std::vector<char> taken;
};

void route_token(const Attributes& a, const void* logits_row, DType logits_type, const float* selection_bias,
                 int64_t E, int64_t* idx, float* w, RouteScratch& s) {
  s.logits.resize(E);
  s.scores.resize(E);
  load_row(logits_row, logits_type, s.logits.data(), E);
  float* sc = s.scores.data();
  if (a.softmax_after_topk) {
    std::copy(s.logits.begin(), s.logits.end(), sc);
  } else if (a.scoring == "softmax") {
    float mx = kNegInf;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, s.logits[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (sc[e] = std::exp(s.logits[e] - mx));
    for (int64_t e = 0; e < E; ++e) sc[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) sc[e] = 1.0f / (1.0f + std::exp(-s.logits[e]));
  }
  const float* choice = sc;
  if (selection_bias || a.n_group > 0) {
    s.choice.resize(E);
    for (int64_t e = 0; e < E; ++e) s.choice[e] = sc[e] + (selection_bias ? selection_bias[e] : 0.0f);
    choice = s.choice.data();
  }
  if (a.n_group > 0) {
    const int64_t G = a.n_group, per = E / G;
    s.groups.resize(G);
    for (int64_t g = 0; g < G; ++g) {
      const float* c = s.choice.data() + g * per;
      float best = kNegInf, second = kNegInf;
      for (int64_t i = 0; i < per; ++i) {
        if (c[i] > best) {
          second = best;
          best = c[i];
        } else if (c[i] > second) {
          second = c[i];
        }
      }
      s.groups[g] = a.group_scoring == "max" ? best : second + best;
    }
    s.kept.resize(a.topk_group);
    top_k(s.groups.data(), G, a.topk_group, s.kept.data(), s.taken);
    std::vector<char>& keep = s.taken;  // top_k leaves exactly the kept groups marked
    for (int64_t g = 0; g < G; ++g)
      if (!keep[g])
        for (int64_t i = 0; i < per; ++i) s.choice[g * per + i] = kNegInf;
  }
  top_k(choice, E, a.k, idx, s.taken);
  for (int64_t j = 0; j < a.k; ++j) w[j] = sc[idx[j]];
  if (a.softmax_after_topk) {
    float mx = kNegInf, sum = 0.0f;
    for (int64_t j = 0; j < a.k; ++j) mx = std::max(mx, w[j]);
    for (int64_t j = 0; j < a.k; ++j) sum += (w[j] = std::exp(w[j] - mx));
    for (int64_t j = 0; j < a.k; ++j) w[j] /= sum;
  }
  if (a.normalize) {
    float sum = 0.0f;
    for (int64_t j = 0; j < a.k; ++j) sum += w[j];
    for (int64_t j = 0; j < a.k; ++j) w[j] /= sum;
  }
  for (int64_t j = 0; j < a.k; ++j) w[j] *= a.scale;
}

// ---- activations: out[0:n] from gate[0:n] and up[0:n] (fp32) ----------------------------

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

void activate(Act act, bool gated, float alpha, float limit, const float* gate, const float* up, float* out, int n) {
  int i = 0;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  switch (act) {
    case Act::silu:
      for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(g, sigmoid8(g)));
      }
      for (; i < n; ++i) out[i] = gate[i] * (1.0f / (1.0f + std::exp(-gate[i])));
      break;
    case Act::gelu:
      for (; i < n; ++i) out[i] = 0.5f * gate[i] * (1.0f + std::erf(gate[i] * 0.70710678118654752f));
      break;
    case Act::gelu_tanh: {
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      const __m256 vc = _mm256_set1_ps(c), v3 = _mm256_set1_ps(0.044715f), two = _mm256_set1_ps(2.0f);
      for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 y = _mm256_mul_ps(vc, _mm256_fmadd_ps(_mm256_mul_ps(v3, g), _mm256_mul_ps(g, g), g));
        __m256 t = _mm256_sub_ps(_mm256_mul_ps(two, sigmoid8(_mm256_mul_ps(two, y))), one);  // tanh(y)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, t)));
      }
      for (; i < n; ++i) {
        float g = gate[i];
        out[i] = 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
      }
      break;
    }
    case Act::relu:
      for (; i < n; ++i) out[i] = std::max(gate[i], 0.0f);
      break;
    case Act::swiglu_clamped: {
      const __m256 va = _mm256_set1_ps(alpha), lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit);
      for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_min_ps(_mm256_loadu_ps(gate + i), lim);
        __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(up + i), nlim), lim);
        __m256 glu = _mm256_mul_ps(g, sigmoid8(_mm256_mul_ps(va, g)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_add_ps(u, one), glu));
      }
      for (; i < n; ++i) {
        float g = std::min(gate[i], limit), u = std::min(std::max(up[i], -limit), limit);
        out[i] = (u + 1.0f) * (g * (1.0f / (1.0f + std::exp(-alpha * g))));
      }
      return;
    }
  }
  if (gated) {
    i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), _mm256_loadu_ps(up + i)));
    for (; i < n; ++i) out[i] *= up[i];
  }
}

// ---- the kernel ---------------------------------------------------------------------------

struct MoEKernel : KernelBase<MoEKernel> {
  Attributes attrs;
  gemm::PackedWeights gate_up, down;  // packed when the weights are constant (and packable)
  explicit MoEKernel(const OrtKernelInfo* info)
      : attrs(info),
        gate_up(gemm::PackedWeights::constant(info, 2, 3, attrs.gated && attrs.layout == "concatenated")),
        down(gemm::PackedWeights::constant(info, 4, 3)) {}

  void Compute(Ort::KernelContext& ctx) {
    const Attributes& a = attrs;
    static const char* names[] = {"X", "router_logits", "gate_up_weights", "gate_up_bias",
                                  "down_weights", "down_bias", "selection_bias"};
    static const size_t ranks[] = {2, 2, 3, 2, 3, 2, 1};
    Input in[7];
    DType types[7] = {};
    for (size_t i = 0; i < 7; ++i) {
      in[i] = read_input(ctx, i);
      if (i >= 2 && !in[i].present()) continue;
      types[i] = float_type(kOp, names[i], in[i].type);
      expect_rank(kOp, names[i], in[i], ranks[i]);
    }
    const Input &X = in[0], &logits = in[1], &gu = in[2], &gub = in[3], &dw = in[4], &db = in[5], &sb = in[6];
    if (!gu.present() || !dw.present())
      fail(kOp, "gate_up_weights and down_weights are required unless the 'expert' graph is given");
    for (size_t i : {2, 3, 4, 5})
      if (in[i].present() && in[i].type != X.type)
        fail(kOp, "input '", names[i], "' must have X's type (element type ", int(X.type), "), got element type ",
             int(in[i].type));
    const DType T = types[0];
    const int64_t tokens = X.dim(0), hidden = X.dim(1);
    if (logits.dim(0) != tokens)
      fail(kOp, "T (tokens) disagrees: X has ", tokens, " rows but router_logits has ", logits.dim(0));
    const int64_t E = logits.dim(1);
    a.check(E);
    if (sb.present() && sb.dim(0) != E)
      fail(kOp, "E (experts) disagrees: router_logits has ", E, " but selection_bias has shape ", shape_str(sb.shape));
    const int64_t n1 = gu.dim(2), inter = dw.dim(1);
    if (gu.dim(0) != E || dw.dim(0) != E)
      fail(kOp, "E (experts) disagrees: router_logits has ", E, ", gate_up_weights ", gu.dim(0), ", down_weights ",
           dw.dim(0));
    if (gu.dim(1) != hidden || dw.dim(2) != hidden)
      fail(kOp, "H (hidden size) disagrees: X has ", hidden, ", gate_up_weights ", gu.dim(1), ", down_weights ",
           dw.dim(2));
    const int64_t want_n1 = a.gated ? 2 * inter : inter;
    if (n1 != want_n1)
      fail(kOp, "gate_up_weights has N1=", n1, " columns but down_weights has I=", inter, "; ",
           a.gated ? "gated" : "non-gated", " experts need N1=", want_n1);
    if (gub.present() && (gub.dim(0) != E || gub.dim(1) != n1))
      fail(kOp, "gate_up_bias must have shape ", shape_str({E, n1}), ", got ", shape_str(gub.shape));
    if (db.present() && (db.dim(0) != E || db.dim(1) != hidden))
      fail(kOp, "down_bias must have shape ", shape_str({E, hidden}), ", got ", shape_str(db.shape));

    const int64_t k = a.k;
    const Act act = Act(index_of(a.activation, {"silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped"}));
    const bool interleaved = a.layout == "interleaved", weight_input = a.weight_position == "input";

    // Outputs.
    Ort::UnownedValue y_value = ctx.GetOutput(0, {tokens, hidden});
    void* Y = y_value.GetTensorMutableRawData();
    int64_t* out_idx = nullptr;
    float* out_w = nullptr;
    const size_t outputs = ctx.GetOutputCount();
    if (outputs > 1) {
      Ort::UnownedValue v = ctx.GetOutput(1, {tokens, k});
      if (static_cast<OrtValue*>(v)) out_idx = v.GetTensorMutableData<int64_t>();
    }
    if (outputs > 2) {
      Ort::UnownedValue v = ctx.GetOutput(2, {tokens, k});
      if (static_cast<OrtValue*>(v)) out_w = v.GetTensorMutableData<float>();
    }
    if (tokens == 0) return;

    // 1. Routing.
    std::vector<int64_t> idx(static_cast<size_t>(tokens * k));
    std::vector<float> wts(static_cast<size_t>(tokens * k));
    std::vector<float> sel;
    if (sb.present()) {
      sel.resize(E);
      load_row(sb.data, types[6], sel.data(), E);
    }
    {
      const DType lt = types[1];
      const size_t lsize = dtype_size(lt);
      const int64_t chunk = 32, chunks = (tokens + chunk - 1) / chunk;
      parallel_for(ctx, size_t(chunks), [&](size_t c) {
        RouteScratch s;
        for (int64_t t = int64_t(c) * chunk; t < std::min(tokens, int64_t(c + 1) * chunk); ++t)
          route_token(a, static_cast<const char*>(logits.data) + t * E * lsize, lt, sel.empty() ? nullptr : sel.data(),
                      E, idx.data() + t * k, wts.data() + t * k, s);
      });
    }
    if (out_idx) std::copy(idx.begin(), idx.end(), out_idx);
    if (out_w) std::copy(wts.begin(), wts.end(), out_w);

    // 2. Group rows (token, slot) by expert, tokens in order within an expert.
    const int64_t rows = tokens * k;
    std::vector<int64_t> start(size_t(E + 1), 0), row_of(static_cast<size_t>(rows)), token_of(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) start[idx[r] + 1]++;
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    {
      std::vector<int64_t> cursor(start.begin(), start.end() - 1);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t g = cursor[idx[r]]++;
        row_of[r] = g;
        token_of[g] = r / k;
      }
    }
    std::vector<int64_t> active;
    for (int64_t e = 0; e < E; ++e)
      if (start[e + 1] > start[e]) active.push_back(e);

    // Inputs of the first GEMM as fp32 row pointers: X itself when it is fp32 and unscaled.
    float* xbuf = nullptr;
    std::vector<const float*> xrows(static_cast<size_t>(rows));
    if (weight_input) {
      xbuf = gemm::scratch(0, rows * hidden);
      const size_t xs = dtype_size(T);
      parallel_for(ctx, size_t(rows), [&](size_t r) {
        float* dst = xbuf + r * hidden;
        load_row(static_cast<const char*>(X.data) + size_t(r / k) * hidden * xs, T, dst, hidden);
        scale_row(dst, wts[r], hidden);
      });
      for (int64_t r = 0; r < rows; ++r) xrows[row_of[r]] = xbuf + r * hidden;
    } else if (T == DType::f32) {
      for (int64_t g = 0; g < rows; ++g) xrows[g] = X.as<float>() + token_of[g] * hidden;
    } else {
      xbuf = gemm::scratch(0, tokens * hidden);
      for (int64_t t = 0; t < tokens; ++t)
        load_row(static_cast<const char*>(X.data) + t * hidden * 2, T, xbuf + t * hidden, hidden);
      for (int64_t g = 0; g < rows; ++g) xrows[g] = xbuf + token_of[g] * hidden;
    }

    // Biases as fp32.
    std::vector<float> bias1, bias2;
    if (gub.present()) {
      bias1.resize(static_cast<size_t>(E * n1));
      load_row(gub.data, T, bias1.data(), E * n1);
    }
    if (db.present()) {
      bias2.resize(static_cast<size_t>(E * hidden));
      load_row(db.data, T, bias2.data(), E * hidden);
    }

    const size_t ws = dtype_size(T);
    const bool packed_gate_up = gate_up.fits(E, hidden, n1), packed_down = down.fits(E, inter, hidden);
    const char* w1 = static_cast<const char*>(gu.data);
    const char* w2 = static_cast<const char*>(dw.data);
    constexpr int64_t kTile = gemm::kTileColumns;

    // 3. gate/up GEMM + activation: items (expert, tile of activation columns).
    float* hbuf = gemm::scratch(1, rows * n1);
    float* abuf = gemm::scratch(2, rows * inter);
    const int64_t act_tile = (a.gated && interleaved) ? kTile / 2 : kTile;
    const int64_t tiles1 = (inter + act_tile - 1) / act_tile;
    parallel_for(ctx, size_t(int64_t(active.size()) * tiles1), [&](size_t item) {
      const int64_t e = active[item / tiles1], tile = int64_t(item % tiles1);
      const int64_t r0 = start[e], m = start[e + 1] - r0;
      const int64_t c0 = tile * act_tile, nc = std::min(act_tile, inter - c0);  // activation columns
      const char* we = w1 + size_t(e) * hidden * n1 * ws;
      float* h = hbuf + r0 * n1;
      // The B column ranges of this item: [first, first + width) (and the up half when concatenated).
      auto run = [&](int64_t col, int64_t width) {
        if (!packed_gate_up || !gate_up.multiply(e, xrows.data() + r0, m, col, int(width), h + col, n1))
          gemm::gemm_tile(xrows.data() + r0, m, we + col * ws, T, n1, hidden, int(width), h + col, n1);
        if (!bias1.empty())
          for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < width; ++j) h[r * n1 + col + j] += bias1[e * n1 + col + j];
      };
      alignas(32) float g[gemm::kMaxNT], u[gemm::kMaxNT];
      if (!a.gated) {
        run(c0, nc);
        for (int64_t r = 0; r < m; ++r)
          activate(act, false, a.alpha, a.limit, h + r * n1 + c0, nullptr, abuf + (r0 + r) * inter + c0, int(nc));
      } else if (interleaved) {
        run(2 * c0, 2 * nc);
        for (int64_t r = 0; r < m; ++r) {
          const float* hr = h + r * n1 + 2 * c0;
          for (int64_t j = 0; j < nc; ++j) {
            g[j] = hr[2 * j];
            u[j] = hr[2 * j + 1];
          }
          activate(act, true, a.alpha, a.limit, g, u, abuf + (r0 + r) * inter + c0, int(nc));
        }
      } else {
        run(c0, nc);
        run(inter + c0, nc);
        for (int64_t r = 0; r < m; ++r)
          activate(act, true, a.alpha, a.limit, h + r * n1 + c0, h + r * n1 + inter + c0,
                   abuf + (r0 + r) * inter + c0, int(nc));
      }
    });

    // 4. down GEMM: items (expert, tile of H).
    float* obuf = gemm::scratch(3, rows * hidden);
    std::vector<const float*> arows(static_cast<size_t>(rows));
    for (int64_t g = 0; g < rows; ++g) arows[g] = abuf + g * inter;
    const int64_t tiles2 = (hidden + kTile - 1) / kTile;
    parallel_for(ctx, size_t(int64_t(active.size()) * tiles2), [&](size_t item) {
      const int64_t e = active[item / tiles2], tile = int64_t(item % tiles2);
      const int64_t r0 = start[e], m = start[e + 1] - r0;
      const int64_t c0 = tile * kTile, nc = std::min<int64_t>(kTile, hidden - c0);
      float* o = obuf + r0 * hidden + c0;
      if (!packed_down || !down.multiply(e, arows.data() + r0, m, c0, int(nc), o, hidden))
        gemm::gemm_tile(arows.data() + r0, m, w2 + (size_t(e) * inter * hidden + c0) * ws, T, hidden, inter, int(nc), o,
                        hidden);
      if (!bias2.empty())
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < nc; ++j) o[r * hidden + j] += bias2[e * hidden + c0 + j];
    });

    // 5. Combine: Y[t] = sum_j (w[t, j] or 1) * o[row of (t, j)].
    const int64_t chunk = 8, chunks = (tokens + chunk - 1) / chunk;
    parallel_for(ctx, size_t(chunks), [&](size_t c) {
      std::vector<float> acc(static_cast<size_t>(hidden));
      for (int64_t t = int64_t(c) * chunk; t < std::min(tokens, int64_t(c + 1) * chunk); ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < k; ++j)
          axpy(acc.data(), weight_input ? 1.0f : wts[t * k + j], obuf + row_of[t * k + j] * hidden, hidden);
        store_row(acc.data(), T, static_cast<char*>(Y) + size_t(t) * hidden * ws, hidden);
      }
    });
  }
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
