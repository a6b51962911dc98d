// The CPU passes of the msam_fused ops (op_impls.h does the rest): read the 0-d scalars (CPU
// tensors, so this is no device sync) and run the kernels of the best CPU capability.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "../functors.h"
#include "../op_impls.h"
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
          a.grad_scale.kind != ScalarKind::kAbsent, step_skipped(a.found_inf)};
}

// What a CPU pass summed, as the op's result tensors.
struct HostSums {
  Sums sums;
  at::Device device;

  std::tuple<at::Tensor, at::Tensor> result(at::ScalarType norm_dtype) const {
    return {scalar_tensor(sums.squares, norm_dtype, device),
            scalar_tensor(std::isnan(sums.nonfinite) ? 1.0 : 0.0, at::kBool, device)};
  }
};

// The CPU passes for OpImpls. A skipped step (found_inf set) returns before any kernel runs,
// except kFinish, which then puts the stashed momenta back.
struct Cpu {
  static HostSums msam_sgd(Pass pass, const MsamSgdArgs& a) {
    if (pass != Pass::kSumOfSquares && pass != Pass::kFinish && step_skipped(a.found_inf)) {
      return {{}, a.table.device};
    }
    return {kernels().msam_sgd(pass, a, pass_scalars(a), nullptr), a.table.device};
  }

  // A summing pass that returns its per-segment sums, [segments, 2] float64, in segment order.
  static at::Tensor msam_sgd_partials(Pass pass, const MsamSgdArgs& a) {
    at::Tensor partials = at::empty({a.table.segment_count(kCpuSegmentLength), 2},
                                    at::TensorOptions().dtype(at::kDouble).device(a.table.device));
    kernels().msam_sgd(pass, a, pass_scalars(a), partials.data_ptr<double>());
    return partials;
  }

  // The sums a pass returns, from its partials: the same order and arithmetic as the pass.
  static std::tuple<at::Tensor, at::Tensor> sum_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
    const double* data = partials.data_ptr<double>();
    std::vector<double> squares(partials.size(0)), nonfinite(partials.size(0));
    for (int64_t k = 0; k < partials.size(0); ++k) {
      squares[k] = data[2 * k];
      nonfinite[k] = data[2 * k + 1];
    }
    return HostSums{{ordered_sum(squares), ordered_sum(nonfinite)}, partials.device()}.result(norm_dtype);
  }

  // Passes that write advance the step counts of rows with a gradient, after reading them
  // for the bias corrections at the new count.
  static HostSums adamw_msam(Pass pass, const AdamwMsamArgs& a) {
    using A = AdamwMsamArgs;
    if (pass == Pass::kSumOfSquares) return {kernels().adamw_msam(pass, a, pass_scalars(a), {}), a.table.device};
    if (step_skipped(a.found_inf)) return {{}, a.table.device};
    std::vector<AdamBias> bias(a.table.rows());
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      bias[r] = adam_bias(a.lr, a.beta1, a.beta2, *static_cast<float*>(a.table.ptr(r, A::kStep)) + 1.0f);
    }
    const Sums sums = kernels().adamw_msam(pass, a, pass_scalars(a), bias);
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      if (a.table.ptr(r, A::kGrad) != nullptr) *static_cast<float*>(a.table.ptr(r, A::kStep)) += 1.0f;
    }
    return {sums, a.table.device};
  }

  static void perturb(const PerturbArgs& a) {
    if (!step_skipped(a.found_inf)) kernels().perturb(a, a.alpha * read_scalar(a.coef, 0.0));
  }

  static at::Tensor perturbation_coef(ScalarArg sum_of_squares, double rho, const at::Tensor& coef_old,
                                      ScalarArg found_inf) {
    if (step_skipped(found_inf)) return coef_old.clone();
    const double coef = msam_fused::perturbation_coef(read_scalar(sum_of_squares, 0.0), rho);
    return scalar_tensor(coef, coef_old.scalar_type(), coef_old.device());
  }

  static HostSums sam_sum_of_squares(const SamArgs& a) {
    return {{kernels().sam_sum_of_squares(a), 0.0}, a.table.device};
  }

  static void sam_ascent(const SamArgs& a) {
    kernels().sam_ascent(a, read_scalar(a.scale, 0.0), step_skipped(a.found_inf));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(msam_fused, CPU, m) {
  OpImpls<Cpu>::register_all(m);
}

}  // namespace msam_fused::cpu
