// Shared by every SFMP kernel: element types, small helpers, and the thread-block abstraction.
//
// Kernel bodies are written against a `Block` with three members: threads(), each(body) and
// sync(). A body is a sequence of phases, each(...) runs one phase for every thread of the block
// and sync() separates phases. On the GPU (DeviceBlock) each(...) runs the body for this thread
// and sync() is __syncthreads(). The host emulator (host_block.cuh, built only with
// -DSFMP_HOST_EMULATION) runs the same bodies on the CPU, one thread after another, which is
// exactly the semantics of barrier-separated phases. That is how the index arithmetic of these
// kernels is tested on machines without a GPU. Per-thread registers that live across phases
// are the `State` struct handed to each(...).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef SFMP_HOST_EMULATION
#define SFMP_HD __host__
#else
#define SFMP_HD __device__
#endif
#define SFMP_INLINE SFMP_HD __forceinline__

namespace sfmp {

constexpr int kWordBits = 32;
constexpr int kMaxBits = 8;  // the format's MAX_BITS

SFMP_INLINE int imin(int a, int b) { return a < b ? a : b; }

SFMP_INLINE float to_float(__half v) { return __half2float(v); }
SFMP_INLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> SFMP_INLINE T from_float(float v);
template <> SFMP_INLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
SFMP_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// alpha and beta of one (row, group), interleaved so that one 32-bit load fetches both.
template <class T> struct alignas(2 * sizeof(T)) ScalePair {
  T alpha;
  T beta;
};

// Where row `row` of the reordered matrix sits in the block grid. A fused layer (q/k/v,
// gate/up) stacks the grids of its shards, so the last block-row of every shard may be ragged:
// row_info int32 [N][4] = (global block-row, row inside it, rows of that block-row, 0).
struct RowRef {
  int block_row;
  int local;
  int rows;
};

SFMP_INLINE RowRef row_ref(const int* row_info, int row) {
  const int4 r = reinterpret_cast<const int4*>(row_info)[row];
  RowRef ref;
  ref.block_row = r.x;
  ref.local = r.y;
  ref.rows = r.z;
  return ref;
}

// Block (block_row, group): meta int32 [n_block_rows][n_groups][2] = (word offset, bits).
struct BlockRef {
  int offset;  // first word of the block
  int bits;
  int rows;    // rows of the block-row
  int local;   // row inside the block-row
};

SFMP_INLINE BlockRef block_ref(const int* meta, const RowRef& row, int group, int n_groups) {
  const int2 m = reinterpret_cast<const int2*>(meta)[row.block_row * n_groups + group];
  BlockRef ref;
  ref.offset = m.x;
  ref.bits = m.y;
  ref.rows = row.rows;
  ref.local = row.local;
  return ref;
}

// Word `word` of plane `plane` of row `ref.local`: blocks are [bits][words][rows] int32, so
// threads mapped to consecutive rows read consecutive words (coalesced).
SFMP_INLINE unsigned plane_word(const int* qweight, const BlockRef& ref, int words_in_group,
                                int plane, int word) {
  return static_cast<unsigned>(
      qweight[ref.offset + (plane * words_in_group + word) * ref.rows + ref.local]);
}

struct NoState {};  // for kernels whose threads keep nothing across phases

#ifndef SFMP_HOST_EMULATION
template <class State> struct DeviceBlock {
  State state;
  void* smem;

  __device__ explicit DeviceBlock(void* shared) : smem(shared) {}
  __device__ __forceinline__ int threads() const { return blockDim.x * blockDim.y; }
  template <class Body> __device__ __forceinline__ void each(Body&& body) {
    body(static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x), state);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};
#endif

}  // namespace sfmp
