// The CPU kernels for any CPU (at::vec's portable vectors).
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace msam_fused::cpu {
const Kernels* default_kernels() { return &DEFAULT::kKernels; }
}  // namespace msam_fused::cpu
