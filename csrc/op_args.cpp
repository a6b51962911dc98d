#include "op_args.h"

#include <sstream>

namespace msam_fused {
namespace {

const at::Tensor kAbsent;

void check_lengths(const TableBuilder& b, size_t n, const char* list, size_t size, bool optional) {
  if (size == n || (optional && size == 0)) return;
  std::ostringstream msg;
  msg << list << " has " << size << " tensors but params has " << n
      << (optional ? " (pass all or none)" : "");
  b.fail(msg.str());
}

void check_norm_dtype(const TableBuilder& b, at::ScalarType norm_dtype) {
  if (norm_dtype != at::kFloat && norm_dtype != at::kDouble) {
    b.fail(std::string("norm_dtype must be float32 or float64, got ") + c10::toString(norm_dtype));
  }
}

void check_hyper(const TableBuilder& b, const char* name, double value) {
  if (!(value >= 0.0)) b.fail(std::string(name) + " must be a non-negative number, got " + std::to_string(value));
}

const at::Tensor& first_param(const char* op, TensorList params) {
  TORCH_CHECK(!params.empty(), "msam_fused.", op, ": params is empty");
  return params[0];
}

const char* op_name(Pass pass, const char* sum_of_squares, const char* update, const char* step) {
  return pass == Pass::kSumOfSquares ? sum_of_squares : pass == Pass::kUpdate ? update : step;
}

const char* msam_sgd_op_name(Pass pass, bool partials) {
  switch (pass) {
    case Pass::kStash: return "msam_sgd_overlap_stash_";
    case Pass::kFinish: return "msam_sgd_overlap_finish_";
    default:
      return partials ? "msam_sgd_overlap_norm"
                      : op_name(pass, "msam_sgd_sum_of_squares", "msam_sgd_update_", "msam_sgd_step_");
  }
}

const at::Tensor* optional_at(TensorList list, size_t i) {
  return list.empty() ? &kAbsent : &list[i];
}

}  // namespace

MsamSgdArgs msam_sgd_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                          TensorList momenta, TensorList masters, double lr, double weight_decay,
                          double momentum, const OptionalTensor& coef_old,
                          const OptionalTensor& coef_new, at::ScalarType norm_dtype,
                          const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                          bool partials) {
  const char* op = msam_sgd_op_name(pass, partials);
  const bool writes_params = pass == Pass::kUpdate || pass == Pass::kStep || pass == Pass::kFinish;
  const bool overlapped = pass == Pass::kStash || pass == Pass::kFinish;
  TableBuilder b(op,
                 {{"params", Role::kParam, writes_params},
                  {overlapped && pass == Pass::kFinish ? "stashes" : "grads", Role::kLikeParam, pass == Pass::kStash},
                  {"momenta", Role::kState, pass != Pass::kSumOfSquares},
                  {"masters", Role::kMaster, writes_params}},
                 first_param(op, params));
  if (overlapped && state_dtype(params[0].scalar_type()) != params[0].scalar_type()) {
    b.fail(std::string("params have dtype ") + c10::toString(params[0].scalar_type()) +
           "; the overlapped step keeps the old momentum in the gradient's memory, which needs "
           "float32 or float64 parameters (their momenta have their dtype)");
  }
  const size_t n = params.size();
  check_lengths(b, n, "grads", grads.size(), false);
  check_lengths(b, n, "momenta", momenta.size(), false);
  check_lengths(b, n, "masters", masters.size(), true);
  check_norm_dtype(b, norm_dtype);
  check_hyper(b, "lr", lr);
  check_hyper(b, "weight_decay", weight_decay);
  check_hyper(b, "momentum", momentum);
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> g = grads[i];
    b.add_row(i, {&params[i], g.has_value() ? &*g : &kAbsent, &momenta[i], optional_at(masters, i)});
  }
  MsamSgdArgs args{b.finish(), lr, weight_decay, momentum, {}, {}, {}, {}, norm_dtype};
  args.coef_old = b.scalar("coef_old", coef_old, false);
  args.coef_new = b.scalar("coef_new", coef_new, false);
  args.grad_scale = b.scalar("grad_scale", grad_scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

AdamwMsamArgs adamw_msam_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                              TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                              TensorList masters, double lr, double beta1, double beta2,
                              double eps, double weight_decay, const OptionalTensor& coef_old,
                              const OptionalTensor& coef_new, at::ScalarType norm_dtype,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  const char* op = op_name(pass, "adamw_msam_sum_of_squares", "adamw_msam_update_", "adamw_msam_step_");
  const bool writes = pass != Pass::kSumOfSquares;
  TableBuilder b(op,
                 {{"params", Role::kParam, writes}, {"grads", Role::kLikeParam, false},
                  {"exp_avgs", Role::kState, writes}, {"exp_avg_sqs", Role::kState, writes},
                  {"masters", Role::kMaster, writes}, {"steps", Role::kStep, writes}},
                 first_param(op, params));
  const size_t n = params.size();
  check_lengths(b, n, "grads", grads.size(), false);
  check_lengths(b, n, "exp_avgs", exp_avgs.size(), false);
  check_lengths(b, n, "exp_avg_sqs", exp_avg_sqs.size(), !writes);
  check_lengths(b, n, "steps", steps.size(), !writes);
  check_lengths(b, n, "masters", masters.size(), true);
  check_norm_dtype(b, norm_dtype);
  check_hyper(b, "lr", lr);
  check_hyper(b, "eps", eps);
  check_hyper(b, "weight_decay", weight_decay);
  if (!(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0)) {
    b.fail("betas must lie in [0, 1), got (" + std::to_string(beta1) + ", " + std::to_string(beta2) + ")");
  }
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> g = grads[i];
    b.add_row(i, {&params[i], g.has_value() ? &*g : &kAbsent, &exp_avgs[i],
                  optional_at(exp_avg_sqs, i), optional_at(masters, i), optional_at(steps, i)});
  }
  AdamwMsamArgs args{b.finish(), lr, beta1, beta2, eps, weight_decay, {}, {}, {}, {}, norm_dtype};
  args.coef_old = b.scalar("coef_old", coef_old, false);
  args.coef_new = b.scalar("coef_new", coef_new, false);
  args.grad_scale = b.scalar("grad_scale", grad_scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

PerturbArgs perturb_args(TensorList params, TensorList directions, TensorList masters,
                         const at::Tensor& coef, double alpha, const OptionalTensor& found_inf) {
  const char* op = "perturb_";
  TableBuilder b(op,
                 {{"params", Role::kParam, true}, {"directions", Role::kState, false},
                  {"masters", Role::kMaster, false}},
                 first_param(op, params));
  const size_t n = params.size();
  check_lengths(b, n, "directions", directions.size(), false);
  check_lengths(b, n, "masters", masters.size(), true);
  for (size_t i = 0; i < n; ++i) b.add_row(i, {&params[i], &directions[i], optional_at(masters, i)});
  PerturbArgs args{b.finish(), alpha, {}, {}};
  args.coef = b.scalar("coef", coef, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

SamArgs sam_sum_of_squares_args(TensorList params, TensorList grads, bool adaptive,
                                at::ScalarType norm_dtype) {
  const char* op = "sam_ascent_sum_of_squares";
  TableBuilder b(op,
                 {{"params", Role::kParam, false}, {"grads", Role::kLikeParam, false},
                  {"backups", Role::kLikeParam, false}},
                 first_param(op, params));
  check_lengths(b, params.size(), "grads", grads.size(), false);
  check_norm_dtype(b, norm_dtype);
  for (size_t i = 0; i < params.size(); ++i) b.add_row(i, {&params[i], &grads[i], &kAbsent});
  return {b.finish(), adaptive, {}, {}, norm_dtype};
}

SamArgs sam_ascent_args(TensorList params, TensorList grads, TensorList backups,
                        const at::Tensor& scale, bool adaptive, const OptionalTensor& found_inf) {
  const char* op = "sam_ascent_";
  TableBuilder b(op,
                 {{"params", Role::kParam, true}, {"grads", Role::kLikeParam, false},
                  {"backups", Role::kLikeParam, true}},
                 first_param(op, params));
  check_lengths(b, params.size(), "grads", grads.size(), false);
  check_lengths(b, params.size(), "backups", backups.size(), false);
  for (size_t i = 0; i < params.size(); ++i) b.add_row(i, {&params[i], &grads[i], &backups[i]});
  SamArgs args{b.finish(), adaptive, {}, {}, at::kFloat};
  args.scale = b.scalar("scale", scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

void check_segment_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
  auto fail = [](const std::string& m) { TORCH_CHECK(false, "msam_fused.sum_segment_partials: ", m); };
  if (partials.scalar_type() != at::kDouble || partials.dim() != 2 || partials.size(1) != 2 ||
      !partials.is_contiguous()) {
    fail("partials must be a contiguous float64 tensor of shape [segments, 2] (what the overlapped "
         "passes return)");
  }
  if (norm_dtype != at::kFloat && norm_dtype != at::kDouble) {
    fail(std::string("norm_dtype must be float32 or float64, got ") + c10::toString(norm_dtype));
  }
}

void check_perturbation_coef_args(const at::Tensor& sum_of_squares, double rho,
                                  const at::Tensor& coef_old, const OptionalTensor& found_inf) {
  auto fail = [](const std::string& m) { TORCH_CHECK(false, "msam_fused.perturbation_coef: ", m); };
  if (!(rho >= 0.0)) fail("rho must be a non-negative number, got " + std::to_string(rho));
  for (const at::Tensor* t : {&sum_of_squares, &coef_old}) {
    if (t->numel() != 1 || (t->scalar_type() != at::kFloat && t->scalar_type() != at::kDouble)) {
      fail("sum_of_squares and coef_old must be one-element float32/float64 tensors");
    }
  }
  if (coef_old.device() != sum_of_squares.device()) fail("coef_old is not on the device of sum_of_squares");
  if (found_inf.has_value() && found_inf->defined() &&
      (found_inf->device() != sum_of_squares.device() || found_inf->numel() != 1)) {
    fail("found_inf must be a one-element tensor on the device of sum_of_squares");
  }
}

}  // namespace msam_fused
