// Dequantize rows [row_begin, row_end) of the reordered weight into a dense fp16/bf16 scratch
// for the large-batch path (the caller then runs one cuBLAS matmul on it). Row `row` goes to
// scratch row dest_rows[row] when dest_rows is given (one chunk holding the whole matrix, rows
// put in the original output order so the matmul writes y directly), else row - row_begin.
//
// The kernel only has to stream: ~3 bits read per 16 bits written, so it is built around the
// stores. A warp covers 8 rows x 4 byte lanes; lane (r, b) expands byte b of every word of a
// group of row r into 8 consecutive outputs, one 16-byte store each. Per store instruction the
// 4 lanes of a row write 64 contiguous bytes (two whole sectors), and per plane-word load the 8
// rows read 32 contiguous bytes ([bits][words][rows] blocks; the 4 lanes of a row share the
// address). alpha/beta and the block's (offset, bits) are loaded once per (row, group); each
// thread walks `groups_per_block` groups.
//   w = alpha * (2q - (2^b - 1)) + beta = q * 2 alpha + (beta - alpha (2^b - 1)),
//   q = sum_i 2^i c_i, computed for 4 outputs at a time as bytes of one 32-bit integer.
#pragma once

#include "common.cuh"

namespace sfmp {

constexpr int kDequantLanes = 4;     // byte lanes per row (4 bytes in a plane word)
constexpr int kDequantWarpRows = 8;  // rows per warp: 32 lanes / 4
constexpr int kDequantWordBatch = 2;  // words whose plane loads are issued together

template <class T> struct DequantArgs {
  const int* qweight;
  const int* meta;             // [n_block_rows][n_groups][2] (word offset, bits)
  const int* row_info;         // [N][4] (block-row, row inside it, its rows, 0)
  const ScalePair<T>* scales;  // [n_groups][N]
  const int* dest_rows;        // [N] scratch row of every reordered row, or null
  T* w;                        // [scratch rows, ldw]
  int row_begin, row_end, N, K, ldw;
  int group_size, n_groups, groups_per_block;
};

// Bit j of `nibble` to the lowest bit of byte j (the four shifted copies never overlap).
SFMP_INLINE unsigned spread_nibble(unsigned nibble) { return (nibble * 0x00204081u) & 0x01010101u; }

// Byte k of q4 as a float, exactly.
SFMP_INLINE float byte_as_float(unsigned q4, int k) {
#ifdef SFMP_HOST_EMULATION
  return static_cast<float>((q4 >> (8 * k)) & 0xFFu);
#else
  // 0x4B0000qq is 2^23 + qq: one byte permute and one add, instead of a slow int conversion.
  const unsigned bits = __byte_perm(q4, 0x4B000000u, 0x7440u | static_cast<unsigned>(k));
  return __uint_as_float(bits) - 8388608.0f;
#endif
}

// 8 consecutive outputs from byte `b` of the plane words of one word.
template <class T>
SFMP_INLINE void expand_byte(const unsigned* planes, int bits, int b, float scale, float shift,
                             T (&out)[8]) {
  unsigned lo = 0, hi = 0;  // q of outputs 0..3 and 4..7, one per byte
#pragma unroll
  for (int i = 0; i < kMaxBits; ++i) {
    if (i < bits) {
      const unsigned byte = (planes[i] >> (8 * b)) & 0xFFu;
      lo |= spread_nibble(byte & 0xFu) << i;
      hi |= spread_nibble(byte >> 4) << i;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = from_float<T>(byte_as_float(lo, k) * scale + shift);
    out[4 + k] = from_float<T>(byte_as_float(hi, k) * scale + shift);
  }
}

SFMP_INLINE unsigned pack2(__half lo, __half hi) {
  return static_cast<__half_raw>(lo).x |
         (static_cast<unsigned>(static_cast<__half_raw>(hi).x) << 16);
}
SFMP_INLINE unsigned pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<__nv_bfloat16_raw>(lo).x |
         (static_cast<unsigned>(static_cast<__nv_bfloat16_raw>(hi).x) << 16);
}

template <class T>
SFMP_INLINE void store8(T* dst, const T (&v)[8], int valid, bool vector_ok) {
  if (vector_ok && valid >= 8) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)  // unrolled: v stays in registers
    if (j < valid) dst[j] = v[j];
}

// One (row, group): every word of the group, byte lane b.
template <class T>
SFMP_INLINE void dequant_row_group(const DequantArgs<T>& a, const RowRef& rr, int row, int group,
                                   int b, T* dst_row, bool vector_ok) {
  const int cols = imin(a.group_size, a.K - group * a.group_size);
  const int words = (cols + kWordBits - 1) / kWordBits;
  const BlockRef ref = block_ref(a.meta, rr, group, a.n_groups);
  const ScalePair<T> sc = a.scales[static_cast<long long>(group) * a.N + row];
  const float alpha = to_float(sc.alpha);
  const float shift = to_float(sc.beta) - alpha * static_cast<float>((1 << ref.bits) - 1);
  const float scale = 2.0f * alpha;
  T* dst = dst_row + group * a.group_size + 8 * b;
  for (int w0 = 0; w0 < words; w0 += kDequantWordBatch) {
    unsigned planes[kDequantWordBatch][kMaxBits];
#pragma unroll
    for (int u = 0; u < kDequantWordBatch; ++u)
#pragma unroll
      for (int i = 0; i < kMaxBits; ++i)
        planes[u][i] = (i < ref.bits && w0 + u < words) ?
            plane_word(a.qweight, ref, words, i, w0 + u) : 0u;
#pragma unroll
    for (int u = 0; u < kDequantWordBatch; ++u) {
      const int col = (w0 + u) * kWordBits + 8 * b;  // first output inside the group
      if (w0 + u >= words || col >= cols) continue;
      T v[8];
      expand_byte<T>(planes[u], ref.bits, b, scale, shift, v);
      store8<T>(dst + (w0 + u) * kWordBits, v, cols - col, vector_ok);
    }
  }
}

// Thread block: rows [bx * rows_per_block, +rows_per_block), groups [by * gpb, +gpb).
template <class T, class Block>
SFMP_HD void dequant_block(Block& blk, const DequantArgs<T>& a, int bx, int by, int) {
  const int rows_per_block = blk.threads() / kDequantLanes;
  // 16-byte stores need 16-byte aligned rows and group starts (8 outputs of 2 bytes).
  const bool vector_ok = ((a.ldw | a.group_size) & 7) == 0 &&
                         (reinterpret_cast<unsigned long long>(a.w) & 15) == 0;
  blk.each([&](int tid, NoState&) {
    const int row = a.row_begin + bx * rows_per_block + tid / kDequantLanes;
    const int b = tid % kDequantLanes;
    if (row >= a.row_end) return;
    const RowRef rr = row_ref(a.row_info, row);
    const long long dest = a.dest_rows != nullptr ? a.dest_rows[row] : row - a.row_begin;
    T* dst_row = a.w + dest * a.ldw;
    const int g_end = imin(a.n_groups, (by + 1) * a.groups_per_block);
    for (int g = by * a.groups_per_block; g < g_end; ++g)
      dequant_row_group<T>(a, rr, row, g, b, dst_row, vector_ok);
  });
}

}  // namespace sfmp
