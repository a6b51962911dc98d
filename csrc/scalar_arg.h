// A 0-d tensor argument read inside a kernel: the coefficient, rho, the GradScaler's scale or
// its found_inf flag. On CUDA the pointer is device memory, so the value never reaches the host.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "host_device.h"

namespace msam_fused {

enum class ScalarKind : int8_t { kAbsent, kBool, kHalf, kBFloat16, kFloat, kDouble };

struct ScalarArg {
  const void* ptr = nullptr;
  ScalarKind kind = ScalarKind::kAbsent;
};

// The value, or `absent` when the argument was not given.
MSAM_HD double read_scalar(const ScalarArg& a, double absent) {
  switch (a.kind) {
    case ScalarKind::kBool: return *static_cast<const bool*>(a.ptr) ? 1.0 : 0.0;
    case ScalarKind::kHalf: return static_cast<float>(*static_cast<const c10::Half*>(a.ptr));
    case ScalarKind::kBFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(a.ptr));
    case ScalarKind::kFloat: return *static_cast<const float*>(a.ptr);
    case ScalarKind::kDouble: return *static_cast<const double*>(a.ptr);
    default: return absent;
  }
}

// found_inf: non-zero means skip the whole step and leave every tensor as it was.
MSAM_HD bool step_skipped(const ScalarArg& found_inf) {
  return read_scalar(found_inf, 0.0) != 0.0;
}

}  // namespace msam_fused
