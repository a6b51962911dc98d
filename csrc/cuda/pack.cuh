// A register pack of N elements in compute precision, and its loads and stores: what each
// CUDA thread works on per iteration, so that every operand's N elements are loaded (as 128-bit
// transactions) before any arithmetic, and stored after it (instruction-level parallelism).
// The element functions of passes.h run on a Pack exactly as they run on one scalar.
#pragma once

#include <cstdint>
#include <cstring>

#include "../passes.h"

namespace msam_fused {
inline namespace MSAM_ARITH_NAMESPACE {

template <typename C, int N>
struct Pack {
  C v[N];

  Pack() = default;
  MSAM_HD explicit Pack(C x) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = x;
  }
};

#define MSAM_PACK_BINARY(op)                                                  \
  template <typename C, int N>                                                \
  MSAM_HD Pack<C, N> operator op(const Pack<C, N>& a, const Pack<C, N>& b) {  \
    Pack<C, N> r;                                                             \
    for (int k = 0; k < N; ++k) r.v[k] = a.v[k] op b.v[k];                    \
    return r;                                                                 \
  }
MSAM_PACK_BINARY(+)
MSAM_PACK_BINARY(-)
MSAM_PACK_BINARY(*)
MSAM_PACK_BINARY(/)
#undef MSAM_PACK_BINARY

// The scalar functions of functors.h, lane by lane.
#define MSAM_PACK_UNARY(fn)                          \
  template <typename C, int N>                       \
  MSAM_HD Pack<C, N> fn(const Pack<C, N>& a) {       \
    Pack<C, N> r;                                    \
    for (int k = 0; k < N; ++k) r.v[k] = fn(a.v[k]); \
    return r;                                        \
  }
MSAM_PACK_UNARY(msam_sqrt)
MSAM_PACK_UNARY(msam_abs)
#undef MSAM_PACK_UNARY

// 128-bit global loads and stores, spelled out: the table's pointers come from memory, so
// the compiler cannot tell they are global and would emit generic accesses (and no
// non-coherent loads). The asm is volatile so that accesses keep program order.
template <bool kReadOnly>
__device__ __forceinline__ uint4 load_global_word(const uint4* src) {
  uint4 w;
  if constexpr (kReadOnly) {
    asm volatile("{ .reg .u64 a; cvta.to.global.u64 a, %4; ld.global.nc.v4.u32 {%0, %1, %2, %3}, [a]; }"
                 : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                 : "l"(src));
  } else {
    asm volatile("{ .reg .u64 a; cvta.to.global.u64 a, %4; ld.global.v4.u32 {%0, %1, %2, %3}, [a]; }"
                 : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                 : "l"(src)
                 : "memory");
  }
  return w;
}

__device__ __forceinline__ void store_global_word(uint4* dst, const uint4& w) {
  asm volatile("{ .reg .u64 a; cvta.to.global.u64 a, %0; st.global.v4.u32 [a], {%1, %2, %3, %4}; }"
               :
               : "l"(dst), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}

// N elements of type S starting at `src` (16-byte aligned, N * sizeof(S) a multiple of 16),
// as 128-bit transactions; kReadOnly: through the non-coherent (read-only data) path, for
// operands nothing writes during the kernel.
template <bool kReadOnly, typename S, int N>
__device__ __forceinline__ void load_lanes(const S* src, S (&out)[N]) {
  static_assert(N * sizeof(S) % 16 == 0, "a pack is whole 128-bit words");
  constexpr int kWords = N * sizeof(S) / 16;
  uint4 words[kWords];
#pragma unroll
  for (int k = 0; k < kWords; ++k) words[k] = load_global_word<kReadOnly>(reinterpret_cast<const uint4*>(src) + k);
  memcpy(out, words, sizeof(words));
}

template <typename S, int N>
__device__ __forceinline__ void store_lanes(S* dst, const S (&lanes)[N]) {
  constexpr int kWords = N * sizeof(S) / 16;
  uint4 words[kWords];
  memcpy(words, lanes, sizeof(words));
#pragma unroll
  for (int k = 0; k < kWords; ++k) store_global_word(reinterpret_cast<uint4*>(dst) + k, words[k]);
}

// Loads convert each lane to C; stores round each lane once to the storage type (to nearest
// even, as the scalar Access and Tensor.to do). A pointer to const is read-only data.
template <typename C, int N>
struct Access<Pack<C, N>> {
  template <bool kReadOnly, typename S>
  __device__ static Pack<C, N> load_from(const S* src) {
    S lanes[N];
    load_lanes<kReadOnly>(src, lanes);
    Pack<C, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = static_cast<C>(lanes[k]);
    return r;
  }
  template <typename S>
  __device__ static Pack<C, N> load(S* src) { return load_from<false>(src); }
  template <typename S>
  __device__ static Pack<C, N> load(const S* src) { return load_from<true>(src); }
  template <typename S>
  __device__ static void store(S* dst, const Pack<C, N>& x) {
    S lanes[N];
#pragma unroll
    for (int k = 0; k < N; ++k) lanes[k] = static_cast<S>(x.v[k]);
    store_lanes(dst, lanes);
  }
};

}  // namespace MSAM_ARITH_NAMESPACE
}  // namespace msam_fused
