// Opens (MSAM_TARGET_BEGIN) and closes (MSAM_TARGET_END) a region of a file whose functions
// are compiled for a wider instruction set than the rest of the library, the way ATen
// builds its kernels once per CPU capability. Every header with inline code that the region
// needs from outside is included before it, so that only at::vec (namespaced per
// capability) and the kernels themselves are compiled for the wider target.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/util/BFloat16-math.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSAM_CAN_TARGET_X86 1
#define MSAM_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define MSAM_TARGET_BEGIN(isa) MSAM_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define MSAM_TARGET_END MSAM_PRAGMA(clang attribute pop)
#else
#define MSAM_TARGET_BEGIN(isa) MSAM_PRAGMA(GCC push_options) MSAM_PRAGMA(GCC target(isa))
#define MSAM_TARGET_END MSAM_PRAGMA(GCC pop_options)
#endif
#else
#define MSAM_CAN_TARGET_X86 0
#endif
