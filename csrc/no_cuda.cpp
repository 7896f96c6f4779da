// Linked instead of csrc/cuda/ when the build found no nvcc.
#include "engine.h"

namespace fm {

std::string cuda_unavailable_reason() {
  return "flashmoe_native was built without CUDA (no nvcc when it was installed, or FLASHMOE_CUDA=OFF)";
}

std::unique_ptr<Engine> make_cuda_engine(ModelSpec, const EngineOptions&) {
  throw std::runtime_error(cuda_unavailable_reason());
}

}  // namespace fm
