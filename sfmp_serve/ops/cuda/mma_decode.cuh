// Bit-plane codes -> mma.sync A fragments, in registers (layout: mma_repack.py, docs/gpu-kernels.md).
//
// Per lane and 64-input chunk, plane p of a (16-row tile, k-block) is one u32 word holding bit p
// of the 32 codes the lane needs for four k16 steps. A step's codes form a "T-word": 8 nibble
// slots (b <= 4) or, twice, 4 byte slots (b >= 5); within plane p, T-word n sits rotated left by
// n, so the planes of T-word n are merged with b - 1 bit selects (lop3 0xE4) whose masks are
// compile-time constants, and one rotation then puts a register's two codes at bits 0 and 16,
// where lop3 0xEA masks them and ORs in the exponent of 1024 (fp16, 0x6400) or 128 (bf16,
// 0x4300): the halves are then exactly magic + code, and one exact hsub2 leaves the codes.
// The scales are applied per k-block in fp32 after the mma (mma.cuh), so decoding is integer
// only: about (b + 11) / 8 instructions per weight.
//
// Everything here also compiles for the host (-DSFMP_HOST_EMULATION): lop3 as its truth table,
// the rotation in C, hsub2 through float (exact: integers). mma_kernels.cu exports a host entry
// that decodes a chunk, and the tests compare it with the numpy model (mma_model.py).
#pragma once

#include "common.cuh"

namespace sfmp {
namespace mma {

constexpr int kTileRows = 16;   // mma m16: output rows per warp tile
constexpr int kStepCols = 16;   // mma k16
constexpr int kChunkCols = 64;  // inputs per plane word of a lane (4 steps)
constexpr int kStepsPerChunk = kChunkCols / kStepCols;
constexpr int kKblockChunks = 2;  // a k-block holds at most 128 inputs
constexpr unsigned kLopSelect = 0xE4;   // (a & c) | (b & ~c)
constexpr unsigned kLopMaskOr = 0xEA;   // (a & b) | c

template <unsigned Imm>
SFMP_INLINE unsigned lop3(unsigned a, unsigned b, unsigned c) {
#ifdef SFMP_HOST_EMULATION
  unsigned r = 0;
  for (int i = 0; i < 8; ++i)
    if ((Imm >> i) & 1u) r |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  return r;
#else
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(Imm));
  return r;
#endif
}

SFMP_INLINE unsigned rotr(unsigned x, int n) {
  n &= 31;
#ifdef SFMP_HOST_EMULATION
  return n == 0 ? x : (x >> n) | (x << (32 - n));
#else
  return __funnelshift_r(x, x, n);
#endif
}

SFMP_HD constexpr unsigned rotl_const(unsigned v, int n) {
  return (n & 31) == 0 ? v : (v << (n & 31)) | (v >> (32 - (n & 31)));
}

// Bits 0..p-1 of every slot of a T-word (slots of `period` bits).
SFMP_HD constexpr unsigned slot_bits_below(int p, int period) {
  unsigned m = 0;
  for (int s = 0; s < 32 / period; ++s) m |= ((1u << p) - 1u) << (period * s);
  return m;
}

template <class T> struct Magic;  // the exponent that makes a code the low mantissa bits
template <> struct Magic<__half> {
  static constexpr unsigned kPair = 0x64006400u;  // 1024.0: 10 mantissa bits
  static constexpr bool kBf16 = false;
};
template <> struct Magic<__nv_bfloat16> {
  static constexpr unsigned kPair = 0x43004300u;  // 128.0: 7 mantissa bits
  static constexpr bool kBf16 = true;
};

template <class T> SFMP_INLINE unsigned hsub2_raw(unsigned a, unsigned b);
template <class T> SFMP_INLINE unsigned hadd2_raw(unsigned a, unsigned b);

#ifdef SFMP_HOST_EMULATION
template <class T> inline float half_bits_to_float(unsigned short v);
template <> inline float half_bits_to_float<__half>(unsigned short v) {
  __half_raw r;
  r.x = v;
  return __half2float(__half(r));
}
template <> inline float half_bits_to_float<__nv_bfloat16>(unsigned short v) {
  __nv_bfloat16_raw r;
  r.x = v;
  return __bfloat162float(__nv_bfloat16(r));
}
template <class T> inline unsigned short float_to_half_bits(float v) {
  if constexpr (Magic<T>::kBf16)
    return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x;
  else
    return static_cast<__half_raw>(__float2half_rn(v)).x;
}
template <class T, class Op> inline unsigned pairwise(unsigned a, unsigned b, Op op) {
  unsigned out = 0;
  for (int h = 0; h < 2; ++h) {
    const float r = op(half_bits_to_float<T>((a >> (16 * h)) & 0xFFFFu),
                       half_bits_to_float<T>((b >> (16 * h)) & 0xFFFFu));
    out |= static_cast<unsigned>(float_to_half_bits<T>(r)) << (16 * h);
  }
  return out;
}
template <class T> inline unsigned hsub2_raw(unsigned a, unsigned b) {
  return pairwise<T>(a, b, [](float x, float y) { return x - y; });
}
template <class T> inline unsigned hadd2_raw(unsigned a, unsigned b) {
  return pairwise<T>(a, b, [](float x, float y) { return x + y; });
}
#else
template <> __device__ __forceinline__ unsigned hsub2_raw<__half>(unsigned a, unsigned b) {
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a),
                            *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const unsigned*>(&r);
}
template <> __device__ __forceinline__ unsigned hsub2_raw<__nv_bfloat16>(unsigned a, unsigned b) {
  const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                   *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const unsigned*>(&r);
}
template <> __device__ __forceinline__ unsigned hadd2_raw<__half>(unsigned a, unsigned b) {
  const __half2 r = __hadd2(*reinterpret_cast<const __half2*>(&a),
                            *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const unsigned*>(&r);
}
template <> __device__ __forceinline__ unsigned hadd2_raw<__nv_bfloat16>(unsigned a, unsigned b) {
  const __nv_bfloat162 r = __hadd2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                   *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const unsigned*>(&r);
}
#endif

template <int Bits> struct Width {
  static_assert(Bits >= 1 && Bits <= kMaxBits, "bit-widths are 1..8");
  static constexpr int kPeriod = Bits <= 4 ? 4 : 8;  // slot size: nibbles or bytes
  static constexpr unsigned kCodeMask = ((1u << Bits) - 1u) * 0x00010001u;
};

// T-word n of a chunk, still rotated left by n: plane p supplies bit p of every slot.
template <int Bits>
SFMP_INLINE unsigned gather_tword(const unsigned (&planes)[kMaxBits], int n) {
  unsigned s = planes[0];
#pragma unroll
  for (int p = 1; p < Bits; ++p)
    s = lop3<kLopSelect>(s, planes[p], rotl_const(slot_bits_below(p, Width<Bits>::kPeriod), n));
  return s;
}

// One A register: the codes of two consecutive inputs of one row, as exact fp16/bf16 values.
template <class T, int Bits>
SFMP_INLINE unsigned extract_pair(unsigned tword, int rotation) {
  constexpr unsigned kMagic = Magic<T>::kPair;
  const unsigned v = rotr(tword, rotation);
  if constexpr (Bits == 8 && Magic<T>::kBf16) {
    // 128 + q needs 8 mantissa bits, bf16 has 7: bit 7 goes through the exponent (0x4380 = 256).
    const unsigned lo = lop3<kLopMaskOr>(v, 0x007F007Fu, kMagic);
    const unsigned hi = lop3<kLopMaskOr>(v, 0x00800080u, kMagic);
    return hadd2_raw<T>(hsub2_raw<T>(lo, kMagic), hsub2_raw<T>(hi, kMagic));
  } else {
    return hsub2_raw<T>(lop3<kLopMaskOr>(v, Width<Bits>::kCodeMask, kMagic), kMagic);
  }
}

// The A fragment (a0..a3) of local k16 step `step` (0..3) of a chunk.
template <class T, int Bits>
SFMP_INLINE void decode_step(const unsigned (&planes)[kMaxBits], int step, unsigned (&a)[4]) {
  if constexpr (Width<Bits>::kPeriod == 4) {
    const unsigned s = gather_tword<Bits>(planes, step);
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = extract_pair<T, Bits>(s, step + 4 * r);
  } else {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int n = 2 * step + half;
      const unsigned s = gather_tword<Bits>(planes, n);
      a[2 * half] = extract_pair<T, Bits>(s, n);
      a[2 * half + 1] = extract_pair<T, Bits>(s, n + 8);
    }
  }
}

// Where register r (half h) of lane (g, t) sits in the tile: the m16n8k16 A fragment map.
SFMP_INLINE int frag_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
SFMP_INLINE int frag_col(int lane, int r, int h) { return 2 * (lane & 3) + 8 * (r >> 1) + h; }

}  // namespace mma
}  // namespace sfmp
