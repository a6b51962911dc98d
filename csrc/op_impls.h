// The op functions behind the schemas of ops.cpp, written once for every device: check the
// arguments (op_args.h), run the device's pass, and write results back into tensors the
// kernels could not walk in place.
//
// A Device (cpu/ops.cpp, cuda/kernels.cu) provides the passes. The read-only passes return
// their per-segment partial sums, [segments, 2] float64 (sum of squares of the new ascent
// direction, non-finite marker of the gradients), in segment order; sum_segment_partials adds
// them up in a fixed order. A step skipped by found_inf writes nothing.
#pragma once

#include <torch/library.h>

#include <tuple>

#include "op_args.h"

namespace msam_fused {

template <class Device>
struct OpImpls {
  static at::Tensor msam_sgd_partials(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                                      const at::Tensor& hyper, at::ScalarType norm_dtype,
                                      const OptionalTensor& grad_scale) {
    check_norm_dtype("msam_sgd_partials", norm_dtype);
    MsamSgdArgs a = msam_sgd_args(Pass::kPartials, params, grads, momenta, {}, hyper, {}, {}, grad_scale, {});
    return run(a, Device::msam_sgd(Pass::kPartials, a));
  }

  static void msam_sgd_step(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                            TensorList masters, const at::Tensor& hyper, const at::Tensor& coef_old,
                            const at::Tensor& coef_new, const OptionalTensor& grad_scale,
                            const OptionalTensor& found_inf) {
    MsamSgdArgs a = msam_sgd_args(Pass::kStep, params, grads, momenta, masters, hyper, coef_old, coef_new,
                                  grad_scale, found_inf);
    run(a, Device::msam_sgd(Pass::kStep, a));
  }

  // The overlapped step (docs/overlap.md).
  static at::Tensor msam_sgd_overlap_stash(TensorList params, TensorList grads, TensorList momenta,
                                           const at::Tensor& hyper, at::ScalarType norm_dtype,
                                           const OptionalTensor& grad_scale) {
    check_norm_dtype("msam_sgd_overlap_stash_", norm_dtype);
    OptionalTensorList present;
    present.reserve(grads.size());
    for (const at::Tensor& g : grads) present.push_back(g);
    MsamSgdArgs a = msam_sgd_args(Pass::kStash, params, present, momenta, {}, hyper, {}, {}, grad_scale, {});
    return run(a, Device::msam_sgd(Pass::kStash, a));
  }

  static void msam_sgd_overlap_finish(TensorList params, const OptionalTensorList& stashes, TensorList momenta,
                                      const at::Tensor& hyper, const at::Tensor& coef_old,
                                      const at::Tensor& coef_new, const OptionalTensor& found_inf) {
    MsamSgdArgs a = msam_sgd_args(Pass::kFinish, params, stashes, momenta, {}, hyper, coef_old, coef_new, {},
                                  found_inf);
    run(a, Device::msam_sgd(Pass::kFinish, a));
  }

  static std::tuple<at::Tensor, at::Tensor> sum_segment_partials(const at::Tensor& partials,
                                                                 at::ScalarType norm_dtype) {
    check_segment_partials(partials, norm_dtype);
    return Device::sum_partials(partials, norm_dtype);
  }

  static at::Tensor adamw_msam_partials(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                                        const at::Tensor& hyper, at::ScalarType norm_dtype,
                                        const OptionalTensor& grad_scale) {
    check_norm_dtype("adamw_msam_partials", norm_dtype);
    AdamwMsamArgs a = adamw_msam_args(Pass::kPartials, params, grads, exp_avgs, {}, {}, {}, hyper, {}, {},
                                      grad_scale, {});
    return run(a, Device::adamw_msam(Pass::kPartials, a));
  }

  static void adamw_msam_step(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                              TensorList exp_avg_sqs, TensorList steps, TensorList masters,
                              const at::Tensor& hyper, const at::Tensor& coef_old, const at::Tensor& coef_new,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    AdamwMsamArgs a = adamw_msam_args(Pass::kStep, params, grads, exp_avgs, exp_avg_sqs, steps, masters, hyper,
                                      coef_old, coef_new, grad_scale, found_inf);
    run(a, Device::adamw_msam(Pass::kStep, a));
  }

  static void perturb(TensorList params, TensorList directions, TensorList masters, const at::Tensor& coef,
                      double alpha) {
    PerturbArgs a = perturb_args(params, directions, masters, coef, alpha);
    Device::perturb(a);
    a.table.write_back();
  }

  static at::Tensor perturbation_coef(const at::Tensor& sum_of_squares, const at::Tensor& rho,
                                      const at::Tensor& coef_old, const OptionalTensor& found_inf) {
    check_perturbation_coef_args(sum_of_squares, rho, coef_old, found_inf);
    return Device::perturbation_coef(scalar_arg(sum_of_squares), scalar_arg(rho), coef_old,
                                     scalar_arg(found_inf));
  }

  static at::Tensor sam_ascent_partials(TensorList params, TensorList grads, bool adaptive,
                                        at::ScalarType norm_dtype) {
    check_norm_dtype("sam_ascent_partials", norm_dtype);
    SamArgs a = sam_partials_args(params, grads, adaptive);
    return run(a, Device::sam_partials(a));
  }

  static void sam_ascent(TensorList params, TensorList grads, TensorList outs, const at::Tensor& scale,
                         bool adaptive, const OptionalTensor& found_inf) {
    SamArgs a = sam_ascent_args(params, grads, outs, scale, adaptive, found_inf);
    Device::sam_ascent(a);
    a.table.write_back();
  }

  // Registers every op for the device's dispatch key.
  static void register_all(torch::Library& m) {
    m.impl("msam_sgd_partials", &msam_sgd_partials);
    m.impl("msam_sgd_step_", &msam_sgd_step);
    m.impl("msam_sgd_overlap_stash_", &msam_sgd_overlap_stash);
    m.impl("msam_sgd_overlap_finish_", &msam_sgd_overlap_finish);
    m.impl("sum_segment_partials", &sum_segment_partials);
    m.impl("adamw_msam_partials", &adamw_msam_partials);
    m.impl("adamw_msam_step_", &adamw_msam_step);
    m.impl("perturbation_coef", &perturbation_coef);
    m.impl("perturb_", &perturb);
    m.impl("sam_ascent_partials", &sam_ascent_partials);
    m.impl("sam_ascent_", &sam_ascent);
  }

 private:
  // Copies results out of temporaries once the pass has run; the pass's partials (undefined
  // for a pass that returns none).
  template <typename Args>
  static at::Tensor run(Args& a, at::Tensor partials) {
    a.table.write_back();
    return partials;
  }
};

}  // namespace msam_fused
