// The model as the engine sees it: shape from the manifest, non-expert weights mmap'd from
// weights.bin, the layout of expert blocks in experts.bin (docs/format.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fm {

enum class DType { F32, BF16, Q8, Q4 };

DType parse_dtype(const std::string& name);
int dtype_bits(DType t);  // bits per stored weight element (q4: 4, q8: 8, bf16: 16, f32: 32)

constexpr int kGroupSize = 64;
inline uint64_t align64(uint64_t n) { return (n + 63) & ~uint64_t(63); }

// Where a tensor lives: in weights.bin (offset from the file start) or in an expert block
// (offset from the block start).
struct TensorInfo {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  int64_t rows() const { return shape.size() == 2 ? shape[0] : 1; }
  int64_t cols() const { return shape.back(); }
};

// Bytes a tensor of this dtype and shape occupies (docs/format.md "Tensor encodings").
uint64_t tensor_nbytes(DType dtype, int64_t rows, int64_t cols);

// A [rows, cols] matrix view. Quantized: data holds rows*cols*bits/8 bytes, scales and biases
// rows*cols/64 bf16 each. bf16/f32: data only.
struct Matrix {
  DType dtype = DType::BF16;
  int64_t rows = 0, cols = 0;
  const uint8_t* data = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  uint64_t nbytes = 0;
};

Matrix matrix_at(const uint8_t* base, const TensorInfo& t);

enum class LayerType { LinearAttention, FullAttention };

struct ModelConfig {
  std::string architecture;
  int vocab_size = 0, hidden_size = 0, num_layers = 0;
  std::vector<LayerType> layer_types;
  float rms_norm_eps = 1e-6f;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0, rotary_dim = 0;
  double rope_theta = 10000.0;
  int max_position_embeddings = 0;
  int lin_num_key_heads = 0, lin_num_value_heads = 0, lin_key_head_dim = 0, lin_value_head_dim = 0;
  int conv_kernel = 0;
  int num_experts = 0, experts_per_tok = 0, moe_intermediate = 0, shared_intermediate = 0;
  bool norm_topk_prob = true;
};

struct ExpertLayout {
  int num_layers = 0, num_experts = 0;
  uint64_t block_bytes = 0, block_stride = 0;
  TensorInfo gate, up, down;  // offsets inside a block
};

// Everything parsed from manifest.json, validated by the Python loader before it gets here.
struct ModelSpec {
  std::string dir;
  std::string experts_file = "experts.bin";
  ModelConfig config;
  std::map<std::string, TensorInfo> tensors;
  ExpertLayout experts;
};

// The open model: weights.bin mapped read-only, tensor lookup by name.
class Model {
 public:
  explicit Model(ModelSpec spec);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return spec_.config; }
  const ExpertLayout& experts() const { return spec_.experts; }
  const std::string& experts_path() const { return experts_path_; }
  bool has(const std::string& name) const { return spec_.tensors.count(name) != 0; }
  Matrix matrix(const std::string& name) const;
  const float* vector_f32(const std::string& name, int64_t expected_len) const;
  uint64_t weights_bytes() const { return map_size_; }

 private:
  const TensorInfo& info(const std::string& name) const;
  ModelSpec spec_;
  std::string weights_path_, experts_path_;
  uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
};

}  // namespace fm
