// A compiled score_mod: the bytecode of onnxgen.passes.compile_score_mod, interpreted over a
// vector of scores of one head: one query row's visible keys of a cache block, or a whole tile of
// rows at once (one call per head instead of one per row and head: dispatch cost most of ALiBi's
// time in a prefill).
//
// Program: [MAGIC, VERSION, num_registers, num_instructions], then per instruction
// (opcode, dst, a, b, c), then the integer tables; the float tables come in a second attribute.
// Registers 0-4 are the inputs score (float), batch, head (integers, uniform), q_pos and kv_pos
// (integers, one per score, which the caller writes into the scratch).  A register is float or
// integer (int32, as the graph's indices; int64 values are computed in 32 bits; booleans 0/1) as
// its opcode says; it is "uniform" (one value, broadcast) when every register it reads is.  Each
// instruction is one tight loop over the vector, with its operands' strides 0 (uniform) or 1.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace onnxgen {

enum ScoreOp : int64_t {
  CONST_F, CONST_I, COPY_F, COPY_I,
  ADD_F, SUB_F, MUL_F, DIV_F, MIN_F, MAX_F, POW_F,
  ADD_I, SUB_I, MUL_I, DIV_I, MIN_I, MAX_I,
  NEG_F, ABS_F, TANH_F, EXP_F, LOG_F, SQRT_F, FLOOR_F, CEIL_F, RECIP_F, SIGMOID_F, RELU_F,
  NEG_I, ABS_I,
  LT_F, LE_F, GT_F, GE_F, EQ_F, LT_I, LE_I, GT_I, GE_I, EQ_I,
  AND, OR, XOR, NOT,
  WHERE_F, WHERE_I,
  F2I, I2F, I2B, F2B,
  GATHER_F, GATHER_I,
  NUM_SCORE_OPS
};

using ScoreInt = int32_t;  // integer registers: AVX2 vectorises 32-bit lanes (and their conversions)

// e^x for 8 lanes with IEEE edges: exp256's polynomial (relative error ~2e-7) inside its range,
// +inf above it, 0 below, NaN kept.
inline __m256 score_exp256(__m256 x) {
  __m256 y = exp256(x);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// tanh for 8 lanes (Cephes tanhf): an odd polynomial below |x| = 0.625, 1 - 2 / (e^2|x| + 1)
// above (±1 from |x| ~ 9 on), the sign restored; NaN kept.  Relative error ~3e-7.
inline __m256 score_tanh256(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp256(_mm256_min_ps(_mm256_add_ps(a, a), _mm256_set1_ps(40.f)));
  __m256 large = _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
  large = _mm256_or_ps(large, _mm256_and_ps(sign, x));
  __m256 y = _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

class ScoreProgram {
 public:
  static constexpr int64_t kMagic = 0x53434F52, kVersion = 1, kInputs = 5;

  ScoreProgram() = default;

  // Parse and check the attributes; an empty `code` means no program.
  ScoreProgram(const std::vector<int64_t>& code, std::vector<float> tables, const char* op) : ftables_(std::move(tables)) {
    if (code.empty()) return;
    auto bad = [&](auto... what) { fail(op, "score_program: ", what...); };
    if (code.size() < 4 || code[0] != kMagic || code[1] != kVersion) bad("not a version-1 program (recompile the model)");
    regs_ = code[2];
    const int64_t count = code[3];
    if (regs_ < kInputs || count < 1 || int64_t(code.size()) < 4 + 5 * count || regs_ > 4096)
      bad("bad header (", regs_, " registers, ", count, " instructions)");
    itables_.assign(code.begin() + 4 + 5 * count, code.end());
    is_float_.assign(size_t(regs_), false), uniform_.assign(size_t(regs_), false), headless_.assign(size_t(regs_), true);
    headless_[0] = headless_[2] = false;
    is_float_[0] = true, uniform_[1] = uniform_[2] = true;  // one call: one batch entry and head
    std::vector<bool> written(size_t(regs_), false);
    for (int i = 0; i < kInputs; ++i) written[size_t(i)] = true;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t* r = &code[size_t(4 + 5 * i)];
      Instr in{r[0], r[1], r[2], r[3], r[4]};
      if (in.op < 0 || in.op >= NUM_SCORE_OPS) bad("unknown opcode ", in.op);
      if (in.dst < kInputs || in.dst >= regs_ || written[size_t(in.dst)]) bad("instruction ", i, " writes register ", in.dst);
      const int arity = operands(in.op);
      const int64_t ops[3] = {in.a, in.b, in.c};
      bool uniform = true, headless = true;
      for (int k = 0; k < arity; ++k) {
        if (ops[k] < 0 || ops[k] >= regs_ || !written[size_t(ops[k])]) bad("instruction ", i, " reads register ", ops[k]);
        uniform = uniform && uniform_[size_t(ops[k])];
        headless = headless && headless_[size_t(ops[k])];
        if (is_float_[size_t(ops[k])] != operand_is_float(in.op, k))
          bad("instruction ", i, " (opcode ", in.op, ") reads register ", ops[k], " of the wrong type");
      }
      if (in.op == GATHER_F || in.op == GATHER_I) {
        const int64_t size = in.op == GATHER_F ? int64_t(ftables_.size()) : int64_t(itables_.size());
        if (in.b < 0 || in.c <= 0 || in.b + in.c > size) bad("instruction ", i, " reads a table outside its bounds");
      }
      written[size_t(in.dst)] = true;
      uniform_[size_t(in.dst)] = uniform;
      headless_[size_t(in.dst)] = headless;
      may_fail_ |= in.op == DIV_I || ((in.op == GATHER_F || in.op == GATHER_I) && !uniform_[size_t(in.a)]);
      is_float_[size_t(in.dst)] = result_is_float(in.op);
      code_.push_back(in);
    }
    if (!is_float_[size_t(code_.back().dst)]) bad("the last instruction must compute the float score");
    headless_[size_t(code_.back().dst)] = false;  // the result is written into each head's scores
  }

  bool empty() const { return code_.empty(); }

  // Whether a score can raise an error (an integer division, a Gather whose index varies with the
  // positions): such a program runs on visible scores only, one row at a time, since a masked
  // position may hold an index its table lacks.  Others may run over a whole tile of rows,
  // masked scores included (what they compute there is discarded).
  bool may_fail() const { return may_fail_; }

  // Registers for vectors of up to `width` scores (see scratch); the caller writes the positions
  // of each score into q_pos() and kv_pos().
  struct Scratch {
    std::vector<float> f;
    std::vector<ScoreInt> i;
    int64_t width = 0;
    ScoreInt* q_pos() { return &i[size_t(3 * width)]; }
    ScoreInt* kv_pos() { return &i[size_t(4 * width)]; }
  };
  // The calling thread's registers, laid out for `width`: kept between calls, since a prefill's
  // tiles of 16 rows x 128 keys take 8 KiB per register, and zeroing fresh ones per tile and head
  // cost as much as the program.
  Scratch& scratch(int64_t width) const {
    thread_local Scratch m;
    if (m.f.size() < size_t(regs_ * width)) m.f.resize(size_t(regs_ * width)), m.i.resize(size_t(regs_ * width));
    m.width = width;
    return m;
  }

  // The registers that depend on the positions and batch alone (ALiBi's float(kv_pos - q_pos)),
  // computed once for every head that reads the same n positions: call after writing them.
  void prepare(int64_t n, int64_t batch, Scratch& m) const {
    if (has_avx512()) run_wide(nullptr, n, batch, -1, m, true);
    else interpret(nullptr, n, batch, -1, m, true);
  }

  // s[t] <- score_mod(s[t], batch, head, q_pos[t], kv_pos[t]) for t < n (n <= the scratch's
  // width), after prepare(n, batch).  Batch and head are uniform, so what depends on them alone
  // (ALiBi's slope, a table row) is computed once per call.
  void run(float* s, int64_t n, int64_t batch, int64_t head, Scratch& m) const {
    if (has_avx512()) run_wide(s, n, batch, head, m, false);
    else interpret(s, n, batch, head, m, false);
  }

 private:
  // The same loops compiled for AVX-512, 16 lanes: a prefill's ALiBi cost 1.5x less over
  // plain attention than with 8.  (GCC's target_clones would do this, but its dispatcher lets no
  // exception through.)
  ONNXGEN_AVX512 void run_wide(float* s, int64_t n, int64_t batch, int64_t head, Scratch& m, bool headless) const {
    interpret(s, n, batch, head, m, headless);
  }

  // The instructions that depend on neither the score nor the head (`headless`), or the others.
  __attribute__((always_inline)) inline void interpret(float* s, int64_t n, int64_t batch, int64_t head, Scratch& m,
                                                       bool headless) const {
    if (n <= 0) return;
    const int64_t W = m.width;
    // The score input and the result are `s` itself, no copies in or out: every instruction is
    // element-wise (reads index t, writes index t) and the result is written by the last one
    // alone, so it may overwrite the scores it reads.
    const int64_t out = code_.back().dst;
    auto F = [&](int64_t r) { return r == 0 || r == out ? s : &m.f[size_t(r * W)]; };
    auto I = [&](int64_t r) { return &m.i[size_t(r * W)]; };
    auto st = [&](int64_t r) { return uniform_[size_t(r)] ? int64_t(0) : int64_t(1); };
    I(1)[0] = ScoreInt(batch), I(2)[0] = ScoreInt(head);
    for (const Instr& in : code_) {
      if (headless_[size_t(in.dst)] != headless) continue;
      const int64_t len = uniform_[size_t(in.dst)] ? 1 : n;
      const int64_t sa = in.op == CONST_F || in.op == CONST_I ? 0 : st(in.a);
      const int64_t sb = operands(in.op) > 1 ? st(in.b) : 0, sc = operands(in.op) > 2 ? st(in.c) : 0;
      float* fo = F(in.dst);
      ScoreInt* io = I(in.dst);
      switch (in.op) {
        case CONST_F: { float v; const int32_t bits = int32_t(in.a); std::memcpy(&v, &bits, 4); fo[0] = v; break; }
        case CONST_I: io[0] = ScoreInt(in.a); break;
        case COPY_F: unary(F(in.a), sa, fo, len, [](float x) { return x; }); break;
        case COPY_I: unary(I(in.a), sa, io, len, [](ScoreInt x) { return x; }); break;
        case ADD_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return x + y; }); break;
        case SUB_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return x - y; }); break;
        case MUL_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return x * y; }); break;
        case DIV_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return x / y; }); break;
        case MIN_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return std::isnan(x) || std::isnan(y) ? NAN : std::min(x, y); }); break;
        case MAX_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return std::isnan(x) || std::isnan(y) ? NAN : std::max(x, y); }); break;
        case POW_F: binary(F(in.a), sa, F(in.b), sb, fo, len, [](float x, float y) { return std::pow(x, y); }); break;
        case ADD_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x + y; }); break;
        case SUB_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x - y; }); break;
        case MUL_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x * y; }); break;
        case DIV_I: {
          const ScoreInt* d = I(in.b);
          for (int64_t t = 0; t < len; ++t)
            if (d[t * sb] == 0) fail("PagedAttention", "score_mod: integer division by zero");
          binary(I(in.a), sa, d, sb, io, len, [](ScoreInt x, ScoreInt y) { return x / y; });
          break;
        }
        case MIN_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return std::min(x, y); }); break;
        case MAX_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return std::max(x, y); }); break;
        case NEG_F: unary(F(in.a), sa, fo, len, [](float x) { return -x; }); break;
        case ABS_F: unary(F(in.a), sa, fo, len, [](float x) { return std::fabs(x); }); break;
        case TANH_F: vector_unary(F(in.a), sa, fo, len, score_tanh256, [](float x) { return std::tanh(x); }); break;
        case EXP_F: vector_unary(F(in.a), sa, fo, len, score_exp256, [](float x) { return std::exp(x); }); break;
        case SIGMOID_F:
          vector_unary(F(in.a), sa, fo, len, [](__m256 x) {
            const __m256 one = _mm256_set1_ps(1.f);
            return _mm256_div_ps(one, _mm256_add_ps(one, score_exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
          }, [](float x) { return 1.f / (1.f + std::exp(-x)); });
          break;
        case LOG_F: unary(F(in.a), sa, fo, len, [](float x) { return std::log(x); }); break;
        case SQRT_F: unary(F(in.a), sa, fo, len, [](float x) { return std::sqrt(x); }); break;
        case FLOOR_F: unary(F(in.a), sa, fo, len, [](float x) { return std::floor(x); }); break;
        case CEIL_F: unary(F(in.a), sa, fo, len, [](float x) { return std::ceil(x); }); break;
        case RECIP_F: unary(F(in.a), sa, fo, len, [](float x) { return 1.f / x; }); break;
        case RELU_F: unary(F(in.a), sa, fo, len, [](float x) { return x > 0.f ? x : (std::isnan(x) ? x : 0.f); }); break;
        case NEG_I: unary(I(in.a), sa, io, len, [](ScoreInt x) { return -x; }); break;
        case ABS_I: unary(I(in.a), sa, io, len, [](ScoreInt x) { return x < 0 ? -x : x; }); break;
        case LT_F: binary(F(in.a), sa, F(in.b), sb, io, len, [](float x, float y) { return ScoreInt(x < y); }); break;
        case LE_F: binary(F(in.a), sa, F(in.b), sb, io, len, [](float x, float y) { return ScoreInt(x <= y); }); break;
        case GT_F: binary(F(in.a), sa, F(in.b), sb, io, len, [](float x, float y) { return ScoreInt(x > y); }); break;
        case GE_F: binary(F(in.a), sa, F(in.b), sb, io, len, [](float x, float y) { return ScoreInt(x >= y); }); break;
        case EQ_F: binary(F(in.a), sa, F(in.b), sb, io, len, [](float x, float y) { return ScoreInt(x == y); }); break;
        case LT_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return ScoreInt(x < y); }); break;
        case LE_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return ScoreInt(x <= y); }); break;
        case GT_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return ScoreInt(x > y); }); break;
        case GE_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return ScoreInt(x >= y); }); break;
        case EQ_I: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return ScoreInt(x == y); }); break;
        case AND: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x & y; }); break;
        case OR: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x | y; }); break;
        case XOR: binary(I(in.a), sa, I(in.b), sb, io, len, [](ScoreInt x, ScoreInt y) { return x ^ y; }); break;
        case NOT: unary(I(in.a), sa, io, len, [](ScoreInt x) { return x ^ 1; }); break;
        case WHERE_F: {
          const ScoreInt* c = I(in.a);
          const float *x = F(in.b), *y = F(in.c);
          for (int64_t t = 0; t < len; ++t) fo[t] = c[t * sa] ? x[t * sb] : y[t * sc];
          break;
        }
        case WHERE_I: {
          const ScoreInt *c = I(in.a), *x = I(in.b), *y = I(in.c);
          for (int64_t t = 0; t < len; ++t) io[t] = c[t * sa] ? x[t * sb] : y[t * sc];
          break;
        }
        case F2I: unary(F(in.a), sa, io, len, [](float x) { return std::isfinite(x) ? ScoreInt(x) : ScoreInt(0); }); break;
        case I2F: unary(I(in.a), sa, fo, len, [](ScoreInt x) { return float(x); }); break;
        case I2B: unary(I(in.a), sa, io, len, [](ScoreInt x) { return ScoreInt(x != 0); }); break;
        case F2B: unary(F(in.a), sa, io, len, [](float x) { return ScoreInt(x != 0.f); }); break;
        case GATHER_F: case GATHER_I: {
          const ScoreInt* idx = I(in.a);
          for (int64_t t = 0; t < len; ++t) {
            int64_t k = idx[t * sa];
            if (k < 0) k += in.c;
            if ((k < 0 || k >= in.c) && sa)
              fail("PagedAttention", "score_mod: Gather index ", idx[t], " is outside its table of ", in.c, " entries (batch ",
                   batch, ", q_pos ", I(3)[t], ", kv_pos ", I(4)[t], ")");
            if (k < 0 || k >= in.c)
              fail("PagedAttention", "score_mod: Gather index ", idx[0], " is outside its table of ", in.c, " entries (batch ",
                   batch, ", head ", head, ")");
            if (in.op == GATHER_F) fo[t] = ftables_[size_t(in.b + k)];
            else io[t] = ScoreInt(itables_[size_t(in.b + k)]);
          }
          break;
        }
        default: break;
      }
    }
    if (!headless && uniform_[size_t(out)]) std::fill_n(s + 1, n - 1, s[0]);  // a constant result: s[0] only
  }
  struct Instr {
    int64_t op, dst, a, b, c;
  };

  static int operands(int64_t op) {
    switch (op) {
      case CONST_F: case CONST_I: return 0;
      case COPY_F: case COPY_I: case NOT: case F2I: case I2F: case I2B: case F2B: case GATHER_F: case GATHER_I: return 1;
      case WHERE_F: case WHERE_I: return 3;
      default: return op >= NEG_F && op <= ABS_I ? 1 : 2;
    }
  }
  static bool operand_is_float(int64_t op, int k) {
    switch (op) {
      case COPY_F: case ADD_F: case SUB_F: case MUL_F: case DIV_F: case MIN_F: case MAX_F: case POW_F:
      case LT_F: case LE_F: case GT_F: case GE_F: case EQ_F: case F2I: case F2B: return true;
      case WHERE_F: return k > 0;
      default: return op >= NEG_F && op <= RELU_F;
    }
  }
  static bool result_is_float(int64_t op) {
    switch (op) {
      case CONST_F: case COPY_F: case ADD_F: case SUB_F: case MUL_F: case DIV_F: case MIN_F: case MAX_F: case POW_F:
      case WHERE_F: case I2F: case GATHER_F: return true;
      default: return op >= NEG_F && op <= RELU_F;
    }
  }

  // out[t] = f(a[t * sa]) and out[t] = f(a[t * sa], b[t * sb]), with loops the compiler vectorises.
  template <typename A, typename O, typename Fn>
  __attribute__((always_inline)) static void unary(const A* a, int64_t sa, O* out, int64_t n, Fn f) {
    if (sa) for (int64_t t = 0; t < n; ++t) out[t] = f(a[t]);
    else { const O v = f(a[0]); for (int64_t t = 0; t < n; ++t) out[t] = v; }
  }
  // Float -> float with an 8-lane version `v` of `f` (the tail and uniform operands use `f`).
  template <typename V, typename Fn>
  __attribute__((always_inline)) static void vector_unary(const float* a, int64_t sa, float* out, int64_t n, V v, Fn f) {
    if (!sa) { const float y = f(a[0]); for (int64_t t = 0; t < n; ++t) out[t] = y; return; }
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(out + t, v(_mm256_loadu_ps(a + t)));
    for (; t < n; ++t) out[t] = f(a[t]);
  }
  template <typename A, typename O, typename Fn>
  __attribute__((always_inline)) static void binary(const A* a, int64_t sa, const A* b, int64_t sb, O* out, int64_t n, Fn f) {
    if (sa && sb) for (int64_t t = 0; t < n; ++t) out[t] = f(a[t], b[t]);
    else if (sa) { const A y = b[0]; for (int64_t t = 0; t < n; ++t) out[t] = f(a[t], y); }
    else if (sb) { const A x = a[0]; for (int64_t t = 0; t < n; ++t) out[t] = f(x, b[t]); }
    else out[0] = f(a[0], b[0]);
  }

  std::vector<Instr> code_;
  std::vector<float> ftables_;
  std::vector<int64_t> itables_;
  std::vector<bool> is_float_, uniform_, headless_;  // headless: depends on neither the score nor the head
  int64_t regs_ = 0;
  bool may_fail_ = false;
};

}  // namespace onnxgen
