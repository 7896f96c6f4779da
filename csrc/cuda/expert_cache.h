// Which device cache slot holds which expert block (key = layer * num_experts + expert), with
// least-recently-used replacement. Host-side bookkeeping only; the engine moves the bytes.
#pragma once
#include <cstdint>
#include <vector>

namespace fm::cuda {

class ExpertCachePolicy {
 public:
  ExpertCachePolicy(int capacity, int num_keys);

  int capacity() const { return int(key_of_.size()); }
  // The slot holding `key`, marked most recently used; -1 when absent.
  int find(int key);
  // A slot for `key` (absent): a free one, else the least recently used one, whose key is dropped.
  // Callers find() every key they need this round before inserting, so a slot in use this round
  // is never the victim while capacity >= keys per round.
  int insert(int key);

 private:
  void unlink(int slot);
  void push_front(int slot);

  std::vector<int> slot_of_;          // per key, -1 when absent
  std::vector<int> key_of_;           // per slot, -1 when free
  std::vector<int> prev_, next_;      // recency list over used slots, most recent at head_
  int head_ = -1, tail_ = -1, used_ = 0;
};

}  // namespace fm::cuda
