// AVX2 + FMA + F16C fallback for x86 CPUs without AVX-512: fp32 gemv and dequantization on
// the same runtime layout. Without mask registers a plane's 32-bit mask is expanded to 16-bit
// lanes by broadcast + and + compare (rows 0-7 from its low half, rows 8-15 from its high
// half), and the codes are built top plane first (c = 2c + bit). With 16 ymm registers one
// call handles at most 2 activation rows (4 accumulators each).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "kernel.h"

namespace sfmp_cpu {
namespace {

constexpr int kMaxMb = 2;

template <int NB>
static inline void decode_codes(const uint32_t* masks, __m256i& lo, __m256i& hi) {
  const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                        4096, 8192, 16384, (short)0x8000);
  lo = hi = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int p = NB - 1; p >= 0; --p) {
    lo = _mm256_add_epi16(lo, lo);
    hi = _mm256_add_epi16(hi, hi);
    const __m256i bl = _mm256_set1_epi16((short)(masks[p] & 0xFFFF));
    const __m256i bh = _mm256_set1_epi16((short)(masks[p] >> 16));
    lo = _mm256_sub_epi16(lo, _mm256_cmpeq_epi16(_mm256_and_si256(bl, sel), sel));
    hi = _mm256_sub_epi16(hi, _mm256_cmpeq_epi16(_mm256_and_si256(bh, sel), sel));
  }
}

// The 16 rows x 2 columns of a pair as floats: v[0] rows 0-7 even column, v[1] rows 0-7 odd,
// v[2] rows 8-15 even, v[3] rows 8-15 odd.
template <int NB>
static inline void decode_pair(const uint32_t* masks, __m256 (&v)[4]) {
  __m256i lo, hi;
  decode_codes<NB>(masks, lo, hi);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, low16));
  v[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 16));
  v[2] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, low16));
  v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 16));
}

static inline __m256 load_scales(const void* base, ScaleKind kind, int64_t offset) {
  switch (kind) {
    case ScaleKind::F32:
      return _mm256_loadu_ps((const float*)base + offset);
    case ScaleKind::BF16: {
      __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + offset));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + offset)));
  }
}

// Two rows' floats (8 lanes each) -> 16 bf16, round to nearest even, in row order.
static inline __m256i to_bf16(__m256 lo, __m256 hi) {
  auto round = [](__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC00000), nan);  // NaN stays NaN
    return _mm256_srli_epi32(b, 16);
  };
  // packus interleaves 128-bit lanes: [lo0-3 hi0-3 lo4-7 hi4-7] -> reorder to lo, hi.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(lo), round(hi)), 0xD8);
}

// 16 outputs (two halves of 8) in the activation dtype.
static inline void store_out(void* y, int64_t offset, __m256 lo, __m256 hi, OutKind kind) {
  switch (kind) {
    case OutKind::F32:
      _mm256_storeu_ps((float*)y + offset, lo);
      _mm256_storeu_ps((float*)y + offset + 8, hi);
      break;
    case OutKind::BF16:
      _mm256_storeu_si256((__m256i*)((uint16_t*)y + offset), to_bf16(lo, hi));
      break;
    default: {
      const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      _mm_storeu_si128((__m128i*)((uint16_t*)y + offset), _mm256_cvtps_ph(lo, round));
      _mm_storeu_si128((__m128i*)((uint16_t*)y + offset + 8), _mm256_cvtps_ph(hi, round));
      break;
    }
  }
}

template <int MB, int NB>
static inline void group(const uint32_t* pl, int kp, const float* x, __m256 (&acc)[MB][4]) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int k = 0; k < kp; ++k) {
    __m256 v[4];
    decode_pair<NB>(pl + k * NB, v);
    const float* xk = x + k * MB * 2;
    for (int m = 0; m < MB; ++m) {
      const __m256 xe = _mm256_set1_ps(xk[2 * m]), xo = _mm256_set1_ps(xk[2 * m + 1]);
      acc[m][0] = _mm256_fmadd_ps(v[0], xe, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(v[1], xo, acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(v[2], xe, acc[m][2]);
      acc[m][3] = _mm256_fmadd_ps(v[3], xo, acc[m][3]);
    }
  }
}

template <int MB>
static void gemv_tiles(const GemvArgs& a) {
  const LayerView& L = *a.layer;
  const int64_t ng = L.n_groups, half = L.group_size / 2;
  const float* x = static_cast<const float*>(a.xpk);
  for (int64_t t = a.t0; t < a.t1; ++t) {
    __m256 y[MB][2];
    for (int m = 0; m < MB; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
    const uint32_t* pl = L.planes + L.tile_off[t];
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t idx = t * ng + g;
      const int nb = L.bits[idx], kp = L.kpairs[g];
      const float* xg = x + g * half * MB * 2;
      __m256 acc[MB][4];
      switch (nb) {
        case 1: group<MB, 1>(pl, kp, xg, acc); break;
        case 2: group<MB, 2>(pl, kp, xg, acc); break;
        case 3: group<MB, 3>(pl, kp, xg, acc); break;
        case 4: group<MB, 4>(pl, kp, xg, acc); break;
        case 5: group<MB, 5>(pl, kp, xg, acc); break;
        case 6: group<MB, 6>(pl, kp, xg, acc); break;
        case 7: group<MB, 7>(pl, kp, xg, acc); break;
        default: group<MB, 8>(pl, kp, xg, acc); break;
      }
      pl += (int64_t)kp * nb;
      const __m256 levels = _mm256_set1_ps((float)((1 << nb) - 1));
      for (int h = 0; h < 2; ++h) {
        const __m256 al = load_scales(L.alpha, L.scale_kind, idx * 16 + 8 * h);
        const __m256 be = load_scales(L.beta, L.scale_kind, idx * 16 + 8 * h);
        const __m256 s = _mm256_add_ps(al, al), o = _mm256_fnmadd_ps(al, levels, be);
        for (int m = 0; m < MB; ++m) {
          const __m256 dot = _mm256_add_ps(acc[m][2 * h], acc[m][2 * h + 1]);
          y[m][h] = _mm256_fmadd_ps(s, dot, y[m][h]);
          y[m][h] = _mm256_fmadd_ps(o, _mm256_set1_ps(a.xsum[g * MB + m]), y[m][h]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) store_out(a.y, m * a.ldy + t * kTileRows, y[m][0], y[m][1], a.out);
  }
}

static void gemv(const GemvArgs& a) {
  if (a.mb == 1)
    gemv_tiles<1>(a);
  else
    gemv_tiles<2>(a);
}

template <int NB>
static void dequant_group(const uint32_t* pl, int kp, const __m256 (&s)[2], const __m256 (&o)[2],
                          float* tile) {
  for (int k = 0; k < kp; ++k) {
    __m256 v[4];
    decode_pair<NB>(pl + k * NB, v);
    float* even = tile + 2 * k * kTileRows;
    _mm256_storeu_ps(even, _mm256_fmadd_ps(s[0], v[0], o[0]));
    _mm256_storeu_ps(even + 8, _mm256_fmadd_ps(s[1], v[2], o[1]));
    _mm256_storeu_ps(even + kTileRows, _mm256_fmadd_ps(s[0], v[1], o[0]));
    _mm256_storeu_ps(even + kTileRows + 8, _mm256_fmadd_ps(s[1], v[3], o[1]));
  }
}

static inline uint16_t bf16_bits(float v) {
  alignas(32) uint16_t h[16];
  const __m256 x = _mm256_set1_ps(v);
  _mm256_store_si256((__m256i*)h, to_bf16(x, x));
  return h[0];
}

static void write_rows(const float* tile, const DequantArgs& a, const int32_t* rows) {
  for (int i = 0; i < kTileRows; ++i) {
    if (rows[i] < 0) continue;
    if (a.bf16_out) {
      uint16_t* dst = (uint16_t*)a.w + (int64_t)rows[i] * a.ld;
      for (int64_t c = 0; c < a.ld; ++c) dst[c] = bf16_bits(tile[(int64_t)a.col_src[c] * kTileRows + i]);
    } else {
      float* dst = (float*)a.w + (int64_t)rows[i] * a.ld;
      for (int64_t c = 0; c < a.ld; ++c) dst[c] = tile[(int64_t)a.col_src[c] * kTileRows + i];
    }
  }
}

static void dequant(const DequantArgs& a) {
  const LayerView& L = *a.layer;
  const int64_t ng = L.n_groups, gs = L.group_size;
  for (int64_t t = a.t0; t < a.t1; ++t) {
    const uint32_t* pl = L.planes + L.tile_off[t];
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t idx = t * ng + g;
      const int nb = L.bits[idx], kp = L.kpairs[g];
      float* tile = a.tile + g * gs * kTileRows;
      const __m256 levels = _mm256_set1_ps((float)((1 << nb) - 1));
      __m256 s[2], o[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 al = load_scales(L.alpha, L.scale_kind, idx * 16 + 8 * h);
        const __m256 be = load_scales(L.beta, L.scale_kind, idx * 16 + 8 * h);
        s[h] = _mm256_add_ps(al, al);
        o[h] = _mm256_fnmadd_ps(al, levels, be);
      }
      switch (nb) {
        case 1: dequant_group<1>(pl, kp, s, o, tile); break;
        case 2: dequant_group<2>(pl, kp, s, o, tile); break;
        case 3: dequant_group<3>(pl, kp, s, o, tile); break;
        case 4: dequant_group<4>(pl, kp, s, o, tile); break;
        case 5: dequant_group<5>(pl, kp, s, o, tile); break;
        case 6: dequant_group<6>(pl, kp, s, o, tile); break;
        case 7: dequant_group<7>(pl, kp, s, o, tile); break;
        default: dequant_group<8>(pl, kp, s, o, tile); break;
      }
      pl += (int64_t)kp * nb;
    }
    write_rows(a.tile, a, a.row_dst + t * kTileRows);
  }
}

}  // namespace

IsaKernels avx2_kernels() {
  return {"avx2", {}, {}, 0, {gemv, kMaxMb, 8, XLayout::PairsF32}, dequant, 16, 16};
}

}  // namespace sfmp_cpu
