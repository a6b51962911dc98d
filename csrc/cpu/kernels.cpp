// The fused CPU kernels: at::parallel_for over fixed segments of the tensor table, at::vec
// inside each segment, the arithmetic from functors.h.
//
// Each segment (at most kChunk elements of one tensor) writes its sum of squares into its own
// slot; the slots are added in order afterwards, so the norm does not depend on the number of
// threads. Values reach the kernels from CPU tensors, so reading them is no device sync.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

#include "../dtypes.h"
#include "../functors.h"
#include "../op_args.h"

namespace msam_fused {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;

template <typename C>
using Vec = at::vec::Vectorized<C>;

// Loads one element (T = C) or one vector (T = Vec<C>) of storage type S as compute type C.
template <typename T, typename S>
T load(const S* src) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(*src);
  } else {
    using C = typename T::value_type;
    if constexpr (std::is_same_v<S, C>) {
      return T::loadu(src);
    } else {
      __at_align__ C buf[T::size()];
      for (int64_t k = 0; k < T::size(); ++k) buf[k] = static_cast<C>(src[k]);
      return T::loadu(buf);
    }
  }
}

// Stores x into storage of type S, rounding once (to nearest even, as Tensor.to does).
template <typename S, typename T>
void store(S* dst, const T& x) {
  if constexpr (std::is_arithmetic_v<T>) {
    *dst = static_cast<S>(x);
  } else {
    using C = typename T::value_type;
    if constexpr (std::is_same_v<S, C>) {
      x.store(dst);
    } else {
      __at_align__ C buf[T::size()];
      x.store(buf);
      for (int64_t k = 0; k < T::size(); ++k) dst[k] = static_cast<S>(buf[k]);
    }
  }
}

// Sum of squares of one segment: vector lanes in C over short runs, then double, so a long
// float32 segment is summed about as accurately as torch's own cascade sum.
template <typename C>
class SquareSum {
 public:
  void add(const Vec<C>& x) {
    lanes_ = lanes_ + x * x;
    if (++pending_ == kRun) flush();
  }
  void add(C x) { total_ += static_cast<double>(x) * static_cast<double>(x); }
  double result() {
    flush();
    return total_;
  }

 private:
  static constexpr int kRun = 32;
  void flush() {
    __at_align__ C buf[Vec<C>::size()];
    lanes_.store(buf);
    for (int64_t k = 0; k < Vec<C>::size(); ++k) total_ += static_cast<double>(buf[k]);
    lanes_ = Vec<C>(C(0));
    pending_ = 0;
  }
  Vec<C> lanes_ = Vec<C>(C(0));
  int pending_ = 0;
  double total_ = 0.0;
};

// Elements in one T: 1 for a scalar, the vector width for Vec<C>.
template <typename T>
constexpr int64_t lanes() {
  if constexpr (std::is_arithmetic_v<T>) return 1; else return T::size();
}

// Calls element(T{}, i) for i in [begin, end): whole vectors first, then single elements.
template <typename C, typename Element>
void for_each_element(int64_t begin, int64_t end, const Element& element) {
  int64_t i = begin;
  for (; i + lanes<Vec<C>>() <= end; i += lanes<Vec<C>>()) element(Vec<C>{}, i);
  for (; i < end; ++i) element(C{}, i);
}

// Runs segment_sum(segment) on every segment of the table in parallel; the ordered sum of
// their results.
template <typename SegmentSum>
double parallel_segments(const TensorTable& table, const SegmentSum& segment_sum) {
  const std::vector<Segment> segments = table.segments(kChunk);
  std::vector<double> partial(segments.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) partial[k] = segment_sum(segments[k]);
  });
  return ordered_sum(partial);
}

template <typename T>
T* column(const TensorTable& table, int64_t row, int col) {
  return static_cast<T*>(table.ptr(row, col));
}

// ------------------------------------------------------------------------------ MSAM-SGD
template <typename P, bool kHasGrad, bool kHasMaster>
double msam_sgd_segment(const MsamSgdArgs& a, const Segment& s, double coef, double grad_scale) {
  using C = compute_t<P>;
  using S = state_t<P>;
  using A = MsamSgdArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const P* g = column<P>(a.table, s.row, A::kGrad);
  S* v = column<S>(a.table, s.row, A::kMomentum);
  master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  const MsamSgdStep<C> step{C(a.lr), C(a.weight_decay), C(a.momentum)};
  const MsamSgdStep<Vec<C>> vec_step{Vec<C>(C(a.lr)), Vec<C>(C(a.weight_decay)), Vec<C>(C(a.momentum))};
  SquareSum<C> sum;
  for_each_element<C>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const T p_i = load<T>(p + i);
    T v_i = load<T>(v + i);
    T w = kHasMaster ? load<T>(master + i) : shift(p_i, T(C(coef)), v_i);
    if constexpr (kHasGrad) {
      const T g_i = load<T>(g + i) / T(C(grad_scale));
      if constexpr (std::is_arithmetic_v<T>) step(p_i, g_i, v_i, w); else vec_step(p_i, g_i, v_i, w);
      store(v + i, v_i);
    }
    if constexpr (kHasMaster) {
      if constexpr (kHasGrad) store(master + i, w);
    } else {
      store(p + i, w);
    }
    sum.add(v_i);
  });
  return sum.result();
}

at::Tensor msam_sgd_update_cpu(TensorList params, const OptionalTensorList& grads, TensorList momenta,
                           TensorList masters, double lr, double weight_decay, double momentum,
                           const at::Tensor& coef, at::ScalarType norm_dtype,
                           const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  MsamSgdArgs a = msam_sgd_args(params, grads, momenta, masters, lr, weight_decay, momentum, coef,
                                norm_dtype, grad_scale, found_inf);
  double total = 0.0;
  if (!step_skipped(a.found_inf)) {
    const double c = read_scalar(a.coef, 0.0), scale = read_scalar(a.grad_scale, 1.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "msam_sgd_update_", [&] {
      total = parallel_segments(a.table, [&](const Segment& s) {
        const bool has_grad = a.table.ptr(s.row, MsamSgdArgs::kGrad) != nullptr;
        const bool has_master = a.table.ptr(s.row, MsamSgdArgs::kMaster) != nullptr;
        if (has_grad && has_master) return msam_sgd_segment<scalar_t, true, true>(a, s, c, scale);
        if (has_grad) return msam_sgd_segment<scalar_t, true, false>(a, s, c, scale);
        if (has_master) return msam_sgd_segment<scalar_t, false, true>(a, s, c, scale);
        return msam_sgd_segment<scalar_t, false, false>(a, s, c, scale);
      });
    });
    a.table.write_back();
  }
  return scalar_tensor(total, norm_dtype, params[0].device());
}

// ---------------------------------------------------------------------------- AdamW-MSAM
template <typename P, bool kHasGrad, bool kHasMaster>
double adamw_msam_segment(const AdamwMsamArgs& a, const Segment& s, double coef, double grad_scale,
                          const AdamBias& bias) {
  using C = compute_t<P>;
  using S = state_t<P>;
  using A = AdamwMsamArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const P* g = column<P>(a.table, s.row, A::kGrad);
  S* m = column<S>(a.table, s.row, A::kExpAvg);
  S* sq = column<S>(a.table, s.row, A::kExpAvgSq);
  master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  auto make_step = [&](auto tag) {
    using T = decltype(tag);
    return AdamwMsamStep<T>{T(C(a.beta1)), T(C(1.0 - a.beta1)), T(C(a.beta2)), T(C(1.0 - a.beta2)),
                            T(C(a.eps)), T(C(bias.step_size)), T(C(bias.bias2_sqrt)),
                            T(C(1.0 - a.lr * a.weight_decay))};
  };
  const auto step = make_step(C{});
  const auto vec_step = make_step(Vec<C>{});
  SquareSum<C> sum;
  for_each_element<C>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    T m_i = load<T>(m + i);
    T w = kHasMaster ? load<T>(master + i) : shift(load<T>(p + i), T(C(coef)), m_i);
    if constexpr (kHasGrad) {
      const T g_i = load<T>(g + i) / T(C(grad_scale));
      T s_i = load<T>(sq + i);
      if constexpr (std::is_arithmetic_v<T>) step(g_i, m_i, s_i, w); else vec_step(g_i, m_i, s_i, w);
      store(m + i, m_i);
      store(sq + i, s_i);
    }
    if constexpr (kHasMaster) {
      if constexpr (kHasGrad) store(master + i, w);
    } else {
      store(p + i, w);
    }
    sum.add(m_i);
  });
  return sum.result();
}

at::Tensor adamw_msam_update_cpu(TensorList params, const OptionalTensorList& grads,
                             TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                             TensorList masters, double lr, double beta1, double beta2, double eps,
                             double weight_decay, const at::Tensor& coef, at::ScalarType norm_dtype,
                             const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  using A = AdamwMsamArgs;
  A a = adamw_msam_args(params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr, beta1, beta2, eps,
                        weight_decay, coef, norm_dtype, grad_scale, found_inf);
  double total = 0.0;
  if (!step_skipped(a.found_inf)) {
    const double c = read_scalar(a.coef, 0.0), scale = read_scalar(a.grad_scale, 1.0);
    // Bias corrections at the new step count t + 1, read before any count advances.
    std::vector<AdamBias> bias(a.table.rows());
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      bias[r] = adam_bias(lr, beta1, beta2, *column<float>(a.table, r, A::kStep) + 1.0f);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "adamw_msam_update_", [&] {
      total = parallel_segments(a.table, [&](const Segment& s) {
        const bool has_grad = a.table.ptr(s.row, A::kGrad) != nullptr;
        const bool has_master = a.table.ptr(s.row, A::kMaster) != nullptr;
        const AdamBias& b = bias[s.row];
        if (has_grad && has_master) return adamw_msam_segment<scalar_t, true, true>(a, s, c, scale, b);
        if (has_grad) return adamw_msam_segment<scalar_t, true, false>(a, s, c, scale, b);
        if (has_master) return adamw_msam_segment<scalar_t, false, true>(a, s, c, scale, b);
        return adamw_msam_segment<scalar_t, false, false>(a, s, c, scale, b);
      });
    });
    for (int64_t r = 0; r < a.table.rows(); ++r) {
      if (a.table.ptr(r, A::kGrad) != nullptr) *column<float>(a.table, r, A::kStep) += 1.0f;
    }
    a.table.write_back();
  }
  return scalar_tensor(total, norm_dtype, params[0].device());
}

// ------------------------------------------------------------------- perturbation, finalize
template <typename P, bool kHasMaster>
void perturb_segment(const PerturbArgs& a, const Segment& s, double k) {
  using C = compute_t<P>;
  using A = PerturbArgs;
  P* p = column<P>(a.table, s.row, A::kParam);
  const state_t<P>* x = column<state_t<P>>(a.table, s.row, A::kDirection);
  const master_t* master = column<master_t>(a.table, s.row, A::kMaster);
  for_each_element<C>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const T base = kHasMaster ? load<T>(master + i) : load<T>(p + i);
    store(p + i, shift(base, T(C(k)), load<T>(x + i)));
  });
}

void perturb_cpu(TensorList params, TensorList directions, TensorList masters, const at::Tensor& coef,
             double alpha, const OptionalTensor& found_inf) {
  PerturbArgs a = perturb_args(params, directions, masters, coef, alpha, found_inf);
  if (step_skipped(a.found_inf)) return;
  const double k = alpha * read_scalar(a.coef, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "perturb_", [&] {
    parallel_segments(a.table, [&](const Segment& s) {
      if (a.table.ptr(s.row, PerturbArgs::kMaster) != nullptr) {
        perturb_segment<scalar_t, true>(a, s, k);
      } else {
        perturb_segment<scalar_t, false>(a, s, k);
      }
      return 0.0;
    });
  });
  a.table.write_back();
}

at::Tensor perturbation_coef_cpu(const at::Tensor& sum_of_squares, double rho, const at::Tensor& coef_old,
                             const OptionalTensor& found_inf) {
  check_perturbation_coef_args(sum_of_squares, rho, coef_old, found_inf);
  if (step_skipped(scalar_arg(found_inf))) return coef_old.clone();
  const double sum = read_scalar(scalar_arg(sum_of_squares), 0.0);
  return scalar_tensor(perturbation_coef(sum, rho), coef_old.scalar_type(), coef_old.device());
}

// ----------------------------------------------------------------------------------- SAM
at::Tensor sam_ascent_sum_of_squares_cpu(TensorList params, TensorList grads, bool adaptive,
                                     at::ScalarType norm_dtype) {
  SamArgs a = sam_sum_of_squares_args(params, grads, adaptive, norm_dtype);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_sum_of_squares", [&] {
    using C = compute_t<scalar_t>;
    total = parallel_segments(a.table, [&](const Segment& s) {
      const scalar_t* p = column<scalar_t>(a.table, s.row, SamArgs::kParam);
      const scalar_t* g = column<scalar_t>(a.table, s.row, SamArgs::kGrad);
      SquareSum<C> sum;
      for_each_element<C>(s.begin, s.end, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        sum.add(sam_norm_term(load<T>(p + i), load<T>(g + i), adaptive));
      });
      return sum.result();
    });
  });
  a.table.write_back();
  return scalar_tensor(total, norm_dtype, params[0].device());
}

void sam_ascent_cpu(TensorList params, TensorList grads, TensorList backups, const at::Tensor& scale,
                bool adaptive, const OptionalTensor& found_inf) {
  SamArgs a = sam_ascent_args(params, grads, backups, scale, adaptive, found_inf);
  const bool skipped = step_skipped(a.found_inf);
  const double k = read_scalar(a.scale, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_", [&] {
    using C = compute_t<scalar_t>;
    parallel_segments(a.table, [&](const Segment& s) {
      scalar_t* p = column<scalar_t>(a.table, s.row, SamArgs::kParam);
      const scalar_t* g = column<scalar_t>(a.table, s.row, SamArgs::kGrad);
      scalar_t* backup = column<scalar_t>(a.table, s.row, SamArgs::kBackup);
      for_each_element<C>(s.begin, s.end, [&](auto tag, int64_t i) {
        using T = decltype(tag);
        std::copy(p + i, p + i + lanes<T>(), backup + i);  // the exact bits of w, for the restore
        if (!skipped) store(p + i, sam_ascent(load<T>(p + i), load<T>(g + i), T(C(k)), adaptive));
      });
      return 0.0;
    });
  });
  a.table.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(msam_fused, CPU, m) {
  m.impl("msam_sgd_update_", &msam_sgd_update_cpu);
  m.impl("adamw_msam_update_", &adamw_msam_update_cpu);
  m.impl("perturbation_coef", &perturbation_coef_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("sam_ascent_sum_of_squares", &sam_ascent_sum_of_squares_cpu);
  m.impl("sam_ascent_", &sam_ascent_cpu);
}

}  // namespace msam_fused
