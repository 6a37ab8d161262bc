// The contract between the binding (binding.cpp: tensors, threads, dispatch) and the per-ISA
// kernels (kernel_*.cpp: raw pointers only, no torch headers, so each compiles in seconds).
//
// Runtime layout of one (fused) layer, built once at load by binding.cpp from the checkpoint:
// the concatenated reordered output rows are cut into tiles of 16 rows that never cross a
// block-row (so a tile has ONE bit-width per input group); the reordered input is cut into the
// format's groups, each padded to group_size columns. For tile t and group g with b bits, the
// planes are stored as b 32-bit masks per column pair kp (columns 2kp, 2kp+1 of the group):
//     planes[tile_off[t] + sum_{g' < g} kpairs[g'] * bits[t, g'] + kp * b + p]
//     bit (2 i + j) = bit p of the code of (tile row i, group column 2 kp + j)
// so one mask, moved into a mask register, selects exactly the 16-bit lanes of a 32-lane
// vector laid out as (row i, column j) pairs: the operand order of vdpbf16ps, with rows in
// the 16 fp32 lanes of the accumulator. No horizontal sums, no shuffles.
// alpha/beta of (t, g) are 16 values at (t * n_groups + g) * 16, in the checkpoint's dtype.
#pragma once
#include <cstdint>

namespace sfmp_cpu {

constexpr int kTileRows = 16;

enum class ScaleKind : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct LayerView {
  int64_t n_tiles;
  int64_t n_groups;
  int64_t group_size;
  const uint32_t* planes;
  const int64_t* tile_off;  // [n_tiles]
  const uint8_t* bits;      // [n_tiles * n_groups]
  const int32_t* kpairs;    // [n_groups]: column pairs of group g, ceil(columns / 2)
  const void* alpha;        // [n_tiles * n_groups * 16]
  const void* beta;
  ScaleKind scale_kind;
};

// y[m * ldy + t * 16 + i] = sum over the reordered input of W[tile t row i] * x[m] for mb
// activation rows (at most the kernel's max_mb), stored in the activation dtype: outputs stay
// in the reordered (tile) order; the binding applies the output permutation afterwards, as one
// sequential-write gather per row. The activations come in the kernel's XLayout; column pair
// kp of the padded reordered input is columns 2kp, 2kp+1 (group g's pairs start at
// g * group_size / 2):
//   PairsBf16: uint32 xpk[kp * mb + m] = the pair's two bf16 values (column 2kp in the low half);
//   PairsF32:  float  xpk[(kp * mb + m) * 2 + j];
//   RowsBf16:  bf16   xpk[m * (n_groups * group_size + kRowPad) + column], zero padded (AMX
//              tiles load 32 columns at a time and may read past the last group).
// xsum[g * mb + m] = sum of x[m] over group g (the offset term of every weight).
enum class XLayout : int32_t { PairsBf16, PairsF32, RowsBf16 };
constexpr int64_t kRowPad = 32;

enum class OutKind : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct GemvArgs {
  const LayerView* layer;
  int mb;
  const void* xpk;
  const float* xsum;
  void* y;
  int64_t ldy;
  OutKind out;
  int64_t t0, t1;
};

// Dense weights of tiles [t0, t1) written straight into the ORIGINAL order, for prefill GEMMs:
//   w[row_dst[t * 16 + i] * ld + c] = W[tile t row i, padded reordered column col_src[c]]
// for every original column c < ld, skipping padding rows (row_dst -1); bf16 (rounded to
// nearest even) or float. Folding both permutations into the dequantizer lets the GEMM take the
// activations as they are and write its outputs where they belong. Each tile is first decoded
// into `tile` (16 rows per padded reordered column, sequential stores), then its rows are
// written out in the original column order (gathered loads, whole-line stores).
struct DequantArgs {
  const LayerView* layer;
  int64_t t0, t1;
  void* w;
  int64_t ld;
  const int32_t* row_dst;
  const int32_t* col_src;
  bool bf16_out;
  float* tile;  // n_groups * group_size * 16 floats
};

using GemvFn = void (*)(const GemvArgs&);
using DequantFn = void (*)(const DequantArgs&);

struct GemvKernel {
  GemvFn fn = nullptr;  // nullptr: the ISA has none
  int max_mb = 0;       // activation rows per call
  int max_bits = 8;     // widest block this kernel decodes exactly
  XLayout layout = XLayout::PairsF32;
};

struct IsaKernels {
  const char* name;
  GemvKernel bf16;        // bfloat16 activations
  GemvKernel bf16_batch;  // bfloat16 activations, from batch_min_m rows on
  int batch_min_m;
  GemvKernel f32;         // float32 (and float16, converted) activations
  DequantFn dequant;
  // From this many activation rows on: dequantize + GEMM instead of the gemv (measured with
  // bench/cpu_op.py); layers of fewer than kSmallLayerWeights weights switch at dense_min_m_small
  // (their dequantization costs little next to their GEMM).
  int dense_min_m;
  int dense_min_m_small;
};
constexpr int64_t kSmallLayerWeights = 4 << 20;

IsaKernels amx_kernels();  // needs the OS to grant AMX tile state first (binding.cpp)
IsaKernels avx512_bf16_kernels();
IsaKernels avx512_kernels();
IsaKernels avx2_kernels();

}  // namespace sfmp_cpu
