// Plain types shared by the host code and every kernel build.
#pragma once

namespace msam_fused {

// The three passes of MSAM-SGD and AdamW-MSAM:
//  kSumOfSquares: read only; the sum of squares of the new direction, and whether any
//                 gradient is non-finite (the step's skip flag costs no extra pass).
//  kUpdate:       write the state and the true weights w (the backend contract's *_update_).
//  kStep:         write the state and p = w - coef_new * x: a whole step in one pass.
enum class Pass { kSumOfSquares, kUpdate, kStep };

// AdamW's per-tensor scalars at step count t: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
struct AdamBias {
  double step_size, bias2_sqrt;
};

}  // namespace msam_fused
