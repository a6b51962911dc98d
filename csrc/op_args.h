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

// `hyper`: the bucket's float64 hyper-parameter vector on the params' device (kernel_types.h
// says which entry is which). On CUDA only the kernels read it; on the CPU the values are
// also checked when the op starts.
// A grad may be absent (no gradient this step), the masters list may be empty.
struct MsamSgdArgs : MsamSgdColumns {
  TensorTable table;
  const double* hyper;
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
};
// For kFinish the grads column holds the stashes (the old momenta) kStash left there.
MsamSgdArgs msam_sgd_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                          TensorList momenta, TensorList masters, const at::Tensor& hyper,
                          const OptionalTensor& coef_old, const OptionalTensor& coef_new,
                          const OptionalTensor& grad_scale, const OptionalTensor& found_inf);

struct AdamwMsamArgs : AdamwMsamColumns {
  TensorTable table;
  const double* hyper;
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
};
// For kPartials only grads and exp_avgs are read; the other lists are empty.
AdamwMsamArgs adamw_msam_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                              TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                              TensorList masters, const at::Tensor& hyper,
                              const OptionalTensor& coef_old, const OptionalTensor& coef_new,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf);

// params = base + alpha * coef * direction.
struct PerturbArgs : PerturbColumns {
  TensorTable table;
  double alpha;
  ScalarArg coef;
};
PerturbArgs perturb_args(TensorList params, TensorList directions, TensorList masters,
                         const at::Tensor& coef, double alpha);

struct SamArgs : SamColumns {
  TensorTable table;
  bool adaptive;
  ScalarArg scale, found_inf;
};
SamArgs sam_partials_args(TensorList params, TensorList grads, bool adaptive);
SamArgs sam_ascent_args(TensorList params, TensorList grads, TensorList outs,
                        const at::Tensor& scale, bool adaptive, const OptionalTensor& found_inf);

// norm_dtype of the passes that return partials: float32 or float64.
void check_norm_dtype(const char* op, at::ScalarType norm_dtype);

// The per-segment partial sums the read-only passes return: [segments, 2] float64, contiguous.
void check_segment_partials(const at::Tensor& partials, at::ScalarType norm_dtype);

// The arguments of perturbation_coef.
void check_perturbation_coef_args(const at::Tensor& sum_of_squares, const at::Tensor& rho,
                                  const at::Tensor& coef_old, const OptionalTensor& found_inf);

}  // namespace msam_fused
