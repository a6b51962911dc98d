// The device copy of a call's tensor table (layout: table_layout.h), from a cache of uploads.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../tensor_table.h"
#include "table_layout.h"

namespace msam_fused::cuda {

// The device copy of `table` split into segments of `chunk` elements, ready for kernels on
// `stream`. Uploads (an async copy from pinned memory on `stream`) only when the cache holds
// no identical table usable there (see device_table.cpp for the rules under graph capture and
// across streams). Host work is O(rows).
DeviceTable device_table(const TensorTable& table, int64_t chunk, c10::cuda::CUDAStream stream);

}  // namespace msam_fused::cuda
