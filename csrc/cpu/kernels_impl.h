// The fused CPU loops: at::parallel_for over fixed segments of the tensor table, at::vec
// inside each segment, the arithmetic from functors.h.
//
// Included once per CPU capability by kernels_<capability>.cpp, each compiled with its own
// instruction-set flags and CPU_CAPABILITY (the namespace that at::vec, the arithmetic and
// these kernels live in, so the builds never share a symbol).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// This build's own copy of the arithmetic (see host_device.h).
#undef MSAM_ARITH_NAMESPACE
#define MSAM_ARITH_NAMESPACE CPU_CAPABILITY
#include "../dtypes.h"
#include "../passes.h"

namespace msam_fused {
inline namespace MSAM_ARITH_NAMESPACE {

// Loads and stores of whole at::vec vectors (passes.h has the scalar case).
template <typename C>
struct Access<at::vec::Vectorized<C>> {
  using V = at::vec::Vectorized<C>;
  template <typename S>
  static V load(const S* src) {
    if constexpr (std::is_same_v<S, C>) {
      return V::loadu(src);
    } else {
      __at_align__ C buf[V::size()];
      for (int64_t k = 0; k < V::size(); ++k) buf[k] = static_cast<C>(src[k]);
      return V::loadu(buf);
    }
  }
  template <typename S>
  static void store(S* dst, const V& x) {
    if constexpr (std::is_same_v<S, C>) {
      x.store(dst);
    } else {
      __at_align__ C buf[V::size()];
      x.store(buf);
      for (int64_t k = 0; k < V::size(); ++k) dst[k] = static_cast<S>(buf[k]);
    }
  }
};

}  // namespace MSAM_ARITH_NAMESPACE

namespace cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kChunk = kCpuSegmentLength;  // elements per segment
constexpr int kRun = 32;  // vectors summed in compute precision before going to double
constexpr int64_t kPrefetchAhead = 512;  // elements: a few KB ahead of each stream

template <typename C>
using Vec = at::vec::Vectorized<C>;

template <typename C>
double horizontal_sum(const Vec<C>& x) {
  __at_align__ C buf[Vec<C>::size()];
  x.store(buf);
  double total = 0.0;
  for (int64_t k = 0; k < Vec<C>::size(); ++k) total += static_cast<double>(buf[k]);
  return total;
}

// Asks the CPU to start loading element i of each stream (a null stream is skipped): with
// only reads in flight the hardware prefetchers alone leave ~10% of the bandwidth unused.
template <typename... Streams>
void prefetch(int64_t i, const Streams*... streams) {
  ((streams != nullptr ? __builtin_prefetch(streams + i) : void()), ...);
}

// Calls element(Tag<T>{}, i) -> Terms<T> for i in [begin, end), whole vectors first, then single
// elements; with kSum, returns what they add up to. The accumulators are locals, so they stay
// in registers; vectors are summed in C over runs of kRun, then in double, which keeps a long
// float32 segment about as accurate as torch's cascade sum.
template <typename C, bool kSum, typename Element, typename... Streams>
Sums run_elements(int64_t begin, int64_t end, const Element& element, const Streams*... streams) {
  Vec<C> squares(C(0)), markers(C(0));
  Sums sums;
  int run = 0;
  int64_t i = begin;
  for (; i + Vec<C>::size() <= end; i += Vec<C>::size()) {
    prefetch(i + kPrefetchAhead, streams...);
    const Terms<Vec<C>> t = element(Tag<Vec<C>>{}, i);
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
    const Terms<C> t = element(Tag<C>{}, i);
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

// Runs segment_sums(segment) -> Sums on every segment in parallel; `partials` (optional)
// receives each segment's (squares, nonfinite) in segment order. Threads claim segments one at
// a time, so a thread that the OS preempts (a busy machine) holds up only its current segment.
template <typename SegmentFn>
void parallel_segments(const TensorTable& table, const SegmentFn& segment_sums, double* partials = nullptr) {
  const std::vector<Segment> segments = table.segments(kChunk);
  const int64_t n = static_cast<int64_t>(segments.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < n; k = next++) {
      const Sums s = segment_sums(segments[k]);
      if (partials != nullptr) {
        partials[2 * k] = s.squares;
        partials[2 * k + 1] = s.nonfinite;
      }
    }
  });
}

// Runs segment(s, has_grad, has_master) on every segment, with the two flags of the
// segment's row as std::integral_constant.
template <typename Args, typename SegmentFn>
void parallel_rows(const Args& a, const SegmentFn& segment, double* partials) {
  parallel_segments(a.table, [&](const Segment& s) {
    const bool has_grad = a.table.ptr(s.row, Args::kGrad) != nullptr;
    const bool has_master = a.table.ptr(s.row, Args::kMaster) != nullptr;
    if (has_grad && has_master) return segment(s, std::true_type{}, std::true_type{});
    if (has_grad) return segment(s, std::true_type{}, std::false_type{});
    if (has_master) return segment(s, std::false_type{}, std::true_type{});
    return segment(s, std::false_type{}, std::false_type{});
  }, partials);
}

template <typename T>
T* column(const TensorTable& table, int64_t row, int col) {
  return static_cast<T*>(table.ptr(row, col));
}

// Scalar and at::vec versions of a functor (Both, passes.h).
template <template <typename> class F, typename C>
using ScalarAndVec = Both<F, C, Vec<C>>;

template <typename C>
ScalarAndVec<PassCoefs, C> pass_coefs(const PassScalars& k) {
  return ScalarAndVec<PassCoefs, C>(k.coef_old, k.coef_new, k.grad_scale, k.unscale);
}

// ---------------------------------------------------------------- MSAM-SGD and AdamW-MSAM
// One segment of a pass (see Pass in kernel_types.h); kHasGrad / kHasMaster: the row has them.
template <Pass kPass, typename P, bool kHasGrad, bool kHasMaster>
Sums msam_sgd_segment(const MsamSgdArgs& a, const Segment& s, const PassScalars& scalars) {
  using C = compute_t<P>;
  using A = MsamSgdArgs;
  const MsamSgdRow<P> row{column<P>(a.table, s.row, A::kParam), column<P>(a.table, s.row, A::kGrad),
                          column<state_t<P>>(a.table, s.row, A::kMomentum),
                          column<master_t>(a.table, s.row, A::kMaster)};
  const ScalarAndVec<MsamSgdStep, C> step(a.hyper);
  const auto k = pass_coefs<C>(scalars);
  auto element = [&](auto tag, int64_t i) {
    return msam_sgd_element<kPass, kHasGrad, kHasMaster>(row, i, step.get(tag), k.get(tag), scalars.skipped);
  };
  return run_elements<C, sums_terms(kPass)>(s.begin, s.end, element, row.p, row.g, row.v);
}

template <Pass kPass, typename P, bool kHasGrad, bool kHasMaster>
Sums adamw_msam_segment(const AdamwMsamArgs& a, const Segment& s, const PassScalars& scalars,
                        const AdamBias& bias) {
  using C = compute_t<P>;
  using A = AdamwMsamArgs;
  const AdamwMsamRow<P> row{column<P>(a.table, s.row, A::kParam), column<P>(a.table, s.row, A::kGrad),
                            column<state_t<P>>(a.table, s.row, A::kExpAvg),
                            column<state_t<P>>(a.table, s.row, A::kExpAvgSq),
                            column<master_t>(a.table, s.row, A::kMaster)};
  const ScalarAndVec<AdamwMsamStep, C> step(a.hyper, bias);
  const auto k = pass_coefs<C>(scalars);
  auto element = [&](auto tag, int64_t i) {
    return adamw_msam_element<kPass, kHasGrad, kHasMaster>(row, i, step.get(tag), k.get(tag));
  };
  return run_elements<C, sums_terms(kPass)>(s.begin, s.end, element, row.g, row.m);
}

template <Pass kPass>
void msam_sgd_pass(const MsamSgdArgs& a, const PassScalars& k, double* partials) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "msam_sgd", [&] {
    parallel_rows(a, [&](const Segment& s, auto has_grad, auto has_master) {
      return msam_sgd_segment<kPass, scalar_t, decltype(has_grad)::value, decltype(has_master)::value>(
          a, s, k);
    }, partials);
  });
}

template <Pass kPass>
void adamw_msam_pass(const AdamwMsamArgs& a, const PassScalars& k, const std::vector<AdamBias>& bias,
                     double* partials) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "adamw_msam", [&] {
    parallel_rows(a, [&](const Segment& s, auto has_grad, auto has_master) {
      return adamw_msam_segment<kPass, scalar_t, decltype(has_grad)::value, decltype(has_master)::value>(
          a, s, k, kPass == Pass::kStep ? bias[s.row] : AdamBias{0.0, 1.0});
    }, partials);
  });
}

void msam_sgd_kernel(Pass pass, const MsamSgdArgs& a, const PassScalars& k, double* partials) {
  switch (pass) {
    case Pass::kPartials: return msam_sgd_pass<Pass::kPartials>(a, k, partials);
    case Pass::kStash: return msam_sgd_pass<Pass::kStash>(a, k, partials);
    case Pass::kFinish: return msam_sgd_pass<Pass::kFinish>(a, k, partials);
    case Pass::kStep: return msam_sgd_pass<Pass::kStep>(a, k, partials);
  }
}

void adamw_msam_kernel(Pass pass, const AdamwMsamArgs& a, const PassScalars& k, const std::vector<AdamBias>& bias,
                       double* partials) {
  if (pass == Pass::kPartials) return adamw_msam_pass<Pass::kPartials>(a, k, bias, partials);
  TORCH_INTERNAL_ASSERT(pass == Pass::kStep, "adamw_msam: no such pass");
  adamw_msam_pass<Pass::kStep>(a, k, bias, partials);
}

// ---------------------------------------------------------------------------- perturbation
template <typename P, bool kHasMaster>
Sums perturb_segment(const PerturbArgs& a, const Segment& s, double k) {
  using C = compute_t<P>;
  using A = PerturbArgs;
  const PerturbRow<P> row{column<P>(a.table, s.row, A::kParam),
                          column<state_t<P>>(a.table, s.row, A::kDirection),
                          column<master_t>(a.table, s.row, A::kMaster)};
  return run_elements<C, false>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = typename decltype(tag)::type;
    perturb_element<kHasMaster>(row, i, T(C(k)));
    return Terms<T>{};
  });
}

void perturb_kernel(const PerturbArgs& a, double k) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "perturb_", [&] {
    parallel_segments(a.table, [&](const Segment& s) {
      return a.table.ptr(s.row, PerturbArgs::kMaster) != nullptr ? perturb_segment<scalar_t, true>(a, s, k)
                                                                 : perturb_segment<scalar_t, false>(a, s, k);
    });
  });
}

// ----------------------------------------------------------------------------------- SAM
template <typename P>
SamRow<P> sam_row(const SamArgs& a, int64_t row) {
  return {column<P>(a.table, row, SamArgs::kParam), column<P>(a.table, row, SamArgs::kGrad),
          column<P>(a.table, row, SamArgs::kOut)};
}

// Whether this build has non-temporal (streaming) stores of whole vectors.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kStreamingStores = true;
#else
constexpr bool kStreamingStores = false;
#endif

// Stores x at dst (aligned to the vector's size) past the caches: a plain store to memory not in
// cache first reads the line (read for ownership), which a destination written without being
// read does not need. The stores are weakly ordered: end with _mm_sfence().
template <typename C>
void stream_store(C* dst, const Vec<C>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    _mm512_stream_ps(dst, x);
  } else {
    _mm512_stream_pd(dst, x);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<C, float>) {
    _mm256_stream_ps(dst, x);
  } else {
    _mm256_stream_pd(dst, x);
  }
#else
  x.store(dst);
#endif
}

// The ascent into a separate buffer of float32/float64: single elements until out is aligned to
// the vector, streamed vectors, single elements at the end. No software prefetch: with streamed
// stores it made this loop about a quarter slower on an AVX-512 Xeon.
template <typename C>
void sam_ascent_streamed(const SamRow<C>& row, int64_t begin, int64_t end, C scale, bool adaptive) {
  constexpr int64_t kBytes = Vec<C>::size() * sizeof(C);
  int64_t i = begin;
  for (; i < end && reinterpret_cast<uintptr_t>(row.out + i) % kBytes != 0; ++i) {
    sam_ascent_element<C>(row, i, scale, adaptive);
  }
  const Vec<C> k(scale);
  for (; i + Vec<C>::size() <= end; i += Vec<C>::size()) {
    stream_store(row.out + i, sam_ascended<Vec<C>>(row, i, k, adaptive));
  }
  for (; i < end; ++i) sam_ascent_element<C>(row, i, scale, adaptive);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();  // this thread's streamed stores are visible before the op returns
#endif
}

void sam_partials_kernel(const SamArgs& a, double* partials) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_partials", [&] {
    using C = compute_t<scalar_t>;
    parallel_segments(a.table, [&](const Segment& s) {
      const SamRow<scalar_t> row = sam_row<scalar_t>(a, s.row);
      return run_elements<C, true>(s.begin, s.end, [&](auto tag, int64_t i) {
        return sam_norm_element<typename decltype(tag)::type>(row, i, a.adaptive);
      });
    }, partials);
  });
}

// out = w + e; skipped: out = w bit for bit, nothing to do in place (out is p).
template <typename P>
Sums sam_ascent_segment(const SamArgs& a, const Segment& s, double scale, bool skipped) {
  using C = compute_t<P>;
  const SamRow<P> row = sam_row<P>(a, s.row);
  if (skipped) {
    if (row.out != row.p) std::copy(row.p + s.begin, row.p + s.end, row.out + s.begin);
    return {};
  }
  if constexpr (kStreamingStores && std::is_same_v<P, C>) {
    if (row.out != row.p) {
      sam_ascent_streamed<C>(row, s.begin, s.end, C(scale), a.adaptive);
      return {};
    }
  }
  return run_elements<C, false>(s.begin, s.end, [&](auto tag, int64_t i) {
    using T = typename decltype(tag)::type;
    sam_ascent_element<T>(row, i, T(C(scale)), a.adaptive);
    return Terms<T>{};
  }, row.p, row.g);
}

void sam_ascent_kernel(const SamArgs& a, double scale, bool skipped) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_", [&] {
    parallel_segments(a.table, [&](const Segment& s) { return sam_ascent_segment<scalar_t>(a, s, scale, skipped); });
  });
}

inline const Kernels kKernels = {C10_STRINGIZE(CPU_CAPABILITY), &msam_sgd_kernel, &adamw_msam_kernel,
                                 &perturb_kernel, &sam_partials_kernel, &sam_ascent_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace msam_fused
