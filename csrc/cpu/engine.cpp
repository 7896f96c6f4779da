// The CPU per-token loop: x += Mixer(RMS(x)); x += MoE(RMS(x)) per layer, then RMS and lm_head.
// Non-expert weights come from the mmap'd weights.bin; the K routed experts of each layer are
// read from experts.bin by the ExpertStore while the shared expert is computed.
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

 private:
  void check_token(int32_t token) const;
  void forward(int32_t token, float* logits);
  void full_attention(int layer, const float* h, float* out);
  void linear_attention(int layer, const float* h, float* out);
  void moe(int layer, const float* h, float* out);
  void mv(const Matrix& w, const float* x, float* y) { cpu::matvec(w, x, y, scratch_, pool_); }

  Model model_;
  const ModelConfig& c_;
  int k_;
  int64_t max_context_;
  ThreadPool pool_;
  ExpertStore store_;
  cpu::MatvecScratch scratch_;
  Matrix embed_, lm_head_;
  const float* final_norm_;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;

  // State. kv_[l]: [capacity, 2, nkv*hd] for full-attention layers; conv_[l]: [kernel-1, channels]
  // oldest first; ssm_[l]: [nv, dk, dv] for DeltaNet layers.
  int64_t pos_ = 0;
  std::vector<std::vector<float>> kv_, conv_, ssm_;

  // Scratch, sized for the largest use.
  std::vector<float> x_, h_, mix_out_, moe_out_, a_, b_, c_buf_, d_, gates_, scores_, probs_, expert_w_;
  std::vector<int> expert_idx_;

  EngineStats stats_;
  uint64_t bytes_at_reset_ = 0, blocks_at_reset_ = 0;
};

int resolve_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("threads must be >= 0 (0 = all cores)");
  if (threads > 0) return threads;
  return std::max(1u, std::thread::hardware_concurrency());
}

int resolve_k(const ModelConfig& c, int k) {
  if (k < 0 || k > c.experts_per_tok)
    throw std::invalid_argument("experts_per_token=" + std::to_string(k) + " is outside 1.." +
                                std::to_string(c.experts_per_tok) + " (the model's top-k)");
  return k == 0 ? c.experts_per_tok : k;
}

int64_t resolve_context(const ModelConfig& c, int64_t n) {
  if (n < 0 || n > c.max_position_embeddings)
    throw std::invalid_argument("max_context=" + std::to_string(n) + " is outside 1.." +
                                std::to_string(c.max_position_embeddings) +
                                " (the model's max_position_embeddings)");
  return n == 0 ? c.max_position_embeddings : n;
}

CpuEngine::CpuEngine(ModelSpec spec, const EngineOptions& o)
    : model_(std::move(spec)),
      c_(model_.config()),
      k_(resolve_k(c_, o.experts_per_token)),
      max_context_(resolve_context(c_, o.max_context)),
      pool_(resolve_threads(o.threads)),
      store_(model_.experts_path(), model_.experts(), k_, k_, o.direct_io),
      scratch_(std::max<int64_t>({c_.hidden_size, int64_t(c_.num_heads) * c_.head_dim,
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
  for (auto* v : {&x_, &h_, &mix_out_, &moe_out_, &a_, &b_, &c_buf_, &d_}) v->assign(size_t(widest), 0.0f);
  gates_.assign(2 * size_t(c_.lin_num_value_heads), 0.0f);
  probs_.assign(size_t(c_.num_experts), 0.0f);
  expert_idx_.assign(size_t(k_), 0);
  expert_w_.assign(size_t(k_), 0.0f);
  reset();
}

void CpuEngine::reset() {
  pos_ = 0;
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

void CpuEngine::check_token(int32_t token) const {
  if (token < 0 || token >= c_.vocab_size)
    throw std::invalid_argument("token id " + std::to_string(token) + " is outside the vocabulary (0.." +
                                std::to_string(c_.vocab_size - 1) + ")");
  if (pos_ >= max_context_)
    throw ContextLimitError("context limit reached: position " + std::to_string(pos_) +
                            " is past max_context=" + std::to_string(max_context_) +
                            "; reset() or restore a shorter state");
}

void CpuEngine::step(int32_t token, float* logits) {
  check_token(token);
  forward(token, logits);
}

void CpuEngine::prefill(const int32_t* tokens, int64_t n, float* logits) {
  if (n <= 0) throw std::invalid_argument("prefill needs at least one token");
  if (pos_ + n > max_context_)
    throw ContextLimitError("prompt of " + std::to_string(n) + " tokens at position " + std::to_string(pos_) +
                            " exceeds max_context=" + std::to_string(max_context_));
  for (int64_t i = 0; i < n; ++i) check_token(tokens[i]);
  for (int64_t i = 0; i < n; ++i) forward(tokens[i], i + 1 == n ? logits : nullptr);
}

void CpuEngine::forward(int32_t token, float* logits) {
  const auto t_token = Clock::now();
  const int H = c_.hidden_size;
  cpu::dequant_row(embed_, token, x_.data());
  for (int l = 0; l < c_.num_layers; ++l) {
    const LayerWeights& w = layers_[size_t(l)];
    auto t0 = Clock::now();
    cpu::rmsnorm(x_.data(), w.input_norm, 1.0f, c_.rms_norm_eps, H, h_.data());
    if (w.type == LayerType::FullAttention)
      full_attention(l, h_.data(), mix_out_.data());
    else
      linear_attention(l, h_.data(), mix_out_.data());
    for (int i = 0; i < H; ++i) x_[size_t(i)] += mix_out_[size_t(i)];
    stats_.mixer_ms += ms_since(t0);
    cpu::rmsnorm(x_.data(), w.post_norm, 1.0f, c_.rms_norm_eps, H, h_.data());
    moe(l, h_.data(), moe_out_.data());
    for (int i = 0; i < H; ++i) x_[size_t(i)] += moe_out_[size_t(i)];
  }
  ++pos_;
  if (logits) {
    auto t0 = Clock::now();
    cpu::rmsnorm(x_.data(), final_norm_, 1.0f, c_.rms_norm_eps, H, h_.data());
    mv(lm_head_, h_.data(), logits);
    stats_.lm_head_ms += ms_since(t0);
  }
  ++stats_.tokens;
  stats_.total_ms += ms_since(t_token);
}

void CpuEngine::full_attention(int layer, const float* h, float* out) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int nh = c_.num_heads, nkv = c_.num_kv_heads, hd = c_.head_dim;
  const int64_t kv_dim = int64_t(nkv) * hd;
  float* qg = a_.data();  // [nh, 2*hd]: query then output gate, per head
  mv(w.q_proj, h, qg);
  float* q = d_.data();
  for (int i = 0; i < nh; ++i) {
    cpu::rmsnorm(qg + int64_t(i) * 2 * hd, w.q_norm, 1.0f, c_.rms_norm_eps, hd, q + int64_t(i) * hd);
  }
  cpu::rope(q, nh, hd, c_.rotary_dim, inv_freq_.data(), pos_);

  std::vector<float>& kv = kv_[size_t(layer)];
  kv.resize(size_t(pos_ + 1) * size_t(2 * kv_dim));  // amortized growth; one row of K then V per position
  float* k = kv.data() + pos_ * 2 * kv_dim;
  float* v = k + kv_dim;
  mv(w.k_proj, h, b_.data());
  for (int i = 0; i < nkv; ++i)
    cpu::rmsnorm(b_.data() + int64_t(i) * hd, w.k_norm, 1.0f, c_.rms_norm_eps, hd, k + int64_t(i) * hd);
  cpu::rope(k, nkv, hd, c_.rotary_dim, inv_freq_.data(), pos_);
  mv(w.v_proj, h, v);

  const int64_t len = pos_ + 1;
  if (scores_.size() < size_t(nh * len)) scores_.resize(size_t(nh * len) * 2);
  float* attn = c_buf_.data();
  cpu::attention(q, kv.data(), kv.data() + kv_dim, 2 * kv_dim, len, nh, nkv, hd, scores_.data(), attn, pool_);
  for (int i = 0; i < nh; ++i)
    for (int j = 0; j < hd; ++j) attn[i * hd + j] *= cpu::sigmoid(qg[int64_t(i) * 2 * hd + hd + j]);
  mv(w.o_proj, attn, out);
}

void CpuEngine::linear_attention(int layer, const float* h, float* out) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int nk = c_.lin_num_key_heads, nv = c_.lin_num_value_heads;
  const int dk = c_.lin_key_head_dim, dv = c_.lin_value_head_dim, K = c_.conv_kernel;
  const int kd = nk * dk, vd = nv * dv, ch = 2 * kd + vd;
  float* mixed = a_.data();  // [q | k | v] before the conv
  float* z = b_.data();      // [nv, dv] output gate
  float* qkv = c_buf_.data();
  mv(w.in_qkv, h, mixed);
  mv(w.in_z, h, z);
  float* beta = gates_.data();
  float* g = gates_.data() + nv;
  mv(w.in_b, h, beta);
  mv(w.in_a, h, g);
  for (int j = 0; j < nv; ++j) {
    beta[j] = cpu::sigmoid(beta[j]);
    g[j] = std::exp(-std::exp(w.a_log[j]) * cpu::softplus(g[j] + w.dt_bias[j]));  // decay e^g
  }

  // Causal depthwise conv over the last K pre-conv inputs (state holds K-1, oldest first), SiLU.
  std::vector<float>& conv = conv_[size_t(layer)];
  for (int c = 0; c < ch; ++c) {
    const float* wc = w.conv_w + int64_t(c) * K;
    float acc = wc[K - 1] * mixed[c];
    for (int t = 0; t < K - 1; ++t) acc += wc[t] * conv[size_t(t) * ch + c];
    qkv[c] = cpu::silu(acc);
  }
  if (K > 1) {
    std::move(conv.begin() + ch, conv.end(), conv.begin());
    std::copy(mixed, mixed + ch, conv.end() - ch);
  }

  // L2-normalise q and k per key head (eps inside the sqrt); q also scaled by dk^-1/2.
  float* q = qkv;
  float* k = qkv + kd;
  const float* v = qkv + 2 * kd;
  for (int i = 0; i < nk; ++i) {
    float* qi = q + i * dk;
    float* ki = k + i * dk;
    float sq = 0, sk = 0;
    for (int d = 0; d < dk; ++d) sq += qi[d] * qi[d], sk += ki[d] * ki[d];
    const float iq = 1.0f / std::sqrt(sq + 1e-6f) / std::sqrt(float(dk));
    const float ik = 1.0f / std::sqrt(sk + 1e-6f);
    for (int d = 0; d < dk; ++d) qi[d] *= iq, ki[d] *= ik;
  }

  // Per value head j (key head j / (nv/nk)): S = e^g S; S += k (beta (v - S^T k))^T; o = S^T q;
  // then rms(o) * w * silu(z).
  float* o = d_.data();
  float* S_all = ssm_[size_t(layer)].data();
  const int ratio = nv / nk;
  pool_.parallel_for(nv, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> delta(static_cast<size_t>(dv));
    for (int64_t j = j0; j < j1; ++j) {
      float* S = S_all + j * dk * dv;
      const float* qj = q + (j / ratio) * dk;
      const float* kj = k + (j / ratio) * dk;
      const float* vj = v + j * dv;
      const float decay = g[j];
      std::fill(delta.begin(), delta.end(), 0.0f);
      for (int a = 0; a < dk; ++a) {
        float* row = S + int64_t(a) * dv;
        for (int b = 0; b < dv; ++b) {
          row[b] *= decay;
          delta[size_t(b)] += row[b] * kj[a];
        }
      }
      for (int b = 0; b < dv; ++b) delta[size_t(b)] = beta[j] * (vj[b] - delta[size_t(b)]);
      float* oj = o + j * dv;
      std::fill(oj, oj + dv, 0.0f);
      for (int a = 0; a < dk; ++a) {
        float* row = S + int64_t(a) * dv;
        for (int b = 0; b < dv; ++b) {
          row[b] += kj[a] * delta[size_t(b)];
          oj[b] += row[b] * qj[a];
        }
      }
      cpu::rmsnorm(oj, w.out_norm, 0.0f, c_.rms_norm_eps, dv, oj);
      const float* zj = z + j * dv;
      for (int b = 0; b < dv; ++b) oj[b] *= cpu::silu(zj[b]);
    }
  });
  mv(w.out_proj, o, out);
}

void CpuEngine::moe(int layer, const float* h, float* out) {
  const LayerWeights& w = layers_[size_t(layer)];
  const int H = c_.hidden_size;
  auto t0 = Clock::now();
  mv(w.router, h, probs_.data());
  cpu::softmax(probs_.data(), c_.num_experts);
  cpu::top_k(probs_.data(), c_.num_experts, k_, expert_idx_.data());
  float wsum = 0.0f;
  for (int i = 0; i < k_; ++i) wsum += (expert_w_[size_t(i)] = probs_[size_t(expert_idx_[size_t(i)])]);
  if (c_.norm_topk_prob)
    for (int i = 0; i < k_; ++i) expert_w_[size_t(i)] /= wsum;
  for (int i = 0; i < k_; ++i) store_.start(i, layer, expert_idx_[size_t(i)]);
  stats_.router_ms += ms_since(t0);

  // Shared expert while the routed experts are read.
  t0 = Clock::now();
  float* gate = a_.data();
  float* up = b_.data();
  float* y = c_buf_.data();
  auto swiglu_expert = [&](const Matrix& g, const Matrix& u, const Matrix& d) {
    mv(g, h, gate);
    mv(u, h, up);
    for (int64_t i = 0; i < g.rows; ++i) gate[i] = cpu::silu(gate[i]) * up[i];
    mv(d, gate, y);
  };
  float shared_scale;
  mv(w.shared_gate, h, &shared_scale);
  shared_scale = cpu::sigmoid(shared_scale);
  swiglu_expert(w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj);
  for (int i = 0; i < H; ++i) out[i] = shared_scale * y[i];
  stats_.expert_compute_ms += ms_since(t0);

  const ExpertLayout& L = model_.experts();
  for (int s = 0; s < k_; ++s) {
    t0 = Clock::now();
    const uint8_t* block = store_.wait(s);
    stats_.expert_io_wait_ms += ms_since(t0);
    t0 = Clock::now();
    swiglu_expert(matrix_at(block, L.gate), matrix_at(block, L.up), matrix_at(block, L.down));
    const float ew = expert_w_[size_t(s)];
    for (int i = 0; i < H; ++i) out[i] += ew * y[i];
    stats_.expert_compute_ms += ms_since(t0);
  }
}

EngineStats CpuEngine::stats() const {
  EngineStats s = stats_;
  s.expert_bytes_read = store_.bytes_read() - bytes_at_reset_;
  s.experts_loaded = store_.blocks_read() - blocks_at_reset_;
  return s;
}

void CpuEngine::reset_stats() {
  stats_ = EngineStats{};
  bytes_at_reset_ = store_.bytes_read();
  blocks_at_reset_ = store_.blocks_read();
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
  for (size_t l = 0; l < n; ++l)
    if (s.buffers[n + l].size() != conv_[l].size() || s.buffers[2 * n + l].size() != ssm_[l].size())
      throw std::invalid_argument("state snapshot is from another model");
  if (s.position > max_context_) throw std::invalid_argument("state snapshot is longer than max_context");
  pos_ = s.position;
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
