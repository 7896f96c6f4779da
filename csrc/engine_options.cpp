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

void check_tokens(const ModelConfig& c, const int32_t* tokens, int64_t n, int64_t pos, int64_t max_context,
                  const std::string& broken) {
  if (!broken.empty())
    throw std::runtime_error("the engine's state is unusable after an earlier error (" + broken +
                             "): reset() or restore() a snapshot first");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary (0.." +
                                  std::to_string(c.vocab_size - 1) + ")");
  if (pos + n > max_context)
    throw ContextLimitError("context limit: " + std::to_string(n) + " more token(s) at position " +
                            std::to_string(pos) + " would pass max_context=" + std::to_string(max_context) +
                            "; reset() or restore a shorter state");
}

}  // namespace fm
