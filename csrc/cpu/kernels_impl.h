// The fused CPU loops: at::parallel_for over fixed segments of the tensor table, at::vec
// inside each segment, the arithmetic from functors.h.
//
// Included once per CPU capability by kernels_<capability>.cpp, which first defines
// CPU_CAPABILITY (the namespace at::vec and these kernels live in, so the builds do not
// collide) and switches the compiler's target.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../dtypes.h"
#include "../functors.h"
#include "kernels.h"

namespace msam_fused::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per segment
constexpr int kRun = 32;  // vectors summed in compute precision before going to double

template <typename C>
using Vec = at::vec::Vectorized<C>;

// Elements in one T: 1 for a scalar, the vector width for Vec<C>.
template <typename T>
constexpr int64_t lanes() {
  if constexpr (std::is_arithmetic_v<T>) {
    return 1;
  } else {
    return T::size();
  }
}

// Loads one element (T = C) or one vector (T = Vec<C>) of storage type S as compute type C.
template <typename T, typename S>
T load(const S* src) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(*src);
  } else if constexpr (std::is_same_v<S, typename T::value_type>) {
    return T::loadu(src);
  } else {
    __at_align__ typename T::value_type buf[T::size()];
    for (int64_t k = 0; k < T::size(); ++k) buf[k] = static_cast<typename T::value_type>(src[k]);
    return T::loadu(buf);
  }
}

// Stores x into storage of type S, rounding once (to nearest even, as Tensor.to does).
template <typename S, typename T>
void store(S* dst, const T& x) {
  if constexpr (std::is_arithmetic_v<T>) {
    *dst = static_cast<S>(x);
  } else if constexpr (std::is_same_v<S, typename T::value_type>) {
    x.store(dst);
  } else {
    __at_align__ typename T::value_type buf[T::size()];
    x.store(buf);
    for (int64_t k = 0; k < T::size(); ++k) dst[k] = static_cast<S>(buf[k]);
  }
}

template <typename C>
double horizontal_sum(const Vec<C>& x) {
  __at_align__ C buf[Vec<C>::size()];
  x.store(buf);
  double total = 0.0;
  for (int64_t k = 0; k < Vec<C>::size(); ++k) total += static_cast<double>(buf[k]);
  return total;
}

// What one element (or vector) adds to a pass's Sums: the direction, to be squared, and its
// non-finite marker.
template <typename T>
struct Terms {
  T direction{}, nonfinite{};
};

// Calls element(T{}, i) -> Terms<T> for i in [begin, end), whole vectors first, then single
// elements; with kSum, returns what they add up to. The accumulators are locals, so they stay
// in registers; vectors are summed in C over runs of kRun, then in double, which keeps a long
// float32 segment about as accurate as torch's cascade sum.
template <typename C, bool kSum, typename Element>
Sums run_elements(int64_t begin, int64_t end, const Element& element) {
  Vec<C> squares(C(0)), markers(C(0));
  Sums sums;
  int run = 0;
  int64_t i = begin;
  for (; i + Vec<C>::size() <= end; i += Vec<C>::size()) {
    const Terms<Vec<C>> t = element(Vec<C>{}, i);
    if constexpr (kSum) {
      squares = squares + t.direction * t.direction;
      markers = markers + t.nonfinite;
      if (++run == kRun) {
        sums.squares += horizontal_sum(squares);
        squares = Vec<C>(C(0));
        run = 0;
      }
    }
  }
  for (; i < end; ++i) {
    const Terms<C> t = element(C{}, i);
    if constexpr (kSum) {
      sums.squares += static_cast<double>(t.direction) * static_cast<double>(t.direction);
      sums.nonfinite += static_cast<double>(t.nonfinite);
    }
  }
  if constexpr (kSum) {
    sums.squares += horizontal_sum(squares);
    sums.nonfinite += horizontal_sum(markers);
  }
  return sums;
}

// Runs segment_sums(segment) -> Sums on every segment in parallel; the sums in segment order.
template <typename SegmentFn>
Sums parallel_segments(const TensorTable& table, const SegmentFn& segment_sums) {
  const std::vector<Segment> segments = table.segments(kChunk);
  std::vector<double> squares(segments.size(), 0.0), nonfinite(segments.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Sums s = segment_sums(segments[k]);
      squares[k] = s.squares;
      nonfinite[k] = s.nonfinite;
    }
  });
  return {ordered_sum(squares), ordered_sum(nonfinite)};
}

// Runs segment(s, has_grad, has_master) on every segment, with the two flags of the
// segment's row as compile-time constants.
template <typename Args, typename SegmentFn>
Sums parallel_rows(const Args& a, const SegmentFn& segment) {
  return parallel_segments(a.table, [&](const Segment& s) {
    const bool has_grad = a.table.ptr(s.row, Args::kGrad) != nullptr;
    const bool has_master = a.table.ptr(s.row, Args::kMaster) != nullptr;
    if (has_grad && has_master) return segment(s, std::true_type{}, std::true_type{});
    if (has_grad) return segment(s, std::true_type{}, std::false_type{});
    if (has_master) return segment(s, std::false_type{}, std::true_type{});
    return segment(s, std::false_type{}, std::false_type{});
  });
}

template <typename T>
T* column(const TensorTable& table, int64_t row, int col) {
  return static_cast<T*>(table.ptr(row, col));
}

// A functor for single elements and for vectors, built from the same scalars.
template <template <typename> class F, typename C>
struct Both {
  template <typename... Args>
  explicit Both(Args... args) : scalar{args...}, vector{Vec<C>(args)...} {}
  const F<C>& get(C) const { return scalar; }
  const F<Vec<C>>& get(const Vec<C>&) const { return vector; }
  F<C> scalar;
  F<Vec<C>> vector;
};

// ---------------------------------------------------------------- MSAM-SGD and AdamW-MSAM
// One segment of a pass (see Pass in op_args.h); kHasGrad / kHasMaster: the row has them.
template <Pass kPass, typename P, bool kHasGrad, bool kHasMaster>
Sums msam_sgd_segment(const MsamSgdArgs& a, const Segment& s, const PassScalars& k) {
  using C = compute_t<P>;
  using S = state_t<P>;
  using A = MsamSgdArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const P* g = column<P>(a.table, s.row, A::kGrad);
  S* v = column<S>(a.table, s.row, A::kMomentum);
  master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  const Both<MsamSgdStep, C> step(C(a.lr), C(a.weight_decay), C(a.momentum));
  const C coef_old(k.coef_old), minus_coef_new(-k.coef_new), grad_scale(k.grad_scale);
  return run_elements<C, kPass != Pass::kStep>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const T p_i = load<T>(p + i);
    const T v_old = load<T>(v + i);
    Terms<T> terms{v_old, T(C(0))};
    if constexpr (kHasGrad) {
      const T g_raw = load<T>(g + i);
      terms.nonfinite = nonfinite_marker(g_raw);
      terms.direction = step.get(tag).new_momentum(p_i, g_raw / T(grad_scale), v_old);
    }
    if constexpr (kPass == Pass::kSumOfSquares) {
      return terms;
    } else {
      const T& v_new = terms.direction;
      const T w_old = kHasMaster ? load<T>(master + i) : shift(p_i, T(coef_old), v_old);
      const T w = kHasGrad ? step.get(tag).new_weight(w_old, v_new) : w_old;
      if constexpr (kHasGrad) store(v + i, v_new);
      if constexpr (kHasGrad && kHasMaster) store(master + i, w);
      if constexpr (kPass == Pass::kUpdate) {
        if constexpr (!kHasMaster) store(p + i, w);
      } else {
        store(p + i, shift(w, T(minus_coef_new), v_new));
      }
      return terms;
    }
  });
}

template <Pass kPass, typename P, bool kHasGrad, bool kHasMaster>
Sums adamw_msam_segment(const AdamwMsamArgs& a, const Segment& s, const PassScalars& k,
                        const AdamBias& bias) {
  using C = compute_t<P>;
  using S = state_t<P>;
  using A = AdamwMsamArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const P* g = column<P>(a.table, s.row, A::kGrad);
  S* m = column<S>(a.table, s.row, A::kExpAvg);
  S* sq = column<S>(a.table, s.row, A::kExpAvgSq);
  master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  const Both<AdamwMsamStep, C> step(C(a.beta1), C(1.0 - a.beta1), C(a.beta2), C(1.0 - a.beta2),
                                    C(a.eps), C(bias.step_size), C(bias.bias2_sqrt),
                                    C(1.0 - a.lr * a.weight_decay));
  const C coef_old(k.coef_old), minus_coef_new(-k.coef_new), grad_scale(k.grad_scale);
  return run_elements<C, kPass != Pass::kStep>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const T m_old = load<T>(m + i);
    Terms<T> terms{m_old, T(C(0))};
    T g_i{};
    if constexpr (kHasGrad) {
      const T g_raw = load<T>(g + i);
      terms.nonfinite = nonfinite_marker(g_raw);
      g_i = g_raw / T(grad_scale);
      terms.direction = step.get(tag).new_exp_avg(g_i, m_old);
    }
    if constexpr (kPass == Pass::kSumOfSquares) {
      return terms;
    } else {
      const T& m_new = terms.direction;
      const T w_old = kHasMaster ? load<T>(master + i) : shift(load<T>(p + i), T(coef_old), m_old);
      T w = w_old;
      if constexpr (kHasGrad) {
        const T s_new = step.get(tag).new_exp_avg_sq(g_i, load<T>(sq + i));
        w = step.get(tag).new_weight(w_old, m_new, s_new);
        store(m + i, m_new);
        store(sq + i, s_new);
        if constexpr (kHasMaster) store(master + i, w);
      }
      if constexpr (kPass == Pass::kUpdate) {
        if constexpr (!kHasMaster) store(p + i, w);
      } else {
        store(p + i, shift(w, T(minus_coef_new), m_new));
      }
      return terms;
    }
  });
}

template <Pass kPass>
Sums msam_sgd_pass(const MsamSgdArgs& a, const PassScalars& k) {
  Sums total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "msam_sgd", [&] {
    total = parallel_rows(a, [&](const Segment& s, auto has_grad, auto has_master) {
      return msam_sgd_segment<kPass, scalar_t, decltype(has_grad)::value, decltype(has_master)::value>(
          a, s, k);
    });
  });
  return total;
}

template <Pass kPass>
Sums adamw_msam_pass(const AdamwMsamArgs& a, const PassScalars& k, const std::vector<AdamBias>& bias) {
  Sums total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "adamw_msam", [&] {
    total = parallel_rows(a, [&](const Segment& s, auto has_grad, auto has_master) {
      return adamw_msam_segment<kPass, scalar_t, decltype(has_grad)::value, decltype(has_master)::value>(
          a, s, k, kPass == Pass::kSumOfSquares ? AdamBias{} : bias[s.row]);
    });
  });
  return total;
}

Sums msam_sgd_kernel(Pass pass, const MsamSgdArgs& a, const PassScalars& k) {
  switch (pass) {
    case Pass::kSumOfSquares: return msam_sgd_pass<Pass::kSumOfSquares>(a, k);
    case Pass::kUpdate: return msam_sgd_pass<Pass::kUpdate>(a, k);
    default: return msam_sgd_pass<Pass::kStep>(a, k);
  }
}

Sums adamw_msam_kernel(Pass pass, const AdamwMsamArgs& a, const PassScalars& k, const std::vector<AdamBias>& bias) {
  switch (pass) {
    case Pass::kSumOfSquares: return adamw_msam_pass<Pass::kSumOfSquares>(a, k, bias);
    case Pass::kUpdate: return adamw_msam_pass<Pass::kUpdate>(a, k, bias);
    default: return adamw_msam_pass<Pass::kStep>(a, k, bias);
  }
}

// ---------------------------------------------------------------------------- perturbation
template <typename P, bool kHasMaster>
void perturb_segment(const PerturbArgs& a, const Segment& s, double k) {
  using C = compute_t<P>;
  using A = PerturbArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const state_t<P>* x = column<state_t<P>>(a.table, s.row, A::kDirection);
  const master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  const C kc(k);
  run_elements<C, false>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const T base = kHasMaster ? load<T>(master + i) : load<T>(p + i);
    store(p + i, shift(base, T(kc), load<T>(x + i)));
    return Terms<T>{};
  });
}

void perturb_kernel(const PerturbArgs& a, double k) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "perturb_", [&] {
    parallel_segments(a.table, [&](const Segment& s) {
      if (a.table.ptr(s.row, PerturbArgs::kMaster) != nullptr) {
        perturb_segment<scalar_t, true>(a, s, k);
      } else {
        perturb_segment<scalar_t, false>(a, s, k);
      }
      return Sums{};
    });
  });
}

// ----------------------------------------------------------------------------------- SAM
double sam_sum_of_squares_kernel(const SamArgs& a) {
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_sum_of_squares", [&] {
    using C = compute_t<scalar_t>;
    total = parallel_segments(a.table, [&](const Segment& s) {
      const scalar_t* p = column<scalar_t>(a.table, s.row, SamArgs::kParam);
      const scalar_t* g = column<scalar_t>(a.table, s.row, SamArgs::kGrad);
      return run_elements<C, true>(s.begin, s.end, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        return Terms<T>{sam_norm_term(load<T>(p + i), load<T>(g + i), a.adaptive), T(C(0))};
      });
    }).squares;
  });
  return total;
}

void sam_ascent_kernel(const SamArgs& a, double scale, bool skipped) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_", [&] {
    using C = compute_t<scalar_t>;
    const C k(scale);
    parallel_segments(a.table, [&](const Segment& s) {
      scalar_t* p = column<scalar_t>(a.table, s.row, SamArgs::kParam);
      const scalar_t* g = column<scalar_t>(a.table, s.row, SamArgs::kGrad);
      scalar_t* backup = column<scalar_t>(a.table, s.row, SamArgs::kBackup);
      run_elements<C, false>(s.begin, s.end, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        std::copy(p + i, p + i + lanes<T>(), backup + i);  // the exact bits of w, for the restore
        if (!skipped) store(p + i, sam_ascent(load<T>(p + i), load<T>(g + i), T(k), a.adaptive));
        return Terms<T>{};
      });
      return Sums{};
    });
  });
}

inline const Kernels kKernels = {C10_STRINGIZE(CPU_CAPABILITY), &msam_sgd_kernel, &adamw_msam_kernel,
                                 &perturb_kernel, &sam_sum_of_squares_kernel, &sam_ascent_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace msam_fused::cpu
