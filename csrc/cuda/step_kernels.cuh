// The CUDA kernels of every pass: one block per segment of the tensor table, the per-element
// work from passes.h on register packs (pack.cuh). Device code only (no ATen), so that the
// test suite can compile it to PTX on its own (tests/test_cuda_ptx.py).
//
// Launch shape. A segment is kCudaSegmentLength = 16384 elements of one tensor; a block of
// kThreads = 512 threads walks it in packs of kLanes<P> elements per thread: 4 for float32 and
// float64 parameters, 8 for bfloat16/float16, so that every parameter and gradient access is a
// whole 128-bit transaction (two for float64 and for the float32 state of 16-bit parameters).
// That is 8 iterations per thread (4 for 16-bit types), each loading every operand first,
// then computing, then storing. Memory-level parallelism: a float32 MSAM-SGD step thread has
// 3 x 16 bytes of loads in flight per iteration, a bfloat16 AdamW-MSAM thread with master
// weights 8 x 16. ptxas (CUDA 13.0, sm_90) gives these kernels 37 (float32 MSAM-SGD step) to
// 104 (bfloat16 AdamW-MSAM step) registers a thread and no spills (a cap of 64 for two blocks
// per SM made the larger ones spill), so an SM holds three to one 512-thread blocks: about
// 64-72 KB of loads in flight, above the ~25-30 KB an H200 needs to keep its memory busy
// (latency x bandwidth per SM). Smaller blocks would not help: the registers,
// not the block size, bound the threads per SM. These are estimates from the compiled code and
// the hardware's figures; no GPU has measured them (docs/kernels.md). A row whose pointers are not all 16-byte aligned
// (a view at an odd offset) is walked one element per thread, as is the tail of a segment
// that is not a whole number of packs.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../dtypes.h"
#include "../passes.h"
#include "../scalar_arg.h"
#include "pack.cuh"
#include "table_layout.h"

namespace msam_fused::cuda {

constexpr int kThreads = 512;
constexpr int64_t kChunk = kCudaSegmentLength;  // elements per block
constexpr int kSumThreads = 1024;               // the block that adds up a bucket's partials

// Elements per thread and iteration: 16 bytes of the parameter type, and at least 4.
template <typename P>
constexpr int kLanes = sizeof(P) >= 4 ? 4 : 16 / static_cast<int>(sizeof(P));

template <typename P>
using PackOf = Pack<compute_t<P>, kLanes<P>>;

// Scalar and pack versions of a functor (Both, passes.h).
template <template <typename> class F, typename P>
using ScalarAndPack = Both<F, compute_t<P>, PackOf<P>>;

// ----------------------------------------------------------------------- the block's task
struct BlockTask {
  const int64_t* row;  // the row's words: pointers, numel, flags
  int64_t row_index, begin, end;
  bool aligned;
};

// The row and elements of this block's segment.
__device__ inline BlockTask block_task(const DeviceTable& t, int width) {
  const int64_t* first = t.words + t.rows * row_words(width);
  const int64_t b = blockIdx.x;
  const int64_t r = row_of_segment(first, t.rows, b);
  const int64_t* row = t.words + r * row_words(width);
  const int64_t begin = (b - first[r]) * kChunk;
  const int64_t numel = row[width];
  return {row, r, begin, begin + kChunk < numel ? begin + kChunk : numel, (row[width + 1] & kRowAligned) != 0};
}

template <typename T>
__device__ T* column(const BlockTask& task, int col) {
  return reinterpret_cast<T*>(task.row[col]);
}

// Calls f(Tag<T>{}, i) for the block's elements: packs of kLanes<P> over the aligned part of
// the segment, then single elements.
template <typename P, typename F>
__device__ void for_each_element(const BlockTask& task, const F& f) {
  constexpr int N = kLanes<P>;
  int64_t rest = task.begin;
  if (task.aligned) {
    rest = task.begin + (task.end - task.begin) / N * N;
    for (int64_t i = task.begin + int64_t(threadIdx.x) * N; i < rest; i += int64_t(kThreads) * N) {
      f(Tag<PackOf<P>>{}, i);
    }
  }
  for (int64_t i = rest + threadIdx.x; i < task.end; i += kThreads) f(Tag<compute_t<P>>{}, i);
}

// Calls f(has_grad, has_master) with the row's flags as std::integral_constant.
template <typename F>
__device__ void with_row_flags(bool has_grad, bool has_master, const F& f) {
  if (has_grad && has_master) {
    f(std::true_type{}, std::true_type{});
  } else if (has_grad) {
    f(std::true_type{}, std::false_type{});
  } else if (has_master) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

// ------------------------------------------------------------------------- block sums
__device__ inline double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// The block's total of x (in thread 0), in an order fixed by the block size.
template <int kBlock>
__device__ double block_sum(double x) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block size");
  __shared__ double warps[kBlock / 32];
  x = warp_sum(x);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < kBlock / 32 ? warps[threadIdx.x] : 0.0;
  if (threadIdx.x < 32) x = warp_sum(x);
  __syncthreads();  // `warps` may be reused by the caller's next block_sum
  return x;
}

// A thread's running sums, in compute precision (32 elements or fewer per thread).
template <typename C>
__device__ void add_terms(Terms<C>& sums, const Terms<C>& t) {
  sums.direction += t.direction * t.direction;
  sums.nonfinite += t.nonfinite;
}

template <typename C, int N>
__device__ void add_terms(Terms<C>& sums, const Terms<Pack<C, N>>& t) {
#pragma unroll
  for (int k = 0; k < N; ++k) add_terms(sums, Terms<C>{t.direction.v[k], t.nonfinite.v[k]});
}

// Writes the block's partials: (squares, nonfinite) into row blockIdx.x.
template <typename C>
__device__ void write_block_sums(const Terms<C>& thread_sums, double* partials) {
  const double squares = block_sum<kThreads>(thread_sums.direction);
  const double nonfinite = block_sum<kThreads>(thread_sums.nonfinite);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = squares;
    partials[2 * blockIdx.x + 1] = nonfinite;
  }
}

__device__ inline void write_scalar(void* out, ScalarKind kind, double value) {
  if (kind == ScalarKind::kDouble) {
    *static_cast<double*>(out) = value;
  } else if (kind == ScalarKind::kFloat) {
    *static_cast<float*>(out) = static_cast<float>(value);
  } else {
    *static_cast<bool*>(out) = value != 0.0;
  }
}

// --------------------------------------------------------------------------------- kernels
// The 0-d tensors of a pass (device pointers).
struct PassScalars {
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
};

template <typename P>
__device__ ScalarAndPack<PassCoefs, P> read_coefs(const PassScalars& s) {
  return ScalarAndPack<PassCoefs, P>(read_scalar(s.coef_old, 0.0), read_scalar(s.coef_new, 0.0),
                                     read_scalar(s.grad_scale, 1.0), s.grad_scale.kind != ScalarKind::kAbsent);
}

// `hyper`: the bucket's MSAM-SGD hyper-parameters, read here from device memory.
template <Pass kPass, typename P>
__global__ void __launch_bounds__(kThreads)
    msam_sgd_kernel(DeviceTable t, const double* __restrict__ hyper, PassScalars s, double* partials) {
  using A = MsamSgdColumns;
  using G = std::conditional_t<kPass == Pass::kStash, P, const P>;  // only kStash writes the gradients
  // A skipped step writes nothing, except that kFinish puts the stashed momenta back.
  const bool skipped = step_skipped(s.found_inf);
  if (skipped && kPass == Pass::kStep) return;
  const BlockTask task = block_task(t, A::kWidth);
  P* __restrict__ p = column<P>(task, A::kParam);
  G* __restrict__ g = column<G>(task, A::kGrad);
  state_t<P>* __restrict__ v = column<state_t<P>>(task, A::kMomentum);
  master_t* __restrict__ master = column<master_t>(task, A::kMaster);
  const MsamSgdRow<P, G> row{p, g, v, master};
  const ScalarAndPack<MsamSgdStep, P> step(hyper);
  const auto k = read_coefs<P>(s);
  Terms<compute_t<P>> sums{};
  with_row_flags(g != nullptr, master != nullptr, [&](auto has_grad, auto has_master) {
    for_each_element<P>(task, [&](auto tag, int64_t i) {
      add_terms(sums, msam_sgd_element<kPass, decltype(has_grad)::value, decltype(has_master)::value>(
                          row, i, step.get(tag), k.get(tag), skipped));
    });
  });
  if constexpr (sums_terms(kPass)) write_block_sums(sums, partials);
}

// One thread per row, before adamw_msam_kernel<kStep>: the row's bias corrections at its new
// step count (once per row, in double), and the step count of each row with a gradient
// advances by one unless the step is skipped.
__global__ void adam_bias_kernel(DeviceTable t, const double* __restrict__ hyper, ScalarArg found_inf,
                                 AdamBias* __restrict__ bias) {
  using A = AdamwMsamColumns;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= t.rows || step_skipped(found_inf)) return;
  const int64_t* row = t.words + r * row_words(A::kWidth);
  float* step = reinterpret_cast<float*>(row[A::kStep]);
  const float t_new = *step + 1.0f;
  bias[r] = adam_bias(hyper, t_new);
  if (row[A::kGrad] != 0) *step = t_new;
}

template <Pass kPass, typename P>
__global__ void __launch_bounds__(kThreads)
    adamw_msam_kernel(DeviceTable t, const double* __restrict__ hyper, const AdamBias* __restrict__ bias,
                      PassScalars s, double* partials) {
  using A = AdamwMsamColumns;
  if (kPass == Pass::kStep && step_skipped(s.found_inf)) return;
  const BlockTask task = block_task(t, A::kWidth);
  P* __restrict__ p = column<P>(task, A::kParam);
  const P* __restrict__ g = column<const P>(task, A::kGrad);
  state_t<P>* __restrict__ m = column<state_t<P>>(task, A::kExpAvg);
  state_t<P>* __restrict__ sq = column<state_t<P>>(task, A::kExpAvgSq);
  master_t* __restrict__ master = column<master_t>(task, A::kMaster);
  const AdamwMsamRow<P> row{p, g, m, sq, master};
  const ScalarAndPack<AdamwMsamStep, P> step(hyper, kPass == Pass::kStep ? bias[task.row_index] : AdamBias{0.0, 1.0});
  const auto k = read_coefs<P>(s);
  Terms<compute_t<P>> sums{};
  with_row_flags(g != nullptr, master != nullptr, [&](auto has_grad, auto has_master) {
    for_each_element<P>(task, [&](auto tag, int64_t i) {
      add_terms(sums, adamw_msam_element<kPass, decltype(has_grad)::value, decltype(has_master)::value>(
                          row, i, step.get(tag), k.get(tag)));
    });
  });
  if constexpr (sums_terms(kPass)) write_block_sums(sums, partials);
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(DeviceTable t, ScalarArg coef, double alpha) {
  using C = compute_t<P>;
  using A = PerturbColumns;
  const BlockTask task = block_task(t, A::kWidth);
  P* __restrict__ p = column<P>(task, A::kParam);
  const state_t<P>* __restrict__ x = column<const state_t<P>>(task, A::kDirection);
  const master_t* __restrict__ master = column<const master_t>(task, A::kMaster);
  const PerturbRow<P> row{p, x, master};
  const C k(alpha * read_scalar(coef, 0.0));
  with_row_flags(true, master != nullptr, [&](auto, auto has_master) {
    for_each_element<P>(task, [&](auto tag, int64_t i) {
      using T = typename decltype(tag)::type;
      perturb_element<decltype(has_master)::value>(row, i, T(k));
    });
  });
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
    sam_partials_kernel(DeviceTable t, bool adaptive, double* partials) {
  const BlockTask task = block_task(t, SamColumns::kWidth);
  const SamRow<P> row{column<P>(task, SamColumns::kParam), column<const P>(task, SamColumns::kGrad), nullptr};
  Terms<compute_t<P>> sums{};
  for_each_element<P>(task, [&](auto tag, int64_t i) {
    add_terms(sums, sam_norm_element<typename decltype(tag)::type>(row, i, adaptive));
  });
  write_block_sums(sums, partials);
}

// out = w + e, or, when skipped, the exact bits of w (nothing to do when out is p itself).
// p and out may be one tensor, so neither is __restrict__.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    sam_ascent_kernel(DeviceTable t, ScalarArg scale, bool adaptive, ScalarArg found_inf) {
  using C = compute_t<P>;
  const BlockTask task = block_task(t, SamColumns::kWidth);
  P* p = column<P>(task, SamColumns::kParam);
  P* out = column<P>(task, SamColumns::kOut);
  const bool skipped = step_skipped(found_inf);
  if (skipped && out == p) return;
  const SamRow<P> row{p, column<const P>(task, SamColumns::kGrad), out};
  const C k(read_scalar(scale, 0.0));
  for_each_element<P>(task, [&](auto tag, int64_t i) {
    using T = typename decltype(tag)::type;
    if (!skipped) {
      sam_ascent_element<T>(row, i, T(k), adaptive);
    } else if constexpr (std::is_same_v<T, C>) {
      out[i] = p[i];
    } else {
      P lanes[kLanes<P>];
      load_lanes<false>(p + i, lanes);
      store_lanes(out + i, lanes);
    }
  });
}

// A bucket's partials added in a fixed order: the squares into `squares` (float or double),
// whether any non-finite marker was set into `nonfinite`.
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const double* partials, int64_t segments, void* squares, ScalarKind squares_kind,
                        bool* nonfinite) {
  double sq = 0.0, bad = 0.0;
  for (int64_t b = threadIdx.x; b < segments; b += kSumThreads) {
    sq += partials[2 * b];
    bad += partials[2 * b + 1];
  }
  sq = block_sum<kSumThreads>(sq);
  bad = block_sum<kSumThreads>(bad);
  if (threadIdx.x == 0) {
    write_scalar(squares, squares_kind, sq);
    *nonfinite = isnan(bad);
  }
}

__global__ void perturbation_coef_kernel(ScalarArg sum_of_squares, ScalarArg rho, ScalarArg coef_old,
                                         ScalarArg found_inf, void* out, ScalarKind out_kind) {
  const double c = step_skipped(found_inf)
                       ? read_scalar(coef_old, 0.0)
                       : msam_fused::perturbation_coef(read_scalar(sum_of_squares, 0.0), read_scalar(rho, 0.0));
  write_scalar(out, out_kind, c);
}

}  // namespace msam_fused::cuda
