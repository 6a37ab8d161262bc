// Bit-serial LUT GEMM for small batches (M = 1 .. 16): y = x @ W^T from the packed sign planes.
//
// One thread per output row (rows of the reordered matrix), a thread block per tile of rows, a
// grid column per split of the groups (split-K), a grid layer per MB batch rows. For every tile
// of KW words of a group the block builds, in shared memory, the table of all 256 +/- sign
// combinations of each 8 activations and each batch row, lut[chunk][v][m] (fp32). Each byte of
// a sign-plane word then indexes the table: one lookup replaces 8 multiply-adds, and the MB batch
// rows of one entry are adjacent, so one lookup serves the whole batch (vector loads).
//   dot    = sum_i 2^i * sum_chunks lut[chunk][byte_i][m]     (= sum_i 2^i s_i . x)
//   y[m]  += alpha * dot + beta * sum(x over the group)        (sum = entry 255 of each chunk)
// The input gather x[:, input_perm] is fused into the table build, the output scatter
// y[:, output_perm] and the bias into the store. Accumulation is fp32 in a fixed order and no
// atomics are used: with splits == 1 every output is written by one thread; with splits > 1
// each split writes its own fp32 partial and finish.cuh sums them in split order.
#pragma once

#include "common.cuh"

namespace sfmp {

constexpr int kChunksPerWord = 4;  // 8 activations per chunk = one byte of a plane word
constexpr int kTableSize = 256;

// Words of one group per table tile: the tables of all MB rows, 4 * KW * 256 * MB floats,
// take 16 KiB (MB = 1), 32 KiB (MB = 2, 4, 8) or 64 KiB (MB = 16) of shared memory.
template <int MB> struct LutTile {
  static constexpr int kWords = MB <= 2 ? 4 : (MB == 4 ? 2 : 1);
};

template <class T> struct LutArgs {
  const T* x;                  // [M, ldx], original input order
  const int* input_perm;       // [K]: reordered input j is original input input_perm[j]
  const int* qweight;          // canonical packed words
  const int* meta;             // [n_block_rows][n_groups][2] (word offset, bits)
  const int* row_info;         // [N][4] (block-row, row inside it, its rows, 0)
  const ScalePair<T>* scales;  // [n_groups][N] (alpha, beta), reordered rows
  const int* output_perm;      // [N]: reordered row i is original output output_perm[i]
  const T* bias;               // [N] original order, or null
  float* partial;              // [splits][M][N] fp32 when the groups are split, else null
  T* y;                        // [M, ldy], original output order (used when partial is null)
  int M, N, K, ldx, ldy;
  int group_size, n_groups, groups_per_split;
};

template <int MB, int KW> struct LutState {
  float y[MB];     // output of this row, summed over groups
  float dot[MB];   // sum_i 2^i s_i . x over the current group
  float xsum[MB];  // sum of the activations of the current group
  unsigned words[kMaxBits][KW];  // plane words of the current tile
  float alpha, beta;
  RowRef row;
  BlockRef ref;
};

// One table build work item: chunk c, low nibble lo, batch row m (m fastest: the stores of a
// warp hit distinct banks for MB >= 2, two-way for MB = 1). It computes the 16 entries
// v = hi * 16 + lo:
// entry = (+/- x0..x3 by the bits of lo) + (+/- x4..x7 by the bits of hi).
template <class T, int MB>
SFMP_INLINE void lut_build_item(const LutArgs<T>& a, float* lut, int item, int m0, int group,
                                int col0, int cols) {
  const int m = item % MB;
  const int lo = (item / MB) % 16;
  const int chunk = item / (MB * 16);
  const int col = col0 + chunk * 8;  // first input of the chunk inside the group
  const bool row_ok = m0 + m < a.M;
  const T* xrow = a.x + static_cast<long long>(m0 + m) * a.ldx;
  const int* perm = a.input_perm + group * a.group_size;
  float xv[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)  // padded inputs of a ragged group are zero
    xv[j] = (row_ok && col + j < cols) ? to_float(xrow[perm[col + j]]) : 0.0f;
  float low = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) low += ((lo >> j) & 1) ? xv[j] : -xv[j];
  float high[16];
  high[0] = -(xv[4] + xv[5] + xv[6] + xv[7]);
#pragma unroll
  for (int h = 1; h < 16; ++h) {  // flip the lowest set bit of h from -x to +x
    const int bit = (h & 1) ? 0 : (h & 2) ? 1 : (h & 4) ? 2 : 3;
    high[h] = high[h & (h - 1)] + 2.0f * xv[4 + bit];
  }
  float* out = lut + (chunk * kTableSize + lo) * MB + m;
#pragma unroll
  for (int h = 0; h < 16; ++h) out[h * 16 * MB] = high[h] + low;
}

// Accumulate MB table entries (adjacent floats) into p, with vector loads where aligned.
template <int MB> SFMP_INLINE void add_entry(float (&p)[MB], const float* e) {
  if constexpr (MB % 4 == 0) {
#pragma unroll
    for (int q = 0; q < MB / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(e)[q];
      p[4 * q] += f.x;
      p[4 * q + 1] += f.y;
      p[4 * q + 2] += f.z;
      p[4 * q + 3] += f.w;
    }
  } else if constexpr (MB == 2) {
    const float2 f = *reinterpret_cast<const float2*>(e);
    p[0] += f.x;
    p[1] += f.y;
  } else {
    p[0] += e[0];
  }
}

template <int MB, int KW>
SFMP_INLINE void lut_lookup(const float* lut, LutState<MB, KW>& s, int kw) {
#pragma unroll
  for (int i = 0; i < kMaxBits; ++i) {
    if (i < s.ref.bits) {
      float p[MB];
#pragma unroll
      for (int m = 0; m < MB; ++m) p[m] = 0.0f;
#pragma unroll
      for (int w = 0; w < KW; ++w) {
        if (w < kw) {
          const unsigned word = s.words[i][w];
#pragma unroll
          for (int b = 0; b < kChunksPerWord; ++b) {
            const int v = (word >> (8 * b)) & 0xFF;
            add_entry<MB>(p, lut + ((w * kChunksPerWord + b) * kTableSize + v) * MB);
          }
        }
      }
      const float scale = static_cast<float>(1 << i);
#pragma unroll
      for (int m = 0; m < MB; ++m) s.dot[m] += scale * p[m];
    }
  }
  // Entry 255 of a chunk is the plain sum of its 8 activations (all signs +).
#pragma unroll
  for (int c = 0; c < kChunksPerWord * KW; ++c)
    if (c < kChunksPerWord * kw) add_entry<MB>(s.xsum, lut + (c * kTableSize + 255) * MB);
}

template <class T, int MB, int KW>
SFMP_INLINE void lut_begin_group(const LutArgs<T>& a, LutState<MB, KW>& s, int row, int group) {
#pragma unroll
  for (int m = 0; m < MB; ++m) s.dot[m] = s.xsum[m] = 0.0f;
  if (row >= a.N) return;
  s.ref = block_ref(a.meta, s.row, group, a.n_groups);
  const ScalePair<T> sc = a.scales[static_cast<long long>(group) * a.N + row];
  s.alpha = to_float(sc.alpha);
  s.beta = to_float(sc.beta);
}

template <class T, int MB, int KW>
SFMP_INLINE void lut_load_words(const LutArgs<T>& a, LutState<MB, KW>& s, int words, int kt,
                                int kw) {
#pragma unroll
  for (int i = 0; i < kMaxBits; ++i)
#pragma unroll
    for (int w = 0; w < KW; ++w)
      if (i < s.ref.bits && w < kw) s.words[i][w] = plane_word(a.qweight, s.ref, words, i, kt + w);
}

template <class T, int MB, int KW>
SFMP_INLINE void lut_store(const LutArgs<T>& a, const LutState<MB, KW>& s, int row, int split,
                           int m0) {
  if (row >= a.N) return;
  if (a.partial != nullptr) {
#pragma unroll
    for (int m = 0; m < MB; ++m)
      if (m0 + m < a.M)
        a.partial[(static_cast<long long>(split) * a.M + m0 + m) * a.N + row] = s.y[m];
    return;
  }
  const int out = a.output_perm[row];
  const float bias = a.bias != nullptr ? to_float(a.bias[out]) : 0.0f;
#pragma unroll
  for (int m = 0; m < MB; ++m)
    if (m0 + m < a.M)
      a.y[static_cast<long long>(m0 + m) * a.ldy + out] = from_float<T>(s.y[m] + bias);
}

// One thread block: rows [bx * threads, +threads), groups of split `by`, batch rows bz * MB...
template <class T, int MB, class Block>
SFMP_HD void lut_gemm_block(Block& blk, const LutArgs<T>& a, int bx, int by, int bz) {
  constexpr int KW = LutTile<MB>::kWords;
  using State = LutState<MB, KW>;
  float* lut = static_cast<float*>(blk.smem);
  const int nthreads = blk.threads();
  const int row0 = bx * nthreads;
  const int m0 = bz * MB;
  const int g_begin = by * a.groups_per_split;
  const int g_end = imin(a.n_groups, g_begin + a.groups_per_split);
  for (int g = g_begin; g < g_end; ++g) {
    const int cols = imin(a.group_size, a.K - g * a.group_size);
    const int words = (cols + kWordBits - 1) / kWordBits;
    for (int kt = 0; kt < words; kt += KW) {
      const int kw = imin(KW, words - kt);
      blk.sync();  // the previous tile's lookups are done before its table is overwritten
      blk.each([&](int tid, State& s) {
        const int row = row0 + tid;
        if (kt == 0) {
          if (g == g_begin) {
#pragma unroll
            for (int m = 0; m < MB; ++m) s.y[m] = 0.0f;
            if (row < a.N) s.row = row_ref(a.row_info, row);
          }
          lut_begin_group(a, s, row, g);
        }
        if (row < a.N) lut_load_words(a, s, words, kt, kw);  // in flight during the build
        const int items = kw * kChunksPerWord * 16 * MB;
        for (int item = tid; item < items; item += nthreads)
          lut_build_item<T, MB>(a, lut, item, m0, g, kt * kWordBits, cols);
      });
      blk.sync();
      blk.each([&](int tid, State& s) {
        const int row = row0 + tid;
        if (row >= a.N) return;
        lut_lookup<MB, KW>(lut, s, kw);
        if (kt + KW < words) return;
#pragma unroll
        for (int m = 0; m < MB; ++m) s.y[m] += s.alpha * s.dot[m] + s.beta * s.xsum[m];
        if (g == g_end - 1) lut_store(a, s, row, by, m0);
      });
    }
  }
}

}  // namespace sfmp
