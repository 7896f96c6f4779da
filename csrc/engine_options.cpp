#include <string>

#include "engine.h"

namespace fm {

int resolve_experts_per_token(const ModelConfig& c, int k) {
  if (k < 0 || k > c.experts_per_tok)
    throw std::invalid_argument("experts_per_token=" + std::to_string(k) + " is outside 1.." +
                                std::to_string(c.experts_per_tok) + " (the model's top-k)");
  return k == 0 ? c.experts_per_tok : k;
}

int64_t resolve_max_context(const ModelConfig& c, int64_t n) {
  if (n < 0 || n > c.max_position_embeddings)
    throw std::invalid_argument("max_context=" + std::to_string(n) + " is outside 1.." +
                                std::to_string(c.max_position_embeddings) +
                                " (the model's max_position_embeddings)");
  return n == 0 ? c.max_position_embeddings : n;
}

}  // namespace fm
