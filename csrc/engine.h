// The engine interface every backend implements: one token in, logits out, state kept inside.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model.h"

namespace fm {

struct EngineOptions {
  int experts_per_token = 0;  // 0: the model's top-k
  int threads = 0;            // 0: all hardware threads
  int64_t max_context = 0;    // 0: the model's max_position_embeddings
  bool direct_io = false;     // read expert blocks with O_DIRECT instead of through the page cache
  int prefill_chunk = 0;      // tokens per prefill chunk; 0: the backend's measured default
  double expert_cache_gb = 0; // CUDA: device expert cache in GB (1e9 B); 0: what fits after weights and state
  bool profile = false;       // CUDA: time each phase with device events (no CUDA graph, slower)
};

// Counters since the last reset_stats(). Milliseconds are wall time on the calling thread.
struct EngineStats {
  uint64_t tokens = 0;
  uint64_t expert_bytes_read = 0;
  uint64_t experts_loaded = 0;
  uint64_t experts_cached = 0;  // of experts_loaded: used in place from the page cache, no copy
  double mixer_ms = 0, router_ms = 0, expert_io_wait_ms = 0, expert_compute_ms = 0, lm_head_ms = 0;
  double total_ms = 0;
  // prefill only: chunks run; the unique experts each chunk ran (summed over chunks and layers);
  // of those, the blocks read from disk, and their bytes
  uint64_t prefill_tokens = 0, prefill_chunks = 0, prefill_unique_experts = 0;
  uint64_t prefill_experts_loaded = 0, prefill_expert_bytes_read = 0;
  // CUDA device expert cache: routed experts found on the device / fetched, bytes copied to it,
  // and hits/misses per layer (empty on the CPU, which has no device cache)
  uint64_t expert_cache_hits = 0, expert_cache_misses = 0, bytes_h2d = 0;
  std::vector<uint64_t> layer_cache_hits, layer_cache_misses;
};

// Thrown when a token would go past the context limit.
struct ContextLimitError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A copy of everything a token depends on: position, KV cache, conv and recurrent states.
struct EngineState {
  int64_t position = 0;
  std::vector<std::vector<float>> buffers;
  uint64_t nbytes() const;
};

// Host buffers of one size for the logits that step() and prefill() write and the bindings
// return; a buffer comes back through release(). Shared with the arrays that hold buffers, so it
// outlives its engine while any is held.
class LogitsBuffers {
 public:
  virtual ~LogitsBuffers() = default;
  virtual float* acquire() = 0;
  virtual void release(float* p) noexcept = 0;
};
// Plain heap buffers of n floats.
std::shared_ptr<LogitsBuffers> make_heap_logits_buffers(size_t n);

class Engine {
 public:
  virtual ~Engine() = default;
  // Runs one token at the current position; writes vocab_size logits when `logits` is not null.
  virtual void step(int32_t token, float* logits) = 0;
  // Runs tokens in order; logits of the last one when `logits` is not null.
  virtual void prefill(const int32_t* tokens, int64_t n, float* logits) = 0;
  virtual void reset() = 0;
  virtual int64_t position() const = 0;
  virtual int64_t max_context() const = 0;
  virtual int experts_per_token() const = 0;
  virtual const ModelConfig& config() const = 0;
  virtual EngineStats stats() const = 0;
  virtual void reset_stats() = 0;
  virtual EngineState snapshot() const = 0;
  virtual void restore(const EngineState& state) = 0;
  virtual std::string describe() const = 0;
  // Where the bindings take the host buffers for logits (vocab_size floats each).
  virtual std::shared_ptr<LogitsBuffers> logits_buffers() const = 0;
};

// EngineOptions checked against the model, for every backend: 0 takes the model's value, a value
// outside 1..(the model's) throws std::invalid_argument naming the option.
int resolve_experts_per_token(const ModelConfig& c, int k);
int64_t resolve_max_context(const ModelConfig& c, int64_t n);
// Before n tokens run at position pos: throws std::runtime_error while `broken` names an earlier
// failure, std::invalid_argument for an id outside the vocabulary, ContextLimitError past
// max_context.
void check_tokens(const ModelConfig& c, const int32_t* tokens, int64_t n, int64_t pos, int64_t max_context,
                  const std::string& broken);

std::unique_ptr<Engine> make_cpu_engine(ModelSpec spec, const EngineOptions& options);

// The CUDA backend (csrc/cuda/). cuda_unavailable_reason() is empty when a usable GPU is present;
// otherwise it says why not (no GPU, no driver, or a build without nvcc), and make_cuda_engine
// throws that reason.
std::string cuda_unavailable_reason();
std::unique_ptr<Engine> make_cuda_engine(ModelSpec spec, const EngineOptions& options);

}  // namespace fm
