// The step kernels instantiated on their own, for tests/test_cuda_ptx.py, which compiles this
// file to PTX (nvcc -ptx, sm_90) and checks the loads and the arithmetic the kernels compile to.
#include "../cuda/step_kernels.cuh"

namespace msam_fused::cuda {

template __global__ void msam_sgd_kernel<Pass::kPartials, float>(DeviceTable, const double*, PassScalars, double*);
template __global__ void msam_sgd_kernel<Pass::kStep, float>(DeviceTable, const double*, PassScalars, double*);
template __global__ void msam_sgd_kernel<Pass::kStep, c10::BFloat16>(DeviceTable, const double*, PassScalars,
                                                                     double*);
template __global__ void adamw_msam_kernel<Pass::kStep, float>(DeviceTable, const double*, const AdamBias*,
                                                               PassScalars, double*);
template __global__ void adamw_msam_kernel<Pass::kStep, c10::BFloat16>(DeviceTable, const double*,
                                                                       const AdamBias*, PassScalars, double*);

}  // namespace msam_fused::cuda
