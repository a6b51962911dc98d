// MSAM_HD marks code that runs on the host and on CUDA devices.
//
// MSAM_ARITH_NAMESPACE names the inline namespace of the arithmetic headers (functors.h,
// passes.h). The CPU kernels are compiled once per CPU capability (cpu/kernels_impl.h), and
// each build puts its copy of the arithmetic in its own namespace, as at::vec does, so that
// no two builds share a symbol and the linker can never mix an AVX-512 copy into code that
// must run on any CPU.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSAM_HD __host__ __device__ __forceinline__
#else
#define MSAM_HD inline
#endif

#ifndef MSAM_ARITH_NAMESPACE
#define MSAM_ARITH_NAMESPACE portable
#endif
