// Memory-bandwidth baselines for benchmarks, run on the same pool as the kernels they judge.
#pragma once
#include <cstddef>
#include <cstdint>

#include "thread_pool.h"

namespace fm::cpu {

// Reads every byte of buf (64-bit words summed) across the pool; returns the sum so the read
// cannot be optimised away.
uint64_t stream_read(const uint8_t* buf, size_t n, ThreadPool& pool);

// memcpy of n bytes split across the pool.
void stream_copy(uint8_t* dst, const uint8_t* src, size_t n, ThreadPool& pool);

}  // namespace fm::cpu
