// AVX-512 (F, BW, VL, DQ) without GFNI or bf16 instructions (Skylake-SP, Cascade Lake): mask
// decoder, fp32 gemv for every activation dtype, dequantization.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#include <immintrin.h>

#include <array>

#include "kernel.h"

namespace sfmp_cpu {
namespace {
#include "avx512_impl.h"
}  // namespace

IsaKernels avx512_kernels() {
  const GemvKernel f32{gemv<F32Path>, 8, F32Path::kMaxBits, XLayout::PairsF32};
  return {"avx512", {}, {}, 0, f32, dequant, 32, 32};
}

}  // namespace sfmp_cpu
