// The CUDA passes of the msam_fused ops (op_impls.h does the rest): multi-tensor kernels over
// the device copy of the tensor table, one block per segment, the per-element work from passes.h.
//
// Nothing here reads a device value on the host: coefficients, grad_scale and found_inf are
// read by the kernels, and a skipped step (found_inf set) returns at the top of each kernel.
// Each block writes its sums into its own slot; one small kernel adds the slots in a fixed
// order, so reruns give identical norms (no float atomics). All kernels run on the current
// stream and the launches per call do not depend on the number of tensors, so a step can be
// captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../op_impls.h"
#include "../passes.h"
#include "device_table.h"

namespace msam_fused::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = kCudaSegmentLength;  // elements per block
constexpr int kSumThreads = 1024;      // the block that adds up the slots

// ----------------------------------------------------------------------- device helpers
struct BlockTask {
  const int64_t* row;  // the row's words: pointers, then numel
  int64_t begin, end;
};

__device__ BlockTask block_task(DeviceTable t, int width) {
  const int64_t* segment = t.words + t.rows * row_words(width) + 2 * blockIdx.x;
  const int64_t* row = t.words + segment[0] * row_words(width);
  const int64_t begin = segment[1];
  const int64_t end = begin + kChunk < row[width] ? begin + kChunk : row[width];
  return {row, begin, end};
}

template <typename T>
__device__ T* column(const BlockTask& task, int col) {
  return reinterpret_cast<T*>(task.row[col]);
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

__device__ double warp_sum(double x) {
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

// Writes the block's sums into its slots (squares, nonfinite).
template <typename C>
__device__ void write_block_sums(const Terms<C>& thread_sums, double* slots) {
  const double squares = block_sum<kThreads>(thread_sums.direction);
  const double nonfinite = block_sum<kThreads>(thread_sums.nonfinite);
  if (threadIdx.x == 0) {
    slots[2 * blockIdx.x] = squares;
    slots[2 * blockIdx.x + 1] = nonfinite;
  }
}

template <typename C>
__device__ void add_terms(Terms<C>& sums, const Terms<C>& t) {
  sums.direction += t.direction * t.direction;
  sums.nonfinite += t.nonfinite;
}

__device__ void write_scalar(void* out, ScalarKind kind, double value) {
  if (kind == ScalarKind::kDouble) {
    *static_cast<double*>(out) = value;
  } else if (kind == ScalarKind::kFloat) {
    *static_cast<float*>(out) = static_cast<float>(value);
  } else {
    *static_cast<bool*>(out) = value != 0.0;
  }
}

ScalarKind kind_of(at::ScalarType t) {
  return t == at::kDouble ? ScalarKind::kDouble : t == at::kFloat ? ScalarKind::kFloat : ScalarKind::kBool;
}

// --------------------------------------------------------------------------------- kernels
template <typename C>
PassCoefs<C> __device__ read_coefs(ScalarArg coef_old, ScalarArg coef_new, ScalarArg grad_scale) {
  return {C(read_scalar(coef_old, 0.0)), C(-read_scalar(coef_new, 0.0)), C(read_scalar(grad_scale, 1.0)),
          grad_scale.kind != ScalarKind::kAbsent};
}

struct PassScalars {
  ScalarArg coef_old, coef_new, grad_scale, found_inf;
};

template <Pass kPass, typename P>
__global__ void __launch_bounds__(kThreads) msam_sgd_kernel(DeviceTable t, MsamSgdStep<compute_t<P>> step,
                                                            PassScalars s, double* slots) {
  using C = compute_t<P>;
  using A = MsamSgdArgs;
  // A skipped step writes nothing, except that kFinish puts the stashed momenta back.
  const bool skipped = step_skipped(s.found_inf);
  if (skipped && kPass != Pass::kSumOfSquares && kPass != Pass::kFinish) return;
  const BlockTask task = block_task(t, A::kWidth);
  const MsamSgdRow<P> row{column<P>(task, A::kParam), column<P>(task, A::kGrad),
                          column<state_t<P>>(task, A::kMomentum), column<master_t>(task, A::kMaster)};
  const PassCoefs<C> k = read_coefs<C>(s.coef_old, s.coef_new, s.grad_scale);
  Terms<C> sums{};
  with_row_flags(row.g != nullptr, row.master != nullptr, [&](auto has_grad, auto has_master) {
    for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
      add_terms(sums, msam_sgd_element<kPass, decltype(has_grad)::value, decltype(has_master)::value>(
                          row, i, step, k, skipped));
    }
  });
  if (sums_terms(kPass)) write_block_sums(sums, slots);
}

struct AdamwHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

template <Pass kPass, typename P>
__global__ void __launch_bounds__(kThreads) adamw_msam_kernel(DeviceTable t, AdamwHyper h, PassScalars s,
                                                              double* slots) {
  using C = compute_t<P>;
  using A = AdamwMsamArgs;
  if (kPass != Pass::kSumOfSquares && step_skipped(s.found_inf)) return;
  const BlockTask task = block_task(t, A::kWidth);
  const AdamwMsamRow<P> row{column<P>(task, A::kParam), column<const P>(task, A::kGrad),
                            column<state_t<P>>(task, A::kExpAvg), column<state_t<P>>(task, A::kExpAvgSq),
                            column<master_t>(task, A::kMaster)};
  // The row's step count advances after this kernel (advance_steps_kernel).
  const AdamBias bias = kPass == Pass::kSumOfSquares
                            ? AdamBias{0.0, 1.0}
                            : adam_bias(h.lr, h.beta1, h.beta2, *column<const float>(task, A::kStep) + 1.0f);
  const AdamwMsamStep<C> step{C(h.beta1), C(1.0 - h.beta1), C(h.beta2), C(1.0 - h.beta2), C(h.eps),
                              C(bias.step_size), C(bias.bias2_sqrt), C(1.0 - h.lr * h.weight_decay)};
  const PassCoefs<C> k = read_coefs<C>(s.coef_old, s.coef_new, s.grad_scale);
  Terms<C> sums{};
  with_row_flags(row.g != nullptr, row.master != nullptr, [&](auto has_grad, auto has_master) {
    for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
      add_terms(sums, adamw_msam_element<kPass, decltype(has_grad)::value, decltype(has_master)::value>(
                          row, i, step, k));
    }
  });
  if (sums_terms(kPass)) write_block_sums(sums, slots);
}

// One thread per row: the step count of each row with a gradient advances by one.
__global__ void advance_steps_kernel(DeviceTable t, ScalarArg found_inf) {
  using A = AdamwMsamArgs;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= t.rows || step_skipped(found_inf)) return;
  const int64_t* row = t.words + r * row_words(A::kWidth);
  if (row[A::kGrad] != 0) *reinterpret_cast<float*>(row[A::kStep]) += 1.0f;
}

template <typename P>
__global__ void __launch_bounds__(kThreads) perturb_kernel(DeviceTable t, ScalarArg coef, double alpha,
                                                           ScalarArg found_inf) {
  using C = compute_t<P>;
  using A = PerturbArgs;
  if (step_skipped(found_inf)) return;
  const BlockTask task = block_task(t, A::kWidth);
  const PerturbRow<P> row{column<P>(task, A::kParam), column<const state_t<P>>(task, A::kDirection),
                          column<const master_t>(task, A::kMaster)};
  const C k(alpha * read_scalar(coef, 0.0));
  with_row_flags(true, row.master != nullptr, [&](auto, auto has_master) {
    for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
      perturb_element<decltype(has_master)::value>(row, i, k);
    }
  });
}

template <typename P>
__device__ SamRow<P> sam_row(const BlockTask& task) {
  return {column<P>(task, SamArgs::kParam), column<const P>(task, SamArgs::kGrad),
          column<P>(task, SamArgs::kBackup)};
}

template <typename P>
__global__ void __launch_bounds__(kThreads) sam_sum_of_squares_kernel(DeviceTable t, bool adaptive,
                                                                      double* slots) {
  using C = compute_t<P>;
  const BlockTask task = block_task(t, SamArgs::kWidth);
  const SamRow<P> row = sam_row<P>(task);
  Terms<C> sums{};
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    add_terms(sums, Terms<C>{sam_norm_element<C>(row, i, adaptive), C(0)});
  }
  write_block_sums(sums, slots);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) sam_ascent_kernel(DeviceTable t, ScalarArg scale, bool adaptive,
                                                              ScalarArg found_inf) {
  using C = compute_t<P>;
  const BlockTask task = block_task(t, SamArgs::kWidth);
  const SamRow<P> row = sam_row<P>(task);
  const bool skipped = step_skipped(found_inf);
  const C k(read_scalar(scale, 0.0));
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    row.backup[i] = row.p[i];  // the exact bits of w, for the restore
    if (!skipped) sam_ascent_element<C>(row, i, k, adaptive);
  }
}

// Adds the slots in a fixed order: squares into `squares` (float or double), and whether any
// non-finite marker was set into `nonfinite` (bool; optional).
__global__ void __launch_bounds__(kSumThreads) sum_slots_kernel(const double* slots, int64_t blocks,
                                                                void* squares, ScalarKind squares_kind,
                                                                bool* nonfinite) {
  double sq = 0.0, bad = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kSumThreads) {
    sq += slots[2 * b];
    bad += slots[2 * b + 1];
  }
  sq = block_sum<kSumThreads>(sq);
  bad = block_sum<kSumThreads>(bad);
  if (threadIdx.x == 0) {
    write_scalar(squares, squares_kind, sq);
    if (nonfinite != nullptr) *nonfinite = isnan(bad);
  }
}

__global__ void perturbation_coef_kernel(ScalarArg sum_of_squares, double rho, ScalarArg coef_old,
                                         ScalarArg found_inf, void* out, ScalarKind out_kind) {
  const double c = step_skipped(found_inf)
                       ? read_scalar(coef_old, 0.0)
                       : msam_fused::perturbation_coef(read_scalar(sum_of_squares, 0.0), rho);
  write_scalar(out, out_kind, c);
}

// ------------------------------------------------------------------------------ host side
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Launches kernel<<<one block per segment>>>(table, args...) unless there is no element.
template <typename Kernel, typename... Args>
void launch_segments(Kernel kernel, const DeviceTable& t, Args... args) {
  if (t.segments == 0) return;
  kernel<<<t.segments, kThreads, 0, stream()>>>(t, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The per-block sums of a pass: two slots per block (zeros where a skipped block wrote none).
struct Slots {
  at::Tensor values;  // undefined for a pass that sums nothing
  int64_t blocks = 0;

  Slots() = default;
  Slots(const DeviceTable& t, at::Device device)
      : values(at::zeros({std::max<int64_t>(2 * t.segments, 2)}, at::TensorOptions().dtype(at::kDouble).device(device))),
        blocks(t.segments) {}
  double* data() const { return values.defined() ? values.data_ptr<double>() : nullptr; }

  // The sums of the slots: (squares as norm_dtype, nonfinite as bool).
  std::tuple<at::Tensor, at::Tensor> result(at::ScalarType norm_dtype) const {
    at::Tensor squares = at::empty({}, values.options().dtype(norm_dtype));
    at::Tensor nonfinite = at::empty({}, values.options().dtype(at::kBool));
    sum_slots_kernel<<<1, kSumThreads, 0, stream()>>>(data(), std::max<int64_t>(blocks, 1), squares.data_ptr(),
                                                      kind_of(norm_dtype), nonfinite.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {squares, nonfinite};
  }
};

template <typename Args>
PassScalars pass_scalars(const Args& a) {
  return {a.coef_old, a.coef_new, a.grad_scale, a.found_inf};
}

template <Pass kPass>
Slots msam_sgd_pass(const MsamSgdArgs& a) {
  const DeviceTable t = device_table(a.table, kChunk);
  Slots slots = sums_terms(kPass) ? Slots(t, a.table.device) : Slots();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "msam_sgd", [&] {
    using C = compute_t<scalar_t>;
    const MsamSgdStep<C> step{C(a.lr), C(a.weight_decay), C(a.momentum)};
    launch_segments(msam_sgd_kernel<kPass, scalar_t>, t, step, pass_scalars(a), slots.data());
  });
  return slots;
}

template <Pass kPass>
Slots adamw_msam_pass(const AdamwMsamArgs& a) {
  const DeviceTable t = device_table(a.table, kChunk);
  Slots slots = sums_terms(kPass) ? Slots(t, a.table.device) : Slots();
  const AdamwHyper h{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "adamw_msam", [&] {
    launch_segments(adamw_msam_kernel<kPass, scalar_t>, t, h, pass_scalars(a), slots.data());
  });
  if (kPass != Pass::kSumOfSquares && t.rows > 0) {
    const int threads = 256;
    advance_steps_kernel<<<(t.rows + threads - 1) / threads, threads, 0, stream()>>>(t, a.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return slots;
}

// The CUDA passes for OpImpls, on the current stream of the tensors' device.
struct Cuda {
  static Slots msam_sgd(Pass pass, const MsamSgdArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    switch (pass) {
      case Pass::kSumOfSquares: return msam_sgd_pass<Pass::kSumOfSquares>(a);
      case Pass::kUpdate: return msam_sgd_pass<Pass::kUpdate>(a);
      case Pass::kStash: return msam_sgd_pass<Pass::kStash>(a);
      case Pass::kFinish: return msam_sgd_pass<Pass::kFinish>(a);
      default: return msam_sgd_pass<Pass::kStep>(a);
    }
  }

  // A summing pass that returns its per-block slots as [segments, 2] float64.
  static at::Tensor msam_sgd_partials(Pass pass, const MsamSgdArgs& a) {
    const Slots slots = msam_sgd(pass, a);
    return slots.values.narrow(0, 0, 2 * slots.blocks).view({slots.blocks, 2});
  }

  // The sums of per-block slots, added by the kernel (and in the order) of a summing pass.
  static std::tuple<at::Tensor, at::Tensor> sum_partials(const at::Tensor& partials, at::ScalarType norm_dtype) {
    const c10::cuda::CUDAGuard guard(partials.device());
    Slots slots;
    slots.blocks = partials.size(0);
    slots.values = slots.blocks > 0 ? partials.view({-1})
                                    : at::zeros({2}, partials.options());  // a pass's empty slots
    return slots.result(norm_dtype);
  }

  static Slots adamw_msam(Pass pass, const AdamwMsamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    switch (pass) {
      case Pass::kSumOfSquares: return adamw_msam_pass<Pass::kSumOfSquares>(a);
      case Pass::kUpdate: return adamw_msam_pass<Pass::kUpdate>(a);
      default: return adamw_msam_pass<Pass::kStep>(a);
    }
  }

  static void perturb(const PerturbArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = device_table(a.table, kChunk);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "perturb_", [&] {
      launch_segments(perturb_kernel<scalar_t>, t, a.coef, a.alpha, a.found_inf);
    });
  }

  static at::Tensor perturbation_coef(ScalarArg sum_of_squares, double rho, const at::Tensor& coef_old,
                                      ScalarArg found_inf) {
    const c10::cuda::CUDAGuard guard(coef_old.device());
    at::Tensor out = at::empty({}, coef_old.options());
    perturbation_coef_kernel<<<1, 1, 0, stream()>>>(sum_of_squares, rho, scalar_arg(coef_old), found_inf,
                                                    out.data_ptr(), kind_of(coef_old.scalar_type()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  static Slots sam_sum_of_squares(const SamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = device_table(a.table, kChunk);
    Slots slots(t, a.table.device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_sum_of_squares", [&] {
      launch_segments(sam_sum_of_squares_kernel<scalar_t>, t, a.adaptive, slots.data());
    });
    return slots;
  }

  static void sam_ascent(const SamArgs& a) {
    const c10::cuda::CUDAGuard guard(a.table.device);
    const DeviceTable t = device_table(a.table, kChunk);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.table.param_dtype, "sam_ascent_", [&] {
      launch_segments(sam_ascent_kernel<scalar_t>, t, a.scale, a.adaptive, a.found_inf);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(msam_fused, CUDA, m) {
  OpImpls<Cuda>::register_all(m);
}

}  // namespace msam_fused::cuda
