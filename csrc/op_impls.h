// The op functions behind the schemas of ops.cpp, written once for every device: check the
// arguments (op_args.h), run the device's pass, write results back into tensors the kernels
// could not walk in place, and shape what the pass summed into the op's result.
//
// A Device (cpu/ops.cpp, cuda/kernels.cu) provides the passes. Those that sum return an
// object with result(norm_dtype) -> (sum of squares, non-finite flag); a step skipped by
// found_inf writes nothing, and its sums are never used (the coefficient keeps its value).
#pragma once

#include <torch/library.h>

#include <tuple>

#include "op_args.h"

namespace msam_fused {

template <class Device>
struct OpImpls {
  using Sums2 = std::tuple<at::Tensor, at::Tensor>;

  static Sums2 msam_sgd_sum_of_squares(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                                       double weight_decay, double momentum, at::ScalarType norm_dtype,
                                       const OptionalTensor& grad_scale) {
    MsamSgdArgs a = msam_sgd_args(Pass::kSumOfSquares, params, grads, momenta, {}, 0.0, weight_decay, momentum,
                                  {}, {}, norm_dtype, grad_scale, {});
    return finish(a, Device::msam_sgd(Pass::kSumOfSquares, a), norm_dtype);
  }

  static at::Tensor msam_sgd_update(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                                    TensorList masters, double lr, double weight_decay, double momentum,
                                    const at::Tensor& coef, at::ScalarType norm_dtype,
                                    const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    MsamSgdArgs a = msam_sgd_args(Pass::kUpdate, params, grads, momenta, masters, lr, weight_decay, momentum,
                                  coef, {}, norm_dtype, grad_scale, found_inf);
    return std::get<0>(finish(a, Device::msam_sgd(Pass::kUpdate, a), norm_dtype));
  }

  static void msam_sgd_step(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                            TensorList masters, double lr, double weight_decay, double momentum,
                            const at::Tensor& coef_old, const at::Tensor& coef_new,
                            const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    MsamSgdArgs a = msam_sgd_args(Pass::kStep, params, grads, momenta, masters, lr, weight_decay, momentum,
                                  coef_old, coef_new, at::kFloat, grad_scale, found_inf);
    Device::msam_sgd(Pass::kStep, a);
    a.table.write_back();
  }

  // The overlapped step (docs/overlap.md): passes that return per-segment partial sums,
  // added up by sum_segment_partials in the order and arithmetic of the passes above.
  static at::Tensor msam_sgd_overlap_norm(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                                          double weight_decay, double momentum, at::ScalarType norm_dtype,
                                          const OptionalTensor& grad_scale) {
    MsamSgdArgs a = msam_sgd_args(Pass::kSumOfSquares, params, grads, momenta, {}, 0.0, weight_decay, momentum,
                                  {}, {}, norm_dtype, grad_scale, {}, /*partials=*/true);
    at::Tensor partials = Device::msam_sgd_partials(Pass::kSumOfSquares, a);
    a.table.write_back();
    return partials;
  }

  static at::Tensor msam_sgd_overlap_stash(TensorList params, TensorList grads, TensorList momenta,
                                           double weight_decay, double momentum, at::ScalarType norm_dtype,
                                           const OptionalTensor& grad_scale) {
    OptionalTensorList present;
    present.reserve(grads.size());
    for (const at::Tensor& g : grads) present.push_back(g);
    MsamSgdArgs a = msam_sgd_args(Pass::kStash, params, present, momenta, {}, 0.0, weight_decay, momentum, {},
                                  {}, norm_dtype, grad_scale, {}, /*partials=*/true);
    at::Tensor partials = Device::msam_sgd_partials(Pass::kStash, a);
    a.table.write_back();
    return partials;
  }

  static void msam_sgd_overlap_finish(TensorList params, const OptionalTensorList& stashes, TensorList momenta,
                                      double lr, const at::Tensor& coef_old, const at::Tensor& coef_new,
                                      const OptionalTensor& found_inf) {
    MsamSgdArgs a = msam_sgd_args(Pass::kFinish, params, stashes, momenta, {}, lr, 0.0, 0.0, coef_old, coef_new,
                                  at::kFloat, {}, found_inf);
    Device::msam_sgd(Pass::kFinish, a);
    a.table.write_back();
  }

  static Sums2 sum_segment_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
    check_segment_partials(partials, norm_dtype);
    return Device::sum_partials(partials, norm_dtype);
  }

  static Sums2 adamw_msam_sum_of_squares(TensorList params, const OptionalTensorList& grads,
                                         TensorList exp_avgs, double beta1, at::ScalarType norm_dtype,
                                         const OptionalTensor& grad_scale) {
    AdamwMsamArgs a = adamw_msam_args(Pass::kSumOfSquares, params, grads, exp_avgs, {}, {}, {}, 0.0, beta1,
                                      0.0, 0.0, 0.0, {}, {}, norm_dtype, grad_scale, {});
    return finish(a, Device::adamw_msam(Pass::kSumOfSquares, a), norm_dtype);
  }

  static at::Tensor adamw_msam_update(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                                      TensorList exp_avg_sqs, TensorList steps, TensorList masters, double lr,
                                      double beta1, double beta2, double eps, double weight_decay,
                                      const at::Tensor& coef, at::ScalarType norm_dtype,
                                      const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    AdamwMsamArgs a = adamw_msam_args(Pass::kUpdate, params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr,
                                      beta1, beta2, eps, weight_decay, coef, {}, norm_dtype, grad_scale,
                                      found_inf);
    return std::get<0>(finish(a, Device::adamw_msam(Pass::kUpdate, a), norm_dtype));
  }

  static void adamw_msam_step(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                              TensorList exp_avg_sqs, TensorList steps, TensorList masters, double lr,
                              double beta1, double beta2, double eps, double weight_decay,
                              const at::Tensor& coef_old, const at::Tensor& coef_new,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    AdamwMsamArgs a = adamw_msam_args(Pass::kStep, params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr,
                                      beta1, beta2, eps, weight_decay, coef_old, coef_new, at::kFloat,
                                      grad_scale, found_inf);
    Device::adamw_msam(Pass::kStep, a);
    a.table.write_back();
  }

  static void perturb(TensorList params, TensorList directions, TensorList masters, const at::Tensor& coef,
                      double alpha, const OptionalTensor& found_inf) {
    PerturbArgs a = perturb_args(params, directions, masters, coef, alpha, found_inf);
    Device::perturb(a);
    a.table.write_back();
  }

  static at::Tensor perturbation_coef(const at::Tensor& sum_of_squares, double rho, const at::Tensor& coef_old,
                                      const OptionalTensor& found_inf) {
    check_perturbation_coef_args(sum_of_squares, rho, coef_old, found_inf);
    return Device::perturbation_coef(scalar_arg(sum_of_squares), rho, coef_old, scalar_arg(found_inf));
  }

  static at::Tensor sam_ascent_sum_of_squares(TensorList params, TensorList grads, bool adaptive,
                                              at::ScalarType norm_dtype) {
    SamArgs a = sam_sum_of_squares_args(params, grads, adaptive, norm_dtype);
    return std::get<0>(finish(a, Device::sam_sum_of_squares(a), norm_dtype));
  }

  static void sam_ascent(TensorList params, TensorList grads, TensorList backups, const at::Tensor& scale,
                         bool adaptive, const OptionalTensor& found_inf) {
    SamArgs a = sam_ascent_args(params, grads, backups, scale, adaptive, found_inf);
    Device::sam_ascent(a);
    a.table.write_back();
  }

  // Registers every op for the device's dispatch key.
  static void register_all(torch::Library& m) {
    m.impl("msam_sgd_sum_of_squares", &msam_sgd_sum_of_squares);
    m.impl("msam_sgd_update_", &msam_sgd_update);
    m.impl("msam_sgd_step_", &msam_sgd_step);
    m.impl("msam_sgd_overlap_norm", &msam_sgd_overlap_norm);
    m.impl("msam_sgd_overlap_stash_", &msam_sgd_overlap_stash);
    m.impl("msam_sgd_overlap_finish_", &msam_sgd_overlap_finish);
    m.impl("sum_segment_partials", &sum_segment_partials);
    m.impl("adamw_msam_sum_of_squares", &adamw_msam_sum_of_squares);
    m.impl("adamw_msam_update_", &adamw_msam_update);
    m.impl("adamw_msam_step_", &adamw_msam_step);
    m.impl("perturbation_coef", &perturbation_coef);
    m.impl("perturb_", &perturb);
    m.impl("sam_ascent_sum_of_squares", &sam_ascent_sum_of_squares);
    m.impl("sam_ascent_", &sam_ascent);
  }

 private:
  template <typename Args, typename Summed>
  static Sums2 finish(Args& a, const Summed& summed, at::ScalarType norm_dtype) {
    a.table.write_back();
    return summed.result(norm_dtype);
  }
};

}  // namespace msam_fused
