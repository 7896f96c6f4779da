// The CUDA per-token loop: the CPU engine's math (csrc/cpu/engine.cpp) with every kernel on one
// stream. Non-expert weights are uploaded once; the KV cache, DeltaNet conv/recurrent state and
// activations live on the device. Routed experts come from a device cache of expert blocks:
//  - resident: the cache holds every block (loaded at start); the top-k choice never leaves the
//    device, so a token is one CUDA graph launch and one synchronisation (for the logits);
//  - streaming: the cache holds some blocks (least frequently used is evicted, expert_cache.h).
//    Each layer synchronises once, on its routing decision; the shared expert and the cached
//    experts run while the misses are read by the pread pool into pinned buffers and copied in on
//    a second stream.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <unordered_set>

#include "cuda/kernels.cuh"
#include "cuda/trace.cuh"
#include "cuda/prefill_kernels.cuh"
#include "engine.h"
#include "expert_cache.h"
#include "expert_store.h"

namespace fm {
namespace {

using cuda::DevMat;
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

constexpr double kGB = 1e9;
// Tokens per prefill chunk. In the streaming regime a chunk of 2048 tokens touches nearly every
// expert of a 256-expert layer once (16k routings), so per token the expert reads shrink with the
// chunk; activations cost about 0.2 MB per token of chunk for a 35B-A3B shape.
constexpr int kDefaultPrefillChunk = 2048;
// Expert blocks read ahead while a chunk's experts stream in (decode needs only k), and the
// routed experts whose tiles go into one launch as their copies land.
constexpr int kReadSlots = 64;
constexpr int kExpertsPerLaunch = 16;
// The decode position whose token a trace build records (FLASHMOE_CUDA_TRACE=<file>), and room for
// its blocks' records (about 22,000 for the 40-layer benchmark model).
constexpr int64_t kTracePosition = 32;
constexpr size_t kTraceRecords = 1 << 16;

template <class T>
struct DeviceArray {
  T* p = nullptr;
  size_t n = 0;
  void alloc(size_t count) {
    n = count;
    FM_CUDA(cudaMalloc(&p, std::max<size_t>(1, count) * sizeof(T)));
  }
  ~DeviceArray() {
    if (p) cudaFree(p);
  }
  size_t bytes() const { return n * sizeof(T); }
};

template <class T>
struct PinnedArray {
  T* p = nullptr;
  void alloc(size_t count) { FM_CUDA(cudaMallocHost(&p, std::max<size_t>(1, count) * sizeof(T))); }
  ~PinnedArray() {
    if (p) cudaFreeHost(p);
  }
};

// Page-locked logits buffers, which the device-to-host copy of the logits fills directly: a host
// copy of 1 MB of logits cost 0.1 ms per token (docs/cuda.md). At most kMaxPinned are lent at
// once (pinned memory is scarce); past that, heap buffers, which the engine fills through its
// staging buffer.
class PinnedLogitsBuffers final : public LogitsBuffers {
 public:
  explicit PinnedLogitsBuffers(size_t n) : n_(n) {}
  ~PinnedLogitsBuffers() override {
    for (float* p : free_) cudaFreeHost(p);
  }
  float* acquire() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      float* p = free_.back();
      free_.pop_back();
      return p;
    }
    void* p = nullptr;
    if (pinned_.size() < kMaxPinned && cudaMallocHost(&p, n_ * sizeof(float)) == cudaSuccess) {
      pinned_.insert(static_cast<float*>(p));
      return static_cast<float*>(p);
    }
    cudaGetLastError();  // a failed cudaMallocHost is not sticky; clear it
    return new float[n_];
  }
  void release(float* p) noexcept override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pinned_.count(p))
      free_.push_back(p);
    else
      delete[] p;
  }

 private:
  static constexpr size_t kMaxPinned = 8;
  size_t n_;
  std::mutex mutex_;
  std::unordered_set<float*> pinned_;
  std::vector<float*> free_;
};

struct Event {
  cudaEvent_t e = nullptr;
  explicit Event(bool timing = false) { FM_CUDA(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming)); }
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { FM_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() {
    cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// Host buffers registered as pinned memory for async copies; unregistered before they are freed.
struct PinnedRegistrations {
  std::vector<void*> ptrs;
  void add(void* p, size_t bytes) {
    FM_CUDA(cudaHostRegister(p, bytes, cudaHostRegisterDefault));
    ptrs.push_back(p);
  }
  ~PinnedRegistrations() {
    for (void* p : ptrs) cudaHostUnregister(p);
  }
};

struct Graph {
  cudaGraphExec_t exec = nullptr;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
  }
};

struct CudaLayer {
  LayerType type;
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  DevMat q_proj, k_proj, v_proj, o_proj;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  DevMat in_qkv, in_z, in_b, in_a, out_proj;
  const float* conv_w = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const float* out_norm = nullptr;
  DevMat router, shared_gate, sh_gate, sh_up, sh_down;
  float* kv = nullptr;    // [capacity, 2, nkv*hd]
  float* conv = nullptr;  // [kernel, channels], the input of position p in row p % kernel
  float* ssm = nullptr;   // [nv, dk, dv]
};

// Events of one layer for the per-phase timing (EngineOptions::profile).
enum { kEvMixer, kEvRouter, kEvRouted, kEvExpA0, kEvExpA1, kEvExpB0, kEvExpB1, kEvPerLayer };

int pick_device() {
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) throw std::runtime_error(why);
  int dev = 0;
  FM_CUDA(cudaGetDevice(&dev));
  return dev;
}

class CudaEngine final : public Engine {
 public:
  CudaEngine(ModelSpec spec, const EngineOptions& o);
  ~CudaEngine() override;

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
  DevMat dmat(const std::string& name);
  void copy_expert_block(uint8_t* slot, const uint8_t* src);
  const float* dvec(const std::string& name, int64_t n) const;
  cuda::PartDesc part(const TensorInfo& t) const;
  void upload_weights();
  void allocate_state();
  void setup_expert_cache(double cache_gb);
  std::unique_ptr<ExpertCachePolicy> make_policy() const;
  void preload_experts();
  void capture_graph();
  void forward(int32_t token, float* logits);
  void enqueue_layers();
  float* logits_landing(float* out, float** device) const;
  void enqueue_lm_head(float* dst);
  void forward_chunk(const int32_t* tokens, int m, float* logits);
  void chunk_mixer(int l, int m);
  void chunk_moe(int l, int m);
  void chunk_experts(int l, int m);
  void launch_experts(const std::vector<int>& experts, const std::vector<int>& slots, size_t& tile_off);
  void dense(const DevMat& w, const float* x, float* y, int m, cuda::Epilogue ep = cuda::Epilogue::Store,
             const DevMat* w2 = nullptr);
  void break_state(const std::exception& e);
  void mixer(int l);
  void moe(int l);
  void record(int l, int which);
  void collect_profile();
  void write_trace();
  cuda::ExpertArgs expert_args(int l) const;

  const int device_;
  std::map<std::string, TensorInfo> tensors_;
  Model model_;
  const ModelConfig& c_;
  const int k_;
  const int64_t max_context_;
  const bool profile_;
  ExpertStore store_;
  PinnedRegistrations pinned_;  // the store's read buffers; destroyed before the store
  cudaDeviceProp props_{};
  int sms_ = 0;

  Stream compute_, copy_;
  cudaStream_t stream_ = compute_.s, copy_stream_ = copy_.s;
  Graph graph_;

  DeviceArray<uint8_t> weights_;
  std::vector<CudaLayer> layers_;
  DevMat embed_, lm_head_;
  const float* final_norm_ = nullptr;
  DeviceArray<float> inv_freq_;
  DeviceArray<float> state_;  // every layer's KV / conv / recurrent state, one allocation
  size_t state_floats_ = 0;

  // activations
  DeviceArray<float> x_, mixed_, z_, bgate_, agate_, o_, o_sumsq_, q_, kraw_, vraw_, attn_part_, attn_out_;
  DeviceArray<float> router_logits_, shared_logit_, expert_w_, act_, y_;
  DeviceArray<int> expert_ids_, topk_counter_, row_counters_;
  DeviceArray<cuda::StepParams> step_;
  int act_stride_ = 0;
  PinnedArray<cuda::StepParams> h_step_;
  PinnedArray<int> h_ids_;
  PinnedArray<float> h_logits_;  // staging for callers' buffers that are not page-locked
  float* h_logits_device_ = nullptr;  // its address on the device
  std::shared_ptr<LogitsBuffers> logits_buffers_;

  // expert cache
  DeviceArray<uint8_t> cache_;
  DeviceArray<uint8_t> pairs_tmp_;   // copy_expert_block's scratch (q4_group_major)
  std::set<const void*> q4_paired_;  // q4 weights whose scales are pairs already
  int capacity_ = 0;  // blocks
  bool resident_ = false;
  std::unique_ptr<ExpertCachePolicy> policy_;
  Event routed_{false}, copied_{false};
  double preload_s_ = 0;

  // timing events, per layer kEvPerLayer plus two for the lm_head
  std::vector<std::unique_ptr<Event>> prof_;
  bool lm_head_timed_ = false;
  // developer builds (FLASHMOE_CUDA_TRACE): the timeline of the graph token at kTracePosition
  std::string trace_path_;
  DeviceArray<cuda::trace::Record> trace_;

  // prefill: activations [chunk, width]; the expert grouping of a layer's routing (host and device)
  int chunk_ = 0;
  DeviceArray<float> px_, ph_, pmixed_, pconv_, pz_, pb_, pa_, po_, pk_, pv_, plogits_, psg_, pw_;
  DeviceArray<float> pact_shared_, py_shared_, pact_, py_;
  DeviceArray<int> pids_, ptokens_, pperm_tok_, pperm_out_;
  DeviceArray<cuda::GemmTile> ptiles_;
  PinnedArray<int> h_pids_, h_perm_tok_, h_perm_out_;
  PinnedArray<int32_t> h_tokens_;
  PinnedArray<cuda::GemmTile> h_tiles_;
  size_t max_tiles_ = 0;
  std::vector<int> group_first_, group_count_;  // per expert: its rows in the permutation
  std::vector<std::unique_ptr<Event>> slot_copied_;
  Event computed_{false};

  std::string broken_;  // why the state is unusable after a failed expert read; empty when sound
  int64_t pos_ = 0;
  EngineStats stats_;
  uint64_t bytes_at_reset_ = 0, blocks_at_reset_ = 0;
};

CudaEngine::CudaEngine(ModelSpec spec, const EngineOptions& o)
    : device_(pick_device()),
      tensors_(spec.tensors),
      model_(std::move(spec)),
      c_(model_.config()),
      k_(resolve_experts_per_token(c_, o.experts_per_token)),
      max_context_(resolve_max_context(c_, o.max_context)),
      profile_(o.profile),
      store_(model_.experts_path(), model_.experts(), std::max(2 * k_, kReadSlots),
             o.threads > 0 ? o.threads : std::max(2 * k_, 16), o.direct_io) {
  if (o.threads < 0) throw std::invalid_argument("threads must be >= 0 (0 = 16 I/O threads)");
  if (o.prefill_chunk < 0 || o.prefill_chunk > 8192) throw std::invalid_argument("prefill_chunk must be in 1..8192");
  chunk_ = int(std::min<int64_t>(o.prefill_chunk > 0 ? o.prefill_chunk : kDefaultPrefillChunk, max_context_));
  if (o.expert_cache_gb < 0) throw std::invalid_argument("expert_cache_gb must be >= 0 (0 = what fits)");
  if (k_ >= cuda::kMaxExperts) throw std::invalid_argument("the CUDA backend runs at most 32 experts per token");
  FM_CUDA(cudaGetDeviceProperties(&props_, device_));
  sms_ = props_.multiProcessorCount;
  cuda::set_programmatic_launch(props_.major >= 9);
  if (const char* path = std::getenv("FLASHMOE_CUDA_TRACE"); path && *path) {
    if (!cuda::trace::enabled())
      throw std::runtime_error("FLASHMOE_CUDA_TRACE is set but this build records no trace (cmake -DFLASHMOE_CUDA_TRACE=ON)");
    trace_path_ = path;
    trace_.alloc(kTraceRecords);
  }
  for (int s = 0; s < store_.slots(); ++s) {
    pinned_.add(store_.buffer(s), model_.experts().block_stride);
    slot_copied_.push_back(std::make_unique<Event>());
  }
  upload_weights();
  allocate_state();
  FM_CUDA(cudaDeviceSynchronize());  // the plain cudaMemcpy uploads are not ordered with our streams
  setup_expert_cache(o.expert_cache_gb);
  if (profile_)
    for (int i = 0; i < c_.num_layers * kEvPerLayer + 2; ++i) prof_.push_back(std::make_unique<Event>(true));
  reset_stats();
  reset();
  if (resident_ && !profile_) capture_graph();
  FM_CUDA(cudaStreamSynchronize(stream_));
  reset_stats();
}

CudaEngine::~CudaEngine() {
  cudaStreamSynchronize(stream_);
  cudaStreamSynchronize(copy_stream_);
}

// A matrix of the uploaded weights; a q4 one's scales and biases become pairs (q4_group_major) the
// first time it is asked for.
DevMat CudaEngine::dmat(const std::string& name) {
  const Matrix host = model_.matrix(name);  // validates presence and layout
  const TensorInfo& t = tensors_.at(name);
  const Matrix m = matrix_at(weights_.p, t);
  DevMat d;
  d.data = m.data;
  d.scales = m.scales;
  d.rows = int(host.rows);
  d.cols = int(host.cols);
  d.bits = dtype_bits(t.dtype);
  if (d.bits == 32) throw std::invalid_argument("tensor '" + name + "': f32 matrices are not supported on CUDA");
  if (d.bits == 8) d.biases = m.biases;
  if (d.bits == 4 && q4_paired_.insert(d.scales).second) {
    DeviceArray<uint8_t> tmp;
    tmp.alloc(cuda::q4_pairs_bytes(d.rows, d.cols));
    uint8_t* scales = weights_.p + (reinterpret_cast<const uint8_t*>(m.scales) - weights_.p);
    cuda::q4_group_major(stream_, scales, reinterpret_cast<const uint8_t*>(m.biases), d.rows, d.cols, tmp.p);
    FM_CUDA(cudaStreamSynchronize(stream_));  // before tmp goes
  }
  return d;
}

// An expert block from host memory into a cache slot, its q4 parts' scales and biases made pairs,
// on the copy stream.
void CudaEngine::copy_expert_block(uint8_t* slot, const uint8_t* src) {
  const ExpertLayout& L = model_.experts();
  FM_CUDA(cudaMemcpyAsync(slot, src, L.block_bytes, cudaMemcpyHostToDevice, copy_stream_));
  for (const TensorInfo* t : {&L.gate, &L.up, &L.down}) {
    const cuda::PartDesc d = part(*t);
    if (d.bits == 4)
      cuda::q4_group_major(copy_stream_, slot + d.scales_off, slot + d.biases_off, d.rows, d.cols, pairs_tmp_.p);
  }
}

const float* CudaEngine::dvec(const std::string& name, int64_t n) const {
  model_.vector_f32(name, n);  // validates dtype and length
  return reinterpret_cast<const float*>(weights_.p + tensors_.at(name).offset);
}

cuda::PartDesc CudaEngine::part(const TensorInfo& t) const {
  // docs/format.md: data, then scales, then biases, each part 64-byte aligned
  cuda::PartDesc d;
  d.rows = int(t.rows());
  d.cols = int(t.cols());
  d.bits = dtype_bits(t.dtype);
  if (d.bits == 32) throw std::invalid_argument("expert parts must be q4, q8 or bf16 on CUDA");
  d.data_off = t.offset;
  if (d.bits < 16) {
    d.scales_off = t.offset + align64(uint64_t(d.rows) * uint64_t(d.cols) * uint64_t(d.bits) / 8);
    d.biases_off = d.scales_off + align64(uint64_t(d.rows) * uint64_t(d.cols / kGroupSize) * 2);
  }
  return d;
}

void CudaEngine::upload_weights() {
  // one copy of weights.bin; views into it replace the mmap's pointers
  const uint64_t n = model_.weights_bytes();
  weights_.alloc(n);
  const Matrix any = model_.matrix("embed_tokens.weight");
  const uint8_t* host_base = any.data - tensors_.at("embed_tokens.weight").offset;
  FM_CUDA(cudaMemcpy(weights_.p, host_base, n, cudaMemcpyHostToDevice));

  const int H = c_.hidden_size;
  embed_ = dmat("embed_tokens.weight");
  lm_head_ = dmat("lm_head.weight");
  final_norm_ = dvec("norm.weight", H);
  const int kd = c_.lin_num_key_heads * c_.lin_key_head_dim;
  const int vd = c_.lin_num_value_heads * c_.lin_value_head_dim;
  for (int l = 0; l < c_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    CudaLayer w;
    w.type = c_.layer_types[size_t(l)];
    w.input_norm = dvec(p + "input_layernorm.weight", H);
    w.post_norm = dvec(p + "post_attention_layernorm.weight", H);
    if (w.type == LayerType::FullAttention) {
      const std::string a = p + "self_attn.";
      w.q_proj = dmat(a + "q_proj.weight");
      w.k_proj = dmat(a + "k_proj.weight");
      w.v_proj = dmat(a + "v_proj.weight");
      w.o_proj = dmat(a + "o_proj.weight");
      w.q_norm = dvec(a + "q_norm.weight", c_.head_dim);
      w.k_norm = dvec(a + "k_norm.weight", c_.head_dim);
    } else {
      const std::string a = p + "linear_attn.";
      w.in_qkv = dmat(a + "in_proj_qkv.weight");
      w.in_z = dmat(a + "in_proj_z.weight");
      w.in_b = dmat(a + "in_proj_b.weight");
      w.in_a = dmat(a + "in_proj_a.weight");
      w.out_proj = dmat(a + "out_proj.weight");
      w.conv_w = dvec(a + "conv1d.weight", int64_t(2 * kd + vd) * c_.conv_kernel);
      w.a_log = dvec(a + "A_log", c_.lin_num_value_heads);
      w.dt_bias = dvec(a + "dt_bias", c_.lin_num_value_heads);
      w.out_norm = dvec(a + "norm.weight", c_.lin_value_head_dim);
    }
    const std::string m = p + "mlp.";
    w.router = dmat(m + "gate.weight");
    w.shared_gate = dmat(m + "shared_expert_gate.weight");
    w.sh_gate = dmat(m + "shared_expert.gate_proj.weight");
    w.sh_up = dmat(m + "shared_expert.up_proj.weight");
    w.sh_down = dmat(m + "shared_expert.down_proj.weight");
    layers_.push_back(w);
  }
  std::vector<float> inv_freq;
  for (int i = 0; i < c_.rotary_dim / 2; ++i)
    inv_freq.push_back(float(1.0 / std::pow(c_.rope_theta, double(2 * i) / c_.rotary_dim)));
  inv_freq_.alloc(inv_freq.size());
  FM_CUDA(cudaMemcpy(inv_freq_.p, inv_freq.data(), inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
}

void CudaEngine::allocate_state() {
  const int H = c_.hidden_size, nh = c_.num_heads, hd = c_.head_dim, nkv = c_.num_kv_heads;
  const int nk = c_.lin_num_key_heads, nv = c_.lin_num_value_heads;
  const int dk = c_.lin_key_head_dim, dv = c_.lin_value_head_dim;
  const int64_t kv_dim = int64_t(nkv) * hd, ch = 2 * int64_t(nk) * dk + int64_t(nv) * dv, vd = int64_t(nv) * dv;
  size_t total = 0;
  std::vector<size_t> offs;
  for (const CudaLayer& w : layers_) {
    offs.push_back(total);
    total += w.type == LayerType::FullAttention ? size_t(max_context_) * 2 * size_t(kv_dim)
                                                : size_t(c_.conv_kernel) * size_t(ch) + size_t(nv) * dk * dv;
  }
  state_.alloc(total);
  state_floats_ = total;
  for (size_t l = 0; l < layers_.size(); ++l) {
    CudaLayer& w = layers_[l];
    float* base = state_.p + offs[l];
    if (w.type == LayerType::FullAttention) {
      w.kv = base;
    } else {
      w.conv = base;
      w.ssm = base + size_t(c_.conv_kernel) * size_t(ch);
    }
  }
  const int I = c_.moe_intermediate, Is = c_.shared_intermediate;
  x_.alloc(size_t(H));
  mixed_.alloc(size_t(std::max<int64_t>(ch, 2 * int64_t(nh) * hd)));
  z_.alloc(size_t(vd));
  o_sumsq_.alloc(size_t(c_.lin_num_value_heads) * size_t((c_.lin_value_head_dim + 31) / 32));
  bgate_.alloc(size_t(nv));
  agate_.alloc(size_t(nv));
  o_.alloc(size_t(vd));
  q_.alloc(size_t(nh) * hd);
  kraw_.alloc(size_t(kv_dim));
  vraw_.alloc(size_t(kv_dim));
  attn_part_.alloc(size_t(nh) * cuda::kAttnSplits * size_t(hd + 2));
  attn_out_.alloc(size_t(nh) * hd);
  router_logits_.alloc(size_t(c_.num_experts));
  shared_logit_.alloc(1);
  expert_ids_.alloc(size_t(k_));
  topk_counter_.alloc(1);
  FM_CUDA(cudaMemset(topk_counter_.p, 0, sizeof(int)));
  row_counters_.alloc(size_t(H));
  FM_CUDA(cudaMemset(row_counters_.p, 0, size_t(H) * sizeof(int)));
  expert_w_.alloc(size_t(k_));
  act_stride_ = (std::max(I, Is) + 3) / 4 * 4;
  act_.alloc(size_t(k_ + 1) * size_t(act_stride_));
  y_.alloc(size_t(k_ + 1) * size_t(H));
  step_.alloc(1);
  h_step_.alloc(1);
  h_ids_.alloc(size_t(k_));
  h_logits_.alloc(size_t(c_.vocab_size));
  FM_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&h_logits_device_), h_logits_.p, 0));
  logits_buffers_ = std::make_shared<PinnedLogitsBuffers>(size_t(c_.vocab_size));

  const size_t C = size_t(chunk_), k = size_t(k_);
  px_.alloc(C * H);
  ph_.alloc(C * H);
  pmixed_.alloc(C * size_t(std::max<int64_t>(ch, 2 * int64_t(nh) * hd)));
  pconv_.alloc(C * size_t(std::max<int64_t>(ch, int64_t(nh) * hd)));
  pz_.alloc(C * size_t(vd));
  pb_.alloc(C * size_t(nv));
  pa_.alloc(C * size_t(nv));
  po_.alloc(C * size_t(std::max<int64_t>(vd, int64_t(nh) * hd)));
  pk_.alloc(C * size_t(kv_dim));
  pv_.alloc(C * size_t(kv_dim));
  plogits_.alloc(C * size_t(c_.num_experts));
  psg_.alloc(C);
  pw_.alloc(C * k);
  pact_shared_.alloc(C * size_t(Is));
  py_shared_.alloc(C * H);
  pact_.alloc(C * k * size_t(I));
  py_.alloc(C * k * H);
  pids_.alloc(C * k);
  ptokens_.alloc(C);
  pperm_tok_.alloc(C * k);
  pperm_out_.alloc(C * k);
  // a group of c rows takes ceil(c / 64) tiles: at most C*k/64 + one per expert
  max_tiles_ = C * k / cuda::kGemmRows + size_t(c_.num_experts) + 1;
  ptiles_.alloc(max_tiles_);
  h_pids_.alloc(C * k);
  h_perm_tok_.alloc(C * k);
  h_perm_out_.alloc(C * k);
  h_tokens_.alloc(C);
  h_tiles_.alloc(max_tiles_);

  const int widest = std::max({H, nh * hd, int(vd), I, Is});
  if (widest > cuda::kMaxCols)
    throw std::runtime_error("the CUDA backend takes inputs of at most " + std::to_string(cuda::kMaxCols) +
                             " columns; this model has " + std::to_string(widest));
  const size_t smem = cuda::matvec_smem_bytes(widest);
  if (smem > props_.sharedMemPerBlockOptin)
    throw std::runtime_error("model too wide for this GPU's shared memory (" + std::to_string(smem) + " bytes)");
  cuda::set_smem_limits(smem);
}

void CudaEngine::setup_expert_cache(double cache_gb) {
  const ExpertLayout& L = model_.experts();
  const int64_t blocks = int64_t(L.num_layers) * L.num_experts;
  const uint64_t all = uint64_t(blocks) * L.block_stride;
  size_t free_b = 0, total_b = 0;
  FM_CUDA(cudaMemGetInfo(&free_b, &total_b));
  // headroom for the runtime, graph and other users of the GPU
  const uint64_t margin = std::max<uint64_t>(uint64_t(1) << 30, total_b / 20);
  const uint64_t avail = free_b > margin ? free_b - margin : 0;
  uint64_t budget;
  if (cache_gb > 0) {
    budget = uint64_t(cache_gb * kGB);
    if (budget > avail)
      throw std::runtime_error("expert_cache_gb=" + std::to_string(cache_gb) + " is more than the " +
                               std::to_string(double(avail) / kGB) + " GB free on the GPU after weights and state");
  } else {
    budget = avail;
  }
  resident_ = budget >= all;
  const int64_t cap = resident_ ? blocks : int64_t(budget / L.block_stride);
  if (cap < k_)
    throw std::runtime_error("the device expert cache holds " + std::to_string(cap) + " expert blocks (" +
                             std::to_string(double(budget) / kGB) + " GB); at least experts_per_token=" +
                             std::to_string(k_) + " are needed");
  capacity_ = int(cap);
  cache_.alloc(size_t(cap) * L.block_stride);
  size_t tmp = 0;
  for (const TensorInfo* t : {&L.gate, &L.up, &L.down})
    tmp = std::max(tmp, cuda::q4_pairs_bytes(int(t->rows()), int(t->cols())));
  pairs_tmp_.alloc(tmp);
  if (resident_)
    preload_experts();
  else
    policy_ = make_policy();
}

// Uses decay with a half-life of about 64 tokens' lookups (every layer's k experts per token).
std::unique_ptr<ExpertCachePolicy> CudaEngine::make_policy() const {
  return std::make_unique<ExpertCachePolicy>(capacity_, c_.num_layers * c_.num_experts, 64.0 * c_.num_layers * k_);
}

void CudaEngine::preload_experts() {
  // every block through the read slots, each slot's copy finished before its next read
  const auto t0 = Clock::now();
  const ExpertLayout& L = model_.experts();
  const int E = L.num_experts, S = store_.slots();
  const int64_t n = int64_t(L.num_layers) * E;
  std::vector<std::unique_ptr<Event>> copied;
  for (int s = 0; s < S; ++s) copied.push_back(std::make_unique<Event>());
  for (int64_t i = 0; i < std::min<int64_t>(S, n); ++i) store_.start(int(i), int(i / E), int(i % E));
  for (int64_t i = 0; i < n; ++i) {
    const int s = int(i % S);
    const uint8_t* src = store_.wait(s);
    copy_expert_block(cache_.p + uint64_t(i) * L.block_stride, src);
    FM_CUDA(cudaEventRecord(copied[size_t(s)]->e, copy_stream_));
    if (i + S < n) {
      FM_CUDA(cudaEventSynchronize(copied[size_t(s)]->e));
      store_.start(s, int((i + S) / E), int((i + S) % E));
    }
  }
  FM_CUDA(cudaStreamSynchronize(copy_stream_));
  preload_s_ = ms_since(t0) / 1e3;
}

void CudaEngine::capture_graph() {
  cudaGraph_t graph = nullptr;
  FM_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue_layers();
  } catch (...) {
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  FM_CUDA(cudaStreamEndCapture(stream_, &graph));
  const cudaError_t err = cudaGraphInstantiate(&graph_.exec, graph, 0);
  cudaGraphDestroy(graph);
  FM_CUDA(err);
}

void CudaEngine::reset() {
  pos_ = 0;
  broken_.clear();
  // KV rows past the position are never read; conv rings and recurrent states start at zero
  const int nk = c_.lin_num_key_heads, nv = c_.lin_num_value_heads;
  const size_t ch = 2 * size_t(nk) * c_.lin_key_head_dim + size_t(nv) * c_.lin_value_head_dim;
  for (const CudaLayer& w : layers_)
    if (w.type == LayerType::LinearAttention)
      FM_CUDA(cudaMemsetAsync(w.conv, 0,
                              (size_t(c_.conv_kernel) * ch + size_t(nv) * c_.lin_key_head_dim * c_.lin_value_head_dim) *
                                  sizeof(float),
                              stream_));
  FM_CUDA(cudaStreamSynchronize(stream_));
}

void CudaEngine::step(int32_t token, float* logits) {
  check_tokens(c_, &token, 1, pos_, max_context_, broken_);
  try {
    forward(token, logits);
  } catch (const std::exception& e) {
    break_state(e);
    throw;
  }
}

void CudaEngine::prefill(const int32_t* tokens, int64_t n, float* logits) {
  if (n <= 0) throw std::invalid_argument("prefill needs at least one token");
  check_tokens(c_, tokens, n, pos_, max_context_, broken_);
  const uint64_t bytes0 = store_.bytes_read(), blocks0 = store_.blocks_read();
  try {
    for (int64_t i = 0; i < n; i += chunk_) {
      const int m = int(std::min<int64_t>(chunk_, n - i));
      forward_chunk(tokens + i, m, i + m == n ? logits : nullptr);
      ++stats_.prefill_chunks;
    }
  } catch (const std::exception& e) {
    break_state(e);
    throw;
  }
  stats_.prefill_tokens += uint64_t(n);
  stats_.prefill_expert_bytes_read += store_.bytes_read() - bytes0;
  stats_.prefill_experts_loaded += store_.blocks_read() - blocks0;
}

// After a failed expert read the layer was left half done and the cache may name blocks that never
// arrived: reads in flight are waited out, the cache forgets everything, the down launch's row
// counters (the hits' launch may have counted without the misses') restart at zero, and tokens
// are refused until reset() or restore().
void CudaEngine::break_state(const std::exception& e) {
  store_.drain();
  cudaStreamSynchronize(copy_stream_);
  cudaMemsetAsync(row_counters_.p, 0, size_t(c_.hidden_size) * sizeof(int), stream_);
  cudaStreamSynchronize(stream_);
  if (policy_) policy_ = make_policy();
  broken_ = e.what();
}

void CudaEngine::record(int l, int which) {
  if (profile_) FM_CUDA(cudaEventRecord(prof_[size_t(l * kEvPerLayer + which)]->e, stream_));
}

void CudaEngine::forward(int32_t token, float* logits) {
  const auto t0 = Clock::now();
  h_step_.p->pos = pos_;
  h_step_.p->token = token;
  FM_CUDA(cudaMemcpyAsync(step_.p, h_step_.p, sizeof(cuda::StepParams), cudaMemcpyHostToDevice, stream_));
  const bool tracing = !trace_path_.empty() && graph_.exec && pos_ == kTracePosition;
  if (tracing) cuda::trace::arm(trace_.p, uint32_t(trace_.n));
  if (graph_.exec)
    FM_CUDA(cudaGraphLaunch(graph_.exec, stream_));
  else
    enqueue_layers();
  float* device = nullptr;
  float* landing = logits ? logits_landing(logits, &device) : nullptr;
  if (logits) enqueue_lm_head(device);
  lm_head_timed_ = logits != nullptr;
  FM_CUDA(cudaStreamSynchronize(stream_));
  if (tracing) write_trace();
  if (landing != logits) std::memcpy(logits, landing, size_t(c_.vocab_size) * sizeof(float));
  if (profile_) collect_profile();
  if (resident_) {
    stats_.expert_cache_hits += uint64_t(k_) * uint64_t(c_.num_layers);
    for (auto& h : stats_.layer_cache_hits) h += uint64_t(k_);
  }
  ++pos_;
  ++stats_.tokens;
  stats_.total_ms += ms_since(t0);
}

// The armed token's records (at most trace_.n) to trace_path_, written to a temporary file and
// renamed; recording stops.
void CudaEngine::write_trace() {
  const size_t n = std::min<size_t>(cuda::trace::count(), trace_.n);
  cuda::trace::arm(nullptr, 0);
  std::vector<cuda::trace::Record> h(n);
  FM_CUDA(cudaMemcpy(h.data(), trace_.p, n * sizeof(cuda::trace::Record), cudaMemcpyDeviceToHost));
  const std::string tmp = trace_path_ + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  const bool ok = f && std::fwrite(h.data(), sizeof(cuda::trace::Record), n, f) == n;
  if ((f && std::fclose(f) != 0) || !ok || std::rename(tmp.c_str(), trace_path_.c_str()) != 0)
    throw std::runtime_error("could not write the CUDA trace to " + trace_path_);
}

// Where lm_head writes the logits for the caller's buffer `out`: `out` itself when it is
// page-locked and mapped for the device (as the buffers logits_buffers() lends are), else the
// staging buffer, which the caller's thread copies on after the synchronisation. *device: the
// landing's address on the device. lm_head's rows write it over the bus as they finish, so no
// copy of the logits follows the last row.
float* CudaEngine::logits_landing(float* out, float** device) const {
  cudaPointerAttributes a{};
  const bool mapped =
      cudaPointerGetAttributes(&a, out) == cudaSuccess && a.type == cudaMemoryTypeHost && a.devicePointer;
  cudaGetLastError();  // an unknown pointer's query error is not sticky; clear it
  *device = mapped ? static_cast<float*>(a.devicePointer) : h_logits_device_;
  return mapped ? out : h_logits_.p;
}

// logits of the residual x_ (final norm, lm_head) into dst (page-locked host memory, by its
// device address), queued on the compute stream
void CudaEngine::enqueue_lm_head(float* dst) {
  const size_t base = size_t(c_.num_layers) * kEvPerLayer;
  if (profile_) FM_CUDA(cudaEventRecord(prof_[base]->e, stream_));
  cuda::PrologueArgs pro;
  pro.kind = cuda::Prologue::Norm;
  pro.src = x_.p;
  pro.w = final_norm_;
  pro.eps = c_.rms_norm_eps;
  cuda::MatvecJob job;
  job.m = lm_head_;
  job.out = dst;
  cuda::matvec(stream_, pro, c_.hidden_size, &job, 1, sms_);
  if (profile_) FM_CUDA(cudaEventRecord(prof_[base + 1]->e, stream_));
}

void CudaEngine::enqueue_layers() {
  cuda::embed(stream_, embed_, step_.p, x_.p);
  for (int l = 0; l < c_.num_layers; ++l) {
    record(l, kEvMixer);
    mixer(l);
    record(l, kEvRouter);
    moe(l);
  }
}

void CudaEngine::mixer(int l) {
  const CudaLayer& w = layers_[size_t(l)];
  const int H = c_.hidden_size;
  cuda::PrologueArgs norm;
  norm.kind = cuda::Prologue::Norm;
  norm.src = x_.p;
  norm.w = w.input_norm;
  norm.eps = c_.rms_norm_eps;
  if (w.type == LayerType::FullAttention) {
    cuda::MatvecJob jobs[3];
    jobs[0].m = w.q_proj, jobs[0].out = mixed_.p;
    jobs[1].m = w.k_proj, jobs[1].out = kraw_.p;
    jobs[2].m = w.v_proj, jobs[2].out = vraw_.p;
    cuda::matvec(stream_, norm, H, jobs, 3, sms_);
    cuda::AttnArgs a;
    a.qg = mixed_.p;
    a.kraw = kraw_.p;
    a.vraw = vraw_.p;
    a.q_norm = w.q_norm;
    a.k_norm = w.k_norm;
    a.inv_freq = inv_freq_.p;
    a.q = q_.p;
    a.kv = w.kv;
    a.partial = attn_part_.p;
    a.out = attn_out_.p;
    a.step = step_.p;
    a.nh = c_.num_heads;
    a.nkv = c_.num_kv_heads;
    a.hd = c_.head_dim;
    a.rotary_dim = c_.rotary_dim;
    a.eps = c_.rms_norm_eps;
    cuda::attention(stream_, a);
    cuda::PrologueArgs copy;
    copy.src = attn_out_.p;
    cuda::MatvecJob o;
    o.m = w.o_proj, o.out = x_.p, o.accumulate = true;
    cuda::matvec(stream_, copy, c_.num_heads * c_.head_dim, &o, 1, sms_);
  } else {
    cuda::MatvecJob jobs[4];
    jobs[0].m = w.in_qkv, jobs[0].out = mixed_.p;
    jobs[1].m = w.in_z, jobs[1].out = z_.p;
    jobs[2].m = w.in_b, jobs[2].out = bgate_.p;
    jobs[3].m = w.in_a, jobs[3].out = agate_.p;
    cuda::matvec(stream_, norm, H, jobs, 4, sms_);
    cuda::DeltaArgs d;
    d.mixed = mixed_.p;
    d.b = bgate_.p;
    d.a = agate_.p;
    d.z = z_.p;
    d.out_norm = w.out_norm;
    d.conv_w = w.conv_w;
    d.a_log = w.a_log;
    d.dt_bias = w.dt_bias;
    d.conv_ring = w.conv;
    d.state = w.ssm;
    d.o = o_.p;
    d.o_sumsq = o_sumsq_.p;
    d.step = step_.p;
    d.nk = c_.lin_num_key_heads;
    d.nv = c_.lin_num_value_heads;
    d.dk = c_.lin_key_head_dim;
    d.dv = c_.lin_value_head_dim;
    d.kernel = c_.conv_kernel;
    cuda::deltanet(stream_, d);
    cuda::PrologueArgs gated;
    gated.kind = cuda::Prologue::GatedNorm;
    gated.src = o_.p;
    gated.sumsq = o_sumsq_.p;
    gated.eps = c_.rms_norm_eps;
    gated.head_dim = c_.lin_value_head_dim;
    cuda::MatvecJob out;
    out.m = w.out_proj, out.out = x_.p, out.accumulate = true;
    cuda::matvec(stream_, gated, c_.lin_num_value_heads * c_.lin_value_head_dim, &out, 1, sms_);
  }
}

cuda::ExpertArgs CudaEngine::expert_args(int l) const {
  const CudaLayer& w = layers_[size_t(l)];
  const ExpertLayout& L = model_.experts();
  cuda::ExpertArgs a;
  a.cache = cache_.p;
  a.stride = L.block_stride;
  a.gate = part(L.gate);
  a.up = part(L.up);
  a.down = part(L.down);
  a.shared_gate = w.sh_gate;
  a.shared_up = w.sh_up;
  a.shared_down = w.sh_down;
  a.ids = expert_ids_.p;
  a.weights = expert_w_.p;
  a.shared_logit = shared_logit_.p;
  a.norm_w = w.post_norm;
  a.eps = c_.rms_norm_eps;
  a.act = act_.p;
  a.act_stride = act_stride_;
  a.y = y_.p;
  a.x = x_.p;
  a.row_counters = row_counters_.p;
  a.k = k_;
  a.layer = l;
  a.num_experts = c_.num_experts;
  a.hidden = c_.hidden_size;
  return a;
}

void CudaEngine::moe(int l) {
  const CudaLayer& w = layers_[size_t(l)];
  const int H = c_.hidden_size;
  cuda::PrologueArgs norm;
  norm.kind = cuda::Prologue::Norm;
  norm.src = x_.p;
  norm.w = w.post_norm;
  norm.eps = c_.rms_norm_eps;
  cuda::MatvecJob jobs[2];
  jobs[0].m = w.router, jobs[0].out = router_logits_.p;
  jobs[1].m = w.shared_gate, jobs[1].out = shared_logit_.p;
  cuda::TopkTail topk;
  topk.counter = topk_counter_.p;
  topk.logits = router_logits_.p;
  topk.num_experts = c_.num_experts;
  topk.k = k_;
  topk.renormalize = c_.norm_topk_prob;
  topk.ids = expert_ids_.p;
  topk.weights = expert_w_.p;
  cuda::matvec(stream_, norm, H, jobs, 2, sms_, &topk);
  record(l, kEvRouted);
  const cuda::ExpertArgs args = expert_args(l);

  if (resident_) {
    cuda::ExpertBatch all;
    all.n = k_ + 1;
    all.k[0] = -1, all.slot[0] = -1;
    for (int i = 0; i < k_; ++i) all.k[i + 1] = i, all.slot[i + 1] = -1;
    record(l, kEvExpA0);
    cuda::experts(stream_, args, all, sms_);
    record(l, kEvExpA1);
    record(l, kEvExpB0);  // no misses' batch here: an empty second span
    record(l, kEvExpB1);
    return;  // hits are counted per token in forward(): a graph replay runs no host code
  }

  // Streaming: the one synchronisation of the layer, on its routing decision.
  FM_CUDA(cudaMemcpyAsync(h_ids_.p, expert_ids_.p, size_t(k_) * sizeof(int), cudaMemcpyDeviceToHost, stream_));
  FM_CUDA(cudaEventRecord(routed_.e, stream_));
  FM_CUDA(cudaEventSynchronize(routed_.e));
  const ExpertLayout& L = model_.experts();
  const int E = c_.num_experts;
  cuda::ExpertBatch hits, misses;
  hits.n = 1;
  hits.k[0] = -1, hits.slot[0] = -1;  // the shared expert goes with the hits
  int miss_keys[cuda::kMaxExperts];
  policy_->begin_round();
  for (int i = 0; i < k_; ++i) {
    const int key = l * E + h_ids_.p[i];
    const int slot = policy_->find(key);
    if (slot >= 0) {
      hits.k[hits.n] = i, hits.slot[hits.n] = slot, ++hits.n;
    } else {
      miss_keys[misses.n] = key;
      misses.k[misses.n] = i, ++misses.n;
    }
  }
  for (int m = 0; m < misses.n; ++m) {
    misses.slot[m] = policy_->insert(miss_keys[m]);
    store_.start(m, l, h_ids_.p[misses.k[m]]);
  }
  record(l, kEvExpA0);
  cuda::experts(stream_, args, hits, sms_);
  record(l, kEvExpA1);
  if (misses.n > 0) {
    for (int m = 0; m < misses.n; ++m) {
      const auto t0 = Clock::now();
      const uint8_t* src = store_.wait(m);
      stats_.expert_io_wait_ms += ms_since(t0);
      copy_expert_block(cache_.p + uint64_t(misses.slot[m]) * L.block_stride, src);
      stats_.bytes_h2d += L.block_bytes;
    }
    FM_CUDA(cudaEventRecord(copied_.e, copy_stream_));
    FM_CUDA(cudaStreamWaitEvent(stream_, copied_.e, 0));
  }
  record(l, kEvExpB0);
  if (misses.n > 0) cuda::experts(stream_, args, misses, sms_);
  record(l, kEvExpB1);
  stats_.expert_cache_hits += uint64_t(hits.n - 1);
  stats_.expert_cache_misses += uint64_t(misses.n);
  stats_.layer_cache_hits[size_t(l)] += uint64_t(hits.n - 1);
  stats_.layer_cache_misses[size_t(l)] += uint64_t(misses.n);
}

// ---- batched prefill: a chunk of m tokens as [m, width] matrices, layer by layer ----

// A matrix in device memory as offsets from `base`, which it lies after.
cuda::PartDesc part_from(const uint8_t* base, const DevMat& m) {
  cuda::PartDesc d;
  d.rows = m.rows;
  d.cols = m.cols;
  d.bits = m.bits;
  d.data_off = uint64_t(m.data - base);
  if (m.bits != 16) d.scales_off = uint64_t(reinterpret_cast<const uint8_t*>(m.scales) - base);
  if (m.bits == 8) d.biases_off = uint64_t(reinterpret_cast<const uint8_t*>(m.biases) - base);
  return d;
}

// y (op)= x W^T for the chunk's m rows (x [m, w.cols], y [m, w.rows]); SwiGLU takes w2 as up.
void CudaEngine::dense(const DevMat& w, const float* x, float* y, int m, cuda::Epilogue ep, const DevMat* w2) {
  cuda::GemmArgs g;
  g.base = weights_.p;
  g.w = part_from(weights_.p, w);
  if (w2) g.w2 = part_from(weights_.p, *w2);
  g.m = m;
  g.x = x;
  g.ldx = w.cols;
  g.y = y;
  g.ldy = w.rows;
  g.ep = ep;
  cuda::gemm(stream_, g);
}

void CudaEngine::forward_chunk(const int32_t* tokens, int m, float* logits) {
  const auto t0 = Clock::now();
  std::memcpy(h_tokens_.p, tokens, size_t(m) * sizeof(int32_t));
  FM_CUDA(cudaMemcpyAsync(ptokens_.p, h_tokens_.p, size_t(m) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  cuda::embed_rows(stream_, embed_, ptokens_.p, m, px_.p);
  for (int l = 0; l < c_.num_layers; ++l) {
    chunk_mixer(l, m);
    chunk_moe(l, m);
  }
  pos_ += m;
  float* device = nullptr;
  float* landing = logits ? logits_landing(logits, &device) : nullptr;
  if (logits) {
    const size_t H = size_t(c_.hidden_size);
    FM_CUDA(cudaMemcpyAsync(x_.p, px_.p + size_t(m - 1) * H, H * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    enqueue_lm_head(device);
  }
  lm_head_timed_ = false;
  FM_CUDA(cudaStreamSynchronize(stream_));
  if (landing != logits) std::memcpy(logits, landing, size_t(c_.vocab_size) * sizeof(float));
  stats_.tokens += uint64_t(m);
  stats_.total_ms += ms_since(t0);
}

void CudaEngine::chunk_mixer(int l, int m) {
  const CudaLayer& w = layers_[size_t(l)];
  const int H = c_.hidden_size;
  cuda::rmsnorm_rows(stream_, px_.p, w.input_norm, c_.rms_norm_eps, m, H, ph_.p);
  if (w.type == LayerType::FullAttention) {
    dense(w.q_proj, ph_.p, pmixed_.p, m);
    dense(w.k_proj, ph_.p, pk_.p, m);
    dense(w.v_proj, ph_.p, pv_.p, m);
    cuda::ChunkAttnArgs a;
    a.qg = pmixed_.p;
    a.kraw = pk_.p;
    a.vraw = pv_.p;
    a.q_norm = w.q_norm;
    a.k_norm = w.k_norm;
    a.inv_freq = inv_freq_.p;
    a.q = pconv_.p;
    a.kv = w.kv;
    a.out = po_.p;
    a.pos0 = pos_;
    a.n = m;
    a.nh = c_.num_heads;
    a.nkv = c_.num_kv_heads;
    a.hd = c_.head_dim;
    a.rotary_dim = c_.rotary_dim;
    a.eps = c_.rms_norm_eps;
    cuda::chunk_attention(stream_, a);
    dense(w.o_proj, po_.p, px_.p, m, cuda::Epilogue::Accumulate);
  } else {
    dense(w.in_qkv, ph_.p, pmixed_.p, m);
    dense(w.in_z, ph_.p, pz_.p, m);
    dense(w.in_b, ph_.p, pb_.p, m);
    dense(w.in_a, ph_.p, pa_.p, m);
    cuda::ChunkDeltaArgs d;
    d.mixed = pmixed_.p;
    d.conv = pconv_.p;
    d.b = pb_.p;
    d.a = pa_.p;
    d.conv_w = w.conv_w;
    d.a_log = w.a_log;
    d.dt_bias = w.dt_bias;
    d.conv_ring = w.conv;
    d.state = w.ssm;
    d.o = po_.p;
    d.pos0 = pos_;
    d.n = m;
    d.nk = c_.lin_num_key_heads;
    d.nv = c_.lin_num_value_heads;
    d.dk = c_.lin_key_head_dim;
    d.dv = c_.lin_value_head_dim;
    d.kernel = c_.conv_kernel;
    cuda::chunk_deltanet(stream_, d);
    cuda::gated_norm_rows(stream_, po_.p, pz_.p, w.out_norm, c_.rms_norm_eps, m, c_.lin_num_value_heads,
                          c_.lin_value_head_dim);
    dense(w.out_proj, po_.p, px_.p, m, cuda::Epilogue::Accumulate);
  }
}

void CudaEngine::chunk_moe(int l, int m) {
  const CudaLayer& w = layers_[size_t(l)];
  const int H = c_.hidden_size, E = c_.num_experts;
  cuda::rmsnorm_rows(stream_, px_.p, w.post_norm, c_.rms_norm_eps, m, H, ph_.p);
  dense(w.router, ph_.p, plogits_.p, m);
  dense(w.shared_gate, ph_.p, psg_.p, m);
  cuda::topk_rows(stream_, plogits_.p, m, E, k_, c_.norm_topk_prob, pids_.p, pw_.p);
  // the layer's one synchronisation: the chunk's routing, to group tokens by expert
  FM_CUDA(cudaMemcpyAsync(h_pids_.p, pids_.p, size_t(m) * k_ * sizeof(int), cudaMemcpyDeviceToHost, stream_));
  FM_CUDA(cudaEventRecord(routed_.e, stream_));
  dense(w.sh_gate, ph_.p, pact_shared_.p, m, cuda::Epilogue::SwiGLU, &w.sh_up);
  dense(w.sh_down, pact_shared_.p, py_shared_.p, m);
  FM_CUDA(cudaEventSynchronize(routed_.e));
  chunk_experts(l, m);
  cuda::combine_rows(stream_, px_.p, psg_.p, py_shared_.p, pw_.p, py_.p, m, k_, H);
}

// Groups the chunk's (token, choice) pairs by expert, ascending, then runs every routed expert
// once on its group: gate/up with SwiGLU on the gathered rows of h, down scattered to y[t*k + j].
// Streaming: hits run at once; misses are read (kReadSlots in flight) and copied in, and run
// kExpertsPerLaunch at a time as their copies land.
void CudaEngine::chunk_experts(int l, int m) {
  const int E = c_.num_experts, n = m * k_;
  group_count_.assign(size_t(E), 0);
  group_first_.assign(size_t(E) + 1, 0);
  for (int i = 0; i < n; ++i) ++group_count_[size_t(h_pids_.p[i])];
  for (int e = 0; e < E; ++e) group_first_[size_t(e) + 1] = group_first_[size_t(e)] + group_count_[size_t(e)];
  std::vector<int> fill(group_first_.begin(), group_first_.end() - 1);
  for (int i = 0; i < n; ++i) {
    const int at = fill[size_t(h_pids_.p[i])]++;
    h_perm_tok_.p[at] = i / k_;
    h_perm_out_.p[at] = i;
  }
  FM_CUDA(cudaMemcpyAsync(pperm_tok_.p, h_perm_tok_.p, size_t(n) * sizeof(int), cudaMemcpyHostToDevice, stream_));
  FM_CUDA(cudaMemcpyAsync(pperm_out_.p, h_perm_out_.p, size_t(n) * sizeof(int), cudaMemcpyHostToDevice, stream_));
  std::vector<int> used;
  for (int e = 0; e < E; ++e)
    if (group_count_[size_t(e)] > 0) used.push_back(e);
  stats_.prefill_unique_experts += used.size();
  size_t tile_off = 0;
  if (resident_) {
    std::vector<int> slots;
    for (int e : used) slots.push_back(l * E + e);
    launch_experts(used, slots, tile_off);
    stats_.expert_cache_hits += used.size();
    stats_.layer_cache_hits[size_t(l)] += used.size();
    return;
  }
  const ExpertLayout& L = model_.experts();
  const int S = store_.slots();
  // waves of at most capacity_ experts: a wave's blocks are all in the cache at once
  for (size_t w0 = 0; w0 < used.size(); w0 += size_t(capacity_)) {
    const size_t w1 = std::min(used.size(), w0 + size_t(capacity_));
    std::vector<int> hits, hit_slots, misses, miss_slots;
    policy_->begin_round();
    for (size_t i = w0; i < w1; ++i) {
      const int slot = policy_->find(l * E + used[i]);
      if (slot >= 0) hits.push_back(used[i]), hit_slots.push_back(slot);
      else misses.push_back(used[i]);
    }
    for (int e : misses) miss_slots.push_back(policy_->insert(l * E + e));
    if (w0 > 0) {  // victims may be blocks the previous wave's kernels still read
      FM_CUDA(cudaEventRecord(computed_.e, stream_));
      FM_CUDA(cudaStreamWaitEvent(copy_stream_, computed_.e, 0));
    }
    const int nm = int(misses.size());
    // a read slot is reused once the copy out of it (from an earlier wave) is done
    auto start_read = [&](int i) {
      FM_CUDA(cudaEventSynchronize(slot_copied_[size_t(i % S)]->e));
      store_.start(i % S, l, misses[size_t(i)]);
    };
    for (int i = 0; i < std::min(nm, S); ++i) start_read(i);
    if (!hits.empty()) launch_experts(hits, hit_slots, tile_off);
    std::vector<int> ready, ready_slots;
    for (int i = 0; i < nm; ++i) {
      const int s = i % S;
      const auto t0 = Clock::now();
      const uint8_t* src = store_.wait(s);
      stats_.expert_io_wait_ms += ms_since(t0);
      copy_expert_block(cache_.p + uint64_t(miss_slots[size_t(i)]) * L.block_stride, src);
      FM_CUDA(cudaEventRecord(slot_copied_[size_t(s)]->e, copy_stream_));
      stats_.bytes_h2d += L.block_bytes;
      ready.push_back(misses[size_t(i)]);
      ready_slots.push_back(miss_slots[size_t(i)]);
      if (int(ready.size()) == kExpertsPerLaunch || i + 1 == nm) {
        FM_CUDA(cudaEventRecord(copied_.e, copy_stream_));
        FM_CUDA(cudaStreamWaitEvent(stream_, copied_.e, 0));
        launch_experts(ready, ready_slots, tile_off);
        ready.clear();
        ready_slots.clear();
      }
      if (i + S < nm) start_read(i + S);
    }
    stats_.expert_cache_hits += hits.size();
    stats_.expert_cache_misses += misses.size();
    stats_.layer_cache_hits[size_t(l)] += hits.size();
    stats_.layer_cache_misses[size_t(l)] += misses.size();
  }
}

// Gate/up + SwiGLU and down of the given experts (blocks in the given cache slots) on their rows.
void CudaEngine::launch_experts(const std::vector<int>& experts, const std::vector<int>& slots,
                                size_t& tile_off) {
  const ExpertLayout& L = model_.experts();
  const size_t first = tile_off;
  for (size_t i = 0; i < experts.size(); ++i) {
    const uint8_t* base = cache_.p + uint64_t(slots[i]) * L.block_stride;
    const int e = experts[i], r0 = group_first_[size_t(e)], r1 = r0 + group_count_[size_t(e)];
    for (int r = r0; r < r1; r += cuda::kGemmRows) {
      if (tile_off >= max_tiles_) throw std::logic_error("prefill: tile list overflow");
      h_tiles_.p[tile_off++] = cuda::GemmTile{base, r, std::min(cuda::kGemmRows, r1 - r)};
    }
  }
  const int nt = int(tile_off - first);
  FM_CUDA(cudaMemcpyAsync(ptiles_.p + first, h_tiles_.p + first, size_t(nt) * sizeof(cuda::GemmTile),
                          cudaMemcpyHostToDevice, stream_));
  cuda::GemmArgs g;
  g.tiles = ptiles_.p + first;
  g.ntiles = nt;
  g.w = part(L.gate);
  g.w2 = part(L.up);
  g.x = ph_.p;
  g.ldx = c_.hidden_size;
  g.xrows = pperm_tok_.p;
  g.y = pact_.p;
  g.ldy = L.gate.rows();
  g.ep = cuda::Epilogue::SwiGLU;
  cuda::gemm(stream_, g);
  cuda::GemmArgs d;
  d.tiles = g.tiles;
  d.ntiles = nt;
  d.w = part(L.down);
  d.x = pact_.p;
  d.ldx = L.down.cols();
  d.y = py_.p;
  d.ldy = c_.hidden_size;
  d.yrows = pperm_out_.p;
  cuda::gemm(stream_, d);
}

void CudaEngine::collect_profile() {
  auto span = [&](size_t a, size_t b) {
    float ms = 0;
    FM_CUDA(cudaEventElapsedTime(&ms, prof_[a]->e, prof_[b]->e));
    return double(ms);
  };
  for (int l = 0; l < c_.num_layers; ++l) {
    const size_t e = size_t(l) * kEvPerLayer;
    stats_.mixer_ms += span(e + kEvMixer, e + kEvRouter);
    stats_.router_ms += span(e + kEvRouter, e + kEvRouted);
    stats_.expert_compute_ms += span(e + kEvExpA0, e + kEvExpA1) + span(e + kEvExpB0, e + kEvExpB1);
  }
  if (lm_head_timed_) {
    const size_t base = size_t(c_.num_layers) * kEvPerLayer;
    stats_.lm_head_ms += span(base, base + 1);
  }
}

EngineStats CudaEngine::stats() const {
  EngineStats s = stats_;
  s.expert_bytes_read = store_.bytes_read() - bytes_at_reset_;
  s.experts_loaded = store_.blocks_read() - blocks_at_reset_;
  return s;
}

void CudaEngine::reset_stats() {
  stats_ = EngineStats{};
  stats_.layer_cache_hits.assign(size_t(c_.num_layers), 0);
  stats_.layer_cache_misses.assign(size_t(c_.num_layers), 0);
  bytes_at_reset_ = store_.bytes_read();
  blocks_at_reset_ = store_.blocks_read();
}

// The CPU engine's state layout (csrc/cpu/engine.cpp), so snapshots move between backends:
// kv [position, 2, nkv*hd] per full-attention layer, conv [kernel-1, channels] oldest first and
// ssm [nv, dk, dv] per DeltaNet layer; the other layers' entries are empty.
EngineState CudaEngine::snapshot() const {
  FM_CUDA(cudaStreamSynchronize(stream_));
  const size_t n = layers_.size();
  const size_t kv_dim = size_t(c_.num_kv_heads) * c_.head_dim;
  const size_t ch = 2 * size_t(c_.lin_num_key_heads) * c_.lin_key_head_dim +
                    size_t(c_.lin_num_value_heads) * c_.lin_value_head_dim;
  const size_t ssm = size_t(c_.lin_num_value_heads) * c_.lin_key_head_dim * c_.lin_value_head_dim;
  const int K = c_.conv_kernel;
  EngineState s;
  s.position = pos_;
  s.buffers.resize(3 * n);
  for (size_t l = 0; l < n; ++l) {
    const CudaLayer& w = layers_[l];
    if (w.type == LayerType::FullAttention) {
      auto& kv = s.buffers[l];
      kv.resize(size_t(pos_) * 2 * kv_dim);
      FM_CUDA(cudaMemcpyAsync(kv.data(), w.kv, kv.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    } else {
      std::vector<float> ring(size_t(K) * ch);
      FM_CUDA(cudaMemcpyAsync(ring.data(), w.conv, ring.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
      FM_CUDA(cudaStreamSynchronize(stream_));
      auto& conv = s.buffers[n + l];
      conv.resize(size_t(K - 1) * ch);
      for (int t = 0; t < K - 1; ++t) {
        const int64_t p = pos_ - (K - 1) + t;
        const int slot = int(((p % K) + K) % K);
        std::copy_n(ring.begin() + int64_t(slot) * int64_t(ch), ch, conv.begin() + int64_t(t) * int64_t(ch));
      }
      auto& st = s.buffers[2 * n + l];
      st.resize(ssm);
      FM_CUDA(cudaMemcpyAsync(st.data(), w.ssm, ssm * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
  }
  FM_CUDA(cudaStreamSynchronize(stream_));
  return s;
}

void CudaEngine::restore(const EngineState& s) {
  const size_t n = layers_.size();
  const size_t kv_dim = size_t(c_.num_kv_heads) * c_.head_dim;
  const size_t ch = 2 * size_t(c_.lin_num_key_heads) * c_.lin_key_head_dim +
                    size_t(c_.lin_num_value_heads) * c_.lin_value_head_dim;
  const size_t ssm = size_t(c_.lin_num_value_heads) * c_.lin_key_head_dim * c_.lin_value_head_dim;
  const int K = c_.conv_kernel;
  if (s.buffers.size() != 3 * n) throw std::invalid_argument("state snapshot is from another model");
  if (s.position < 0 || s.position > max_context_)
    throw std::invalid_argument("state snapshot is longer than max_context");
  for (size_t l = 0; l < n; ++l) {
    const bool full = layers_[l].type == LayerType::FullAttention;
    const size_t want_kv = full ? size_t(s.position) * 2 * kv_dim : 0;
    const size_t want_conv = full ? 0 : size_t(K - 1) * ch;
    const size_t want_ssm = full ? 0 : ssm;
    if (s.buffers[l].size() != want_kv || s.buffers[n + l].size() != want_conv || s.buffers[2 * n + l].size() != want_ssm)
      throw std::invalid_argument("state snapshot is from another model");
  }
  FM_CUDA(cudaStreamSynchronize(stream_));
  for (size_t l = 0; l < n; ++l) {
    const CudaLayer& w = layers_[l];
    if (w.type == LayerType::FullAttention) {
      FM_CUDA(cudaMemcpyAsync(w.kv, s.buffers[l].data(), s.buffers[l].size() * sizeof(float), cudaMemcpyHostToDevice,
                              stream_));
    } else {
      std::vector<float> ring(size_t(K) * ch, 0.0f);
      for (int t = 0; t < K - 1; ++t) {
        const int64_t p = s.position - (K - 1) + t;
        const int slot = int(((p % K) + K) % K);
        std::copy_n(s.buffers[n + l].begin() + int64_t(t) * int64_t(ch), ch, ring.begin() + int64_t(slot) * int64_t(ch));
      }
      FM_CUDA(cudaMemcpyAsync(w.conv, ring.data(), ring.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
      FM_CUDA(cudaMemcpyAsync(w.ssm, s.buffers[2 * n + l].data(), ssm * sizeof(float), cudaMemcpyHostToDevice,
                              stream_));
      FM_CUDA(cudaStreamSynchronize(stream_));  // before `ring` goes
    }
  }
  FM_CUDA(cudaStreamSynchronize(stream_));
  pos_ = s.position;
  broken_.clear();
}

std::string CudaEngine::describe() const {
  char buf[512];
  const double gb = double(capacity_) * double(model_.experts().block_stride) / kGB;
  const int blocks = c_.num_layers * c_.num_experts;
  if (resident_)
    std::snprintf(buf, sizeof buf, "cuda (%s, %d SMs): all %d expert blocks resident, %.2f GB, loaded in %.1f s%s",
                  props_.name, sms_, blocks, gb, preload_s_, profile_ ? ", profiling" : ", CUDA graph");
  else
    std::snprintf(buf, sizeof buf, "cuda (%s, %d SMs): expert cache %d of %d blocks, %.2f GB, LFU; %d read slots%s",
                  props_.name, sms_, capacity_, blocks, gb, store_.slots(), profile_ ? ", profiling" : "");
  return buf;
}

}  // namespace

std::string cuda_unavailable_reason() {
  static const std::string reason = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
      return std::string("no usable CUDA GPU: no NVIDIA driver or GPU here, or a driver older than this build's "
                         "CUDA runtime (") + cudaGetErrorName(err) + ")";
    if (err != cudaSuccess)
      return std::string("no usable CUDA GPU: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    if (n == 0) return std::string("no CUDA GPU found");
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return std::string("no usable CUDA GPU: cannot query device properties");
    if (major < 8)
      return "CUDA GPU " + std::to_string(dev) + " has compute capability " + std::to_string(major) +
             ".x; this build needs 8.0 or newer";
    return std::string();
  }();
  return reason;
}

std::unique_ptr<Engine> make_cuda_engine(ModelSpec spec, const EngineOptions& options) {
  return std::make_unique<CudaEngine>(std::move(spec), options);
}

}  // namespace fm
