// Python bindings: the native core as `flashmoe_native._core`. The Python package parses and
// validates manifest.json and hands it over as a dict; everything per token runs here with the
// GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <mutex>
#include <thread>

#include "cpu/kernels.h"
#include "cpu/membench.h"
#include "engine.h"
#include "expert_cache.h"
#include "xxh64.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T>
T get(nb::handle d, const char* key) {
  nb::dict dict = nb::cast<nb::dict>(d);
  if (!dict.contains(key)) throw std::invalid_argument(std::string("manifest: missing key '") + key + "'");
  return nb::cast<T>(dict[key]);
}

fm::TensorInfo tensor_info(nb::handle t) {
  fm::TensorInfo info;
  info.dtype = fm::parse_dtype(get<std::string>(t, "dtype"));
  info.shape = get<std::vector<int64_t>>(t, "shape");
  info.offset = get<uint64_t>(t, "offset");
  nb::dict d = nb::cast<nb::dict>(t);
  if (d.contains("nbytes")) info.nbytes = get<uint64_t>(t, "nbytes");
  if (info.shape.empty() || info.shape.size() > 2)
    throw std::invalid_argument("manifest: tensors must be 1-D or 2-D");
  return info;
}

fm::ModelSpec model_spec(const std::string& dir, nb::dict manifest) {
  fm::ModelSpec spec;
  spec.dir = dir;
  fm::ModelConfig& c = spec.config;
  c.architecture = get<std::string>(manifest, "architecture");
  if (c.architecture != "qwen3_5_moe")
    throw std::invalid_argument("unsupported architecture '" + c.architecture + "'");
  nb::handle cfg = manifest["config"];
  c.vocab_size = get<int>(cfg, "vocab_size");
  c.hidden_size = get<int>(cfg, "hidden_size");
  c.num_layers = get<int>(cfg, "num_hidden_layers");
  for (const std::string& t : get<std::vector<std::string>>(cfg, "layer_types")) {
    if (t == "linear_attention") c.layer_types.push_back(fm::LayerType::LinearAttention);
    else if (t == "full_attention") c.layer_types.push_back(fm::LayerType::FullAttention);
    else throw std::invalid_argument("manifest: unknown layer type '" + t + "'");
  }
  if (int(c.layer_types.size()) != c.num_layers)
    throw std::invalid_argument("manifest: layer_types does not have num_hidden_layers entries");
  c.rms_norm_eps = get<float>(cfg, "rms_norm_eps");
  c.num_heads = get<int>(cfg, "num_attention_heads");
  c.num_kv_heads = get<int>(cfg, "num_key_value_heads");
  c.head_dim = get<int>(cfg, "head_dim");
  c.rotary_dim = get<int>(cfg, "rotary_dim");
  c.rope_theta = get<double>(cfg, "rope_theta");
  c.max_position_embeddings = get<int>(cfg, "max_position_embeddings");
  c.lin_num_key_heads = get<int>(cfg, "linear_num_key_heads");
  c.lin_num_value_heads = get<int>(cfg, "linear_num_value_heads");
  c.lin_key_head_dim = get<int>(cfg, "linear_key_head_dim");
  c.lin_value_head_dim = get<int>(cfg, "linear_value_head_dim");
  c.conv_kernel = get<int>(cfg, "linear_conv_kernel_dim");
  c.num_experts = get<int>(cfg, "num_experts");
  c.experts_per_tok = get<int>(cfg, "num_experts_per_tok");
  c.moe_intermediate = get<int>(cfg, "moe_intermediate_size");
  c.shared_intermediate = get<int>(cfg, "shared_expert_intermediate_size");
  c.norm_topk_prob = get<bool>(cfg, "norm_topk_prob");
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads || c.lin_num_key_heads <= 0 ||
      c.lin_num_value_heads % c.lin_num_key_heads || c.rotary_dim % 2 || c.rotary_dim > c.head_dim)
    throw std::invalid_argument("manifest: inconsistent head configuration");

  for (auto [name, t] : nb::cast<nb::dict>(manifest["tensors"]))
    spec.tensors[nb::cast<std::string>(name)] = tensor_info(t);

  nb::handle ex = manifest["experts"];
  fm::ExpertLayout& L = spec.experts;
  spec.experts_file = get<std::string>(ex, "file");
  L.num_layers = get<int>(ex, "num_layers");
  L.num_experts = get<int>(ex, "num_experts");
  L.block_bytes = get<uint64_t>(ex, "block_bytes");
  L.block_stride = get<uint64_t>(ex, "block_stride");
  nb::handle parts = ex["parts"];
  L.gate = tensor_info(parts["gate"]);
  L.up = tensor_info(parts["up"]);
  L.down = tensor_info(parts["down"]);
  for (fm::TensorInfo* t : {&L.gate, &L.up, &L.down}) {
    t->nbytes = fm::tensor_nbytes(t->dtype, t->rows(), t->cols());
    if (t->offset + t->nbytes > L.block_bytes) throw std::invalid_argument("manifest: expert part outside its block");
  }
  if (L.num_layers != c.num_layers || L.num_experts != c.num_experts || L.block_stride < L.block_bytes ||
      L.block_stride % 4096)
    throw std::invalid_argument("manifest: expert layout does not match the config");
  return spec;
}

// The CPU kernels on their own, for tests against numpy and for the bandwidth benchmarks.
struct CpuKernels {
  explicit CpuKernels(int threads) : pool(threads > 0 ? threads : int(std::thread::hardware_concurrency())) {}
  fm::ThreadPool pool;
};

using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Floats = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Serialises calls: the GIL is released inside, and one engine holds one sequence.
struct PyEngine {
  std::unique_ptr<fm::Engine> engine;
  std::mutex mutex;
};

nb::ndarray<nb::numpy, float, nb::ndim<1>> new_array(size_t n, float** data) {
  *data = new float[n];
  nb::capsule owner(*data, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  return nb::ndarray<nb::numpy, float, nb::ndim<1>>(*data, {n}, owner);
}

// An array for the engine's logits, in a buffer the engine lends (the CUDA engine's are
// page-locked and mapped, so lm_head writes them directly); the buffer goes back when the
// array dies, to buffers that outlive the engine.
nb::ndarray<nb::numpy, float, nb::ndim<1>> new_logits(const fm::Engine& engine, float** data) {
  struct Lent {
    std::shared_ptr<fm::LogitsBuffers> buffers;
    float* p;
  };
  auto buffers = engine.logits_buffers();
  auto lent = std::make_unique<Lent>(Lent{buffers, buffers->acquire()});
  *data = lent->p;
  nb::capsule owner(lent.get(), [](void* l) noexcept {
    const std::unique_ptr<Lent> done(static_cast<Lent*>(l));
    done->buffers->release(done->p);
  });
  lent.release();
  return nb::ndarray<nb::numpy, float, nb::ndim<1>>(*data, {size_t(engine.config().vocab_size)}, owner);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "flashmoe_native native core";
  nb::exception<fm::ContextLimitError>(m, "ContextLimitError", PyExc_ValueError);

  m.def("cuda_unavailable_reason", &fm::cuda_unavailable_reason,
        "Empty when a CUDA GPU can be used, else why not.");

  nb::class_<fm::ExpertCachePolicy>(m, "ExpertCachePolicy",
                                    "The CUDA expert cache's bookkeeping: slots, keys, what to evict.")
      .def(nb::init<int, int, double>(), "capacity"_a, "num_keys"_a, "half_life"_a)
      .def_prop_ro("capacity", &fm::ExpertCachePolicy::capacity)
      .def("begin_round", &fm::ExpertCachePolicy::begin_round)
      .def("find", &fm::ExpertCachePolicy::find, "key"_a, "The slot holding key, or -1.")
      .def("insert", &fm::ExpertCachePolicy::insert, "key"_a, "A slot for an absent key, evicting if full.");

  nb::class_<fm::Xxh64>(m, "Xxh64", "Streaming XXH64 (seed 0).")
      .def(nb::init<>())
      .def("update", [](fm::Xxh64& h, nb::bytes data) { h.update(data.c_str(), data.size()); }, "data"_a)
      .def(
          "update_array",
          [](fm::Xxh64& h, nb::ndarray<nb::c_contig, nb::device::cpu> a) {
            nb::gil_scoped_release release;
            h.update(a.data(), a.nbytes());
          },
          "array"_a)
      .def("digest", &fm::Xxh64::digest);
  m.def(
      "xxh64_file",
      [](const std::string& path, uint64_t offset, uint64_t length) {
        nb::gil_scoped_release release;
        return fm::xxh64_file(path, offset, length);
      },
      "path"_a, "offset"_a, "length"_a, "XXH64 of `length` bytes of a file from `offset`.");

  nb::class_<CpuKernels>(m, "CpuKernels", "The CPU kernels and bandwidth baselines on a thread pool.")
      .def(nb::init<int>(), "threads"_a = 0)
      .def_prop_ro("threads", [](CpuKernels& k) { return k.pool.size(); })
      .def_prop_ro("simd", [](CpuKernels&) { return std::string(fm::cpu::simd_path()); })
      .def(
          "linear",
          [](CpuKernels& k, Bytes tensor, const std::string& dtype, int64_t rows, int64_t cols, Floats x) {
            fm::TensorInfo t;
            t.dtype = fm::parse_dtype(dtype);
            t.shape = {rows, cols};
            t.nbytes = fm::tensor_nbytes(t.dtype, rows, cols);
            if (tensor.shape(0) < t.nbytes) throw std::invalid_argument("tensor buffer too small for its shape");
            if (cols <= 0 || int64_t(x.shape(0)) % cols) throw std::invalid_argument("x must hold n rows of `cols`");
            const int64_t n = int64_t(x.shape(0)) / cols;
            float* data;
            auto y = new_array(size_t(n * rows), &data);
            nb::gil_scoped_release release;
            fm::cpu::LinearScratch scratch(n, cols);
            fm::cpu::linear(fm::matrix_at(tensor.data(), t), x.data(), n, data, scratch, k.pool);
            return y;
          },
          "tensor"_a, "dtype"_a, "rows"_a, "cols"_a, "x"_a,
          "y = x W^T for a tensor in the model format; x holds n rows of `cols` (flattened), y n rows of `rows`.")
      .def(
          "stream_read",
          [](CpuKernels& k, Bytes buf) {
            nb::gil_scoped_release release;
            return fm::cpu::stream_read(buf.data(), buf.shape(0), k.pool);
          },
          "buf"_a)
      .def(
          "stream_copy",
          [](CpuKernels& k, nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> dst, Bytes src) {
            if (dst.shape(0) < src.shape(0)) throw std::invalid_argument("dst smaller than src");
            nb::gil_scoped_release release;
            fm::cpu::stream_copy(dst.data(), src.data(), src.shape(0), k.pool);
          },
          "dst"_a, "src"_a);

  nb::class_<fm::EngineState>(m, "EngineState", "A copy of the engine's sequence state.")
      .def_ro("position", &fm::EngineState::position)
      .def_prop_ro("nbytes", &fm::EngineState::nbytes);

  nb::class_<PyEngine>(m, "Engine")
      .def(
          "__init__",
          [](PyEngine* self, const std::string& model_dir, nb::dict manifest, const std::string& device,
             int experts_per_token, int threads, int64_t max_context, bool direct_io, int prefill_chunk,
             double expert_cache_gb, bool profile) {
            if (device != "cpu" && device != "cuda")
              throw std::invalid_argument("device must be 'cpu' or 'cuda', not '" + device + "'");
            fm::ModelSpec spec = model_spec(model_dir, manifest);
            fm::EngineOptions o{experts_per_token, threads, max_context, direct_io, prefill_chunk, expert_cache_gb,
                                profile};
            new (self) PyEngine();
            nb::gil_scoped_release release;
            self->engine = device == "cuda" ? fm::make_cuda_engine(std::move(spec), o)
                                            : fm::make_cpu_engine(std::move(spec), o);
          },
          "model_dir"_a, "manifest"_a, "device"_a = "cpu", "experts_per_token"_a = 0, "threads"_a = 0,
          "max_context"_a = 0, "direct_io"_a = false, "prefill_chunk"_a = 0, "expert_cache_gb"_a = 0.0,
          "profile"_a = false)
      .def(
          "step",
          [](PyEngine& e, int64_t token) {
            if (token < INT32_MIN || token > INT32_MAX)
              throw std::invalid_argument("token id " + std::to_string(token) + " is outside the vocabulary");
            float* data;
            auto out = new_logits(*e.engine, &data);
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine->step(int32_t(token), data);
            return out;
          },
          "token"_a, "Run one token; returns float32 logits [vocab_size].")
      .def(
          "prefill",
          [](PyEngine& e, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> tokens) {
            float* data;
            auto out = new_logits(*e.engine, &data);
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine->prefill(tokens.data(), int64_t(tokens.shape(0)), data);
            return out;
          },
          "tokens"_a, "Run a prompt; returns the logits of its last token.")
      .def("reset",
           [](PyEngine& e) {
             std::lock_guard<std::mutex> lock(e.mutex);
             e.engine->reset();
           })
      .def_prop_ro("position",
                   [](PyEngine& e) {
                     nb::gil_scoped_release release;
                     std::lock_guard<std::mutex> lock(e.mutex);
                     return e.engine->position();
                   })
      .def_prop_ro("max_context", [](PyEngine& e) { return e.engine->max_context(); })
      .def_prop_ro("experts_per_token", [](PyEngine& e) { return e.engine->experts_per_token(); })
      .def("describe", [](PyEngine& e) { return e.engine->describe(); })
      .def("stats",
           [](PyEngine& e) {
             fm::EngineStats s;
             {
               nb::gil_scoped_release release;
               std::lock_guard<std::mutex> lock(e.mutex);
               s = e.engine->stats();
             }
             nb::dict ms;
             ms["mixer"] = s.mixer_ms;
             ms["router"] = s.router_ms;
             ms["expert_io_wait"] = s.expert_io_wait_ms;
             ms["expert_compute"] = s.expert_compute_ms;
             ms["lm_head"] = s.lm_head_ms;
             ms["total"] = s.total_ms;
             nb::dict d;
             d["tokens"] = s.tokens;
             d["expert_bytes_read"] = s.expert_bytes_read;
             d["experts_loaded"] = s.experts_loaded;
             d["experts_cached"] = s.experts_cached;
             d["ms"] = ms;
             d["prefill_tokens"] = s.prefill_tokens;
             d["prefill_chunks"] = s.prefill_chunks;
             d["prefill_unique_experts"] = s.prefill_unique_experts;
             d["prefill_experts_loaded"] = s.prefill_experts_loaded;
             d["prefill_expert_bytes_read"] = s.prefill_expert_bytes_read;
             d["expert_cache_hits"] = s.expert_cache_hits;
             d["expert_cache_misses"] = s.expert_cache_misses;
             d["bytes_h2d"] = s.bytes_h2d;
             d["layer_cache_hits"] = s.layer_cache_hits;
             d["layer_cache_misses"] = s.layer_cache_misses;
             return d;
           })
      .def("reset_stats",
           [](PyEngine& e) {
             std::lock_guard<std::mutex> lock(e.mutex);
             e.engine->reset_stats();
           })
      .def("snapshot",
           [](PyEngine& e) {
             nb::gil_scoped_release release;
             std::lock_guard<std::mutex> lock(e.mutex);
             return e.engine->snapshot();
           })
      .def(
          "restore",
          [](PyEngine& e, const fm::EngineState& s) {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(e.mutex);
            e.engine->restore(s);
          },
          "state"_a);
}
