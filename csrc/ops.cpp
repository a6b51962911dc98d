// The schemas of every msam_fused op, declared once. Kernels are registered per device in
// cpu/ops.cpp and cuda/kernels.cu (both through op_impls.h); the fake (meta) kernels live in
// msam_fused/fused_ops.py. The passes of a step are described in docs/design.md.
//
// Arrays are per-parameter lists of one bucket (one device, one parameter dtype). A None
// gradient means "no gradient this step"; an empty masters list means "no master weights".
// `hyper` is the bucket's float64 hyper-parameter vector (MSAM-SGD: lr, weight_decay,
// momentum, rho; AdamW-MSAM: lr, beta1, beta2, eps, weight_decay, rho) and, like the 0-d
// tensors (coef, rho, grad_scale, found_inf), stays on the device: kernels read it there.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "kernel_types.h"

namespace msam_fused {

int64_t segment_length(c10::Device device) {
  if (device.is_cpu()) return kCpuSegmentLength;
  if (device.is_cuda()) return kCudaSegmentLength;
  TORCH_CHECK(false, "msam_fused.segment_length: no kernels for device type ", device.type());
}

}  // namespace msam_fused

TORCH_LIBRARY(msam_fused, m) {
  // 1. The read-only passes: per segment (segment_length elements of one tensor, in tensor
  //    order), the sum of squares of the new ascent direction and a non-finite marker (NaN iff
  //    a gradient entry of the segment is inf/NaN), as [segments, 2] float64.
  //    AdamW-MSAM's reads only grads and exp_avgs.
  m.def(
      "msam_sgd_partials(Tensor[] params, Tensor?[] grads, Tensor[] momenta, Tensor hyper, "
      "ScalarType norm_dtype, Tensor? grad_scale=None) -> Tensor");
  m.def(
      "adamw_msam_partials(Tensor[] params, Tensor?[] grads, Tensor[] exp_avgs, Tensor hyper, "
      "ScalarType norm_dtype, Tensor? grad_scale=None) -> Tensor");
  // 2. A bucket's (sum of squares as norm_dtype, any non-finite as bool) from its partials, in
  //    a fixed order: partials computed in pieces and concatenated in tensor order give the
  //    same bits as one pass.
  m.def("sum_segment_partials(Tensor partials, ScalarType norm_dtype) -> (Tensor, Tensor)");
  // 3. rho / (sqrt(sum_of_squares) + 1e-12) in float64 as a new tensor of coef_old's dtype
  //    (coef_old's value when found_inf is set).
  m.def("perturbation_coef(Tensor sum_of_squares, Tensor rho, Tensor coef_old, Tensor? found_inf=None) -> Tensor");
  // 4. The one write pass: remove the old perturbation (coef_old), update state and weights,
  //    apply the new one (coef_new). Steps advance where a gradient exists.
  m.def(
      "msam_sgd_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] momenta, Tensor(c!)[] masters, "
      "Tensor hyper, Tensor coef_old, Tensor coef_new, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "adamw_msam_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] masters, Tensor hyper, Tensor coef_old, "
      "Tensor coef_new, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // MSAM-SGD overlapped with backward (docs/overlap.md), float32/float64 parameters:
  // stash_ writes momenta = v' and the old momenta into the (consumed) gradients and returns
  // the partials of msam_sgd_partials; once the norm is known, finish_ writes params from them,
  // or, when found_inf is set, puts the old momenta back.
  m.def(
      "msam_sgd_overlap_stash_(Tensor[] params, Tensor(a!)[] grads, Tensor(b!)[] momenta, Tensor hyper, "
      "ScalarType norm_dtype, Tensor? grad_scale=None) -> Tensor");
  m.def(
      "msam_sgd_overlap_finish_(Tensor(a!)[] params, Tensor?[] stashes, Tensor(b!)[] momenta, Tensor hyper, "
      "Tensor coef_old, Tensor coef_new, Tensor? found_inf=None) -> ()");
  // Outside the step: params = base + alpha * coef * directions, base = masters if given, else
  // params. alpha = -1 applies the perturbation to true weights; alpha = 1 (0 with masters)
  // removes it.
  m.def("perturb_(Tensor(a!)[] params, Tensor[] directions, Tensor[] masters, Tensor coef, float alpha) -> ()");
  // SAM: the partials of g (adaptive: |w| * g) with g's non-finite markers, and the ascent
  // outs = w + e from w = params (outs = w exactly when found_inf is set); outs may be params.
  m.def("sam_ascent_partials(Tensor[] params, Tensor[] grads, bool adaptive, ScalarType norm_dtype) -> Tensor");
  m.def(
      "sam_ascent_(Tensor[] params, Tensor[] grads, Tensor(a!)[] outs, Tensor scale, "
      "bool adaptive, Tensor? found_inf=None) -> ()");
  // Elements per segment of the kernels for a device type ("cpu" or "cuda").
  m.def("segment_length(Device device) -> int", &msam_fused::segment_length);
  // Which CPU kernel set runs: "DEFAULT", "AVX2" or "AVX512" (see csrc/cpu/kernels.h).
  m.def("cpu_capability() -> str", &msam_fused::cpu::capability);
}
