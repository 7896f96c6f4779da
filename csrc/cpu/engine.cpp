// The CPU loop: x += Mixer(RMS(x)); x += MoE(RMS(x)) per layer, then RMS and lm_head, for a batch
// of n consecutive tokens (n = 1 when decoding, a chunk of the prompt when prefilling). Projections
// are x[n, in] W^T products that read each weight once per batch; attention and the DeltaNet
// recurrence walk the batch in order. Non-expert weights come from the mmap'd weights.bin. The
// MoE routes the whole batch, then reads every expert any token needs once, from experts.bin,
// while the shared expert and the experts already read are computed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

#include "cpu/kernels.h"
#include "engine.h"
#include "expert_store.h"
#include "thread_pool.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Tokens per prefill chunk. Streaming a 35B-A3B-shaped model from disk (bench/prefill_vs_decode.py)
// a 512-token prompt read 244 MB of experts per token in chunks of 64 and 35 MB in one chunk of
// 512 (a chunk's 4096 routings touch every one of 256 experts); compute per token barely moves.
constexpr int kDefaultPrefillChunk = 512;
// Expert blocks in flight while a chunk's experts are read (decode needs only K): read buffers of
// about 256 MB, at least 64 blocks, at most a layer's experts; and the I/O threads reading them.
// Streaming a 35B-A3B-shaped model with O_DIRECT, 64 slots and 16 threads cut prefill's expert I/O
// wait from 9.0 to 2.8 ms per token against 32 slots and 8 threads; once the mixer's time also
// carried reads (below), 151 slots (256 MB) let the reads run through the whole mixer.
constexpr uint64_t kPrefillReadBytes = uint64_t(256) << 20;
constexpr int kMinPrefillSlots = 64;
// With O_DIRECT and a chunk of n tokens whose n * k routings are at least this many times the
// expert count, a layer's first read slots are filled with its lowest expert ids while its mixer
// runs, before the router has chosen: each expert is then unused with probability below
// (1 - k/E)^n < e^-8. 40 layers of a 35B-A3B shape, 512 tokens: the mixer (a third of prefill)
// otherwise runs with the disk idle.
constexpr int kSpeculateRoutingsPerExpert = 8;
constexpr int kMinIoThreads = 16;

struct LayerWeights {
  LayerType type;
  const float* input_norm;
  const float* post_norm;
  // full attention
  Matrix q_proj, k_proj, v_proj, o_proj;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  // Gated DeltaNet
  Matrix in_qkv, in_z, in_b, in_a, out_proj;
  const float* conv_w = nullptr;  // [channels, kernel]
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const float* out_norm = nullptr;  // [value_head_dim], plain weight
  // MoE
  Matrix router, shared_gate, shared_gate_proj, shared_up_proj, shared_down_proj;
};

// Scratch of up to [chunk, width] floats; users index rows with the stride of what they store.
struct Buffer {
  std::vector<float> data;
  void resize(int64_t rows, int64_t width) { data.assign(size_t(rows * width), 0.0f); }
  float* get() { return data.data(); }
};

class CpuEngine final : public Engine {
 public:
  CpuEngine(ModelSpec spec, const EngineOptions& options);

  void step(int32_t token, float* logits) override;
  void prefill(const int32_t* tokens, int64_t n, float* logits) override;
  void reset() override;
  int64_t position() const override { return pos_; }
  int64_t max_context() const override { return max_context_; }
  int experts_per_token() const override { return k_; }
  const ModelConfig& config() const override { return c_; }
  EngineStats stats() const override;
  void reset_stats() override;
  EngineState snapshot() const override;
  void restore(const EngineState& state) override;
  std::string describe() const override;
  std::shared_ptr<LogitsBuffers> logits_buffers() const override { return logits_buffers_; }

 private:
  // Runs n <= chunk_ tokens at positions pos_..pos_+n-1; logits of the last when not null.
  void forward(const int32_t* tokens, int64_t n, float* logits);
  // forward(), but an error (a failed expert read) leaves the engine refusing tokens until
  // reset() or restore(): the state was half updated.
  void forward_or_break(const int32_t* tokens, int64_t n, float* logits);
  void full_attention(int layer, int64_t n);
  void linear_attention(int layer, int64_t n);
  void moe(int layer, int64_t n);
  void lin(const Matrix& w, const float* x, int64_t n, float* y) { cpu::linear(w, x, n, y, scratch_, pool_); }
  // y[n, H] = down(silu(gate x) * up x) for x[n, H]
  void swiglu(const Matrix& gate, const Matrix& up, const Matrix& down, const float* x, int64_t n, float* y);

  Model model_;
  const ModelConfig& c_;
  std::shared_ptr<LogitsBuffers> logits_buffers_ = make_heap_logits_buffers(size_t(c_.vocab_size));
  int k_;
  int64_t max_context_;
  int64_t chunk_;
  ThreadPool pool_;
  ExpertStore store_;
  bool direct_io_;
  cpu::LinearScratch scratch_;
  Matrix embed_, lm_head_;
  const float* final_norm_;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;

  // State. kv_[l]: [positions, 2, nkv*hd] (K then V) for full-attention layers; conv_[l]:
  // [kernel-1, channels] oldest first, ssm_[l]: [nv, dk, dv] for DeltaNet layers.
  int64_t pos_ = 0;
  std::vector<std::vector<float>> kv_, conv_, ssm_;

  // Scratch for a batch of up to chunk_ tokens.
  Buffer x_, h_, mix_, moe_, a_, b_, c_buf_, d_, gates_, probs_;
  std::vector<int> expert_idx_;      // [n, k]
  // the MoE's per-layer bookkeeping, kept to spare allocations inside the token
  std::vector<std::vector<std::pair<int, float>>> expert_users_;
  std::vector<int> expert_order_;
  std::vector<const uint8_t*> expert_cached_;
  std::vector<int64_t> expert_to_read_;
  std::vector<int> prefetched_;  // experts whose reads fill slots 0.. ahead of this layer's router

  EngineStats stats_;
  uint64_t bytes_at_reset_ = 0, blocks_at_reset_ = 0, cached_at_reset_ = 0;
  std::string broken_;  // why the state is unusable; empty when it is sound
  uint64_t unique_experts_run_ = 0;  // by every MoE call: each chunk's distinct experts, per layer
};

int resolve_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("threads must be >= 0 (0 = all cores)");
  if (threads > 0) return threads;
  return std::max(1u, std::thread::hardware_concurrency());
}

int read_slots(const ModelConfig& c, const ExpertLayout& layout, int k) {
  const uint64_t budget = kPrefillReadBytes / std::max<uint64_t>(1, layout.block_stride);
  return std::max(k, std::min(c.num_experts, std::max(kMinPrefillSlots, int(budget))));
}

int64_t resolve_chunk(int chunk) {
  if (chunk < 0 || chunk > 8192) throw std::invalid_argument("prefill_chunk must be in 1..8192");
  return chunk == 0 ? kDefaultPrefillChunk : chunk;
}

CpuEngine::CpuEngine(ModelSpec spec, const EngineOptions& o)
    : model_(std::move(spec)),
      c_(model_.config()),
      k_(resolve_experts_per_token(c_, o.experts_per_token)),
      max_context_(resolve_max_context(c_, o.max_context)),
      chunk_(resolve_chunk(o.prefill_chunk)),
      pool_(resolve_threads(o.threads)),
      store_(model_.experts_path(), model_.experts(), read_slots(c_, model_.experts(), k_),
             std::max(k_, kMinIoThreads), o.direct_io),
      direct_io_(o.direct_io),
      scratch_(chunk_, std::max<int64_t>({c_.hidden_size, int64_t(c_.num_heads) * c_.head_dim,
                                          int64_t(c_.lin_num_value_heads) * c_.lin_value_head_dim,
                                          c_.moe_intermediate, c_.shared_intermediate})) {
  const int H = c_.hidden_size;
  embed_ = model_.matrix("embed_tokens.weight");
  lm_head_ = model_.matrix("lm_head.weight");
  final_norm_ = model_.vector_f32("norm.weight", H);
  const int kd = c_.lin_num_key_heads * c_.lin_key_head_dim;
  const int vd = c_.lin_num_value_heads * c_.lin_value_head_dim;
  const int conv_ch = 2 * kd + vd;
  for (int l = 0; l < c_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.type = c_.layer_types[size_t(l)];
    w.input_norm = model_.vector_f32(p + "input_layernorm.weight", H);
    w.post_norm = model_.vector_f32(p + "post_attention_layernorm.weight", H);
    if (w.type == LayerType::FullAttention) {
      const std::string a = p + "self_attn.";
      w.q_proj = model_.matrix(a + "q_proj.weight");
      w.k_proj = model_.matrix(a + "k_proj.weight");
      w.v_proj = model_.matrix(a + "v_proj.weight");
      w.o_proj = model_.matrix(a + "o_proj.weight");
      w.q_norm = model_.vector_f32(a + "q_norm.weight", c_.head_dim);
      w.k_norm = model_.vector_f32(a + "k_norm.weight", c_.head_dim);
    } else {
      const std::string a = p + "linear_attn.";
      w.in_qkv = model_.matrix(a + "in_proj_qkv.weight");
      w.in_z = model_.matrix(a + "in_proj_z.weight");
      w.in_b = model_.matrix(a + "in_proj_b.weight");
      w.in_a = model_.matrix(a + "in_proj_a.weight");
      w.out_proj = model_.matrix(a + "out_proj.weight");
      w.conv_w = model_.vector_f32(a + "conv1d.weight", int64_t(conv_ch) * c_.conv_kernel);
      w.a_log = model_.vector_f32(a + "A_log", c_.lin_num_value_heads);
      w.dt_bias = model_.vector_f32(a + "dt_bias", c_.lin_num_value_heads);
      w.out_norm = model_.vector_f32(a + "norm.weight", c_.lin_value_head_dim);
    }
    const std::string m = p + "mlp.";
    w.router = model_.matrix(m + "gate.weight");
    w.shared_gate = model_.matrix(m + "shared_expert_gate.weight");
    w.shared_gate_proj = model_.matrix(m + "shared_expert.gate_proj.weight");
    w.shared_up_proj = model_.matrix(m + "shared_expert.up_proj.weight");
    w.shared_down_proj = model_.matrix(m + "shared_expert.down_proj.weight");
    layers_.push_back(w);
  }
  for (int i = 0; i < c_.rotary_dim / 2; ++i)
    inv_freq_.push_back(float(1.0 / std::pow(c_.rope_theta, double(2 * i) / c_.rotary_dim)));

  kv_.resize(size_t(c_.num_layers));
  conv_.resize(size_t(c_.num_layers));
  ssm_.resize(size_t(c_.num_layers));
  const int64_t q_dim = int64_t(c_.num_heads) * c_.head_dim * 2;
  const int64_t widest = std::max<int64_t>({H, q_dim, conv_ch, vd, c_.moe_intermediate,
                                            c_.shared_intermediate, c_.num_experts});
  for (Buffer* b : {&x_, &h_, &mix_, &moe_}) b->resize(chunk_, H);
  for (Buffer* b : {&a_, &b_, &c_buf_, &d_}) b->resize(chunk_, widest);
  gates_.resize(chunk_, 2 * c_.lin_num_value_heads);
  probs_.resize(chunk_, c_.num_experts);
  expert_idx_.assign(size_t(chunk_ * k_), 0);
  expert_users_.resize(size_t(c_.num_experts));
  reset();
}

void CpuEngine::reset() {
  pos_ = 0;
  broken_.clear();
  const int kd = c_.lin_num_key_heads * c_.lin_key_head_dim;
  const int vd = c_.lin_num_value_heads * c_.lin_value_head_dim;
  for (int l = 0; l < c_.num_layers; ++l) {
    kv_[size_t(l)].clear();
    if (layers_[size_t(l)].type == LayerType::LinearAttention) {
      conv_[size_t(l)].assign(size_t(c_.conv_kernel - 1) * size_t(2 * kd + vd), 0.0f);
      ssm_[size_t(l)].assign(size_t(c_.lin_num_value_heads) * c_.lin_key_head_dim * c_.lin_value_head_dim, 0.0f);
    }
  }
}

void CpuEngine::step(int32_t token, float* logits) {
  check_tokens(c_, &token, 1, pos_, max_context_, broken_);
  forward_or_break(&token, 1, logits);
}

void CpuEngine::forward_or_break(const int32_t* tokens, int64_t n, float* logits) {
  try {
    forward(tokens, n, logits);
  } catch (const std::exception& e) {
    store_.drain();
    prefetched_.clear();
    for (auto& u : expert_users_) u.clear();  // the failed layer's routing
    broken_ = e.what();
    throw;
  }
}

void CpuEngine::prefill(const int32_t* tokens, int64_t n, float* logits) {
  if (n <= 0) throw std::invalid_argument("prefill needs at least one token");
  check_tokens(c_, tokens, n, pos_, max_context_, broken_);
  const uint64_t bytes0 = store_.bytes_read(), blocks0 = store_.blocks_read(), run0 = unique_experts_run_;
  for (int64_t i = 0; i < n; i += chunk_) {
    const int64_t m = std::min(chunk_, n - i);
    forward_or_break(tokens + i, m, i + m == n ? logits : nullptr);
    ++stats_.prefill_chunks;
  }
  stats_.prefill_tokens += uint64_t(n);
  stats_.prefill_unique_experts += unique_experts_run_ - run0;
  stats_.prefill_expert_bytes_read += store_.bytes_read() - bytes0;
  stats_.prefill_experts_loaded += store_.blocks_read() - blocks0;
}

void CpuEngine::forward(const int32_t* tokens, int64_t n, float* logits) {
  const auto t_start = Clock::now();
  const int H = c_.hidden_size;
  for (int64_t t = 0; t < n; ++t) cpu::dequant_row(embed_, tokens[t], x_.get() + t * H);
  for (int l = 0; l < c_.num_layers; ++l) {
    const LayerWeights& w = layers_[size_t(l)];
    if (direct_io_ && n * k_ >= int64_t(kSpeculateRoutingsPerExpert) * c_.num_experts)
      for (int e = 0; e < std::min(store_.slots(), c_.num_experts); ++e) {
        store_.start(e, l, e);
        prefetched_.push_back(e);
      }
    auto t0 = Clock::now();
    for (int64_t t = 0; t < n; ++t) cpu::rmsnorm(x_.get() + t * H, w.input_norm, 1.0f, c_.rms_norm_eps, H, h_.get() + t * H);
    if (w.type == LayerType::FullAttention)
      full_attention(l, n);
    else
      linear_attention(l, n);
    for (int64_t i = 0; i < n * H; ++i) x_.get()[i] += mix_.get()[i];
    stats_.mixer_ms += ms_since(t0);
    for (int64_t t = 0; t < n; ++t) cpu::rmsnorm(x_.get() + t * H, w.post_norm, 1.0f, c_.rms_norm_eps, H, h_.get() + t * H);
    moe(l, n);
    for (int64_t i = 0; i < n * H; ++i) x_.get()[i] += moe_.get()[i];
  }
  pos_ += n;
  if (logits) {
    auto t0 = Clock::now();
    cpu::rmsnorm(x_.get() + (n - 1) * H, final_norm_, 1.0f, c_.rms_norm_eps, H, h_.get());
    lin(lm_head_, h_.get(), 1, logits);
    stats_.lm_head_ms += ms_since(t0);
  }
  stats_.tokens += uint64_t(n);
  stats_.total_ms += ms_since(t_start);
}

void CpuEngine::full_attention(int layer, int64_t n) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int nh = c_.num_heads, nkv = c_.num_kv_heads, hd = c_.head_dim;
  const int64_t kv_dim = int64_t(nkv) * hd, row = 2 * kv_dim;
  const int group = nh / nkv;
  lin(w.q_proj, h_.get(), n, a_.get());  // [n, nh, 2*hd]: query then output gate, per head
  lin(w.k_proj, h_.get(), n, b_.get());
  lin(w.v_proj, h_.get(), n, c_buf_.get());

  std::vector<float>& kv = kv_[size_t(layer)];
  kv.resize(size_t((pos_ + n) * row));  // amortized growth
  const int64_t q_width = 2 * int64_t(nh) * hd;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = pos_ + t;
    const float* qg = a_.get() + t * q_width;
    float* q = d_.get() + t * nh * hd;
    for (int i = 0; i < nh; ++i)
      cpu::rmsnorm(qg + int64_t(i) * 2 * hd, w.q_norm, 1.0f, c_.rms_norm_eps, hd, q + int64_t(i) * hd);
    cpu::rope(q, nh, hd, c_.rotary_dim, inv_freq_.data(), pos);
    float* k = kv.data() + pos * row;
    for (int i = 0; i < nkv; ++i)
      cpu::rmsnorm(b_.get() + t * kv_dim + i * hd, w.k_norm, 1.0f, c_.rms_norm_eps, hd, k + int64_t(i) * hd);
    cpu::rope(k, nkv, hd, c_.rotary_dim, inv_freq_.data(), pos);
    std::copy(c_buf_.get() + t * kv_dim, c_buf_.get() + (t + 1) * kv_dim, k + kv_dim);
  }
  // token t of the batch sees positions 0..pos_+t (causal); one task per (token, head)
  float* attn = c_buf_.get();  // v is in the cache now; reuse its buffer for the output [n, nh*hd]
  pool_.parallel_for(n * nh, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / nh, h = i % nh;
      const float* kh = kv.data() + (h / group) * hd;
      cpu::attend(d_.get() + (t * nh + h) * hd, kh, kh + kv_dim, row, pos_ + t + 1, hd, attn + (t * nh + h) * hd);
    }
  });
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < nh; ++i)
      for (int j = 0; j < hd; ++j) attn[(t * nh + i) * hd + j] *= cpu::sigmoid(a_.get()[t * q_width + (2 * i + 1) * hd + j]);
  lin(w.o_proj, attn, n, mix_.get());
}

void CpuEngine::linear_attention(int layer, int64_t n) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int nk = c_.lin_num_key_heads, nv = c_.lin_num_value_heads;
  const int dk = c_.lin_key_head_dim, dv = c_.lin_value_head_dim, K = c_.conv_kernel;
  const int kd = nk * dk, vd = nv * dv, ch = 2 * kd + vd;
  lin(w.in_qkv, h_.get(), n, a_.get());  // [n, q | k | v] before the conv
  lin(w.in_z, h_.get(), n, b_.get());    // [n, nv, dv] output gate
  lin(w.in_b, h_.get(), n, probs_.get());  // [n, nv]
  lin(w.in_a, h_.get(), n, d_.get());      // [n, nv]

  std::vector<float>& conv = conv_[size_t(layer)];
  for (int64_t t = 0; t < n; ++t) {
    const float* mixed = a_.get() + t * ch;
    float* qkv = c_buf_.get() + t * ch;
    // causal depthwise conv over the last K pre-conv inputs (state holds K-1, oldest first), SiLU
    for (int c = 0; c < ch; ++c) {
      const float* wc = w.conv_w + int64_t(c) * K;
      float acc = wc[K - 1] * mixed[c];
      for (int s = 0; s < K - 1; ++s) acc += wc[s] * conv[size_t(s) * ch + c];
      qkv[c] = cpu::silu(acc);
    }
    if (K > 1) {
      std::move(conv.begin() + ch, conv.end(), conv.begin());
      std::copy(mixed, mixed + ch, conv.end() - ch);
    }
    // L2-normalise q and k per key head (eps inside the sqrt); q also scaled by dk^-1/2
    for (int i = 0; i < nk; ++i) {
      float* qi = qkv + i * dk;
      float* ki = qkv + kd + i * dk;
      float sq = 0, sk = 0;
      for (int d = 0; d < dk; ++d) sq += qi[d] * qi[d], sk += ki[d] * ki[d];
      const float iq = 1.0f / std::sqrt(sq + 1e-6f) / std::sqrt(float(dk));
      const float ik = 1.0f / std::sqrt(sk + 1e-6f);
      for (int d = 0; d < dk; ++d) qi[d] *= iq, ki[d] *= ik;
    }
    float* beta = gates_.get() + t * 2 * nv;
    float* decay = beta + nv;
    for (int j = 0; j < nv; ++j) {
      beta[j] = cpu::sigmoid(probs_.get()[t * nv + j]);
      decay[j] = std::exp(-std::exp(w.a_log[j]) * cpu::softplus(d_.get()[t * nv + j] + w.dt_bias[j]));
    }
  }

  // Per value head j (key head j / (nv/nk)), token by token: S = e^g S; S += k (beta (v - S^T k))^T;
  // o = S^T q; then rms(o) * w * silu(z). One task per head keeps its state in cache for the batch.
  float* S_all = ssm_[size_t(layer)].data();
  float* o_all = d_.get();  // [n, vd]; in_proj_a's output was consumed above
  const int ratio = nv / nk;
  pool_.parallel_for(nv, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> delta(static_cast<size_t>(dv));
    for (int64_t j = j0; j < j1; ++j) {
      float* S = S_all + j * dk * dv;
      for (int64_t t = 0; t < n; ++t) {
        const float* qkv = c_buf_.get() + t * ch;
        const float* qj = qkv + (j / ratio) * dk;
        const float* kj = qkv + kd + (j / ratio) * dk;
        const float* vj = qkv + 2 * kd + j * dv;
        const float beta = gates_.get()[t * 2 * nv + j], decay = gates_.get()[t * 2 * nv + nv + j];
        float* oj = o_all + t * vd + j * dv;
        cpu::deltanet_step(S, qj, kj, vj, beta, decay, dk, dv, delta.data(), oj);
        cpu::rmsnorm(oj, w.out_norm, 0.0f, c_.rms_norm_eps, dv, oj);
        const float* zj = b_.get() + t * vd + j * dv;
        for (int b = 0; b < dv; ++b) oj[b] *= cpu::silu(zj[b]);
      }
    }
  });
  lin(w.out_proj, o_all, n, mix_.get());
}

void CpuEngine::swiglu(const Matrix& gate, const Matrix& up, const Matrix& down, const float* x, int64_t n,
                       float* y) {
  const int64_t inter = gate.rows;
  float* g = a_.get();
  float* u = b_.get();
  lin(gate, x, n, g);
  lin(up, x, n, u);
  for (int64_t i = 0; i < n * inter; ++i) g[i] = cpu::silu(g[i]) * u[i];
  lin(down, g, n, y);
}

void CpuEngine::moe(int layer, int64_t n) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int H = c_.hidden_size, E = c_.num_experts;
  auto t0 = Clock::now();
  lin(w.router, h_.get(), n, probs_.get());
  // per token: softmax over experts, top-K, renormalise. The batch's experts run in ascending id,
  // so each token sums its experts in the same order whatever the batch (prefill == stepping).
  auto& users = expert_users_;  // expert -> (token, weight); emptied again below
  auto& order = expert_order_;
  order.clear();
  for (int64_t t = 0; t < n; ++t) {
    float* p = probs_.get() + t * E;
    cpu::softmax(p, E);
    int* idx = expert_idx_.data() + t * k_;
    cpu::top_k(p, E, k_, idx);
    float sum = 0.0f;
    for (int i = 0; i < k_; ++i) sum += p[idx[i]];
    for (int i = 0; i < k_; ++i) {
      const float wgt = c_.norm_topk_prob ? p[idx[i]] / sum : p[idx[i]];
      if (users[size_t(idx[i])].empty()) order.push_back(idx[i]);
      users[size_t(idx[i])].push_back({int(t), wgt});
    }
  }
  std::sort(order.begin(), order.end());
  stats_.router_ms += ms_since(t0);
  // Blocks already in the page cache are used where they lie; the others are read into slots,
  // queued up front in ascending id. Queueing wakes the I/O threads, which can take the core for
  // a while: that counts as I/O time.
  t0 = Clock::now();
  const int64_t unique = int64_t(order.size());
  unique_experts_run_ += uint64_t(unique);
  auto& cached = expert_cached_;
  auto& to_read = expert_to_read_;  // indices into order
  cached.assign(size_t(unique), nullptr);
  to_read.clear();
  for (int64_t i = 0; i < unique; ++i)
    if (!(cached[size_t(i)] = store_.if_cached(layer, order[size_t(i)]))) to_read.push_back(i);
  const int slots = store_.slots();
  const int64_t reads = int64_t(to_read.size());
  // slot j's read is the j-th of to_read: kept when the prefetch guessed it, else replaced
  for (int64_t j = 0; j < std::max<int64_t>(std::min<int64_t>(reads, slots), int64_t(prefetched_.size())); ++j) {
    const bool guessed = j < int64_t(prefetched_.size());
    const int want = j < std::min<int64_t>(reads, slots) ? order[size_t(to_read[size_t(j)])] : -1;
    if (guessed && prefetched_[size_t(j)] == want) continue;
    if (guessed) store_.wait(int(j));  // an expert no token chose: its read is dropped
    if (want >= 0) store_.start(int(j), layer, want);
  }
  prefetched_.clear();
  stats_.expert_io_wait_ms += ms_since(t0);

  // shared expert while the routed experts are read
  t0 = Clock::now();
  float* out = moe_.get();
  swiglu(w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, h_.get(), n, out);
  float* gate = probs_.get();  // router probabilities are consumed
  lin(w.shared_gate, h_.get(), n, gate);
  for (int64_t t = 0; t < n; ++t) {
    const float s = cpu::sigmoid(gate[t]);
    for (int i = 0; i < H; ++i) out[t * H + i] *= s;
  }
  stats_.expert_compute_ms += ms_since(t0);

  // experts in ascending id whichever way they came, so every token sums them in one order
  const ExpertLayout& L = model_.experts();
  float* xe = c_buf_.get();  // [n_e, H] inputs of one expert's tokens
  float* ye = d_.get();      // [n_e, H] its outputs
  int64_t j = 0;             // next of to_read to wait for
  for (int64_t i = 0; i < unique; ++i) {
    const uint8_t* block = cached[size_t(i)];
    if (!block) {
      const int slot = int(j % slots);
      t0 = Clock::now();
      block = store_.wait(slot);
      stats_.expert_io_wait_ms += ms_since(t0);
    }
    t0 = Clock::now();
    const auto& tokens = users[size_t(order[size_t(i)])];
    const int64_t ne = int64_t(tokens.size());
    for (int64_t r = 0; r < ne; ++r) {
      const float* src = h_.get() + int64_t(tokens[size_t(r)].first) * H;
      std::copy(src, src + H, xe + r * H);
    }
    swiglu(matrix_at(block, L.gate), matrix_at(block, L.up), matrix_at(block, L.down), xe, ne, ye);
    if (!cached[size_t(i)]) {
      if (j + slots < reads)  // the slot's block is consumed: read the next one into it
        store_.start(int(j % slots), layer, order[size_t(to_read[size_t(j + slots)])]);
      ++j;
    }
    for (int64_t r = 0; r < ne; ++r) {
      const auto [t, wgt] = tokens[size_t(r)];
      for (int k = 0; k < H; ++k) out[int64_t(t) * H + k] += wgt * ye[r * H + k];
    }
    users[size_t(order[size_t(i)])].clear();
    stats_.expert_compute_ms += ms_since(t0);
  }
}

EngineStats CpuEngine::stats() const {
  EngineStats s = stats_;
  s.expert_bytes_read = store_.bytes_read() - bytes_at_reset_;
  s.experts_loaded = store_.blocks_read() - blocks_at_reset_;
  s.experts_cached = store_.blocks_cached() - cached_at_reset_;
  return s;
}

void CpuEngine::reset_stats() {
  stats_ = EngineStats{};
  bytes_at_reset_ = store_.bytes_read();
  blocks_at_reset_ = store_.blocks_read();
  cached_at_reset_ = store_.blocks_cached();
}

EngineState CpuEngine::snapshot() const {
  EngineState s;
  s.position = pos_;
  for (auto* group : {&kv_, &conv_, &ssm_})
    for (const auto& buf : *group) s.buffers.push_back(buf);
  return s;
}

void CpuEngine::restore(const EngineState& s) {
  const size_t n = size_t(c_.num_layers);
  if (s.buffers.size() != 3 * n) throw std::invalid_argument("state snapshot is from another model");
  const size_t kv_row = size_t(2 * c_.num_kv_heads * c_.head_dim);
  for (size_t l = 0; l < n; ++l) {
    const bool full = layers_[l].type == LayerType::FullAttention;
    if (s.buffers[n + l].size() != conv_[l].size() || s.buffers[2 * n + l].size() != ssm_[l].size() ||
        s.buffers[l].size() != (full ? size_t(s.position) * kv_row : 0))
      throw std::invalid_argument("state snapshot is from another model");
  }
  if (s.position < 0 || s.position > max_context_)
    throw std::invalid_argument("state snapshot is longer than max_context");
  pos_ = s.position;
  broken_.clear();
  for (size_t l = 0; l < n; ++l) {
    kv_[l] = s.buffers[l];
    conv_[l] = s.buffers[n + l];
    ssm_[l] = s.buffers[2 * n + l];
  }
}

std::string CpuEngine::describe() const {
  return "cpu (" + std::string(cpu::simd_path()) + ", " + std::to_string(pool_.size()) + " threads)";
}

}  // namespace

uint64_t EngineState::nbytes() const {
  uint64_t n = 0;
  for (const auto& b : buffers) n += b.size() * sizeof(float);
  return n;
}

std::unique_ptr<Engine> make_cpu_engine(ModelSpec spec, const EngineOptions& options) {
  return std::make_unique<CpuEngine>(std::move(spec), options);
}

}  // namespace fm
