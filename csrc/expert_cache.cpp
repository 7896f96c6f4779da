#include "expert_cache.h"

#include <cmath>
#include <stdexcept>

namespace fm {

ExpertCachePolicy::ExpertCachePolicy(int capacity, int num_keys, double half_life)
    : uses_(size_t(num_keys), 0.0), slot_of_(size_t(num_keys), -1), key_of_(size_t(capacity), -1),
      tick_of_(size_t(capacity), 0), round_of_(size_t(capacity), 0), step_(std::exp2(1.0 / half_life)) {
  if (capacity < 1) throw std::invalid_argument("expert cache needs at least one slot");
  if (!(half_life > 0)) throw std::invalid_argument("expert cache half-life must be positive");
}

void ExpertCachePolicy::use(int key) {
  uses_[size_t(key)] += weight_;
  weight_ *= step_;
  if (weight_ > 1e200) {  // rescale before the weights overflow; the order is unchanged
    for (double& u : uses_) u /= weight_;
    std::set<std::tuple<double, uint64_t, int>> rescaled;
    for (const auto& [u, tick, slot] : order_) rescaled.emplace(uses_[size_t(key_of_[size_t(slot)])], tick, slot);
    order_.swap(rescaled);
    weight_ = 1.0;
  }
}

void ExpertCachePolicy::touch(int slot) {
  const int key = key_of_[size_t(slot)];
  order_.emplace(uses_[size_t(key)], ++tick_, slot);
  tick_of_[size_t(slot)] = tick_;
  round_of_[size_t(slot)] = round_;
}

int ExpertCachePolicy::find(int key) {
  const int s = slot_of_[size_t(key)];
  if (s >= 0) order_.erase({uses_[size_t(key)], tick_of_[size_t(s)], s});
  use(key);
  if (s >= 0) touch(s);
  return s;
}

int ExpertCachePolicy::insert(int key) {
  if (slot_of_[size_t(key)] >= 0) throw std::logic_error("expert cache: key inserted twice");
  int s = -1;
  if (used_ < capacity()) {
    s = used_++;
  } else {
    for (auto it = order_.begin(); it != order_.end(); ++it)
      if (round_of_[size_t(std::get<2>(*it))] != round_) {
        s = std::get<2>(*it);
        order_.erase(it);
        break;
      }
    if (s < 0) throw std::logic_error("expert cache: every slot is in use this round");
    slot_of_[size_t(key_of_[size_t(s)])] = -1;
  }
  key_of_[size_t(s)] = key;
  slot_of_[size_t(key)] = s;
  touch(s);
  return s;
}

}  // namespace fm
