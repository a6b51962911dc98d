// What each pass does to one element (or one at::vec vector) of a parameter: which tensors it
// reads, which functor of functors.h it applies, what it writes, and what it adds to the
// pass's sums. Shared by the CPU loops (T = at::vec::Vectorized<C> and T = C) and the CUDA
// kernels (T = a register pack of C, cuda/pack.cuh, and T = C), so the devices differ only in
// how they walk the elements.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "functors.h"
#include "kernel_types.h"

namespace msam_fused {
inline namespace MSAM_ARITH_NAMESPACE {

// Loads and stores of T from and to storage of another type, rounding once on the store
// (to nearest even, as Tensor.to does). This is the scalar case; the CPU kernels add at::vec.
template <typename T>
struct Access {
  template <typename S>
  MSAM_HD static T load(const S* src) { return static_cast<T>(*src); }
  template <typename S>
  MSAM_HD static void store(S* dst, const T& x) { *dst = static_cast<S>(x); }
};

// Names the type an element function works in: a scalar C, or a wider type W of several lanes
// (at::vec::Vectorized<C> on the CPU, a register pack on CUDA).
template <typename T>
struct Tag {
  using type = T;
};

// A functor (or a pass's coefficients) for single elements and for W, built by
// F<T>::from<C>(args...) from the same scalars; get(tag) gives the one an element function
// works in.
template <template <typename> class F, typename C, typename W>
struct Both {
  template <typename... Args>
  MSAM_HD explicit Both(const Args&... args)
      : scalar(F<C>::template from<C>(args...)), wide(F<W>::template from<C>(args...)) {}
  MSAM_HD const F<C>& get(Tag<C>) const { return scalar; }
  MSAM_HD const F<W>& get(Tag<W>) const { return wide; }
  F<C> scalar;
  F<W> wide;
};

// What one element adds to its pass's sums: the direction (squared for the norm) and its
// non-finite marker.
template <typename T>
struct Terms {
  T direction{}, nonfinite{};
};

// The 0-d arguments of a pass in compute precision. Without a GradScaler (unscale false) the
// gradients are used as they are: dividing by 1 changes nothing but costs a division.
template <typename T>
struct PassCoefs {
  T coef_old, minus_coef_new, grad_scale;
  bool unscale;

  template <typename C>
  MSAM_HD static PassCoefs from(double coef_old, double coef_new, double grad_scale, bool unscale) {
    return {T(C(coef_old)), T(C(-coef_new)), T(C(grad_scale)), unscale};
  }
};

template <typename T>
MSAM_HD T unscaled(const T& g, const PassCoefs<T>& k) {
  return k.unscale ? g / k.grad_scale : g;
}

// Typed pointers of one parameter's row of the tensor table (nullptr where absent).
// G: the gradient's element type, P where the pass writes into it (kStash moves the old
// momentum there), const P where it only reads it (CUDA then loads it as read-only data).
template <typename P, typename G = P>
struct MsamSgdRow {
  P* p;
  G* g;
  state_t<P>* v;
  master_t* master;
};

template <typename P>
struct AdamwMsamRow {
  P* p;
  const P* g;
  state_t<P>* m;
  state_t<P>* s;
  master_t* master;
};

template <typename P>
struct PerturbRow {
  P* p;
  const state_t<P>* x;
  const master_t* master;
};

template <typename P>
struct SamRow {
  P* p;  // only read, but not const: out may be p, and CUDA reads const rows through the read-only cache
  const P* g;
  P* out;  // the ascent's destination: a spare buffer, or p itself
};

template <Pass kPass, bool kHasGrad, bool kHasMaster, typename T, typename P, typename G>
MSAM_HD Terms<T> msam_sgd_plain_element(const MsamSgdRow<P, G>& r, int64_t i, const MsamSgdStep<T>& step,
                                        const PassCoefs<T>& k) {
  using A = Access<T>;
  const T p_i = A::load(r.p + i);
  const T v_old = A::load(r.v + i);
  Terms<T> terms{v_old, T(0)};
  if constexpr (kHasGrad) {
    const T g_raw = A::load(r.g + i);
    terms.nonfinite = nonfinite_marker(g_raw);
    terms.direction = step.new_momentum(p_i, unscaled(g_raw, k), v_old);
  }
  if constexpr (kPass == Pass::kStep) {
    const T& v_new = terms.direction;
    const T w_old = kHasMaster ? A::load(r.master + i) : shift(p_i, k.coef_old, v_old);
    const T w = kHasGrad ? step.new_weight(w_old, v_new) : w_old;
    if constexpr (kHasGrad) A::store(r.v + i, v_new);
    if constexpr (kHasGrad && kHasMaster) A::store(r.master + i, w);
    A::store(r.p + i, shift(w, k.minus_coef_new, v_new));
  }
  return terms;
}

// The overlapped step's halves (kStash, kFinish; see Pass). Only for parameters whose state
// has their own dtype (float32, float64; the ops refuse others), so the gradient's memory
// holds the old momentum exactly. A row without a gradient is not stashed: its momentum
// stays, v' = v_old, as in kStep.
template <bool kHasGrad, typename T, typename P>
MSAM_HD Terms<T> msam_sgd_stash_element(const MsamSgdRow<P>& r, int64_t i, const MsamSgdStep<T>& step,
                                        const PassCoefs<T>& k) {
  using A = Access<T>;
  const T v_old = A::load(r.v + i);
  Terms<T> terms{v_old, T(0)};
  if constexpr (kHasGrad) {
    const T g_raw = A::load(r.g + i);
    terms.nonfinite = nonfinite_marker(g_raw);
    terms.direction = step.new_momentum(A::load(r.p + i), unscaled(g_raw, k), v_old);
    A::store(r.v + i, terms.direction);
    A::store(r.g + i, v_old);
  }
  return terms;
}

// kFinish: the arithmetic of kStep with v' read back instead of recomputed.
template <bool kHasGrad, typename T, typename P, typename G>
MSAM_HD void msam_sgd_finish_element(const MsamSgdRow<P, G>& r, int64_t i, const MsamSgdStep<T>& step,
                                     const PassCoefs<T>& k) {
  using A = Access<T>;
  const T v_new = A::load(r.v + i);
  const T v_old = kHasGrad ? A::load(r.g + i) : v_new;
  const T w_old = shift(A::load(r.p + i), k.coef_old, v_old);
  const T w = kHasGrad ? step.new_weight(w_old, v_new) : w_old;
  A::store(r.p + i, shift(w, k.minus_coef_new, v_new));
}

// A skipped overlapped step: the old momentum back from the gradient's memory, bit for bit.
template <bool kHasGrad, typename T, typename P, typename G>
MSAM_HD void msam_sgd_restore_element(const MsamSgdRow<P, G>& r, int64_t i) {
  using A = Access<T>;
  if constexpr (kHasGrad) A::store(r.v + i, A::load(r.g + i));
}

// One element of any MSAM-SGD pass; `skipped` matters only to kFinish (a skipped kStep
// never runs, and the read-only passes do not look at found_inf).
template <Pass kPass, bool kHasGrad, bool kHasMaster, typename T, typename P, typename G>
MSAM_HD Terms<T> msam_sgd_element(const MsamSgdRow<P, G>& r, int64_t i, const MsamSgdStep<T>& step,
                                  const PassCoefs<T>& k, bool skipped = false) {
  if constexpr (kPass == Pass::kStash) {
    return msam_sgd_stash_element<kHasGrad>(r, i, step, k);
  } else if constexpr (kPass == Pass::kFinish) {
    if (skipped) {
      msam_sgd_restore_element<kHasGrad, T>(r, i);
    } else {
      msam_sgd_finish_element<kHasGrad>(r, i, step, k);
    }
    return {};
  } else {
    return msam_sgd_plain_element<kPass, kHasGrad, kHasMaster>(r, i, step, k);
  }
}

template <Pass kPass, bool kHasGrad, bool kHasMaster, typename T, typename P>
MSAM_HD Terms<T> adamw_msam_element(const AdamwMsamRow<P>& r, int64_t i, const AdamwMsamStep<T>& step,
                                    const PassCoefs<T>& k) {
  using A = Access<T>;
  const T m_old = A::load(r.m + i);
  Terms<T> terms{m_old, T(0)};
  T g{};
  if constexpr (kHasGrad) {
    const T g_raw = A::load(r.g + i);
    terms.nonfinite = nonfinite_marker(g_raw);
    g = unscaled(g_raw, k);
    terms.direction = step.new_exp_avg(g, m_old);
  }
  if constexpr (kPass == Pass::kStep) {
    const T& m_new = terms.direction;
    const T w_old = kHasMaster ? A::load(r.master + i) : shift(A::load(r.p + i), k.coef_old, m_old);
    T w = w_old;
    if constexpr (kHasGrad) {
      const T s_new = step.new_exp_avg_sq(g, A::load(r.s + i));
      w = step.new_weight(w_old, m_new, s_new);
      A::store(r.m + i, m_new);
      A::store(r.s + i, s_new);
      if constexpr (kHasMaster) A::store(r.master + i, w);
    }
    A::store(r.p + i, shift(w, k.minus_coef_new, m_new));
  }
  return terms;
}

// params = base + k * x with base = the master copy if there is one, else the parameter.
template <bool kHasMaster, typename T, typename P>
MSAM_HD void perturb_element(const PerturbRow<P>& r, int64_t i, const T& k) {
  using A = Access<T>;
  const T base = kHasMaster ? A::load(r.master + i) : A::load(r.p + i);
  A::store(r.p + i, shift(base, k, A::load(r.x + i)));
}

// SAM's partials: the norm's term and the gradient's non-finite marker.
template <typename T, typename P>
MSAM_HD Terms<T> sam_norm_element(const SamRow<P>& r, int64_t i, bool adaptive) {
  using A = Access<T>;
  const T g = A::load(r.g + i);
  return {sam_norm_term(A::load(r.p + i), g, adaptive), nonfinite_marker(g)};
}

// SAM's ascent from w = params: w + e, into out.
template <typename T, typename P>
MSAM_HD T sam_ascended(const SamRow<P>& r, int64_t i, const T& scale, bool adaptive) {
  using A = Access<T>;
  return sam_ascent(A::load(r.p + i), A::load(r.g + i), scale, adaptive);
}

template <typename T, typename P>
MSAM_HD void sam_ascent_element(const SamRow<P>& r, int64_t i, const T& scale, bool adaptive) {
  Access<T>::store(r.out + i, sam_ascended<T>(r, i, scale, adaptive));
}

}  // namespace MSAM_ARITH_NAMESPACE
}  // namespace msam_fused
