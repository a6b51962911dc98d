// The arguments of each op, checked once and turned into a TensorTable, for both devices.
// Column order in each table is the order the kernels read the row's pointers in.
#pragma once

#include <ATen/ATen.h>

#include "kernel_types.h"
#include "tensor_table.h"

namespace msam_fused {

using TensorList = at::TensorList;
using OptionalTensorList = c10::List<c10::optional<at::Tensor>>;
using OptionalTensor = c10::optional<at::Tensor>;

// Columns: param, grad (absent: no gradient this step), momentum, master (optional).
struct MsamSgdArgs {
  enum { kParam, kGrad, kMomentum, kMaster, kWidth };
  TensorTable table;
  double lr, weight_decay, momentum;
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
  at::ScalarType norm_dtype;
};
// For kFinish the grads column holds the stashes (the old momenta) kStash left there.
// `partials`: the pass returns per-segment sums (only names the op in messages).
MsamSgdArgs msam_sgd_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                          TensorList momenta, TensorList masters, double lr, double weight_decay,
                          double momentum, const OptionalTensor& coef_old,
                          const OptionalTensor& coef_new, at::ScalarType norm_dtype,
                          const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                          bool partials = false);

// Columns: param, grad (optional), exp_avg, exp_avg_sq, master (optional), step.
struct AdamwMsamArgs {
  enum { kParam, kGrad, kExpAvg, kExpAvgSq, kMaster, kStep, kWidth };
  TensorTable table;
  double lr, beta1, beta2, eps, weight_decay;
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
  at::ScalarType norm_dtype;
};
// For kSumOfSquares only grads and exp_avgs are read; the other lists may be empty.
AdamwMsamArgs adamw_msam_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                              TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                              TensorList masters, double lr, double beta1, double beta2,
                              double eps, double weight_decay, const OptionalTensor& coef_old,
                              const OptionalTensor& coef_new, at::ScalarType norm_dtype,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf);

// Columns: param, direction, master (optional). params = base + alpha * coef * direction.
struct PerturbArgs {
  enum { kParam, kDirection, kMaster, kWidth };
  TensorTable table;
  double alpha;
  ScalarArg coef, found_inf;
};
PerturbArgs perturb_args(TensorList params, TensorList directions, TensorList masters,
                         const at::Tensor& coef, double alpha, const OptionalTensor& found_inf);

// Columns: param, grad, backup (only for the ascent itself).
struct SamArgs {
  enum { kParam, kGrad, kBackup, kWidth };
  TensorTable table;
  bool adaptive;
  ScalarArg scale, found_inf;
  at::ScalarType norm_dtype;
};
SamArgs sam_sum_of_squares_args(TensorList params, TensorList grads, bool adaptive,
                                at::ScalarType norm_dtype);
SamArgs sam_ascent_args(TensorList params, TensorList grads, TensorList backups,
                        const at::Tensor& scale, bool adaptive, const OptionalTensor& found_inf);

// The per-segment sums of the overlapped passes: [segments, 2] float64, contiguous.
void check_segment_partials(const at::Tensor& partials, at::ScalarType norm_dtype);

// Finalize: checks the arguments of perturbation_coef.
void check_perturbation_coef_args(const at::Tensor& sum_of_squares, double rho,
                                  const at::Tensor& coef_old, const OptionalTensor& found_inf);

}  // namespace msam_fused
