// The tensor table of a call as the CUDA kernels read it: one block of int64 words in device
// memory, O(tensors) long (never O(elements), so building and comparing it on the host is
// cheap even for a bucket of billions of elements).
#pragma once

#include <cstdint>

#include "../host_device.h"

namespace msam_fused::cuda {

// Per row: `width` data pointers (0 where absent), the row's numel, its flags; then, for
// rows + 1 entries, the index of each row's first segment (the last entry is the segment
// count). A block finds its row by a binary search over those.
struct DeviceTable {
  const int64_t* words;  // device memory, valid while the cache holds it (device_table.cpp)
  int64_t rows;
  int64_t segments;
};

inline constexpr int64_t row_words(int width) { return width + 2; }

// Row flags.
enum : int64_t {
  // Every pointer of the row is 16-byte aligned: the kernels may use 128-bit loads and stores.
  kRowAligned = 1,
};

// The row that owns segment `segment`: the last row whose first segment is <= segment (an
// empty row owns no segment, so it shares its first segment with the next row). `first`
// holds each row's first segment, in row order.
MSAM_HD int64_t row_of_segment(const int64_t* first, int64_t rows, int64_t segment) {
  int64_t lo = 0, hi = rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (first[mid] <= segment) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace msam_fused::cuda
