// The CPU kernels' interface. The loops (kernels_impl.h) are compiled once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp), like ATen's own CPU kernels,
// so that at::vec uses real AVX2/AVX-512 registers where the CPU has them; ops.cpp picks
// one set at run time.
#pragma once

#include <string>
#include <vector>

#include "../kernel_types.h"
#include "../op_args.h"

namespace msam_fused::cpu {

// What a segment adds up: the squares of the new direction, and non-finite markers (0, or
// NaN once any gradient entry is inf or NaN). Each segment sums into its own slot of the
// pass's partials, so the result does not depend on the number of threads.
struct Sums {
  double squares = 0.0, nonfinite = 0.0;
};

// The 0-d arguments of a pass, read on the host (they are CPU tensors).
struct PassScalars {
  double coef_old = 0.0, coef_new = 0.0, grad_scale = 1.0;
  bool unscale = false;  // a grad_scale was given
  bool skipped = false;  // found_inf is set (kFinish then restores instead)
};

struct Kernels {
  const char* capability;
  // partials: for the passes that sum, two doubles per segment (see Sums), in segment order.
  void (*msam_sgd)(Pass pass, const MsamSgdArgs& a, const PassScalars& k, double* partials);
  // bias (kStep): per row, the AdamW bias corrections at the row's new step count.
  void (*adamw_msam)(Pass pass, const AdamwMsamArgs& a, const PassScalars& k, const std::vector<AdamBias>& bias,
                     double* partials);
  // params = base + k * directions.
  void (*perturb)(const PerturbArgs& a, double k);
  void (*sam_partials)(const SamArgs& a, double* partials);
  // outs = w + e (e from scale) with w = params, or outs = w when skipped; outs may be params.
  void (*sam_ascent)(const SamArgs& a, double scale, bool skipped);
};

// The kernel sets this CPU can run, narrowest first (DEFAULT, then AVX2, AVX512 where built).
std::vector<const Kernels*> runnable_kernels();
// The set the CPU ops use: the widest runnable one, or the one ATEN_CPU_CAPABILITY names.
const Kernels& kernels();
// Its name ("DEFAULT", "AVX2" or "AVX512").
std::string capability();

// The kernels built for each capability; nullptr where the compiler could not target it.
const Kernels* default_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();

}  // namespace msam_fused::cpu
