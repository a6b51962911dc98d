// Storage and compute types of the kernels, derived from the parameter type P.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace msam_fused {

template <typename P>
constexpr bool kLowPrecision = std::is_same_v<P, c10::BFloat16> || std::is_same_v<P, c10::Half>;

// Arithmetic runs in float64 for float64 parameters and in float32 otherwise.
template <typename P>
using compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

// Optimizer state is float32 for bfloat16/float16 parameters, else the parameter type.
template <typename P>
using state_t = std::conditional_t<kLowPrecision<P>, float, P>;

// fp32 master copies of the true weights.
using master_t = float;

}  // namespace msam_fused
