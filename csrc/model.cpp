#include "model.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace fm {

DType parse_dtype(const std::string& name) {
  if (name == "f32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  if (name == "q8") return DType::Q8;
  if (name == "q4") return DType::Q4;
  throw std::invalid_argument("unknown tensor dtype '" + name + "'");
}

int dtype_bits(DType t) {
  switch (t) {
    case DType::F32: return 32;
    case DType::BF16: return 16;
    case DType::Q8: return 8;
    case DType::Q4: return 4;
  }
  return 0;
}

uint64_t tensor_nbytes(DType dtype, int64_t rows, int64_t cols) {
  uint64_t n = uint64_t(rows) * uint64_t(cols);
  if (dtype == DType::F32) return 4 * n;
  if (dtype == DType::BF16) return 2 * n;
  uint64_t side = uint64_t(rows) * uint64_t(cols / kGroupSize) * 2;
  return align64(n * uint64_t(dtype_bits(dtype)) / 8) + align64(side) + side;
}

Matrix matrix_at(const uint8_t* base, const TensorInfo& t) {
  Matrix m;
  m.dtype = t.dtype;
  m.rows = t.rows();
  m.cols = t.cols();
  m.data = base + t.offset;
  m.nbytes = t.nbytes;
  if (t.dtype == DType::Q4 || t.dtype == DType::Q8) {
    if (m.cols % kGroupSize) throw std::invalid_argument("quantized matrix cols not a multiple of 64");
    uint64_t data_bytes = align64(uint64_t(m.rows) * uint64_t(m.cols) * dtype_bits(t.dtype) / 8);
    uint64_t side = align64(uint64_t(m.rows) * uint64_t(m.cols / kGroupSize) * 2);
    m.scales = reinterpret_cast<const uint16_t*>(m.data + data_bytes);
    m.biases = reinterpret_cast<const uint16_t*>(m.data + data_bytes + side);
  }
  return m;
}

Model::Model(ModelSpec spec) : spec_(std::move(spec)) {
  weights_path_ = spec_.dir + "/weights.bin";
  experts_path_ = spec_.dir + "/" + spec_.experts_file;
  int fd = ::open(weights_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(weights_path_ + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw std::runtime_error(weights_path_ + ": cannot stat: " + std::strerror(errno));
  }
  map_size_ = size_t(st.st_size);
  void* p = map_size_ ? ::mmap(nullptr, map_size_, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
  ::close(fd);
  if (p == MAP_FAILED) throw std::runtime_error(weights_path_ + ": mmap failed: " + std::strerror(errno));
  map_ = static_cast<uint8_t*>(p);
  for (const auto& [name, t] : spec_.tensors) {
    uint64_t want = tensor_nbytes(t.dtype, t.rows(), t.cols());
    if (t.nbytes != want || t.offset + t.nbytes > map_size_)
      throw std::runtime_error(weights_path_ + ": tensor '" + name + "' does not fit the file");
  }
}

Model::~Model() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorInfo& Model::info(const std::string& name) const {
  auto it = spec_.tensors.find(name);
  if (it == spec_.tensors.end())
    throw std::runtime_error(spec_.dir + "/manifest.json: missing tensor '" + name + "'");
  return it->second;
}

Matrix Model::matrix(const std::string& name) const { return matrix_at(map_, info(name)); }

const float* Model::vector_f32(const std::string& name, int64_t expected_len) const {
  const TensorInfo& t = info(name);
  if (t.dtype != DType::F32 || t.rows() * t.cols() != expected_len)
    throw std::runtime_error(spec_.dir + "/manifest.json: tensor '" + name + "' should be f32 with " +
                             std::to_string(expected_len) + " elements");
  return reinterpret_cast<const float*>(map_ + t.offset);
}

}  // namespace fm
