// The CPU passes of the msam_fused ops (op_impls.h does the rest): read the 0-d scalars and
// the hyper vector (CPU tensors, so this is no device sync) and run the kernels of the best
// CPU capability.
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

// The partial sums of a pass over `table`: [segments, 2] float64 on the CPU.
at::Tensor empty_partials(const TensorTable& table) {
  return at::empty({table.segment_count(kCpuSegmentLength), 2}, at::TensorOptions().dtype(at::kDouble));
}

// The CPU passes for OpImpls. A skipped kStep (found_inf set) returns before any kernel runs;
// a skipped kFinish puts the stashed momenta back.
struct Cpu {
  static at::Tensor msam_sgd(Pass pass, const MsamSgdArgs& a) {
    const PassScalars k = pass_scalars(a);
    if (pass == Pass::kStep && k.skipped) return {};
    at::Tensor partials = sums_terms(pass) ? empty_partials(a.table) : at::Tensor();
    kernels().msam_sgd(pass, a, k, partials.defined() ? partials.data_ptr<double>() : nullptr);
    return partials;
  }

  // kStep advances the step counts of rows with a gradient, after reading them for the bias
  // corrections at the new count (once per row, in double).
  static at::Tensor adamw_msam(Pass pass, const AdamwMsamArgs& a) {
    using A = AdamwMsamArgs;
    const PassScalars k = pass_scalars(a);
    if (pass == Pass::kPartials) {
      at::Tensor partials = empty_partials(a.table);
      kernels().adamw_msam(pass, a, k, {}, partials.data_ptr<double>());
      return partials;
    }
    if (k.skipped) return {};
    std::vector<AdamBias> bias(a.table.rows());
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      bias[r] = adam_bias(a.hyper, *static_cast<float*>(a.table.ptr(r, A::kStep)) + 1.0f);
    }
    kernels().adamw_msam(pass, a, k, bias, nullptr);
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      if (a.table.ptr(r, A::kGrad) != nullptr) *static_cast<float*>(a.table.ptr(r, A::kStep)) += 1.0f;
    }
    return {};
  }

  // The sums of a bucket's partials, added in row order in double.
  static std::tuple<at::Tensor, at::Tensor> sum_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
    const double* data = partials.data_ptr<double>();
    double squares = 0.0, nonfinite = 0.0;
    for (int64_t k = 0; k < partials.size(0); ++k) {
      squares += data[2 * k];
      nonfinite += data[2 * k + 1];
    }
    return {scalar_tensor(squares, norm_dtype, partials.device()),
            scalar_tensor(std::isnan(nonfinite) ? 1.0 : 0.0, at::kBool, partials.device())};
  }

  static void perturb(const PerturbArgs& a) { kernels().perturb(a, a.alpha * read_scalar(a.coef, 0.0)); }

  static at::Tensor perturbation_coef(ScalarArg sum_of_squares, ScalarArg rho, const at::Tensor& coef_old,
                                      ScalarArg found_inf) {
    if (step_skipped(found_inf)) return coef_old.clone();
    const double coef = msam_fused::perturbation_coef(read_scalar(sum_of_squares, 0.0), read_scalar(rho, 0.0));
    return scalar_tensor(coef, coef_old.scalar_type(), coef_old.device());
  }

  static at::Tensor sam_partials(const SamArgs& a) {
    at::Tensor partials = empty_partials(a.table);
    kernels().sam_partials(a, partials.data_ptr<double>());
    return partials;
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
