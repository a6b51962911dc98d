// The CPU implementations of the msam_fused ops: check the arguments, read the 0-d scalars
// (CPU tensors, so this is no device sync), run the kernels of the best CPU capability.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "../functors.h"
#include "kernels.h"

namespace msam_fused::cpu {

std::vector<const Kernels*> runnable_kernels() {
  std::vector<const Kernels*> out = {default_kernels()};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx2 && avx2_kernels()) out.push_back(avx2_kernels());
  if (avx512 && avx512_kernels()) out.push_back(avx512_kernels());
#endif
  return out;
}

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    // ATEN_CPU_CAPABILITY=default|avx2|avx512 caps the choice, as it does for ATen's kernels.
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = env != nullptr ? env : "avx512";
    const size_t widest = cap == "default" ? 0 : cap == "avx2" ? 1 : 2;
    const std::vector<const Kernels*> runnable = runnable_kernels();
    return runnable[std::min(widest, runnable.size() - 1)];
  }();
  return *chosen;
}

std::string capability() { return kernels().capability; }

namespace {

template <typename Args>
PassScalars pass_scalars(const Args& a) {
  return {read_scalar(a.coef_old, 0.0), read_scalar(a.coef_new, 0.0), read_scalar(a.grad_scale, 1.0),
          a.grad_scale.kind != ScalarKind::kAbsent};
}

std::tuple<at::Tensor, at::Tensor> sum_of_squares_result(const Sums& total, at::ScalarType norm_dtype,
                                                         at::Device device) {
  return {scalar_tensor(total.squares, norm_dtype, device),
          scalar_tensor(std::isnan(total.nonfinite) ? 1.0 : 0.0, at::kBool, device)};
}

// ------------------------------------------------------------------------------ MSAM-SGD
std::tuple<at::Tensor, at::Tensor> msam_sgd_sum_of_squares(
    TensorList params, const OptionalTensorList& grads, TensorList momenta, double weight_decay,
    double momentum, at::ScalarType norm_dtype, const OptionalTensor& grad_scale) {
  const MsamSgdArgs a = msam_sgd_args(Pass::kSumOfSquares, params, grads, momenta, {}, 0.0, weight_decay,
                                      momentum, {}, {}, norm_dtype, grad_scale, {});
  return sum_of_squares_result(kernels().msam_sgd(Pass::kSumOfSquares, a, pass_scalars(a)), norm_dtype,
                               params[0].device());
}

at::Tensor msam_sgd_update(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                           TensorList masters, double lr, double weight_decay, double momentum,
                           const at::Tensor& coef, at::ScalarType norm_dtype,
                           const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  MsamSgdArgs a = msam_sgd_args(Pass::kUpdate, params, grads, momenta, masters, lr, weight_decay, momentum,
                                coef, {}, norm_dtype, grad_scale, found_inf);
  Sums total;
  if (!step_skipped(a.found_inf)) {
    total = kernels().msam_sgd(Pass::kUpdate, a, pass_scalars(a));
    a.table.write_back();
  }
  return scalar_tensor(total.squares, norm_dtype, params[0].device());
}

void msam_sgd_step(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                   TensorList masters, double lr, double weight_decay, double momentum,
                   const at::Tensor& coef_old, const at::Tensor& coef_new,
                   const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  MsamSgdArgs a = msam_sgd_args(Pass::kStep, params, grads, momenta, masters, lr, weight_decay, momentum,
                                coef_old, coef_new, at::kFloat, grad_scale, found_inf);
  if (step_skipped(a.found_inf)) return;
  kernels().msam_sgd(Pass::kStep, a, pass_scalars(a));
  a.table.write_back();
}

// ---------------------------------------------------------------------------- AdamW-MSAM
// Runs a pass that writes: bias corrections at each row's new step count, read before any
// count advances; the counts of rows with a gradient advance afterwards.
Sums adamw_msam_writing_pass(Pass pass, AdamwMsamArgs& a) {
  using A = AdamwMsamArgs;
  std::vector<AdamBias> bias(a.table.rows());
  for (int64_t r = 0; r < a.table.rows(); ++r) {
    const float t_new = *static_cast<float*>(a.table.ptr(r, A::kStep)) + 1.0f;
    bias[r] = adam_bias(a.lr, a.beta1, a.beta2, t_new);
  }
  const Sums total = kernels().adamw_msam(pass, a, pass_scalars(a), bias);
  for (int64_t r = 0; r < a.table.rows(); ++r) {
    if (a.table.ptr(r, A::kGrad) != nullptr) *static_cast<float*>(a.table.ptr(r, A::kStep)) += 1.0f;
  }
  a.table.write_back();
  return total;
}

std::tuple<at::Tensor, at::Tensor> adamw_msam_sum_of_squares(
    TensorList params, const OptionalTensorList& grads, TensorList exp_avgs, double beta1,
    at::ScalarType norm_dtype, const OptionalTensor& grad_scale) {
  const AdamwMsamArgs a = adamw_msam_args(Pass::kSumOfSquares, params, grads, exp_avgs, {}, {}, {}, 0.0,
                                          beta1, 0.0, 0.0, 0.0, {}, {}, norm_dtype, grad_scale, {});
  const Sums total = kernels().adamw_msam(Pass::kSumOfSquares, a, pass_scalars(a), {});
  return sum_of_squares_result(total, norm_dtype, params[0].device());
}

at::Tensor adamw_msam_update(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                             TensorList exp_avg_sqs, TensorList steps, TensorList masters, double lr,
                             double beta1, double beta2, double eps, double weight_decay,
                             const at::Tensor& coef, at::ScalarType norm_dtype,
                             const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  AdamwMsamArgs a = adamw_msam_args(Pass::kUpdate, params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr,
                                    beta1, beta2, eps, weight_decay, coef, {}, norm_dtype, grad_scale,
                                    found_inf);
  const Sums total = step_skipped(a.found_inf) ? Sums{} : adamw_msam_writing_pass(Pass::kUpdate, a);
  return scalar_tensor(total.squares, norm_dtype, params[0].device());
}

void adamw_msam_step(TensorList params, const OptionalTensorList& grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, TensorList steps, TensorList masters, double lr, double beta1,
                     double beta2, double eps, double weight_decay, const at::Tensor& coef_old,
                     const at::Tensor& coef_new, const OptionalTensor& grad_scale,
                     const OptionalTensor& found_inf) {
  AdamwMsamArgs a = adamw_msam_args(Pass::kStep, params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr,
                                    beta1, beta2, eps, weight_decay, coef_old, coef_new, at::kFloat,
                                    grad_scale, found_inf);
  if (!step_skipped(a.found_inf)) adamw_msam_writing_pass(Pass::kStep, a);
}

// ------------------------------------------------------------------- perturbation, finalize
void perturb(TensorList params, TensorList directions, TensorList masters, const at::Tensor& coef,
             double alpha, const OptionalTensor& found_inf) {
  PerturbArgs a = perturb_args(params, directions, masters, coef, alpha, found_inf);
  if (step_skipped(a.found_inf)) return;
  kernels().perturb(a, alpha * read_scalar(a.coef, 0.0));
  a.table.write_back();
}

at::Tensor perturbation_coef(const at::Tensor& sum_of_squares, double rho, const at::Tensor& coef_old,
                             const OptionalTensor& found_inf) {
  check_perturbation_coef_args(sum_of_squares, rho, coef_old, found_inf);
  if (step_skipped(scalar_arg(found_inf))) return coef_old.clone();
  const double sum = read_scalar(scalar_arg(sum_of_squares), 0.0);
  return scalar_tensor(msam_fused::perturbation_coef(sum, rho), coef_old.scalar_type(), coef_old.device());
}

// ----------------------------------------------------------------------------------- SAM
at::Tensor sam_ascent_sum_of_squares(TensorList params, TensorList grads, bool adaptive,
                                     at::ScalarType norm_dtype) {
  SamArgs a = sam_sum_of_squares_args(params, grads, adaptive, norm_dtype);
  const double total = kernels().sam_sum_of_squares(a);
  a.table.write_back();
  return scalar_tensor(total, norm_dtype, params[0].device());
}

void sam_ascent(TensorList params, TensorList grads, TensorList backups, const at::Tensor& scale,
                bool adaptive, const OptionalTensor& found_inf) {
  SamArgs a = sam_ascent_args(params, grads, backups, scale, adaptive, found_inf);
  kernels().sam_ascent(a, read_scalar(a.scale, 0.0), step_skipped(a.found_inf));
  a.table.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(msam_fused, CPU, m) {
  m.impl("msam_sgd_sum_of_squares", &msam_sgd_sum_of_squares);
  m.impl("msam_sgd_update_", &msam_sgd_update);
  m.impl("msam_sgd_step_", &msam_sgd_step);
  m.impl("adamw_msam_sum_of_squares", &adamw_msam_sum_of_squares);
  m.impl("adamw_msam_update_", &adamw_msam_update);
  m.impl("adamw_msam_step_", &adamw_msam_step);
  m.impl("perturbation_coef", &perturbation_coef);
  m.impl("perturb_", &perturb);
  m.impl("sam_ascent_sum_of_squares", &sam_ascent_sum_of_squares);
  m.impl("sam_ascent_", &sam_ascent);
}

}  // namespace msam_fused::cpu
