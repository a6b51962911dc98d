// The CPU kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ), FMA and F16C. The build compiles
// this file alone with those -m flags and -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512,
// as ATen does its AVX512 kernels; ops.cpp calls into it only on a CPU that has them.
#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX512)
#include "kernels_impl.h"
#endif

namespace msam_fused::cpu {
#if defined(CPU_CAPABILITY_AVX512)
const Kernels* avx512_kernels() { return &AVX512::kKernels; }
#else
const Kernels* avx512_kernels() { return nullptr; }
#endif
}  // namespace msam_fused::cpu
