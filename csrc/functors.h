// The arithmetic of every fused op, written once and shared by the CPU and CUDA kernels.
//
// Each functor is a template over the arithmetic type T: float or double on both devices, or
// at::vec::Vectorized<float|double> in the CPU kernels. The expressions follow
// msam_fused/reference.py operation by operation (same order, same roundings), so the kernels
// differ from the reference only where a device fuses a multiply-add (CUDA; the CPU build
// passes -ffp-contract=off). Hyper-parameters arrive as the float64 `hyper` vector; scalars
// derived from them (1 - beta, the AdamW bias corrections, 1 - lr * weight_decay) are formed
// in double, as the reference forms them, and each is cast once to the compute type C.
#pragma once

#include <cmath>

#include "host_device.h"
#include "kernel_types.h"

#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace msam_fused {
inline namespace MSAM_ARITH_NAMESPACE {

// c = rho / (||x|| + EPS_NORM), as msam_fused/reference.py:perturbation_coef.
constexpr double kEpsNorm = 1e-12;

MSAM_HD float msam_sqrt(float x) { return sqrtf(x); }
MSAM_HD double msam_sqrt(double x) { return sqrt(x); }
MSAM_HD float msam_abs(float x) { return fabsf(x); }
MSAM_HD double msam_abs(double x) { return fabs(x); }
#if !defined(__CUDACC__) && !defined(__HIPCC__)
template <typename S>
inline at::vec::Vectorized<S> msam_sqrt(const at::vec::Vectorized<S>& x) { return x.sqrt(); }
template <typename S>
inline at::vec::Vectorized<S> msam_abs(const at::vec::Vectorized<S>& x) { return x.abs(); }
#endif

// base + k * x: the perturbation moves weights along the ascent direction x. Removing it is
// shift(p, c, x) (p = w - c * x gives w back), applying it is shift(w, -c, x).
template <typename T>
MSAM_HD T shift(const T& base, const T& k, const T& x) {
  return base + k * x;
}

// MSAM-SGD's new momentum and weights (removing the old perturbation gives w: shift).
template <typename T>
struct MsamSgdStep {
  T lr, weight_decay, momentum;

  template <typename C>
  MSAM_HD static MsamSgdStep from(const double* hyper) {
    using H = MsamSgdHyper;
    return {T(C(hyper[H::kLr])), T(C(hyper[H::kWeightDecay])), T(C(hyper[H::kMomentum]))};
  }

  // v_new from the stored (perturbed) weight p the gradient g was taken at: coupled decay at
  // the perturbed point, as the authors' code does.
  MSAM_HD T new_momentum(const T& p, const T& g, const T& v) const {
    const T d = g + weight_decay * p;
    return momentum * v + d;
  }
  // The true weights after the step.
  MSAM_HD T new_weight(const T& w, const T& v_new) const { return w - lr * v_new; }
};

// AdamW-MSAM's moments and weights, for one tensor whose step count is now t.
template <typename T>
struct AdamwMsamStep {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  T step_size;   // lr / (1 - beta1^t)
  T bias2_sqrt;  // sqrt(1 - beta2^t)
  T decay;       // 1 - lr * weight_decay

  // `bias`: the tensor's bias corrections (adam_bias), formed once per tensor.
  template <typename C>
  MSAM_HD static AdamwMsamStep from(const double* hyper, const AdamBias& bias) {
    using H = AdamwMsamHyper;
    const double beta1 = hyper[H::kBeta1], beta2 = hyper[H::kBeta2];
    return {T(C(beta1)),          T(C(1.0 - beta1)),        T(C(beta2)),
            T(C(1.0 - beta2)),    T(C(hyper[H::kEps])),     T(C(bias.step_size)),
            T(C(bias.bias2_sqrt)), T(C(1.0 - hyper[H::kLr] * hyper[H::kWeightDecay]))};
  }
  // The first moment alone (the partials pass reads nothing else).
  template <typename C>
  MSAM_HD static AdamwMsamStep from(const double* hyper) {
    return from<C>(hyper, AdamBias{0.0, 1.0});
  }

  MSAM_HD T new_exp_avg(const T& g, const T& m) const { return beta1 * m + one_minus_beta1 * g; }
  MSAM_HD T new_exp_avg_sq(const T& g, const T& s) const { return beta2 * s + one_minus_beta2 * g * g; }
  MSAM_HD T new_weight(const T& w, const T& m_new, const T& s_new) const {
    const T adam = w - step_size * m_new / (msam_sqrt(s_new) / bias2_sqrt + eps);
    return adam * decay;  // decoupled decay, after the Adam update
  }
};

// The per-tensor scalars of AdamwMsamStep at step count t (>= 1), in double
// (msam_fused/reference.py:adam_bias).
MSAM_HD AdamBias adam_bias(const double* hyper, double t) {
  using H = AdamwMsamHyper;
  return {hyper[H::kLr] / (1.0 - pow(hyper[H::kBeta1], t)), sqrt(1.0 - pow(hyper[H::kBeta2], t))};
}

// SAM's ascent e = scale * g (adaptive: scale * w^2 * g); returns w + e.
template <typename T>
MSAM_HD T sam_ascent(const T& w, const T& g, const T& scale, bool adaptive) {
  T e = scale * g;
  if (adaptive) e = e * w * w;
  return w + e;
}

// The vector whose norm scales SAM's ascent: g, or |w| * g when adaptive.
template <typename T>
MSAM_HD T sam_norm_term(const T& w, const T& g, bool adaptive) {
  return adaptive ? msam_abs(w) * g : g;
}

// 0 for a finite x, NaN for inf or NaN: summed over a tensor, it says whether all is finite.
template <typename T>
MSAM_HD T nonfinite_marker(const T& x) {
  return x - x;
}

// Finalize: the coefficient from the global sum of squares (on the device, in double).
MSAM_HD double perturbation_coef(double sum_of_squares, double rho) {
  return rho / (sqrt(sum_of_squares) + kEpsNorm);
}

}  // namespace MSAM_ARITH_NAMESPACE
}  // namespace msam_fused
