// AVX-512 with BF16, GFNI and VBMI (Zen 4/5, Ice Lake with BF16, Sapphire Rapids): the GFNI
// decoder, the bf16 gemv (vdpbf16ps on codes decoded straight into bf16), the fp32 gemv and
// the dequantizer.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,gfni,fma,f16c")
#include <immintrin.h>

#include <array>

#include "kernel.h"

#define SFMP_GFNI 1
#define SFMP_BF16 1

namespace sfmp_cpu {
namespace {
#include "avx512_impl.h"
}  // namespace

IsaKernels avx512_bf16_kernels() {
  const GemvKernel bf16{gemv<Bf16Path>, 8, Bf16Path::kMaxBits, XLayout::PairsBf16};
  const GemvKernel f32{gemv<F32Path>, 8, F32Path::kMaxBits, XLayout::PairsF32};
  return {"avx512_bf16", bf16, {}, 0, f32, dequant, 32, 32};
}

}  // namespace sfmp_cpu
