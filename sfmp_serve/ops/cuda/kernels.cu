// Entry points of the SFMP CUDA kernels: one extern "C" symbol per specialization, so CuPy loads
// them by plain name, and the CI test compiles exactly this file with nvcc and NVRTC.
// Names and parameter lists must match sources.py (kernel_params(), *_PARAMS); the compile
// test checks both against the PTX.
//
// Built with -DSFMP_HOST_EMULATION the same entry points become host functions taking the launch
// geometry first (grid x/y/z, threads, shared bytes), run by host_block.cuh (tests on CPU).
#include "dequant.cuh"
#include "finish.cuh"
#include "lut_gemm.cuh"

#ifdef SFMP_HOST_EMULATION
#include "host_block.cuh"
#define SFMP_ENTRY(NAME, ...) \
  extern "C" void NAME(int gx, int gy, int gz, int threads, int smem_bytes, __VA_ARGS__)
#define SFMP_RUN(STATE, ...)                                                         \
  sfmp::run_grid<STATE>(gx, gy, gz, threads, smem_bytes,                             \
                        [&](auto& blk, int bx, int by, int bz) { __VA_ARGS__(blk, a, bx, by, bz); })
#else
#define SFMP_ENTRY(NAME, ...) extern "C" __global__ void __launch_bounds__(256) NAME(__VA_ARGS__)
// No lambda here: NVRTC treats a lambda in a kernel as a host function.
#define SFMP_RUN(STATE, ...)                                          \
  do {                                                                \
    extern __shared__ float4 sfmp_smem[];                             \
    sfmp::DeviceBlock<STATE> blk(sfmp_smem);                          \
    __VA_ARGS__(blk, a, blockIdx.x, blockIdx.y, blockIdx.z);          \
  } while (0)
#endif

#define SFMP_LUT_PARAMS(T)                                                                     \
  const T *x, const int *input_perm, const int *qweight, const int *meta,                      \
      const int *row_info, const sfmp::ScalePair<T> *scales, const int *output_perm,           \
      const T *bias, float *partial, T *y, int M, int N, int K, int ldx, int ldy,              \
      int group_size, int n_groups, int groups_per_split

#define SFMP_DEFINE_LUT(NAME, T, MB)                                                             \
  SFMP_ENTRY(NAME, SFMP_LUT_PARAMS(T)) {                                                         \
    const sfmp::LutArgs<T> a{x,    input_perm, qweight, meta, row_info,   scales,   output_perm, \
                             bias, partial,    y,       M,    N,          K,        ldx,         \
                             ldy,  group_size, n_groups, groups_per_split};                      \
    using State = sfmp::LutState<MB, sfmp::LutTile<MB>::kWords>;                                 \
    SFMP_RUN(State, sfmp::lut_gemm_block<T, MB>);                                                \
  }

#define SFMP_DEFINE_FINISH(NAME, T)                                                           \
  SFMP_ENTRY(NAME, const float *partial, const int *output_perm, const T *bias, T *y, int M,  \
             int N, int ldy, int splits) {                                                    \
    const sfmp::FinishArgs<T> a{partial, output_perm, bias, y, M, N, ldy, splits};            \
    SFMP_RUN(sfmp::NoState, sfmp::finish_block<T>);                                           \
  }

#define SFMP_DEFINE_DEQUANT(NAME, T)                                                            \
  SFMP_ENTRY(NAME, const int *qweight, const int *meta, const int *row_info,                    \
             const sfmp::ScalePair<T> *scales, const int *dest_rows, T *w, int row_begin,       \
             int row_end, int N, int K, int ldw, int group_size, int n_groups,                   \
             int groups_per_block) {                                                             \
    const sfmp::DequantArgs<T> a{qweight, meta,    row_info, scales, dest_rows,                  \
                                 w,       row_begin, row_end, N,     K,                          \
                                 ldw,     group_size, n_groups, groups_per_block};               \
    SFMP_RUN(sfmp::NoState, sfmp::dequant_block<T>);                                             \
  }

SFMP_DEFINE_LUT(sfmp_lut_f16_m1, __half, 1)
SFMP_DEFINE_LUT(sfmp_lut_f16_m2, __half, 2)
SFMP_DEFINE_LUT(sfmp_lut_f16_m4, __half, 4)
SFMP_DEFINE_LUT(sfmp_lut_f16_m8, __half, 8)
SFMP_DEFINE_LUT(sfmp_lut_f16_m16, __half, 16)
SFMP_DEFINE_LUT(sfmp_lut_bf16_m1, __nv_bfloat16, 1)
SFMP_DEFINE_LUT(sfmp_lut_bf16_m2, __nv_bfloat16, 2)
SFMP_DEFINE_LUT(sfmp_lut_bf16_m4, __nv_bfloat16, 4)
SFMP_DEFINE_LUT(sfmp_lut_bf16_m8, __nv_bfloat16, 8)
SFMP_DEFINE_LUT(sfmp_lut_bf16_m16, __nv_bfloat16, 16)
SFMP_DEFINE_FINISH(sfmp_finish_f16, __half)
SFMP_DEFINE_FINISH(sfmp_finish_bf16, __nv_bfloat16)
SFMP_DEFINE_DEQUANT(sfmp_dequant_f16, __half)
SFMP_DEFINE_DEQUANT(sfmp_dequant_bf16, __nv_bfloat16)

#ifdef SFMP_HOST_EMULATION
// Lets the tests check plan.py's copy of the table tile size against the kernel's.
extern "C" int sfmp_lut_words_per_tile(int mb) {
  switch (mb) {
    case 1: return sfmp::LutTile<1>::kWords;
    case 2: return sfmp::LutTile<2>::kWords;
    case 4: return sfmp::LutTile<4>::kWords;
    case 8: return sfmp::LutTile<8>::kWords;
    case 16: return sfmp::LutTile<16>::kWords;
    default: return -1;
  }
}
#endif
