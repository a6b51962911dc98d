// The schemas of every msam_fused op, declared once. Kernels are registered per device in
// cpu/kernels.cpp and cuda/kernels.cu; the fake (meta) kernels live in msam_fused/fused_ops.py.
//
// Arrays are per-parameter lists of one bucket (one device, one parameter dtype). A None
// gradient means "no gradient this step"; an empty masters list means "no master weights".
// Scalar tensors (coef, grad_scale, found_inf) stay on the device: kernels read them there.
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
  // MSAM-SGD (SPEC §1), in two passes either way:
  // * sum_of_squares (reads only) -> (sum of squares of the new momenta in norm_dtype,
  //   whether any gradient holds inf/NaN), then step_ (the whole step, given both
  //   coefficients): the fast path, with the non-finite check folded into the first pass;
  // * update_ (steps 1-4: true weights into params or masters, momenta updated; returns the
  //   sum of squares), then perturb_: the backend contract's split.
  m.def(
      "msam_sgd_sum_of_squares(Tensor[] params, Tensor?[] grads, Tensor[] momenta, "
      "float weight_decay, float momentum, ScalarType norm_dtype, Tensor? grad_scale=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "msam_sgd_update_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] momenta, "
      "Tensor(c!)[] masters, float lr, float weight_decay, float momentum, Tensor coef, "
      "ScalarType norm_dtype, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  m.def(
      "msam_sgd_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] momenta, "
      "Tensor(c!)[] masters, float lr, float weight_decay, float momentum, Tensor coef_old, "
      "Tensor coef_new, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // MSAM-SGD overlapped with backward (docs/overlap.md), per bucket of parameters whose
  // gradients are ready; each returns its per-segment sums, [segments, 2] float64 (squares of
  // the new momenta, non-finite markers), and sum_segment_partials adds a bucket's partials
  // exactly as the passes above add theirs, so the norm is bit for bit that of the plain step.
  // * overlap_norm: the read-only first pass (any dtype);
  // * overlap_stash_ (float32/float64): momenta = v' and the old momenta into the gradients
  //   (consumed); then, once the norm is known, overlap_finish_ writes params from them, or,
  //   when found_inf is set, puts the old momenta back.
  m.def(
      "msam_sgd_overlap_norm(Tensor[] params, Tensor?[] grads, Tensor[] momenta, float weight_decay, "
      "float momentum, ScalarType norm_dtype, Tensor? grad_scale=None) -> Tensor");
  m.def(
      "msam_sgd_overlap_stash_(Tensor[] params, Tensor(a!)[] grads, Tensor(b!)[] momenta, "
      "float weight_decay, float momentum, ScalarType norm_dtype, Tensor? grad_scale=None) -> Tensor");
  m.def(
      "msam_sgd_overlap_finish_(Tensor(a!)[] params, Tensor?[] stashes, Tensor(b!)[] momenta, float lr, "
      "Tensor coef_old, Tensor coef_new, Tensor? found_inf=None) -> ()");
  m.def("sum_segment_partials(Tensor partials, ScalarType norm_dtype) -> (Tensor, Tensor)");
  // Elements per segment of the kernels for a device type ("cpu" or "cuda").
  m.def("segment_length(Device device) -> int", &msam_fused::segment_length);
  // AdamW-MSAM, the same three; steps advance where a gradient exists.
  m.def(
      "adamw_msam_sum_of_squares(Tensor[] params, Tensor?[] grads, Tensor[] exp_avgs, "
      "float beta1, ScalarType norm_dtype, Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def(
      "adamw_msam_update_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] masters, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, Tensor coef, ScalarType norm_dtype, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  m.def(
      "adamw_msam_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] masters, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, Tensor coef_old, Tensor coef_new, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Finalize: rho / (sqrt(sum_of_squares) + 1e-12) as a new tensor of coef_old's dtype
  // (coef_old itself when found_inf is set).
  m.def("perturbation_coef(Tensor sum_of_squares, float rho, Tensor coef_old, Tensor? found_inf=None) -> Tensor");
  // params = base + alpha * coef * directions, base = masters if given, else params.
  // alpha = -1 applies the perturbation to true weights; alpha = 1 (0 with masters) removes it.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] directions, Tensor[] masters, Tensor coef, "
      "float alpha, Tensor? found_inf=None) -> ()");
  // SAM: the sum of squares of g (adaptive: |w| * g), and the ascent w -> w + e with w saved.
  m.def("sam_ascent_sum_of_squares(Tensor[] params, Tensor[] grads, bool adaptive, ScalarType norm_dtype) -> Tensor");
  // Which CPU kernel set runs: "DEFAULT", "AVX2" or "AVX512" (see csrc/cpu/kernels.h).
  m.def("cpu_capability() -> str", &msam_fused::cpu::capability);
  m.def(
      "sam_ascent_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
      "bool adaptive, Tensor? found_inf=None) -> ()");
}
