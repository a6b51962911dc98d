// The CPU kernels for x86-64 CPUs with AVX2 and FMA (ops.cpp checks the CPU at run time).
#include "target_region.h"

#if MSAM_CAN_TARGET_X86
MSAM_TARGET_BEGIN("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
MSAM_TARGET_END

namespace msam_fused::cpu {
const Kernels* avx2_kernels() { return &AVX2::kKernels; }
}  // namespace msam_fused::cpu
#else
namespace msam_fused::cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace msam_fused::cpu
#endif
