// Plain types shared by the host code and every kernel build.
#pragma once

namespace msam_fused {

// The passes of MSAM-SGD and AdamW-MSAM:
//  kSumOfSquares: read only; the sum of squares of the new direction, and whether any
//                 gradient is non-finite (the step's skip flag costs no extra pass).
//  kUpdate:       write the state and the true weights w (the backend contract's *_update_).
//  kStep:         write the state and p = w - coef_new * x: a whole step in one pass.
// and the two halves of an MSAM-SGD step overlapped with backward (docs/overlap.md):
//  kStash:        during backward: v = v' and the old momentum into the gradient's memory
//                 (the gradient is consumed); sums as kSumOfSquares.
//  kFinish:       after the global norm: p = (p + coef_old v_old) - lr v' - coef_new v' with
//                 v_old from the gradient's memory; a skipped step puts v_old back into v.
enum class Pass { kSumOfSquares, kUpdate, kStep, kStash, kFinish };

// Whether a pass returns sums (of squares, of non-finite markers).
constexpr bool sums_terms(Pass pass) { return pass != Pass::kStep && pass != Pass::kFinish; }

// Elements per segment: the unit of parallel work, and of the per-segment partial sums that
// the norm adds in a fixed order (one CPU task, one CUDA block).
constexpr long long kCpuSegmentLength = 1LL << 15;
constexpr long long kCudaSegmentLength = 1LL << 14;

// AdamW's per-tensor scalars at step count t: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
struct AdamBias {
  double step_size, bias2_sqrt;
};

}  // namespace msam_fused
