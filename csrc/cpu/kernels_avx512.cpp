// The CPU kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ) and FMA, as ATen's AVX512 build.
#include "target_region.h"

#if MSAM_CAN_TARGET_X86
MSAM_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
MSAM_TARGET_END

namespace msam_fused::cpu {
const Kernels* avx512_kernels() { return &AVX512::kKernels; }
}  // namespace msam_fused::cpu
#else
namespace msam_fused::cpu {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace msam_fused::cpu
#endif
