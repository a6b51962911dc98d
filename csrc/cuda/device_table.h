// The tensor table of a call, as the CUDA kernels read it: one block of int64 words in device
// memory. Tables are cached, so a step that sees the same tensors as before uploads nothing.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../tensor_table.h"

namespace msam_fused::cuda {

// Layout of the words: per row, `width` data pointers and the row's numel; then per
// segment (one per CUDA block) its row and first element.
struct DeviceTable {
  const int64_t* words;  // device memory, valid while the cache holds it (see device_table.cpp)
  int64_t rows;
  int64_t segments;
};

inline constexpr int64_t row_words(int width) { return width + 1; }

// The device copy of `table` split into segments of `chunk` elements. Uploads (an async copy
// from pinned memory, on the current stream) only when no identical table is cached.
DeviceTable device_table(const TensorTable& table, int64_t chunk);

}  // namespace msam_fused::cuda
