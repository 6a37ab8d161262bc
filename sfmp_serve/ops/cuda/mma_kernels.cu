// Entry points of the tensor-core SFMP kernels (mma.cuh): one extern "C" symbol per
// specialization, loaded by CuPy as a module of its own (runtime.py), so the default LUT
// kernels (kernels.cu) compile and load without them. Names and parameter lists must match
// sources.py (MMA_*_PARAMS); the compile test checks both against the PTX.
//
// Built with -DSFMP_HOST_EMULATION only the host entry sfmp_mma_decode_chunk exists: the decode
// helpers of mma_decode.cuh run on the CPU, for the tests (there is no host mma).
#include "mma_decode.cuh"

#ifndef SFMP_HOST_EMULATION
#include "mma.cuh"

#define SFMP_MMA_PARAMS(T)                                                                      \
  const T *x, const int *kidx, const unsigned *qweight, const int2 *tile_meta,                  \
      const int4 *kb_info, const uint2 *scales, const int *out_row, const T *bias,              \
      float *partial, int *counters, T *y, int M, int ldx, int ldy, int n_tiles, int n_kb,      \
      int kb_per_split, int zchunks

#define SFMP_DEFINE_MMA(NAME, T, NB)                                                           \
  extern "C" __global__ void __launch_bounds__(sfmp::mma::kThreads,                            \
                                               sfmp::mma::MinBlocks<NB>::kValue)                     \
      NAME(SFMP_MMA_PARAMS(T)) {                                                               \
    const sfmp::mma::GemmArgs<T> a{x,       kidx,     qweight, tile_meta, kb_info, scales,     \
                                   out_row, bias,     partial, counters,  y,       M,          \
                                   ldx,     ldy,      n_tiles, n_kb,      kb_per_split,        \
                                   zchunks};                                                   \
    sfmp::mma::mma_gemm<T, NB>(a);                                                             \
  }

#define SFMP_DEFINE_MMA_DEQUANT(NAME, T)                                                       \
  extern "C" __global__ void __launch_bounds__(sfmp::mma::kThreads)                            \
      NAME(const unsigned *qweight, const int2 *tile_meta, const int4 *kb_info,                \
           const uint2 *scales, const int *out_row, T *w, int ldw, int tile_begin,             \
           int tile_end, int n_kb, int kb_per_block) {                                         \
    const sfmp::mma::DequantArgs<T> a{qweight, tile_meta,  kb_info,  scales, out_row, w,       \
                                      ldw,     tile_begin, tile_end, n_kb,   kb_per_block};    \
    sfmp::mma::mma_dequant<T>(a);                                                              \
  }

#define SFMP_DEFINE_MMA_GATHER(NAME, T)                                                        \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      NAME(const T *x, const int *kidx, T *xr, int M, int ldx, int padded_cols) {              \
    sfmp::mma::mma_gather<T>(x, kidx, xr, M, ldx, padded_cols);                                \
  }

SFMP_DEFINE_MMA(sfmp_mma_f16_n1, __half, 1)
SFMP_DEFINE_MMA(sfmp_mma_f16_n2, __half, 2)
SFMP_DEFINE_MMA(sfmp_mma_f16_n4, __half, 4)
SFMP_DEFINE_MMA(sfmp_mma_f16_n8, __half, 8)
SFMP_DEFINE_MMA(sfmp_mma_bf16_n1, __nv_bfloat16, 1)
SFMP_DEFINE_MMA(sfmp_mma_bf16_n2, __nv_bfloat16, 2)
SFMP_DEFINE_MMA(sfmp_mma_bf16_n4, __nv_bfloat16, 4)
SFMP_DEFINE_MMA(sfmp_mma_bf16_n8, __nv_bfloat16, 8)
SFMP_DEFINE_MMA_DEQUANT(sfmp_mma_dequant_f16, __half)
SFMP_DEFINE_MMA_DEQUANT(sfmp_mma_dequant_bf16, __nv_bfloat16)
SFMP_DEFINE_MMA_GATHER(sfmp_mma_gather_f16, __half)
SFMP_DEFINE_MMA_GATHER(sfmp_mma_gather_bf16, __nv_bfloat16)

#else

namespace {
template <class T, int Bits>
void decode_chunk_host(const unsigned* words, unsigned short* out) {
  using namespace sfmp::mma;
  for (int lane = 0; lane < 32; ++lane) {
    unsigned planes[sfmp::kMaxBits] = {};
    for (int p = 0; p < Bits; ++p) planes[p] = words[p * 32 + lane];
    for (int j = 0; j < kStepsPerChunk; ++j) {
      unsigned frag[4];
      decode_step<T, Bits>(planes, j, frag);
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h)
          out[frag_row(lane, r) * kChunkCols + j * kStepCols + frag_col(lane, r, h)] =
              static_cast<unsigned short>((frag[r] >> (16 * h)) & 0xFFFFu);
    }
  }
}

template <class T> int decode_chunk_bits(int bits, const unsigned* words, unsigned short* out) {
  switch (bits) {
    case 1: decode_chunk_host<T, 1>(words, out); return 0;
    case 2: decode_chunk_host<T, 2>(words, out); return 0;
    case 3: decode_chunk_host<T, 3>(words, out); return 0;
    case 4: decode_chunk_host<T, 4>(words, out); return 0;
    case 5: decode_chunk_host<T, 5>(words, out); return 0;
    case 6: decode_chunk_host<T, 6>(words, out); return 0;
    case 7: decode_chunk_host<T, 7>(words, out); return 0;
    case 8: decode_chunk_host<T, 8>(words, out); return 0;
    default: return -1;
  }
}
}  // namespace

// words uint32 [bits][32 lanes] of one (tile, chunk) -> out uint16 [16 rows][64 inputs]: the
// fp16 (bf16 != 0: bf16) bits of every decoded code, placed by the A-fragment map.
extern "C" int sfmp_mma_decode_chunk(const unsigned* words, int bits, int bf16,
                                     unsigned short* out) {
  return bf16 ? decode_chunk_bits<__nv_bfloat16>(bits, words, out)
              : decode_chunk_bits<__half>(bits, words, out);
}

#endif
