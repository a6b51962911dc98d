// The CPU kernels for x86-64 CPUs with AVX2 and FMA. The build compiles this file alone with
// -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2, as ATen does its AVX2 kernels;
// ops.cpp calls into it only on a CPU that has them.
#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX2)
#include "kernels_impl.h"
#endif

namespace msam_fused::cpu {
#if defined(CPU_CAPABILITY_AVX2)
const Kernels* avx2_kernels() { return &AVX2::kKernels; }
#else
const Kernels* avx2_kernels() { return nullptr; }
#endif
}  // namespace msam_fused::cpu
