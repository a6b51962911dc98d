// The CUDA passes of the msam_fused ops (op_impls.h does the rest): launches of the kernels of
// step_kernels.cuh over the device copy of the tensor table (device_table.h).
//
// Nothing here reads a device value on the host: hyper-parameters, coefficients, rho,
// grad_scale and found_inf are read by the kernels, and a skipped step (found_inf set) returns
// at the top of each kernel. Each block writes its sums into its own row of the pass's
// partials; sum_segment_partials adds them in a fixed order, so reruns give identical norms (no
// float atomics). All kernels run on the current stream and the launches per call do not
// depend on the number of tensors, so a step can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../op_impls.h"
#include "device_table.h"
#include "step_kernels.cuh"

namespace msam_fused::cuda {
namespace {

ScalarKind kind_of(at::ScalarType t) {
  return t == at::kDouble ? ScalarKind::kDouble : t == at::kFloat ? ScalarKind::kFloat : ScalarKind::kBool;
}

// The table of a call on the current stream of its device.
DeviceTable upload(const TensorTable& table) {
  return device_table(table, kChunk, c10::cuda::getCurrentCUDAStream(table.device.index()));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Launches kernel<<<one block per segment>>>(table, args...) unless there is no element.
template <typename Kernel, typename... Args>
void launch_segments(Kernel kernel, const DeviceTable& t, Args... args) {
  if (t.segments == 0) return;
  kernel<<<t.segments, kThreads, 0, stream()>>>(t, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [segments, 2] float64: every block of a summing pass writes its row.
at::Tensor empty_partials(const DeviceTable& t, at::Device device) {
  return at::empty({t.segments, 2}, at::TensorOptions().dtype(at::kDouble).device(device));
}

template <typename Args>
PassScalars pass_scalars(const Args& a) {
  return {a.coef_old, a.coef_new, a.grad_scale, a.found_inf};
}

template <Pass kPass>
at::Tensor msam_sgd_pass(const MsamSgdArgs& a) {
  const DeviceTable t = upload(a.table);
  at::Tensor partials = sums_terms(kPass) ? empty_partials(t, a.table.device) : at::Tensor();
  double* out = partials.defined() ? partials.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "msam_sgd", [&] {
    launch_segments(msam_sgd_kernel<kPass, scalar_t>, t, a.hyper, pass_scalars(a), out);
  });
  return partials;
}

template <Pass kPass>
at::Tensor adamw_msam_pass(const AdamwMsamArgs& a) {
  const DeviceTable t = upload(a.table);
  at::Tensor partials = sums_terms(kPass) ? empty_partials(t, a.table.device) : at::Tensor();
  at::Tensor bias;  // per row (step_size, bias2_sqrt), kStep only
  if (kPass == Pass::kStep && t.rows > 0) {
    static_assert(sizeof(AdamBias) == 2 * sizeof(double), "AdamBias is two doubles");
    bias = at::empty({t.rows, 2}, at::TensorOptions().dtype(at::kDouble).device(a.table.device));
    const int threads = 256;
    adam_bias_kernel<<<(t.rows + threads - 1) / threads, threads, 0, stream()>>>(
        t, a.hyper, a.found_inf, reinterpret_cast<AdamBias*>(bias.data_ptr<double>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const AdamBias* bias_ptr = bias.defined() ? reinterpret_cast<const AdamBias*>(bias.data_ptr<double>()) : nullptr;
  double* out = partials.defined() ? partials.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "adamw_msam", [&] {
    launch_segments(adamw_msam_kernel<kPass, scalar_t>, t, a.hyper, bias_ptr, pass_scalars(a), out);
  });
  return partials;
}

// The CUDA passes for OpImpls, on the current stream of the tensors' device.
struct Cuda {
  static at::Tensor msam_sgd(Pass pass, const MsamSgdArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    switch (pass) {
      case Pass::kPartials: return msam_sgd_pass<Pass::kPartials>(a);
      case Pass::kStash: return msam_sgd_pass<Pass::kStash>(a);
      case Pass::kFinish: return msam_sgd_pass<Pass::kFinish>(a);
      case Pass::kStep: break;
    }
    return msam_sgd_pass<Pass::kStep>(a);
  }

  static at::Tensor adamw_msam(Pass pass, const AdamwMsamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    if (pass == Pass::kPartials) return adamw_msam_pass<Pass::kPartials>(a);
    TORCH_INTERNAL_ASSERT(pass == Pass::kStep, "adamw_msam: no such pass");
    return adamw_msam_pass<Pass::kStep>(a);
  }

  static std::tuple<at::Tensor, at::Tensor> sum_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
    const c10::cuda::CUDAGuard guard(partials.device());
    at::Tensor squares = at::empty({}, partials.options().dtype(norm_dtype));
    at::Tensor nonfinite = at::empty({}, partials.options().dtype(at::kBool));
    sum_partials_kernel<<<1, kSumThreads, 0, stream()>>>(partials.data_ptr<double>(), partials.size(0),
                                                         squares.data_ptr(), kind_of(norm_dtype),
                                                         nonfinite.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {squares, nonfinite};
  }

  static void perturb(const PerturbArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = upload(a.table);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "perturb_", [&] {
      launch_segments(perturb_kernel<scalar_t>, t, a.coef, a.alpha);
    });
  }

  static at::Tensor perturbation_coef(ScalarArg sum_of_squares, ScalarArg rho, const at::Tensor& coef_old,
                                      ScalarArg found_inf) {
    const c10::cuda::CUDAGuard guard(coef_old.device());
    at::Tensor out = at::empty({}, coef_old.options());
    perturbation_coef_kernel<<<1, 1, 0, stream()>>>(sum_of_squares, rho, scalar_arg(coef_old), found_inf,
                                                    out.data_ptr(), kind_of(coef_old.scalar_type()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  static at::Tensor sam_partials(const SamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = upload(a.table);
    at::Tensor partials = empty_partials(t, a.table.device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_partials", [&] {
      launch_segments(sam_partials_kernel<scalar_t>, t, a.adaptive, partials.data_ptr<double>());
    });
    return partials;
  }

  static void sam_ascent(const SamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = upload(a.table);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_", [&] {
      launch_segments(sam_ascent_kernel<scalar_t>, t, a.scale, a.adaptive, a.found_inf);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(msam_fused, CUDA, m) {
  OpImpls<Cuda>::register_all(m);
}

}  // namespace msam_fused::cuda
