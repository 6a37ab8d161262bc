// Tensor-core SFMP kernels over the fragment-order layout of mma_repack.py (device only).
//
// mma_gemm<T, NB>: y = x W^T for M <= 8 NB rows per z-chunk (NB n8 tiles of the batch), as
// y^T = W x^T with mma.sync m16n8k16: the weight is the A operand (16 output rows per warp
// tile), the activations the B operand. A thread block = kWarps warps = kWarps tiles of one
// row block; grid.x = row blocks x z-chunks (the z-chunks of a row block are adjacent, so a
// weight read twice for M > 8 NB is read from L2), grid.y = splits of the k-blocks.
// Per k-block (<= 128 inputs of one group):
//   1. all warps stage x[m0.., kidx[kp..]] (the input gather) and its sum per batch row into
//      shared memory, one k-block ahead (double buffer, one barrier per k-block);
//   2. each warp decodes its plane words (loaded one k-block ahead) into A fragments,
//      `switch (bits)` being uniform per warp, and runs the mma on integer codes: acc = sum q x;
//   3. y += 2 alpha acc + (beta - alpha (2^b - 1)) sum x, in fp32, per row and batch column.
// Splits: each split stores fp32 partials; the last block to finish a row block (an integer
// ticket per row block, reset by that block) sums them in split order, so the result does not
// depend on scheduling; it then adds the bias and scatters rows through out_row. No float
// atomics, no host synchronisation, and the tickets are zero again after every launch, so the
// launch can be captured in a CUDA graph and replayed.
//
// mma_dequant<T>: the same decode into a dense [rows, padded_cols] weight (prefill path), rows
// in out_row order (the whole matrix) or tile order (a chunk of tiles); mma_gather<T>: x
// through kidx into the padded input order, zeros at padded inputs (prefill path).
#pragma once

#include "mma_decode.cuh"

namespace sfmp {
namespace mma {

constexpr int kWarps = 4;  // tiles per thread block (mma_repack.WARPS_PER_CTA)
constexpr int kThreads = 32 * kWarps;
// Blocks per SM the register allocation must allow (__launch_bounds__). Without it ptxas aims at
// about 96 registers and spills at NB = 2 and 4 on sm_90; with it no kernel spills (NB = 8 needs
// more than 128 registers, hence 2 blocks).
template <int NB> struct MinBlocks { static constexpr int kValue = NB <= 4 ? 4 : 2; };
constexpr int kXsStride = kKblockChunks * kChunkCols + 8;  // +16 bytes: ldmatrix conflict-free

template <class T> struct GemmArgs {
  const T* x;              // [M, ldx], original input order
  const int* kidx;         // [padded_cols]: original input or -1
  const unsigned* qweight; // fragment-order plane words
  const int2* tile_meta;   // [n_tiles][n_kb] (word offset, bits)
  const int4* kb_info;     // [n_kb] (padded column, chunks, group, 0)
  const uint2* scales;     // [n_tiles][n_kb][8]: (alpha, beta) of rows g and g + 8
  const int* out_row;      // [n_tiles * 16]: original output, or -1
  const T* bias;           // [N] original order, or null
  float* partial;          // [splits][grid.x][kWarps * 16][8 NB] when split, else null
  int* counters;           // [grid.x] tickets, zero before and after every launch
  T* y;                    // [M, ldy], original output order
  int M, ldx, ldy, n_tiles, n_kb, kb_per_split, zchunks;
};

template <class T> struct Pair;
template <> struct Pair<__half> {
  using Type = __half2;
  static __device__ __forceinline__ float2 to_float2(unsigned v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
};
template <> struct Pair<__nv_bfloat16> {
  using Type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(unsigned v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
};

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
  if constexpr (Magic<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T> __device__ __forceinline__ unsigned pack_pair(T lo, T hi) {
  unsigned short l, h;
  if constexpr (Magic<T>::kBf16) {
    l = static_cast<__nv_bfloat16_raw>(lo).x;
    h = static_cast<__nv_bfloat16_raw>(hi).x;
  } else {
    l = static_cast<__half_raw>(lo).x;
    h = static_cast<__half_raw>(hi).x;
  }
  return static_cast<unsigned>(l) | (static_cast<unsigned>(h) << 16);
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// Step 1: x rows m0 .. m0 + 8 NB through kidx into xs [8 NB][kXsStride], their sums into xsum.
// Lane l covers inputs 4l .. 4l + 3 of the k-block (always inside the kXsStride row); warp w
// rows w, w + kWarps, ...
template <class T, int NB>
__device__ __forceinline__ void stage_x(const GemmArgs<T>& a, int kb, int m0, T* xs,
                                        float* xsum) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int4 info = a.kb_info[kb];
  const int c0 = 4 * lane;
  int4 idx = make_int4(-1, -1, -1, -1);  // lanes past a one-chunk k-block stage zeros
  if (c0 < info.y * kChunkCols) idx = *reinterpret_cast<const int4*>(a.kidx + info.x + c0);
  const T zero = from_float<T>(0.0f);
  static_assert((8 * NB) % kWarps == 0, "every warp stages the same number of rows");
#pragma unroll
  for (int i = 0; i < 8 * NB / kWarps; ++i) {
    const int r = warp + i * kWarps;
    const int m = m0 + r;
    const T* row = a.x + static_cast<long long>(m) * a.ldx;
    const bool live = m < a.M;
    T v[4];
    v[0] = (live && idx.x >= 0) ? row[idx.x] : zero;
    v[1] = (live && idx.y >= 0) ? row[idx.y] : zero;
    v[2] = (live && idx.z >= 0) ? row[idx.z] : zero;
    v[3] = (live && idx.w >= 0) ? row[idx.w] : zero;
    float s = (to_float(v[0]) + to_float(v[1])) + (to_float(v[2]) + to_float(v[3]));
    *reinterpret_cast<uint2*>(xs + r * kXsStride + c0) =
          make_uint2(pack_pair(v[0], v[1]), pack_pair(v[2], v[3]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) xsum[r] = s;
  }
}

// The plane words of (tile, kb) for this lane: words[p][c] for p < bits, c < chunks.
__device__ __forceinline__ int load_words(const unsigned* qweight, int2 meta, int chunks,
                                          unsigned (&w)[kMaxBits][kKblockChunks]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int p = 0; p < kMaxBits; ++p) {
    if (p < meta.y) {
      const unsigned* src = qweight + meta.x + (p * 32 + lane) * chunks;
      if (chunks == kKblockChunks) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
        w[p][0] = v.x;
        w[p][1] = v.y;
      } else {
        w[p][0] = __ldg(src);
        w[p][1] = 0u;
      }
    }
  }
  return meta.y;
}

// Step 2: acc += codes x over one k-block, for one bit-width (a uniform branch per warp).
template <class T, int NB, int Bits>
__device__ __forceinline__ void mma_kblock(const unsigned (&w)[kMaxBits][kKblockChunks],
                                           int chunks, const T* xs, float (&acc)[NB][4]) {
  const int lane = threadIdx.x & 31;
  const int lrow = lane & 7, mat = lane >> 3;  // ldmatrix: row address of matrix `mat`
#pragma unroll
  for (int c = 0; c < kKblockChunks; ++c) {
    if (c < chunks) {
      unsigned planes[kMaxBits];
#pragma unroll
      for (int p = 0; p < kMaxBits; ++p) planes[p] = p < Bits ? w[p][c] : 0u;
#pragma unroll
      for (int j = 0; j < kStepsPerChunk; ++j) {
        unsigned frag[4];
        decode_step<T, Bits>(planes, j, frag);
        const int col = c * kChunkCols + j * kStepCols;
        if constexpr (NB == 1) {
          unsigned b[2];
          ldmatrix_x2(b, xs + lrow * kXsStride + col + 8 * (mat & 1));
          mma_16816<T>(acc[0], frag, b[0], b[1]);
        } else {
#pragma unroll
          for (int nt = 0; nt < NB; nt += 2) {
            unsigned b[4];
            ldmatrix_x4(b, xs + ((nt + (mat >> 1)) * 8 + lrow) * kXsStride + col + 8 * (mat & 1));
            mma_16816<T>(acc[nt], frag, b[0], b[1]);
            mma_16816<T>(acc[nt + 1], frag, b[2], b[3]);
          }
        }
      }
    }
  }
}

template <class T, int NB>
__device__ __forceinline__ void mma_kblock_any(int bits, const unsigned (&w)[kMaxBits][kKblockChunks],
                                               int chunks, const T* xs, float (&acc)[NB][4]) {
  switch (bits) {
    case 1: mma_kblock<T, NB, 1>(w, chunks, xs, acc); break;
    case 2: mma_kblock<T, NB, 2>(w, chunks, xs, acc); break;
    case 3: mma_kblock<T, NB, 3>(w, chunks, xs, acc); break;
    case 4: mma_kblock<T, NB, 4>(w, chunks, xs, acc); break;
    case 5: mma_kblock<T, NB, 5>(w, chunks, xs, acc); break;
    case 6: mma_kblock<T, NB, 6>(w, chunks, xs, acc); break;
    case 7: mma_kblock<T, NB, 7>(w, chunks, xs, acc); break;
    default: mma_kblock<T, NB, 8>(w, chunks, xs, acc); break;
  }
}

// (2 alpha, beta - alpha (2^b - 1)) of rows g and g + 8 from the stored pairs.
template <class T>
__device__ __forceinline__ float4 row_scales(uint2 pairs, int bits) {
  const float levels = static_cast<float>((1 << bits) - 1);
  const float2 r0 = Pair<T>::to_float2(pairs.x), r1 = Pair<T>::to_float2(pairs.y);
  return make_float4(2.0f * r0.x, fmaf(-r0.x, levels, r0.y), 2.0f * r1.x,
                     fmaf(-r1.x, levels, r1.y));
}

template <class T, int NB>
__device__ __forceinline__ void finish_split(const GemmArgs<T>& a, const float (&yacc)[NB][4],
                                             int m0) {
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kCols = 8 * NB, kRows = kWarps * kTileRows;
  const long long stride = static_cast<long long>(kRows) * kCols;
  float* mine = a.partial + (static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x) * stride;
#pragma unroll
  for (int nt = 0; nt < NB; ++nt) {
    const int col = nt * 8 + 2 * (lane & 3);
    const int row = warp * kTileRows + (lane >> 2);
    *reinterpret_cast<float2*>(mine + row * kCols + col) = make_float2(yacc[nt][0], yacc[nt][1]);
    *reinterpret_cast<float2*>(mine + (row + 8) * kCols + col) =
        make_float2(yacc[nt][2], yacc[nt][3]);
  }
  __threadfence();  // partials visible device-wide before the ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int rb = blockIdx.x / a.zchunks;
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const int row = rb * kRows + i / kCols, m = m0 + i % kCols;
    if (row >= a.n_tiles * kTileRows || m >= a.M) continue;
    const int out = a.out_row[row];
    if (out < 0) continue;
    float s = 0.0f;  // fixed split order: deterministic whichever block came last
    for (int sp = 0; sp < static_cast<int>(gridDim.y); ++sp)
      s += __ldcg(a.partial + (static_cast<long long>(sp) * gridDim.x + blockIdx.x) * stride + i);
    if (a.bias != nullptr) s += to_float(a.bias[out]);
    a.y[static_cast<long long>(m) * a.ldy + out] = from_float<T>(s);
  }
  if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;  // ready for the next launch (graph replay)
}

template <class T, int NB>
__device__ void mma_gemm(const GemmArgs<T>& a) {
  extern __shared__ uint4 mma_smem[];
  constexpr int kCols = 8 * NB;
  T* xs = reinterpret_cast<T*>(mma_smem);                       // [2][kCols][kXsStride]
  float* xsum = reinterpret_cast<float*>(xs + 2 * kCols * kXsStride);  // [2][kCols]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int zc = blockIdx.x % a.zchunks, rb = blockIdx.x / a.zchunks;
  const int m0 = zc * kCols;
  // A warp past the last tile decodes the last tile again and stores nothing: no predicate
  // lives across the main loop (sm_90 ptxas would spill one).
  const int tile = imin(rb * kWarps + warp, a.n_tiles - 1);
  const int kb0 = blockIdx.y * a.kb_per_split;
  const int kb1 = imin(a.n_kb, kb0 + a.kb_per_split);
  const int2* meta = a.tile_meta + static_cast<long long>(tile) * a.n_kb;

  float yacc[NB][4];
#pragma unroll
  for (int nt = 0; nt < NB; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) yacc[nt][e] = 0.0f;
  unsigned w[kMaxBits][kKblockChunks];
  int bits = 0;
  stage_x<T, NB>(a, kb0, m0, xs, xsum);
  bits = load_words(a.qweight, meta[kb0], a.kb_info[kb0].y, w);

  for (int kb = kb0; kb < kb1; ++kb) {
    const int buf = (kb - kb0) & 1;
    T* xs_cur = xs + buf * kCols * kXsStride;
    const float* xsum_cur = xsum + buf * kCols;
    __syncthreads();  // k-block kb staged; everyone is done with the other buffer
    if (kb + 1 < kb1)
      stage_x<T, NB>(a, kb + 1, m0, xs + (buf ^ 1) * kCols * kXsStride, xsum + (buf ^ 1) * kCols);
    const int chunks = a.kb_info[kb].y;
    const float4 sc = row_scales<T>(a.scales[(static_cast<long long>(tile) * a.n_kb + kb) * 8 +
                                             (lane >> 2)], bits);
    unsigned next[kMaxBits][kKblockChunks];
    int next_bits = 0;
    if (kb + 1 < kb1) next_bits = load_words(a.qweight, meta[kb + 1], a.kb_info[kb + 1].y, next);
    float acc[NB][4];
#pragma unroll
    for (int nt = 0; nt < NB; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
    mma_kblock_any<T, NB>(bits, w, chunks, xs_cur, acc);
#pragma unroll
    for (int nt = 0; nt < NB; ++nt) {  // C fragment: rows g, g + 8; columns 2t, 2t + 1
      const float2 sx = *reinterpret_cast<const float2*>(xsum_cur + nt * 8 + 2 * (lane & 3));
      yacc[nt][0] = fmaf(sc.x, acc[nt][0], fmaf(sc.y, sx.x, yacc[nt][0]));
      yacc[nt][1] = fmaf(sc.x, acc[nt][1], fmaf(sc.y, sx.y, yacc[nt][1]));
      yacc[nt][2] = fmaf(sc.z, acc[nt][2], fmaf(sc.w, sx.x, yacc[nt][2]));
      yacc[nt][3] = fmaf(sc.z, acc[nt][3], fmaf(sc.w, sx.y, yacc[nt][3]));
    }
#pragma unroll
    for (int p = 0; p < kMaxBits; ++p) {
      w[p][0] = next[p][0];
      w[p][1] = next[p][1];
    }
    bits = next_bits;
  }

  if (gridDim.y > 1) {
    finish_split<T, NB>(a, yacc, m0);
    return;
  }
  if (rb * kWarps + warp >= a.n_tiles) return;
#pragma unroll
  for (int nt = 0; nt < NB; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = tile * kTileRows + (lane >> 2) + 8 * (e >> 1);
      const int m = m0 + nt * 8 + 2 * (lane & 3) + (e & 1);
      if (m >= a.M) continue;
      const int out = a.out_row[row];
      if (out < 0) continue;
      const float b = a.bias != nullptr ? to_float(a.bias[out]) : 0.0f;
      a.y[static_cast<long long>(m) * a.ldy + out] = from_float<T>(yacc[nt][e] + b);
    }
}

template <class T> struct DequantArgs {
  const unsigned* qweight;
  const int2* tile_meta;
  const int4* kb_info;
  const uint2* scales;
  const int* out_row;  // rows go to w[out_row[row]] (whole matrix), or null: tile order
  T* w;                // [rows, ldw]
  int ldw, tile_begin, tile_end, n_kb, kb_per_block;
};

template <class T, int Bits>
__device__ __forceinline__ void dequant_kblock(const unsigned (&w)[kMaxBits][kKblockChunks],
                                               int chunks, float4 sc, T* row0, T* row1) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < kKblockChunks; ++c) {
    if (c < chunks) {
      unsigned planes[kMaxBits];
#pragma unroll
      for (int p = 0; p < kMaxBits; ++p) planes[p] = p < Bits ? w[p][c] : 0u;
#pragma unroll
      for (int j = 0; j < kStepsPerChunk; ++j) {
        unsigned frag[4];
        decode_step<T, Bits>(planes, j, frag);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          T* dst = (r & 1) ? row1 : row0;
          if (dst == nullptr) continue;
          const float2 q = Pair<T>::to_float2(frag[r]);
          const float s = (r & 1) ? sc.z : sc.x, z = (r & 1) ? sc.w : sc.y;
          *reinterpret_cast<unsigned*>(dst + c * kChunkCols + j * kStepCols +
                                       frag_col(lane, r, 0)) =
              pack_pair(from_float<T>(fmaf(q.x, s, z)), from_float<T>(fmaf(q.y, s, z)));
        }
      }
    }
  }
}

template <class T>
__device__ void mma_dequant(const DequantArgs<T>& a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = a.tile_begin + blockIdx.x * kWarps + warp;
  if (tile >= a.tile_end) return;
  const int r0 = tile * kTileRows + (lane >> 2);
  long long d0, d1;
  if (a.out_row != nullptr) {
    d0 = a.out_row[r0];
    d1 = a.out_row[r0 + 8];
  } else {
    d0 = r0 - a.tile_begin * kTileRows;
    d1 = d0 + 8;
  }
  const int kb_end = imin(a.n_kb, (blockIdx.y + 1) * a.kb_per_block);
  for (int kb = blockIdx.y * a.kb_per_block; kb < kb_end; ++kb) {
    const int4 info = a.kb_info[kb];
    unsigned w[kMaxBits][kKblockChunks];
    const int bits = load_words(a.qweight, a.tile_meta[static_cast<long long>(tile) * a.n_kb + kb],
                                info.y, w);
    const float4 sc = row_scales<T>(a.scales[(static_cast<long long>(tile) * a.n_kb + kb) * 8 +
                                             (lane >> 2)], bits);
    T* row0 = d0 >= 0 ? a.w + d0 * a.ldw + info.x : nullptr;
    T* row1 = d1 >= 0 ? a.w + d1 * a.ldw + info.x : nullptr;
    switch (bits) {
      case 1: dequant_kblock<T, 1>(w, info.y, sc, row0, row1); break;
      case 2: dequant_kblock<T, 2>(w, info.y, sc, row0, row1); break;
      case 3: dequant_kblock<T, 3>(w, info.y, sc, row0, row1); break;
      case 4: dequant_kblock<T, 4>(w, info.y, sc, row0, row1); break;
      case 5: dequant_kblock<T, 5>(w, info.y, sc, row0, row1); break;
      case 6: dequant_kblock<T, 6>(w, info.y, sc, row0, row1); break;
      case 7: dequant_kblock<T, 7>(w, info.y, sc, row0, row1); break;
      default: dequant_kblock<T, 8>(w, info.y, sc, row0, row1); break;
    }
  }
}

template <class T>
__device__ void mma_gather(const T* x, const int* kidx, T* xr, int M, int ldx, int padded_cols) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(M) * padded_cols) return;
  const int m = static_cast<int>(i / padded_cols), kp = static_cast<int>(i % padded_cols);
  const int src = kidx[kp];
  xr[i] = src >= 0 ? x[static_cast<long long>(m) * ldx + src] : from_float<T>(0.0f);
}

}  // namespace mma
}  // namespace sfmp
