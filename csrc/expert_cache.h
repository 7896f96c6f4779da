// Which device cache slot holds which expert block (key = layer * num_experts + expert), and which
// block to evict. Host-side bookkeeping only; the engine moves the bytes.
//
// Policy: least frequently used, with exponentially decayed use counts (half-life in lookups),
// ties to the least recently used. Chosen by measurement: on the bundled model's routing (a
// trained Qwen3.5-MoE; tests/test_expert_cache.py, docs/cuda.md) it hits 35-37% of lookups with an
// eighth of the blocks cached where LRU hits 21%, 58% against 45% with a quarter: routers favour
// some experts for long stretches, which recency alone forgets between tokens.
#pragma once
#include <cstdint>
#include <set>
#include <tuple>
#include <vector>

namespace fm {

class ExpertCachePolicy {
 public:
  ExpertCachePolicy(int capacity, int num_keys, double half_life);

  int capacity() const { return int(key_of_.size()); }
  // Starts a round (a layer's routed experts, or a wave of a prefill chunk): keys found or inserted
  // from now on are not evicted before the next round, so their slots stay valid while in use.
  void begin_round() { ++round_; }
  // The slot holding `key`, or -1; counts a use either way.
  int find(int key);
  // A slot for `key` (absent, found this round first): a free one, else that of the cached key
  // with the fewest decayed uses that this round has not used. Throws std::logic_error when every
  // slot is in use this round.
  int insert(int key);

 private:
  void use(int key);
  void touch(int slot);

  std::vector<double> uses_;      // per key, decayed use count in units of the current step
  std::vector<int> slot_of_;      // per key, -1 when absent
  std::vector<int> key_of_;       // per slot, -1 when free
  std::vector<uint64_t> tick_of_, round_of_;  // per slot: last use, last round used
  std::set<std::tuple<double, uint64_t, int>> order_;  // (uses, tick, slot) of occupied slots
  double step_, weight_ = 1.0;  // a use adds weight_, which grows by step_ (decay of the others)
  uint64_t tick_ = 0, round_ = 1;
  int used_ = 0;
};

}  // namespace fm
