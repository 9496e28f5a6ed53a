// PagedAttention on the CPU: a ragged batch over a paged KV cache, flash-style.
//
// Work is split into items (sequence, query tile, KV chunk): a KV chunk is a run of
// "segments" (one cache block of the past, or up to block_size of the new tokens), so one long
// sequence still spreads over every thread.  An item walks its segments in memory order
// (token, then KV head) with an online softmax; a merge pass combines the chunks of each query
// row (and the head sink).  The segments of a sequence that several query tiles read (a
// prefill's) are first packed once per call in fp32 (Pack), and its tiles then work one KV
// head at a time (scores, softmax, values), which keeps a head's working set in L1/L2.  The
// past is read from the input caches, then the new keys/values are written at their slots (in
// place when onnxruntime binds the output to the input buffer).
//
// Private attribute `cache_only` (set by onnxgen.passes.flex_kernel for non-paged FlexAttention,
// never in a model file): the caches are FlexAttention's K/V as they are, heads first
// ([num_blocks, kv_heads, block_size, head_size], one block per sequence), attention is over
// cache[0:past] only, with query positions counted from 0 (q_pos = row, as FlexAttention's
// q_idx); the key/value inputs may have no rows, nothing is written and the cache outputs are
// left unwritten (the rewritten graph does not read them).
// Private attribute `heads_first` (with cache_only, set by flex_kernel too): the query keeps its
// [num_tokens, heads * head_size] shape but its memory is FlexAttention's [B, heads, L,
// head_size] (the rewrite reshapes, never transposes), and the output is [B, heads, L,
// v_head_size], every sequence L rows long (head_row gives both layouts' offsets).
// Blocks longer than kMaxSegment positions are walked in pieces of kMaxSegment.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "ops.h"
#include "score_program.h"

namespace onnxgen {
namespace {

constexpr const char* kOp = "PagedAttention";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kQueryTile = 16;
constexpr int64_t kMaxSegment = 128;

struct Attributes {
  int64_t num_heads, kv_num_heads, is_causal, local_window_size, cache_only, heads_first;
  float scale, softcap;
  ScoreProgram score_mod;  // compiled by onnxgen.passes.compile_score_mod; empty when absent
};

// Sizes and pointers of one call, checked against each other.
struct Problem {
  int64_t tokens, batch, heads, kv_heads, group, head_size, v_head_size, num_blocks, block_size, max_blocks;
  int64_t segment;  // positions per segment of the cache: min(block_size, kMaxSegment)
  int64_t span;     // positions of the longest segment (the new tokens' and packed runs are up to kMaxSegment)
  bool cache_only, heads_first;
  DType qkv_type, cache_type;
  Input query, key, value, key_cache, value_cache, cu, past, table, slots, sink;
};

// A run of consecutive logical positions: key row (token t, KV head h) at
// key + (t * k_token + h * k_head) elements ([count][kv_heads][D]: k_token = kv_heads * D,
// k_head = D; heads first: k_token = D, k_head = block_size * D), values alike.
struct Segment {
  const void* key;
  const void* value;
  DType type;
  int64_t first_position, count;
  int64_t k_token, k_head, v_token, v_head;
  const float* packed = nullptr;  // its fp32 pack (Pack), when several query tiles read it
};

// A run of segments' keys and values in fp32, packed once per call for a sequence that several
// query tiles read (a prefill's), into one segment of up to kMaxSegment positions: its blocks
// need not lie together any more, so a prefill over a cache of 16-token blocks walks runs of
// 128 (fewer softmax rescales, 32-key score tiles).  Per KV head: the keys transposed in chunks
// of 32 keys ([D][32]; a last chunk of 16 or fewer is [D][16], zero past the last key) for
// scores_tile, then the values in strips of 32 columns ([ceil(Dv/32)][count][32]) for
// weighted_strips.  Each tile transposed its keys itself before (6 % of a 1024-token prefill),
// and read value rows 4 KiB apart that share one L1 set.
struct Pack {
  int64_t head_size, v_head_size, count;
  // Chunk c (a multiple of 32) starts at c * head_size and is 32 or 16 keys wide.
  static int64_t chunk_width(int64_t count, int64_t c) { return count - c > 16 ? 32 : 16; }
  int64_t keys() const { return (count / 32 * 32 + (count % 32 ? chunk_width(count, count / 32 * 32) : 0)) * head_size; }
  int64_t strip_stride() const { return count * 32; }
  int64_t per_head() const { return keys() + (v_head_size + 31) / 32 * strip_stride(); }

  // KV head h of `parts` (consecutive segments, `count` positions in all) into `out`.
  void write(const std::vector<Segment>& parts, int64_t h, float* out) const {
    float* rows = workspace(2, size_t(count * head_size));  // the keys gathered in fp32, [count][head_size]
    float* values = out + keys();
    int64_t t = 0;
    for (const Segment& part : parts) {
      const size_t width = dtype_size(part.type);
      for (int64_t i = 0; i < part.count; ++i, ++t) {
        load_row(static_cast<const char*>(part.key) + size_t(i * part.k_token + h * part.k_head) * width, part.type,
                 rows + t * head_size, head_size);
        for (int64_t j = 0; j * 32 < v_head_size; ++j)
          load_row(static_cast<const char*>(part.value) + size_t(i * part.v_token + h * part.v_head + 32 * j) * width,
                   part.type, values + j * strip_stride() + t * 32, std::min<int64_t>(32, v_head_size - 32 * j));
      }
    }
    for (int64_t c = 0; c < count; c += 32) {
      const int64_t w = chunk_width(count, c);
      for (int64_t half = 0; half < w / 16; ++half)  // an absent half is zeros
        transpose_rows16<DType::f32>(rows + std::min(c + 16 * half, count - 1) * head_size, head_size,
                                     std::clamp<int64_t>(count - c - 16 * half, 0, 16), head_size,
                                     out + c * head_size + 16 * half, w);
    }
  }
};

struct WorkItem {
  int64_t seq, row_begin, row_end;       // query rows (relative to the sequence's first new token)
  int64_t segment_begin, segment_end;    // into the sequence's segment list
  int64_t state_offset;                  // into the partial-state buffer (-1: whole)
  // Whole: every segment its rows see, so it writes their output itself, from states kept per
  // task (see Attention::run).
  bool whole() const { return state_offset < 0; }
};

Problem check(Ort::KernelContext& ctx, const Attributes& a) {
  Problem p{};
  p.query = read_input(ctx, 0), p.key = read_input(ctx, 1), p.value = read_input(ctx, 2);
  p.key_cache = read_input(ctx, 3), p.value_cache = read_input(ctx, 4);
  p.cu = read_input(ctx, 5), p.past = read_input(ctx, 6), p.table = read_input(ctx, 7);
  p.slots = read_input(ctx, 8), p.sink = read_input(ctx, 9);
  if (a.num_heads <= 0 || a.kv_num_heads <= 0 || a.num_heads % a.kv_num_heads)
    fail(kOp, "num_heads=", a.num_heads, " must be a positive multiple of kv_num_heads=", a.kv_num_heads);
  expect_rank(kOp, "query", p.query, 2), expect_rank(kOp, "key", p.key, 2), expect_rank(kOp, "value", p.value, 2);
  expect_rank(kOp, "key_cache", p.key_cache, 4), expect_rank(kOp, "value_cache", p.value_cache, 4);
  expect_rank(kOp, "cumulative_sequence_length", p.cu, 1), expect_rank(kOp, "past_seqlens", p.past, 1);
  expect_rank(kOp, "block_table", p.table, 2);
  for (auto [name, in] : {std::pair{"cumulative_sequence_length", &p.cu}, {"past_seqlens", &p.past},
                          {"block_table", &p.table}})
    expect_type(kOp, name, *in, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32");
  p.qkv_type = float_type(kOp, "query", p.query.type);
  if (p.key.type != p.query.type || p.value.type != p.query.type)
    fail(kOp, "query, key and value must share one element type");
  p.cache_type = float_type(kOp, "key_cache", p.key_cache.type);
  if (p.value_cache.type != p.key_cache.type) fail(kOp, "key_cache and value_cache must share one element type");

  p.heads = a.num_heads, p.kv_heads = a.kv_num_heads, p.group = a.num_heads / a.kv_num_heads;
  p.cache_only = a.cache_only != 0, p.heads_first = a.heads_first != 0;
  if (p.heads_first && !p.cache_only) fail(kOp, "heads_first needs cache_only");
  p.tokens = p.query.dim(0);
  if (p.query.dim(1) % p.heads) fail(kOp, "query width ", p.query.dim(1), " is not a multiple of num_heads=", p.heads);
  p.head_size = p.query.dim(1) / p.heads;
  p.num_blocks = p.key_cache.dim(0), p.block_size = p.key_cache.dim(1);
  p.v_head_size = p.value_cache.dim(3);
  const int64_t kv_rows = p.cache_only ? p.key.dim(0) : p.tokens;  // cache_only: no rows, or ignored ones
  if (p.key.shape != std::vector<int64_t>{kv_rows, p.kv_heads * p.head_size})
    fail(kOp, "key has shape ", shape_str(p.key.shape), "; expected [", p.tokens, ", kv_num_heads * head_size = ",
         p.kv_heads * p.head_size, "]");
  const int a_block = p.cache_only ? 2 : 1, a_heads = p.cache_only ? 1 : 2;  // heads first in cache_only
  p.block_size = p.key_cache.dim(a_block);
  if (p.key_cache.dim(a_heads) != p.kv_heads || p.key_cache.dim(3) != p.head_size)
    fail(kOp, "key_cache has shape ", shape_str(p.key_cache.shape), "; expected [num_blocks, block_size, ",
         p.kv_heads, ", ", p.head_size, "]");
  if (p.value_cache.dim(0) != p.num_blocks || p.value_cache.dim(a_block) != p.block_size ||
      p.value_cache.dim(a_heads) != p.kv_heads)
    fail(kOp, "value_cache has shape ", shape_str(p.value_cache.shape), "; expected [", p.num_blocks, ", ",
         p.block_size, ", ", p.kv_heads, ", v_head_size]");
  if (p.value.shape != std::vector<int64_t>{kv_rows, p.kv_heads * p.v_head_size})
    fail(kOp, "value has shape ", shape_str(p.value.shape), "; expected [", p.tokens, ", ", p.kv_heads * p.v_head_size, "]");
  if (p.block_size <= 0) fail(kOp, "key_cache has block_size ", p.block_size);
  p.segment = std::min(p.block_size, kMaxSegment);

  p.batch = p.past.dim(0);
  const int32_t* cu = p.cu.as<int32_t>();
  const int32_t* past = p.past.as<int32_t>();
  if (p.cu.dim(0) != p.batch + 1)
    fail(kOp, "cumulative_sequence_length has ", p.cu.dim(0), " entries; expected B + 1 = ", p.batch + 1);
  if (p.table.dim(0) != p.batch) fail(kOp, "block_table has ", p.table.dim(0), " rows for ", p.batch, " sequences");
  p.max_blocks = p.table.dim(1);
  bool increasing = p.batch > 0 && cu[0] == 0 && cu[p.batch] == p.tokens;
  for (int64_t b = 0; increasing && b < p.batch; ++b) increasing = cu[b + 1] > cu[b];
  if (!increasing)
    fail(kOp, "cumulative_sequence_length must increase strictly from 0 to num_tokens=", p.tokens,
         " (every sequence has at least one new token)");
  for (int64_t b = 0; p.heads_first && b < p.batch; ++b)  // the output is [B, heads, L, v_head_size]
    if (cu[b + 1] - cu[b] != p.tokens / p.batch)
      fail(kOp, "heads_first needs every sequence to have the same number of rows (sequence ", b, " has ",
           cu[b + 1] - cu[b], ", not ", p.tokens / p.batch, ")");
  if (p.slots.present()) {
    expect_type(kOp, "slot_mapping", p.slots, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32");
    if (p.slots.shape != std::vector<int64_t>{p.tokens})
      fail(kOp, "slot_mapping has shape ", shape_str(p.slots.shape), "; expected [", p.tokens, "]");
    const int64_t num_slots = p.num_blocks * p.block_size;
    std::vector<bool> used(size_t(num_slots), false);
    for (int64_t t = 0; t < p.tokens; ++t) {
      int64_t s = p.slots.as<int32_t>()[t];
      if (s < -1 || s >= num_slots) fail(kOp, "slot_mapping[", t, "]=", s, " lies outside [-1, ", num_slots, ")");
      if (s >= 0 && used[size_t(s)]) fail(kOp, "slot_mapping writes slot ", s, " twice");
      if (s >= 0) used[size_t(s)] = true;
    }
  }
  if (p.sink.present()) {
    if (p.sink.type != p.query.type) fail(kOp, "head_sink must have the query's element type");
    if (p.sink.shape != std::vector<int64_t>{p.heads})
      fail(kOp, "head_sink has shape ", shape_str(p.sink.shape), "; expected [", p.heads, "]");
  }
  const int32_t* table = p.table.as<int32_t>();
  p.span = p.segment;
  for (int64_t b = 0; b < p.batch && !p.cache_only; ++b) p.span = std::max<int64_t>(p.span, std::min<int64_t>(kMaxSegment, cu[b + 1] - cu[b]));
  for (int64_t b = 0; b < p.batch; ++b) {
    if (past[b] < 0) fail(kOp, "past_seqlens[", b, "]=", past[b], " is negative");
    const int64_t total = int64_t(past[b]) + cu[b + 1] - cu[b];
    const int64_t needed = p.slots.present() || p.cache_only ? past[b] : total;  // read, or read and written
    if (needed > p.max_blocks * p.block_size)
      fail(kOp, "sequence ", b, " needs ", needed, " mapped positions but its block_table row holds ",
           p.max_blocks, " blocks of ", p.block_size);
    for (int64_t j = 0; j < (needed + p.block_size - 1) / p.block_size; ++j) {
      const int32_t id = table[b * p.max_blocks + j];
      if (id < 0 || id >= p.num_blocks)
        fail(kOp, "block_table[", b, ", ", j, "]=", id, " must lie in [0, ", p.num_blocks, ") (sequence ", b,
             " uses it)");
    }
  }
  return p;
}

// Element offset of token t's row for `head` (`width` elements per head) in the query or the
// output: token-major [tokens][heads][width]; with heads_first, each sequence's tokens heads
// first, [B][heads][L_b][width] (FlexAttention's layout: no transposes around the kernel).
int64_t head_row(const Problem& p, int64_t seq, int64_t t, int64_t head, int64_t width) {
  if (!p.heads_first) return (t * p.heads + head) * width;
  const int64_t begin = p.cu.as<int32_t>()[seq], length = p.cu.as<int32_t>()[seq + 1] - begin;
  return (begin * p.heads + head * length + (t - begin)) * width;
}

// The segments of sequence b, in position order: its past blocks, then its new tokens.
std::vector<Segment> segments_of(const Problem& p, int64_t b) {
  const int64_t past = p.past.as<int32_t>()[b], begin = p.cu.as<int32_t>()[b], end = p.cu.as<int32_t>()[b + 1];
  const int64_t k_row = p.kv_heads * p.head_size, v_row = p.kv_heads * p.v_head_size;
  const size_t cache_bytes = dtype_size(p.cache_type), input_bytes = dtype_size(p.qkv_type);
  std::vector<Segment> out;
  const int64_t D = p.head_size, Dv = p.v_head_size, bs = p.block_size;
  // Strides of the cache rows (token, KV head), in elements; the new tokens are token-major.
  const int64_t kt = p.cache_only ? D : k_row, kh = p.cache_only ? bs * D : D;
  const int64_t vt = p.cache_only ? Dv : v_row, vh = p.cache_only ? bs * Dv : Dv;
  for (int64_t pos = 0; pos < past; pos += bs) {
    const int64_t block = p.table.as<int32_t>()[b * p.max_blocks + pos / bs];
    const int64_t count = std::min(bs, past - pos);
    for (int64_t o = 0; o < count; o += p.segment) {  // pieces of a long block
      const char* k = static_cast<const char*>(p.key_cache.data) + size_t(block * bs * k_row + o * kt) * cache_bytes;
      const char* v = static_cast<const char*>(p.value_cache.data) + size_t(block * bs * v_row + o * vt) * cache_bytes;
      out.push_back({k, v, p.cache_type, pos + o, std::min(p.segment, count - o), kt, kh, vt, vh});
    }
  }
  if (p.cache_only) return out;
  // The new tokens lie in one run of rows, not in blocks: longer segments, fewer softmax rescales.
  for (int64_t t = begin; t < end; t += kMaxSegment) {
    const char* k = static_cast<const char*>(p.key.data) + size_t(t * k_row) * input_bytes;
    const char* v = static_cast<const char*>(p.value.data) + size_t(t * v_row) * input_bytes;
    out.push_back({k, v, p.qkv_type, past + (t - begin), std::min(kMaxSegment, end - t), k_row, D, v_row, Dv});
  }
  return out;
}

// Per item: for each (query row, head) a running max, a running sum and the weighted values.
struct State {
  float* base;
  int64_t v_head_size;
  float& max(int64_t i) { return base[i * (v_head_size + 2)]; }
  float& sum(int64_t i) { return base[i * (v_head_size + 2) + 1]; }
  float* acc(int64_t i) { return base + i * (v_head_size + 2) + 2; }
};

// Prefetches the rows of the next segment while the current one is computed, as many bytes as
// the kernel has just read of the current one: a trickle spread over the arithmetic, so loads
// from memory overlap it.  A burst of a whole segment's prefetches fills the line-fill buffers
// and stalls the core until memory answers.  Measured: cold decode with 64 KiB segments (bf16,
// 8 x 128 per token) 1.27x faster; the serving Llama's 32 and 16 KiB ones (fp32, bf16) 1.03x and
// 1.09x more tokens/s; but 128 KiB fp32 segments 1.19x slower (the hardware prefetcher alone
// does better there), hence the limit.
class Trickle {
 public:
  static constexpr size_t kMaxBytes = size_t(64) << 10;  // of keys and values per segment

  void reset(const Segment& next, int64_t kv_heads, int64_t head_size, int64_t v_head_size) {
    const size_t width = dtype_size(next.type);
    runs_.clear(), run_ = 0, offset_ = 0, carry_ = 0;
    if (size_t(next.count * kv_heads * (head_size + v_head_size)) * width > kMaxBytes) return;
    if (next.k_head == head_size && next.v_head == v_head_size) {  // token-major: one run each
      runs_.push_back({next.key, size_t(next.count * kv_heads * head_size) * width});
      runs_.push_back({next.value, size_t(next.count * kv_heads * v_head_size) * width});
      return;
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      runs_.push_back({static_cast<const char*>(next.key) + size_t(h * next.k_head) * width, size_t(next.count * head_size) * width});
      runs_.push_back({static_cast<const char*>(next.value) + size_t(h * next.v_head) * width, size_t(next.count * v_head_size) * width});
    }
  }
  void clear() { runs_.clear(), run_ = 0; }

  // Prefetch the next `bytes` of the runs.
  void step(size_t bytes) {
    bytes += carry_;
    while (bytes >= 64 && run_ < runs_.size()) {
      const auto [data, size] = runs_[run_];
      _mm_prefetch(static_cast<const char*>(data) + offset_, _MM_HINT_T1);
      bytes -= 64, offset_ += 64;
      if (offset_ >= size) ++run_, offset_ = 0;
    }
    carry_ = bytes;
  }

 private:
  std::vector<std::pair<const void*, size_t>> runs_;
  size_t run_ = 0, offset_ = 0, carry_ = 0;
};

// Denormal results (a probability near e^-87 times a value, as ALiBi's distant keys give) cost
// a microcode assist each, ~100 cycles; they lie far below what a softmax sum of at least 1 can
// resolve, so this thread flushes them to zero while it computes attention.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
};

// Combine the KV chunks of one (token, head) and the head sink into the output row: one pass
// over the sums per chunk (a prefill's rows have one).
void merge(const Problem& p, const float* const* partials, size_t count, const float* sink, float* out) {
  const int64_t Dv = p.v_head_size;
  float m = sink ? *sink : kNegInf;
  for (size_t i = 0; i < count; ++i) m = std::max(m, partials[i][0]);
  std::fill_n(out, Dv, 0.f);
  if (m == kNegInf) return;  // fully masked, no sink: zeros
  float total = sink ? std::exp(*sink - m) : 0.f;
  for (size_t i = 0; i < count; ++i)
    if (partials[i][0] != kNegInf) total += std::exp(partials[i][0] - m) * partials[i][1];
  if (!(total > 0.f)) return;
  for (size_t i = 0; i < count; ++i)
    if (partials[i][0] != kNegInf) axpy(out, std::exp(partials[i][0] - m) / total, partials[i] + 2, Dv);
}

// Query heads [head_begin, head_end) of output token t (of sequence seq) from `row` (fp32, Dv per
// head).
void store_output(const Problem& p, void* out, int64_t seq, int64_t t, int64_t head_begin, int64_t head_end, const float* row) {
  const size_t bytes = dtype_size(p.qkv_type);
  const int64_t Dv = p.v_head_size;
  if (!p.heads_first) {
    store_output_row(row, p.qkv_type, static_cast<char*>(out) + size_t((t * p.heads + head_begin) * Dv) * bytes,
                     (head_end - head_begin) * Dv);
    return;
  }
  for (int64_t h = head_begin; h < head_end; ++h)
    store_output_row(row + (h - head_begin) * Dv, p.qkv_type, static_cast<char*>(out) + size_t(head_row(p, seq, t, h, Dv)) * bytes, Dv);
}

class Attention {
 public:
  // `sink`: one per query head, or null; `out`: the output tensor's data.
  Attention(const Problem& p, const Attributes& a, const float* sink, void* out) : p_(p), a_(a), sink_(sink), out_(out) {
    scale_ = a.scale != 0.f ? a.scale : 1.f / std::sqrt(float(p.head_size));
  }

  // One work item: query rows [row_begin, row_end) of sequence `seq` over some of its segments,
  // for KV heads [kv_begin, kv_end) (their query heads' states only: the tasks of one item with
  // other KV heads may run at the same time).  A whole item's states live in this thread's
  // workspace for the task, and its output is written at the end: a 1024-token prefill's states
  // (17 MiB) are neither cleared, nor written back, nor read again by the merge.
  void run(const WorkItem& item, const std::vector<Segment>& segments, float* states, int64_t kv_begin,
           int64_t kv_end) const {
    const FlushDenormals flush;
    const int64_t rows = item.row_end - item.row_begin, H = p_.heads, D = p_.head_size, Dv = p_.v_head_size;
    const int64_t G = p_.group, Hkv = kv_end - kv_begin;
    const int64_t head_begin = kv_begin * G, head_end = kv_end * G, Hl = head_end - head_begin;
    const int64_t past = p_.cache_only ? 0 : p_.past.as<int32_t>()[item.seq];  // position of the first query
    const int64_t first_token = p_.cu.as<int32_t>()[item.seq];
    // The queries, scores and states of (row r, query head `head`): q and scores hold this task's
    // heads only, q[local(r, head)] (a row's heads together) and scores from scored(r, head) (a
    // head's rows together, so that a score_mod runs over them at once); the states are the
    // item's (a whole item's: the task's), at state_of(r, head).
    const int64_t bs = p_.span;  // scores per row and head
    auto local = [&](int64_t r, int64_t head) { return r * Hl + head - head_begin; };
    auto scored = [&](int64_t r, int64_t head) { return ((head - head_begin) * rows + r) * bs; };
    const bool whole = item.whole();
    auto state_of = [&](int64_t r, int64_t head) { return whole ? local(r, head) : r * H + head; };
    // Queries in fp32, pre-scaled: q[row][head of this task][D].
    std::vector<float> q(size_t(rows * Hl * D));
    const size_t qbytes = dtype_size(p_.qkv_type);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t token = first_token + item.row_begin + r;
      if (!p_.heads_first) {
        load_row(static_cast<const char*>(p_.query.data) + size_t((token * H + head_begin) * D) * qbytes, p_.qkv_type,
                 &q[size_t(r * Hl * D)], Hl * D);
        continue;
      }
      for (int64_t head = head_begin; head < head_end; ++head)
        load_row(static_cast<const char*>(p_.query.data) + size_t(head_row(p_, item.seq, token, head, D)) * qbytes, p_.qkv_type,
                 &q[size_t(local(r, head) * D)], D);
    }
    if (!(a_.softcap > 0.f)) scale_row(q.data(), scale_, rows * Hl * D);
    // bf16 caches with D and Dv multiples of 32: rows are read 32 at a time as even/odd halves,
    // and the queries are kept in that order too (see split_bf16).
    const bool split = has_avx512() && p_.cache_type == DType::bf16 && D % 32 == 0 && p_.v_head_size % 32 == 0;
    std::vector<float> q_split(split ? q.size() : 0);
    for (int64_t v = 0; split && v < rows * Hl; ++v) split_even_odd(&q[size_t(v * D)], &q_split[size_t(v * D)], D);
    State state{whole ? workspace(3, size_t(rows * Hl * (Dv + 2))) : states + item.state_offset, Dv};
    // score_mod runs once per (head, segment) over every row, or once per (row, head, segment)
    // over the visible keys when it may fail (see ScoreProgram::may_fail).
    const ScoreProgram& program = a_.score_mod;
    const bool whole_tile = !program.empty() && !program.may_fail();
    ScoreProgram::Scratch none;
    ScoreProgram::Scratch& scratch = program.empty() ? none : program.scratch(whole_tile ? rows * bs : bs);
    for (int64_t r = 0; whole_tile && r < rows; ++r) std::fill_n(scratch.q_pos() + r * bs, bs, ScoreInt(past + item.row_begin + r));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t head = head_begin; head < head_end; ++head) {
        const int64_t i = state_of(r, head);
        state.max(i) = kNegInf, state.sum(i) = 0.f, std::fill_n(state.acc(i), Dv, 0.f);
      }

    std::vector<float> scores(size_t(rows * Hl * bs));  // [head][row][token]
    // With many queries per KV head (prefill tiles), the AVX-512 tiled path; per KV head h (local,
    // from 0) its query vectors are v = (row, g): queries[h * rows * G + v], their scores from
    // score_of[...], their states at state_index[...].
    const bool tiled = has_avx512() && rows * G >= 16;
    std::vector<int64_t> state_index(size_t(Hkv * rows * G)), score_of(state_index.size());
    std::vector<const float*> queries(state_index.size()), prob_rows(size_t(rows * G));
    std::vector<float*> score_rows(size_t(rows * G)), acc_rows(size_t(rows * G));
    std::vector<float> kt;  // one head's keys of a segment, 32 at a time, transposed: [D][32]
    if (has_avx512()) {
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t v = h * rows * G + r * G + g, head = head_begin + h * G + g;
            state_index[size_t(v)] = state_of(r, head);
            score_of[size_t(v)] = scored(r, head);
            queries[size_t(v)] = &q[size_t(local(r, head) * D)];
          }
    }
    // Blocks lie anywhere in the cache, so the hardware prefetcher restarts at each one: the
    // rows of the next segment are requested a few lines at a time while this one is computed.
    Trickle next_rows;
    int64_t positions_of = -1;  // the segment whose positions the scratch holds (whole_tile)
    for (int64_t s = item.segment_begin; s < item.segment_end; ++s) {
      const Segment& seg = segments[size_t(s)];
      // Causal: no query of this item sees past its last row's position.
      const int64_t n = a_.is_causal ? std::clamp<int64_t>(past + item.row_end - seg.first_position, 0, seg.count) : seg.count;
      // Window: no query of this item sees a key before its first row's position - W, so the
      // prefill tiles and the value sums start there (softmax_step zeroes what lies before).
      const int64_t first_key =
          a_.local_window_size >= 0 ? std::clamp<int64_t>(past + item.row_begin - a_.local_window_size - seg.first_position, 0, n) : 0;
      if (Hkv == p_.kv_heads && s + 1 < item.segment_end && !segments[size_t(s) + 1].packed)
        next_rows.reset(segments[size_t(s) + 1], Hkv, D, Dv);
      else next_rows.clear();
      const size_t width = dtype_size(seg.type);
      // Score mod and softmax step of query heads [heads_from, heads_to) of every row; false if
      // none of them sees a key of this segment.
      auto normalise = [&](int64_t heads_from, int64_t heads_to) {
        if (whole_tile) {  // soft cap, then the program, over each head's rows (masked scores too)
          if (positions_of != s) {
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t t = 0; t < bs; ++t) scratch.kv_pos()[r * bs + t] = ScoreInt(seg.first_position + t);
            program.prepare((rows - 1) * bs + n, item.seq, scratch);
            positions_of = s;
          }
          for (int64_t head = heads_from; head < heads_to; ++head) {
            float* tile = &scores[size_t(scored(0, head))];
            if (a_.softcap > 0.f) soft_cap(tile, (rows - 1) * bs + n);
            program.run(tile, (rows - 1) * bs + n, item.seq, head, scratch);
          }
        }
        bool any = false;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t q_pos = past + item.row_begin + r;
          int64_t lo = seg.first_position, hi = seg.first_position + n;  // visible kv positions [lo, hi)
          if (a_.is_causal) hi = std::min(hi, q_pos + 1);
          if (a_.local_window_size >= 0) lo = std::max(lo, q_pos - a_.local_window_size);
          const int64_t vis_lo = std::max<int64_t>(lo - seg.first_position, 0), vis_hi = std::min(hi - seg.first_position, n);
          const bool modded = !program.empty() && (whole_tile || vis_lo < vis_hi);
          if (modded && !whole_tile) {  // soft cap, then the program, over each head's visible scores
            std::fill_n(scratch.q_pos(), vis_hi - vis_lo, ScoreInt(q_pos));
            for (int64_t t = vis_lo; t < vis_hi; ++t) scratch.kv_pos()[t - vis_lo] = ScoreInt(seg.first_position + t);
            program.prepare(vis_hi - vis_lo, item.seq, scratch);
            for (int64_t head = heads_from; head < heads_to; ++head) {
              float* visible = &scores[size_t(scored(r, head) + vis_lo)];
              if (a_.softcap > 0.f) soft_cap(visible, vis_hi - vis_lo);
              program.run(visible, vis_hi - vis_lo, item.seq, head, scratch);
            }
          }
          for (int64_t head = heads_from; head < heads_to; ++head)
            any |= softmax_step(&scores[size_t(scored(r, head))], n, lo - seg.first_position, hi - seg.first_position, state,
                                state_of(r, head), modded);
        }
        return any;
      };
      // The rows, pointers and state indices of KV head h's queries for weighted_rows/strips.
      auto weights_of = [&](int64_t h) {
        for (int64_t v = 0; v < rows * G; ++v) {
          const size_t w = size_t(h * rows * G + v);
          prob_rows[size_t(v)] = &scores[size_t(score_of[w] + first_key)];
          acc_rows[size_t(v)] = state.acc(state_index[w]);
        }
      };
      if (seg.packed) {  // one KV head at a time: its scores, softmax and values
        const Pack pack{D, Dv, seg.count};
        for (int64_t h = 0; h < Hkv; ++h) {
          const float* keys = seg.packed + (kv_begin + h) * pack.per_head();
          // Chunks of 32 from 0 (the scores before first_key are masked).
          for (int64_t c = first_key / 32 * 32; c < n; c += 32) {
            for (int64_t v = 0; v < rows * G; ++v) score_rows[size_t(v)] = &scores[size_t(score_of[size_t(h * rows * G + v)] + c)];
            const int64_t m = std::min<int64_t>(32, n - c);
            if (Pack::chunk_width(seg.count, c) == 32) scores_tile<2>(&queries[size_t(h * rows * G)], rows * G, keys + c * D, D, score_rows.data(), m);
            else scores_tile<1>(&queries[size_t(h * rows * G)], rows * G, keys + c * D, D, score_rows.data(), m);
          }
          if (!normalise(head_begin + h * G, head_begin + (h + 1) * G)) continue;
          weights_of(h);
          weighted_strips(prob_rows.data(), rows * G, keys + pack.keys() + first_key * 32, pack.strip_stride(), n - first_key,
                          Dv, acc_rows.data());
        }
        continue;
      }
      if (tiled) {  // many queries per key: transpose each head's keys once, then broadcast-FMAs
        const TransposeFn transpose = transpose_for(seg.type);
        if (kt.empty()) kt.assign(size_t(((D + 15) / 16) * 16 * 32) + 32, 0.f);
        for (int64_t h = 0; h < Hkv; ++h) {
          for (int64_t c = first_key; c < n; c += 32) {  // 32 keys at a time, or the last 16 or fewer
            const int64_t m = std::min<int64_t>(32, n - c), columns = m > 16 ? 2 : 1;
            const char* keys = static_cast<const char*>(seg.key) + size_t(c * seg.k_token + (kv_begin + h) * seg.k_head) * width;
            for (int64_t half = 0; half < columns; ++half)
              transpose(keys + size_t(16 * half * seg.k_token) * width, seg.k_token, std::min<int64_t>(16, m - 16 * half), D,
                        kt.data() + 16 * half, 16 * columns);
            for (int64_t v = 0; v < rows * G; ++v) score_rows[size_t(v)] = &scores[size_t(score_of[size_t(h * rows * G + v)] + c)];
            if (columns == 2) scores_tile<2>(&queries[size_t(h * rows * G)], rows * G, kt.data(), D, score_rows.data(), m);
            else scores_tile<1>(&queries[size_t(h * rows * G)], rows * G, kt.data(), D, score_rows.data(), m);
            next_rows.step(size_t(m * D) * width);
          }
        }
      } else {
        const DotsFn dots = dots_for(seg.type);
        int64_t t = 0;
        if (has_avx512()) {  // Q query heads x 16 / Q keys at a time, reduced together
          const int64_t Q = G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1, keys = 16 / Q;
          const bool halves = split && seg.type == DType::bf16 && Q == 4;
          const DotsBlockFn block = halves ? dots4x4_bf16_split
                                    : Q == 4 ? dots_block_for<4>(seg.type)
                                    : Q == 2 ? dots_block_for<2>(seg.type) : dots_block_for<1>(seg.type);
          const float* qs = halves ? q_split.data() : q.data();
          for (; t + keys <= n; t += keys)
            for (int64_t h = 0; h < Hkv; ++h) {
              const void* krows = static_cast<const char*>(seg.key) + size_t(t * seg.k_token + (kv_begin + h) * seg.k_head) * width;
              for (int64_t r = 0; r < rows; ++r)
                for (int64_t g = 0; g < G; g += Q) {
                  const int64_t head = head_begin + h * G + g;
                  block(&qs[size_t(local(r, head) * D)], krows, seg.k_token, D, &scores[size_t(scored(r, head) + t)], rows * bs);
                }
              next_rows.step(size_t(keys * D) * width);
            }
        }
        // Scores, in the segment's memory order: token, KV head, then the queries that read it.
        for (; t < n; ++t)
          for (int64_t h = 0; h < Hkv; ++h) {
            const void* krow = static_cast<const char*>(seg.key) + size_t(t * seg.k_token + (kv_begin + h) * seg.k_head) * width;
            for (int64_t r = 0; r < rows; ++r) {  // the G query heads of KV head h read this row
              const int64_t head = head_begin + h * G;
              dots(&q[size_t(local(r, head) * D)], G, krow, D, &scores[size_t(scored(r, head) + t)], rows * bs);
            }
            next_rows.step(size_t(D) * width);
          }
      }
      if (!normalise(head_begin, head_end)) continue;
      if (has_avx512()) {  // values accumulate in registers, two queries at a time
        const WeightedRowsFn weigh =
            split && seg.type == DType::bf16 ? weighted_rows_bf16_split : weighted_rows_for(seg.type);
        for (int64_t h = 0; h < Hkv; ++h) {
          weights_of(h);
          weigh(prob_rows.data(), rows * G,
                static_cast<const char*>(seg.value) + size_t(first_key * seg.v_token + (kv_begin + h) * seg.v_head) * width, seg.v_token,
                n - first_key, Dv, acc_rows.data());
          next_rows.step(size_t(n * Dv) * width);
        }
        continue;
      }
      const AxpyFn axpy_row = axpy_for(seg.type);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < Hkv; ++h) {
          const void* vrow = static_cast<const char*>(seg.value) + size_t(t * seg.v_token + (kv_begin + h) * seg.v_head) * width;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t g = 0; g < G; ++g) {
              const int64_t head = head_begin + h * G + g;
              const float w = scores[size_t(scored(r, head) + t)];
              if (w != 0.f) axpy_row(state.acc(state_of(r, head)), w, vrow, Dv);
            }
          next_rows.step(size_t(Dv) * width);
        }
    }
    if (whole) write_output(item, state, head_begin, head_end);
  }

 private:
  // The output rows of a whole item's heads [head_begin, head_end), from its task's states.
  void write_output(const WorkItem& item, State& state, int64_t head_begin, int64_t head_end) const {
    const int64_t Dv = p_.v_head_size, Hl = head_end - head_begin;
    std::vector<float> row(size_t(Hl * Dv));
    for (int64_t r = 0; r < item.row_end - item.row_begin; ++r) {
      for (int64_t head = head_begin; head < head_end; ++head) {
        const float* part = &state.max(r * Hl + head - head_begin);
        merge(p_, &part, 1, sink_ ? &sink_[head] : nullptr, &row[size_t((head - head_begin) * Dv)]);
      }
      store_output(p_, out_, item.seq, p_.cu.as<int32_t>()[item.seq] + item.row_begin + r, head_begin, head_end, row.data());
    }
    _mm_sfence();  // the non-temporal stores, before the task ends
  }

  // s[t] = softcap * tanh(s[t] * scale / softcap) for t < n, eight lanes at a time (score_tanh256:
  // relative error ~3e-7; std::tanh per score made the attribute 2x slower than a compiled mod).
  void soft_cap(float* s, int64_t n) const {
    const float inner = scale_ / a_.softcap;
    const __m256 vi = _mm256_set1_ps(inner), vo = _mm256_set1_ps(a_.softcap);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8)
      _mm256_storeu_ps(s + t, _mm256_mul_ps(vo, score_tanh256(_mm256_mul_ps(_mm256_loadu_ps(s + t), vi))));
    for (; t < n; ++t) s[t] = a_.softcap * std::tanh(s[t] * inner);
  }

  // Softcap and mask one row of scores (visible tokens [lo, hi)), fold it into the running
  // softmax of state i, and leave the (unnormalised) probabilities in `s`.  False if none visible.
  // `modded`: the soft cap and the score_mod program have already run on the visible scores; a
  // row the program masks completely (-inf) counts as invisible.
  bool softmax_step(float* s, int64_t n, int64_t lo, int64_t hi, State& state, int64_t i, bool modded) const {
    lo = std::max<int64_t>(lo, 0), hi = std::min(hi, n);
    if (lo >= hi) {
      std::fill_n(s, n, 0.f);
      return false;
    }
    if (a_.softcap > 0.f && !modded)
      soft_cap(s + lo, hi - lo);
    float m = state.max(i);
    m = max_of(m, s + lo, hi - lo);
    if (m == kNegInf) {  // everything so far masked by score_mod
      std::fill_n(s, n, 0.f);
      return false;
    }
    const float old_max = state.max(i);
    if (m > old_max && old_max != kNegInf) {
      const float factor = std::exp(old_max - m);
      state.sum(i) *= factor;
      scale_row(state.acc(i), factor, p_.v_head_size);
    }
    state.max(i) = m;
    std::fill_n(s, lo, 0.f);
    std::fill(s + hi, s + n, 0.f);
    if (has_avx512()) {
      state.sum(i) += exp_sum_avx512(s + lo, hi - lo, m);
      return true;
    }
    const __m256 vm = _mm256_set1_ps(m), neg_inf = _mm256_set1_ps(kNegInf);
    __m256 total = _mm256_setzero_ps();
    int64_t t = lo;
    for (; t + 8 <= hi; t += 8) {
      const __m256 x = _mm256_loadu_ps(s + t);
      // exp256 flushes at -87 to ~1e-38, not 0: keys masked to -inf by score_mod weigh exactly 0.
      __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(x, vm)), _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(s + t, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; t < hi; ++t) sum += (s[t] = std::exp(s[t] - m));
    state.sum(i) += sum;
    return true;
  }

  const Problem& p_;
  const Attributes& a_;
  const float* sink_;
  void* out_;
  float scale_;
};


struct PagedAttentionKernel : KernelBase<PagedAttentionKernel> {
  Attributes a;

  explicit PagedAttentionKernel(const OrtKernelInfo* info) {
    a.num_heads = attribute_or<int64_t>(info, "num_heads", 0);
    a.kv_num_heads = attribute_or<int64_t>(info, "kv_num_heads", 0);
    a.scale = attribute_or<float>(info, "scale", 0.f);
    a.softcap = attribute_or<float>(info, "softcap", 0.f);
    a.is_causal = attribute_or<int64_t>(info, "is_causal", 1);
    a.local_window_size = attribute_or<int64_t>(info, "local_window_size", -1);
    a.cache_only = attribute_or<int64_t>(info, "cache_only", 0);
    a.heads_first = attribute_or<int64_t>(info, "heads_first", 0);
    Ort::ConstKernelInfo ki(info);
    std::vector<int64_t> program;
    std::vector<float> constants;
    try {
      program = ki.GetAttributes<int64_t>("score_program");
    } catch (const Ort::Exception&) {
    }
    try {
      constants = ki.GetAttributes<float>("score_constants");
    } catch (const Ort::Exception&) {
    }
    a.score_mod = ScoreProgram(program, std::move(constants), kOp);
  }

  void Compute(Ort::KernelContext& ctx) {
    Problem p = check(ctx, a);
    auto output = p.heads_first ? ctx.GetOutput(0, {p.batch, p.heads, p.tokens / p.batch, p.v_head_size})
                                : ctx.GetOutput(0, {p.tokens, p.heads * p.v_head_size});
    auto key_out = ctx.GetOutput(1, p.key_cache.shape);
    auto value_out = ctx.GetOutput(2, p.value_cache.shape);

    // 1. Plan: segments per sequence (runs of them merged where packed), work items (sequence,
    // query tile, chunk of segments).
    std::vector<std::vector<Segment>> segments(size_t(p.batch));
    for (int64_t b = 0; b < p.batch; ++b) segments[size_t(b)] = segments_of(p, b);
    const PackPlan packs = plan_packs(p, segments);
    for (const PackJob& job : packs.jobs) p.span = std::max(p.span, segments[job.seq][job.index].count);  // merged runs
    std::vector<WorkItem> items;
    int64_t total_segments = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t n = p.cu.as<int32_t>()[b + 1] - p.cu.as<int32_t>()[b];
      total_segments += int64_t(segments[size_t(b)].size()) * ((n + kQueryTile - 1) / kQueryTile);
    }
    const int64_t chunk = std::max<int64_t>(8, (total_segments + 63) / 64);  // ~64 items
    int64_t state_size = 0;
    const int64_t per_row = p.heads * (p.v_head_size + 2);
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t n = p.cu.as<int32_t>()[b + 1] - p.cu.as<int32_t>()[b];
      const int64_t past = p.cache_only ? 0 : p.past.as<int32_t>()[b];  // position of the first query
      const auto& segs = segments[size_t(b)];
      for (int64_t r0 = 0; r0 < n; r0 += kQueryTile) {
        const int64_t r1 = std::min(n, r0 + kQueryTile);
        // Segments this tile can see at all (causal: nothing after its last query).
        int64_t first = 0, last = int64_t(segs.size());
        if (a.is_causal)
          while (last > 0 && segs[size_t(last - 1)].first_position > past + r1 - 1) --last;
        if (a.local_window_size >= 0)
          while (first < last && segs[size_t(first)].first_position + segs[size_t(first)].count <=
                                     past + r0 - a.local_window_size) ++first;
        if (first == last) last = first + (segs.empty() ? 0 : 1);  // keep one (fully masked) item
        if (std::max(last, first + 1) - first <= chunk) {  // one item: whole
          items.push_back({b, r0, r1, first, last, -1});
          continue;
        }
        for (int64_t s = first; s < last; s += chunk) {
          items.push_back({b, r0, r1, s, std::min(last, s + chunk), state_size});
          state_size += (r1 - r0) * per_row;
        }
      }
    }
    // Every item sets its own rows first (a 1024-token prefill's are 17 MiB).
    float* states = workspace(0, size_t(state_size));
    write_packs(ctx, p, packs, segments);

    // 2. Attention over the input caches (and the output of whole items).
    std::vector<float> sink(size_t(p.heads));
    if (p.sink.present()) load_row(p.sink.data, p.qkv_type, sink.data(), p.heads);
    void* out = output.GetTensorMutableRawData();
    Attention attention(p, a, p.sink.present() ? sink.data() : nullptr, out);
    const std::vector<Task> tasks = plan_tasks(p, items, segments);
    parallel_for(ctx, tasks.size(), [&](size_t i) {
      const WorkItem& item = items[tasks[i].item];
      attention.run(item, segments[size_t(item.seq)], states, tasks[i].kv_begin, tasks[i].kv_end);
    });

    // 3. Merge the chunks of the other query rows, add the sink, write the output.
    std::vector<std::vector<size_t>> items_of_row(size_t(p.tokens));
    std::vector<size_t> to_merge;
    for (size_t i = 0; i < items.size(); ++i)
      for (int64_t r = items[i].row_begin; r < items[i].row_end && !items[i].whole(); ++r)
        items_of_row[size_t(p.cu.as<int32_t>()[items[i].seq] + r)].push_back(i);
    for (size_t t = 0; t < size_t(p.tokens); ++t)
      if (!items_of_row[t].empty()) to_merge.push_back(t);
    std::vector<int64_t> seq_of_token(size_t(p.tokens));
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t t = p.cu.as<int32_t>()[b]; t < p.cu.as<int32_t>()[b + 1]; ++t) seq_of_token[size_t(t)] = b;
    parallel_for(ctx, to_merge.size(), [&](size_t j) {
      const size_t t = to_merge[j];
      std::vector<float> row(size_t(p.heads * p.v_head_size));
      std::vector<const float*> partials;
      for (int64_t h = 0; h < p.heads; ++h) {
        partials.clear();
        for (size_t i : items_of_row[t]) {
          const WorkItem& item = items[i];
          const int64_t r = int64_t(t) - p.cu.as<int32_t>()[item.seq] - item.row_begin;
          partials.push_back(&states[size_t(item.state_offset + (r * p.heads + h) * (p.v_head_size + 2))]);
        }
        merge(p, partials.data(), partials.size(), p.sink.present() ? &sink[size_t(h)] : nullptr, &row[size_t(h * p.v_head_size)]);
      }
      store_output(p, out, seq_of_token[t], int64_t(t), 0, p.heads, row.data());
      _mm_sfence();  // the non-temporal stores, before the task ends
    });

    // 4. The caches: copy when not bound in place, then write the new rows at their slots.
    if (p.cache_only) return;
    write_caches(ctx, p, key_out.GetTensorMutableRawData(), value_out.GetTensorMutableRawData(), seq_of_token);
  }

  // One call of Attention::run: a work item's KV heads [kv_begin, kv_end).
  struct Task {
    size_t item;
    int64_t kv_begin, kv_end;
  };

  // Items over packed segments run one task per KV head, in order of the head, so that both
  // threads read one head's packs at a time: 1 MiB for 1024 tokens of 128-wide keys and values,
  // which stays in L2 from one query tile to the next, where all heads' (8 MiB) came from L3 for
  // every tile (the score and value products ran at 0.8x their rate on cached data).  The
  // heaviest first within a head, so the last tasks are short.  Other items: one task, all heads.
  static std::vector<Task> plan_tasks(const Problem& p, const std::vector<WorkItem>& items,
                                      const std::vector<std::vector<Segment>>& segments) {
    std::vector<Task> tasks;
    std::vector<size_t> packed;
    for (size_t i = 0; i < items.size(); ++i) {
      const WorkItem& item = items[i];
      if (item.segment_begin < item.segment_end && segments[size_t(item.seq)][size_t(item.segment_begin)].packed)
        packed.push_back(i);
      else
        tasks.push_back({i, 0, p.kv_heads});
    }
    auto work = [&](size_t i) {  // keys the item's rows read
      const WorkItem& item = items[i];
      const auto& segs = segments[size_t(item.seq)];
      const Segment& last = segs[size_t(item.segment_end - 1)];
      return (item.row_end - item.row_begin) * (last.first_position + last.count - segs[size_t(item.segment_begin)].first_position);
    };
    std::stable_sort(packed.begin(), packed.end(), [&](size_t x, size_t y) { return work(x) > work(y); });
    for (int64_t h = 0; h < p.kv_heads; ++h)
      for (size_t i : packed) tasks.push_back({i, h, h + 1});
    return tasks;
  }

  // A segment to pack (see Pack): segments[seq][index], made of `parts`, at `offset` in the packs.
  struct PackJob {
    size_t seq, index;
    std::vector<Segment> parts;
    int64_t offset;
  };
  struct PackPlan {
    std::vector<PackJob> jobs;
    int64_t size = 0;  // floats, all packs
  };

  // Merges the segments of every sequence whose keys at least kMinReaders query vectors read
  // (rows x group) into runs of up to kMaxSegment positions, each to be packed, while the packs
  // total at most kMaxPackBytes (later sequences are read as they lie).  Below that, packing
  // costs more than it saves: B 4 x 200 new tokens, 8/4 heads of 64 (400 readers), was 1.06-1.1x
  // slower packed; 1024 tokens, 32/8 heads of 128, 1.1x faster, and 256 over a past of 1024 in
  // blocks of 16 1.33x faster.
  static PackPlan plan_packs(const Problem& p, std::vector<std::vector<Segment>>& segments) {
    constexpr int64_t kMaxPackBytes = int64_t(256) << 20, kMinReaders = 512;
    PackPlan plan;
    if (!has_avx512()) return plan;
    int64_t& size = plan.size;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t rows = p.cu.as<int32_t>()[b + 1] - p.cu.as<int32_t>()[b];
      if (rows <= kQueryTile || rows * p.group < kMinReaders) continue;
      std::vector<Segment> runs;
      std::vector<PackJob> mine;
      int64_t mine_size = 0;
      for (const Segment& seg : segments[size_t(b)]) {
        if (runs.empty() || runs.back().count + seg.count > kMaxSegment) {
          runs.push_back(seg), runs.back().key = runs.back().value = nullptr;  // read through its pack only
          mine.push_back({size_t(b), runs.size() - 1, {}, 0});
        } else {
          runs.back().count += seg.count;
        }
        mine.back().parts.push_back(seg);
      }
      for (PackJob& job : mine)
        job.offset = size + mine_size, mine_size += p.kv_heads * Pack{p.head_size, p.v_head_size, runs[job.index].count}.per_head();
      if ((size + mine_size) * 4 > kMaxPackBytes) break;
      size += mine_size;
      segments[size_t(b)] = std::move(runs);
      for (PackJob& job : mine) plan.jobs.push_back(std::move(job));
    }
    return plan;
  }

  // Writes the planned packs (one task per segment and KV head) and points the segments at them.
  static void write_packs(Ort::KernelContext& ctx, const Problem& p, const PackPlan& plan,
                          std::vector<std::vector<Segment>>& segments) {
    const std::vector<PackJob>& jobs = plan.jobs;
    if (jobs.empty()) return;
    float* packs = workspace(1, size_t(plan.size));
    parallel_for(ctx, jobs.size() * size_t(p.kv_heads), [&](size_t i) {
      const PackJob& job = jobs[i / size_t(p.kv_heads)];
      const int64_t h = int64_t(i % size_t(p.kv_heads));
      const Pack pack{p.head_size, p.v_head_size, segments[job.seq][job.index].count};
      pack.write(job.parts, h, packs + job.offset + h * pack.per_head());
    });
    for (const PackJob& job : jobs) segments[job.seq][job.index].packed = packs + job.offset;
  }

  void write_caches(Ort::KernelContext& ctx, const Problem& p, void* key_out, void* value_out,
                    const std::vector<int64_t>& seq_of_token) const {
    const size_t cache_bytes = dtype_size(p.cache_type), input_bytes = dtype_size(p.qkv_type);
    for (auto [dst, src, size] : {std::tuple{key_out, p.key_cache.data, p.key_cache.size()},
                                  std::tuple{value_out, p.value_cache.data, p.value_cache.size()}}) {
      if (dst == src) continue;  // bound in place: nothing to copy
      const size_t bytes = size_t(size) * cache_bytes, piece = size_t(1) << 22;
      parallel_for(ctx, (bytes + piece - 1) / piece, [&](size_t i) {
        std::memcpy(static_cast<char*>(dst) + i * piece, static_cast<const char*>(src) + i * piece,
                    std::min(piece, bytes - i * piece));
      });
    }
    const int64_t k_row = p.kv_heads * p.head_size, v_row = p.kv_heads * p.v_head_size;
    parallel_for(ctx, size_t(p.tokens), [&](size_t t) {
      int64_t slot;
      if (p.slots.present()) {
        slot = p.slots.as<int32_t>()[t];
      } else {
        const int64_t b = seq_of_token[t];
        const int64_t pos = p.past.as<int32_t>()[b] + int64_t(t) - p.cu.as<int32_t>()[b];
        slot = int64_t(p.table.as<int32_t>()[b * p.max_blocks + pos / p.block_size]) * p.block_size + pos % p.block_size;
      }
      if (slot < 0) return;
      std::vector<float> scratch(size_t(std::max(k_row, v_row)));
      convert_row(static_cast<const char*>(p.key.data) + t * k_row * input_bytes, p.qkv_type,
                  static_cast<char*>(key_out) + size_t(slot * k_row) * cache_bytes, p.cache_type, k_row, scratch.data());
      convert_row(static_cast<const char*>(p.value.data) + t * v_row * input_bytes, p.qkv_type,
                  static_cast<char*>(value_out) + size_t(slot * v_row) * cache_bytes, p.cache_type, v_row, scratch.data());
    });
  }
};

struct PagedAttentionOp : OpBase<PagedAttentionOp, PagedAttentionKernel> {
  static constexpr uint32_t kOptionalInputs = 0b1100000000, kOptionalOutputs = 0;
  static constexpr OutputSpec kOutputs[] = {{0, -1, 2}, {3, 3, 4}, {4, 4, 4}};
  // heads_first: the output is FlexAttention's [B, heads, L, v_head_size] itself.
  static constexpr OutputSpec kHeadsFirstOutputs[] = {{0, -1, 4}, {3, 3, 4}, {4, 4, 4}};
  PagedAttentionOp() {
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return infer_outputs(ctx, int_attribute(ctx, "heads_first", 0) ? kHeadsFirstOutputs : kOutputs, 3);
    };
  }
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
