#include "cuda/expert_cache.h"

#include <stdexcept>

namespace fm::cuda {

ExpertCachePolicy::ExpertCachePolicy(int capacity, int num_keys)
    : slot_of_(size_t(num_keys), -1), key_of_(size_t(capacity), -1), prev_(size_t(capacity), -1),
      next_(size_t(capacity), -1) {
  if (capacity < 1) throw std::invalid_argument("expert cache needs at least one slot");
}

void ExpertCachePolicy::unlink(int s) {
  if (prev_[size_t(s)] >= 0) next_[size_t(prev_[size_t(s)])] = next_[size_t(s)];
  else head_ = next_[size_t(s)];
  if (next_[size_t(s)] >= 0) prev_[size_t(next_[size_t(s)])] = prev_[size_t(s)];
  else tail_ = prev_[size_t(s)];
  prev_[size_t(s)] = next_[size_t(s)] = -1;
}

void ExpertCachePolicy::push_front(int s) {
  prev_[size_t(s)] = -1;
  next_[size_t(s)] = head_;
  if (head_ >= 0) prev_[size_t(head_)] = s;
  head_ = s;
  if (tail_ < 0) tail_ = s;
}

int ExpertCachePolicy::find(int key) {
  const int s = slot_of_[size_t(key)];
  if (s >= 0 && s != head_) {
    unlink(s);
    push_front(s);
  }
  return s;
}

int ExpertCachePolicy::insert(int key) {
  if (slot_of_[size_t(key)] >= 0) throw std::logic_error("expert cache: key inserted twice");
  int s;
  if (used_ < capacity()) {
    s = used_++;
  } else {
    s = tail_;
    unlink(s);
    slot_of_[size_t(key_of_[size_t(s)])] = -1;
  }
  key_of_[size_t(s)] = key;
  slot_of_[size_t(key)] = s;
  push_front(s);
  return s;
}

}  // namespace fm::cuda
