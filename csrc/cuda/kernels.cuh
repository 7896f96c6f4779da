// CUDA kernels of the per-token loop. Activations are fp32 in device memory; weights are bf16 or
// group-affine q4/q8 (docs/format.md) read straight from their on-disk layout. Every launch here
// is asynchronous on the given stream and reads the token and position from device memory, so a
// whole token can be captured into a CUDA graph.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fm::cuda {

// Throws std::runtime_error naming the call site when a CUDA call fails.
void check(cudaError_t err, const char* what, const char* file, int line);
#define FM_CUDA(call) ::fm::cuda::check((call), #call, __FILE__, __LINE__)

constexpr int kThreads = 256;      // threads of every matvec-style block
constexpr int kMaxJobs = 4;        // matrices sharing one input vector in one launch
constexpr int kMaxExperts = 33;    // routed experts per token (32) + the shared expert
constexpr int kAttnSplits = 16;    // KV positions are split this many ways (flash-decoding)
constexpr int kMaxCols = 8192;     // input width of a matvec-style launch (x held in registers)
constexpr int kMaxDeltaKeyDim = 128;  // DeltaNet key head dim held in registers (8 warps x 16)
constexpr int kMaxConvKernel = 8;     // DeltaNet conv taps held in registers

// Step inputs the kernels read instead of taking them as launch arguments (graph replay).
struct StepParams {
  int64_t pos;
  int32_t token;
  int32_t pad;
};

// A weight matrix in device memory. bits: 4 or 8 (group-affine, group 64) or 16 (bf16). q8 keeps
// the file's row-major scales and biases; q4 holds them as (scale, bias) pairs in group-major order
// (q4_group_major), `scales` pointing at the pairs and `biases` unused.
struct DevMat {
  const uint8_t* data = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  int rows = 0, cols = 0, bits = 16;
};

// A matrix inside an expert block: offsets from the block start (q4: scales_off the pairs').
struct PartDesc {
  uint64_t data_off = 0, scales_off = 0, biases_off = 0;
  int rows = 0, cols = 0, bits = 16;
};

// How a matvec block builds its input vector x (cols floats) from `src`.
enum class Prologue : int {
  Copy,       // x = src
  Norm,       // x = src * rsqrt(mean(src^2) + eps) * (1 + w)
  GatedNorm,  // per head of head_dim: x = src * rsqrt(sum_head(sumsq) / head_dim + eps), src the gated output
};

struct PrologueArgs {
  Prologue kind = Prologue::Copy;
  const float* src = nullptr;
  const float* w = nullptr;
  // GatedNorm: per head, the sums of squares of its ungated output over each 32 columns
  // (ceil(head_dim / 32) per head), which the DeltaNet launch leaves with its gated output
  const float* sumsq = nullptr;
  float eps = 0;
  int head_dim = 0;
};

struct MatvecJob {
  DevMat m;
  float* out = nullptr;
  bool accumulate = false;  // out += W x (residual add) instead of out = W x
};

// For the router's launch: its last block to finish turns the logits into the top-k choice
// (softmax, top-k with ties to the lower index, optional renormalisation), saving a launch.
// counter: a device int that is 0 between launches (the last block resets it).
struct TopkTail {
  int* counter = nullptr;
  const float* logits = nullptr;
  int num_experts = 0, k = 0;
  bool renormalize = false;
  int* ids = nullptr;
  float* weights = nullptr;
};

// A q4 matrix's scales and biases (row-major bf16 arrays, as in the files: docs/format.md)
// rearranged in place into pairs: the 32-bit word at pairs[g * rows + r] holds row r's group g,
// the scale in its low half and the bias in its high half. The 16 rows of a q4 tile then read
// their group's parameters as one contiguous segment instead of 16 scattered rows of two arrays.
// The pairs take the scales' place and run on into the padding and the biases; `tmp` is scratch
// of q4_pairs_bytes(rows, cols), and the rearrangement is ordered on stream s.
size_t q4_pairs_bytes(int rows, int cols);
void q4_group_major(cudaStream_t s, uint8_t* scales, const uint8_t* biases, int rows, int cols, uint8_t* tmp);

// Launch kernels with programmatic dependent launch (sm_90 and newer), so that each kernel's
// launch and first weight loads overlap its predecessor. The engine turns it on per device.
void set_programmatic_launch(bool on);

// out_j = W_j x for up to kMaxJobs matrices of `cols` columns sharing the prologue's x.
void matvec(cudaStream_t s, const PrologueArgs& pro, int cols, const MatvecJob* jobs, int njobs, int sms,
            const TopkTail* tail = nullptr);

// Shared memory a launch of `cols` columns needs; the engine raises the kernels' limits once.
size_t matvec_smem_bytes(int cols);
void set_smem_limits(size_t bytes);

// x[H] = row `token` of the embedding matrix, widened to fp32.
void embed(cudaStream_t s, const DevMat& table, const StepParams* step, float* x);

// Full attention, after q_proj/k_proj/v_proj. qg [nh, 2*hd] (query | gate per head), kraw, vraw
// [nkv*hd]: q/k zero-centred RMSNorm, partial NeoX RoPE at the step's position, K and V written
// into the cache row of that position ([cap, 2, nkv*hd]), q to `q` [nh*hd].
struct AttnArgs {
  const float* qg = nullptr;
  const float* kraw = nullptr;
  const float* vraw = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* inv_freq = nullptr;
  float* q = nullptr;
  float* kv = nullptr;
  float* partial = nullptr;  // [nh, kAttnSplits, hd + 2]
  float* out = nullptr;      // [nh*hd] attention output times sigmoid(gate)
  const StepParams* step = nullptr;
  int nh = 0, nkv = 0, hd = 0, rotary_dim = 0;
  float eps = 0;
};
void attention(cudaStream_t s, const AttnArgs& a);

// Gated DeltaNet for one token after in_proj_qkv/z/b/a: causal conv (ring of `kernel` inputs
// indexed by position), SiLU, L2-normalised q/k, decay and beta gates, the per-value-head state
// update and its output o = S^T q, written gated and weighted as o silu(z) w_norm, with the sum of
// o^2 over each block's 32 columns: out_proj's prologue then reads one vector and a few sums
// for the gated RMSNorm instead of o, the gate and the norm weight.
struct DeltaArgs {
  const float* mixed = nullptr;  // [2*nk*dk + nv*dv] pre-conv q|k|v
  const float* b = nullptr;      // [nv] before sigmoid
  const float* a = nullptr;      // [nv] before softplus
  const float* z = nullptr;      // [nv*dv] the output gate's input
  const float* out_norm = nullptr;  // [dv] the gated RMSNorm's weight
  const float* conv_w = nullptr; // [channels, kernel]
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  float* conv_ring = nullptr;    // [kernel, channels]
  float* state = nullptr;        // [nv, dk, dv]
  float* o = nullptr;            // [nv*dv] o silu(z) w_norm
  float* o_sumsq = nullptr;      // [nv, ceil(dv / 32)] sum of o^2 over each 32 columns
  const StepParams* step = nullptr;
  int nk = 0, nv = 0, dk = 0, dv = 0, kernel = 0;
};
void deltanet(cudaStream_t s, const DeltaArgs& a);

// The routed experts of one layer (and the shared one) for a list of entries. An entry is the
// shared expert (k = -1) or top-k choice k; its block sits in `slot` of the device cache, or,
// when slot = -1, in slot layer*num_experts + ids[k] (every expert resident).
struct ExpertBatch {
  int n = 0;
  int k[kMaxExperts];
  int slot[kMaxExperts];
};
struct ExpertArgs {
  const uint8_t* cache = nullptr;
  uint64_t stride = 0;
  PartDesc gate, up, down;
  DevMat shared_gate, shared_up, shared_down;
  const int* ids = nullptr;
  const float* weights = nullptr;
  const float* shared_logit = nullptr;  // sigmoid of this scales the shared expert
  const float* norm_w = nullptr;        // the post-attention RMSNorm's weight: h = norm(x)
  float eps = 0;
  float* act = nullptr;                 // [1 + k, act_stride]: silu(gate h) * (up h), shared first
  int act_stride = 0;
  float* y = nullptr;                   // [1 + k, hidden]: down act, shared first
  float* x = nullptr;                   // residual stream: gate/up's input (normed), down adds to it
  int* row_counters = nullptr;          // [hidden], 0 between layers: entries done per row range
  int layer = 0, num_experts = 0, hidden = 0;
  int k = 0;                            // routed experts per token (the layer's entries: k + 1)
};
// act and y of the batch's entries (two launches: gate/up with SwiGLU, then down). Down splits
// hidden into the same row ranges for every entry (whatever batch it is in), and the last block
// to finish a range over the layer's k + 1 entries adds the MoE output to those rows of x:
// sigmoid(shared_logit) * y_shared + sum_k weights[k] * y_k, in that order (the same bits however
// the experts were split between cache hits and misses).
void experts(cudaStream_t s, const ExpertArgs& a, const ExpertBatch& batch, int sms);

}  // namespace fm::cuda
