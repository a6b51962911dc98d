// Plain types shared by the host code and every kernel build.
#pragma once

namespace msam_fused {

// The passes of a step (docs/design.md):
//  kPartials: read only; per segment, the sum of squares of the new ascent direction and a
//             non-finite marker of the gradients (the step's skip flag costs no extra pass).
//  kStep:     the one write pass: remove the old perturbation, update state and weights,
//             apply the new one (p = w - coef_new * x).
// and the two halves of an MSAM-SGD step overlapped with backward (docs/overlap.md):
//  kStash:    during backward: v = v' and the old momentum into the gradient's memory
//             (the gradient is consumed); partials as kPartials.
//  kFinish:   after the global norm: p = (p + coef_old v_old) - lr v' - coef_new v' with
//             v_old from the gradient's memory; a skipped step puts v_old back into v.
enum class Pass { kPartials, kStep, kStash, kFinish };

// Whether a pass returns per-segment partial sums.
constexpr bool sums_terms(Pass pass) { return pass == Pass::kPartials || pass == Pass::kStash; }

// Elements per segment: the unit of parallel work, and of the per-segment partial sums that
// the norm adds in a fixed order (one CPU task, one CUDA block).
constexpr long long kCpuSegmentLength = 1LL << 15;
constexpr long long kCudaSegmentLength = 1LL << 14;

// Positions in the float64 `hyper` vector of a bucket (msam_fused/reference.py:
// MSAM_SGD_HYPER and ADAMW_MSAM_HYPER).
struct MsamSgdHyper {
  enum { kLr, kWeightDecay, kMomentum, kRho, kSize };
};
struct AdamwMsamHyper {
  enum { kLr, kBeta1, kBeta2, kEps, kWeightDecay, kRho, kSize };
};

// The columns of each op's tensor table (op_args.h), in the order the kernels read a row.
struct MsamSgdColumns {  // the grads column holds the stashes in kFinish
  enum { kParam, kGrad, kMomentum, kMaster, kWidth };
};
struct AdamwMsamColumns {
  enum { kParam, kGrad, kExpAvg, kExpAvgSq, kMaster, kStep, kWidth };
};
struct PerturbColumns {
  enum { kParam, kDirection, kMaster, kWidth };
};
struct SamColumns {  // outs only for the ascent itself
  enum { kParam, kGrad, kOut, kWidth };
};

// AdamW's per-tensor scalars at step count t: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
struct AdamBias {
  double step_size, bias2_sqrt;
};

}  // namespace msam_fused
