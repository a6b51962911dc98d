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

const at::Tensor& first_param(const char* op, TensorList params) {
  TORCH_CHECK(!params.empty(), "msam_fused.", op, ": params is empty");
  return params[0];
}

const at::Tensor* optional_at(TensorList list, size_t i) {
  return list.empty() ? &kAbsent : &list[i];
}

// A hyper-parameter value read on the CPU; CUDA kernels read theirs on the device unchecked.
void check_non_negative(const TableBuilder& b, const char* name, double value) {
  if (!(value >= 0.0)) b.fail(std::string("hyper: ") + name + " must be a non-negative number, got " + std::to_string(value));
}

// The bucket's hyper vector: shape, dtype and device, and on the CPU the values the kernels use.
const double* hyper_arg(const TableBuilder& b, const at::Tensor& hyper, int64_t size, const char* names) {
  if (hyper.scalar_type() != at::kDouble || hyper.dim() != 1 || hyper.size(0) != size || !hyper.is_contiguous()) {
    std::ostringstream msg;
    msg << "hyper must be a contiguous 1-D float64 tensor of " << size << " entries (" << names << "), got "
        << hyper.scalar_type() << " of shape " << hyper.sizes();
    b.fail(msg.str());
  }
  if (hyper.device() != b.device()) {
    std::ostringstream msg;
    msg << "hyper is on " << hyper.device() << " but params[0] is on " << b.device();
    b.fail(msg.str());
  }
  return hyper.data_ptr<double>();
}

const char* msam_sgd_op_name(Pass pass) {
  switch (pass) {
    case Pass::kPartials: return "msam_sgd_partials";
    case Pass::kStash: return "msam_sgd_overlap_stash_";
    case Pass::kFinish: return "msam_sgd_overlap_finish_";
    default: return "msam_sgd_step_";
  }
}

}  // namespace

MsamSgdArgs msam_sgd_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                          TensorList momenta, TensorList masters, const at::Tensor& hyper,
                          const OptionalTensor& coef_old, const OptionalTensor& coef_new,
                          const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  const char* op = msam_sgd_op_name(pass);
  const bool writes_params = pass == Pass::kStep || pass == Pass::kFinish;
  TableBuilder b(op,
                 {{"params", Role::kParam, writes_params},
                  {pass == Pass::kFinish ? "stashes" : "grads", Role::kLikeParam, pass == Pass::kStash},
                  {"momenta", Role::kState, pass != Pass::kPartials},
                  {"masters", Role::kMaster, writes_params}},
                 first_param(op, params));
  if ((pass == Pass::kStash || pass == Pass::kFinish) &&
      state_dtype(params[0].scalar_type()) != params[0].scalar_type()) {
    b.fail(std::string("params have dtype ") + c10::toString(params[0].scalar_type()) +
           "; the overlapped step keeps the old momentum in the gradient's memory, which needs "
           "float32 or float64 parameters (their momenta have their dtype)");
  }
  const size_t n = params.size();
  check_lengths(b, n, pass == Pass::kFinish ? "stashes" : "grads", grads.size(), false);
  check_lengths(b, n, "momenta", momenta.size(), false);
  check_lengths(b, n, "masters", masters.size(), true);
  using H = MsamSgdHyper;
  const double* h = hyper_arg(b, hyper, H::kSize, "lr, weight_decay, momentum, rho");
  if (hyper.device().is_cpu()) {
    check_non_negative(b, "lr", h[H::kLr]);
    check_non_negative(b, "weight_decay", h[H::kWeightDecay]);
    check_non_negative(b, "momentum", h[H::kMomentum]);
  }
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> g = grads[i];
    b.add_row(i, {&params[i], g.has_value() ? &*g : &kAbsent, &momenta[i], optional_at(masters, i)});
  }
  MsamSgdArgs args{{}, b.finish(), h, {}, {}, {}, {}};
  args.coef_old = b.scalar("coef_old", coef_old, false);
  args.coef_new = b.scalar("coef_new", coef_new, false);
  args.grad_scale = b.scalar("grad_scale", grad_scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

AdamwMsamArgs adamw_msam_args(Pass pass, TensorList params, const OptionalTensorList& grads,
                              TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                              TensorList masters, const at::Tensor& hyper,
                              const OptionalTensor& coef_old, const OptionalTensor& coef_new,
                              const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  const bool writes = pass == Pass::kStep;
  const char* op = writes ? "adamw_msam_step_" : "adamw_msam_partials";
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
  using H = AdamwMsamHyper;
  const double* h = hyper_arg(b, hyper, H::kSize, "lr, beta1, beta2, eps, weight_decay, rho");
  if (hyper.device().is_cpu()) {
    check_non_negative(b, "lr", h[H::kLr]);
    check_non_negative(b, "eps", h[H::kEps]);
    check_non_negative(b, "weight_decay", h[H::kWeightDecay]);
    const double beta1 = h[H::kBeta1], beta2 = h[H::kBeta2];
    if (!(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0)) {
      b.fail("hyper: betas must lie in [0, 1), got (" + std::to_string(beta1) + ", " + std::to_string(beta2) + ")");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> g = grads[i];
    b.add_row(i, {&params[i], g.has_value() ? &*g : &kAbsent, &exp_avgs[i],
                  optional_at(exp_avg_sqs, i), optional_at(masters, i), optional_at(steps, i)});
  }
  AdamwMsamArgs args{{}, b.finish(), h, {}, {}, {}, {}};
  args.coef_old = b.scalar("coef_old", coef_old, false);
  args.coef_new = b.scalar("coef_new", coef_new, false);
  args.grad_scale = b.scalar("grad_scale", grad_scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

PerturbArgs perturb_args(TensorList params, TensorList directions, TensorList masters,
                         const at::Tensor& coef, double alpha) {
  const char* op = "perturb_";
  TableBuilder b(op,
                 {{"params", Role::kParam, true}, {"directions", Role::kState, false},
                  {"masters", Role::kMaster, false}},
                 first_param(op, params));
  const size_t n = params.size();
  check_lengths(b, n, "directions", directions.size(), false);
  check_lengths(b, n, "masters", masters.size(), true);
  for (size_t i = 0; i < n; ++i) b.add_row(i, {&params[i], &directions[i], optional_at(masters, i)});
  PerturbArgs args{{}, b.finish(), alpha, {}};
  args.coef = b.scalar("coef", coef, false);
  return args;
}

SamArgs sam_partials_args(TensorList params, TensorList grads, bool adaptive) {
  const char* op = "sam_ascent_partials";
  TableBuilder b(op,
                 {{"params", Role::kParam, false}, {"grads", Role::kLikeParam, false},
                  {"outs", Role::kLikeParam, false}},
                 first_param(op, params));
  check_lengths(b, params.size(), "grads", grads.size(), false);
  for (size_t i = 0; i < params.size(); ++i) b.add_row(i, {&params[i], &grads[i], &kAbsent});
  return {{}, b.finish(), adaptive, {}, {}};
}

SamArgs sam_ascent_args(TensorList params, TensorList grads, TensorList outs,
                        const at::Tensor& scale, bool adaptive, const OptionalTensor& found_inf) {
  const char* op = "sam_ascent_";
  TableBuilder b(op,
                 {{"params", Role::kParam, false}, {"grads", Role::kLikeParam, false},
                  {"outs", Role::kLikeParam, true}},
                 first_param(op, params));
  check_lengths(b, params.size(), "grads", grads.size(), false);
  check_lengths(b, params.size(), "outs", outs.size(), false);
  for (size_t i = 0; i < params.size(); ++i) b.add_row(i, {&params[i], &grads[i], &outs[i]});
  SamArgs args{{}, b.finish(), adaptive, {}, {}};
  args.scale = b.scalar("scale", scale, false);
  args.found_inf = b.scalar("found_inf", found_inf, true);
  return args;
}

void check_norm_dtype(const char* op, at::ScalarType norm_dtype) {
  TORCH_CHECK(norm_dtype == at::kFloat || norm_dtype == at::kDouble, "msam_fused.", op,
              ": norm_dtype must be float32 or float64, got ", c10::toString(norm_dtype));
}

void check_segment_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
  TORCH_CHECK(partials.scalar_type() == at::kDouble && partials.dim() == 2 && partials.size(1) == 2 &&
                  partials.is_contiguous(),
              "msam_fused.sum_segment_partials: partials must be a contiguous float64 tensor of shape "
              "[segments, 2] (what the read-only passes return)");
  check_norm_dtype("sum_segment_partials", norm_dtype);
}

void check_perturbation_coef_args(const at::Tensor& sum_of_squares, const at::Tensor& rho,
                                  const at::Tensor& coef_old, const OptionalTensor& found_inf) {
  auto fail = [](const std::string& m) { TORCH_CHECK(false, "msam_fused.perturbation_coef: ", m); };
  for (const at::Tensor* t : {&sum_of_squares, &coef_old}) {
    if (t->numel() != 1 || (t->scalar_type() != at::kFloat && t->scalar_type() != at::kDouble)) {
      fail("sum_of_squares and coef_old must be one-element float32/float64 tensors");
    }
  }
  const at::ScalarType rho_dtype = rho.scalar_type();
  if (rho.numel() != 1 || !(rho_dtype == at::kFloat || rho_dtype == at::kDouble || rho_dtype == at::kBFloat16 ||
                            rho_dtype == at::kHalf)) {
    fail(std::string("rho must be a one-element float64/float32/bfloat16/float16 tensor, got ") +
         c10::toString(rho_dtype) + " with " + std::to_string(rho.numel()) + " elements");
  }
  for (const at::Tensor* t : {&rho, &coef_old}) {
    if (t->device() != sum_of_squares.device()) {
      fail(std::string(t == &rho ? "rho" : "coef_old") + " is not on the device of sum_of_squares");
    }
  }
  if (found_inf.has_value() && found_inf->defined() &&
      (found_inf->device() != sum_of_squares.device() || found_inf->numel() != 1)) {
    fail("found_inf must be a one-element tensor on the device of sum_of_squares");
  }
}

}  // namespace msam_fused
