// AVX-512 kernels, included inside an anonymous namespace by the kernel_avx512*.cpp files: the
// same source compiled for several targets, with internal linkage so that instantiations for
// different targets can never be merged by the linker. The includer defines:
//   SFMP_GFNI  decode with GFNI + VBMI (else with mask registers, AVX512BW only)
//   SFMP_BF16  the bf16 compute path (vdpbf16ps) and hardware bf16 rounding
//
// Decoding turns the plane masks of column pairs into code vectors: 32 16-bit lanes, lane
// 2i + j = (tile row i, column j of the pair). For the bf16 path the high byte of every lane is
// 0x43, so a lane reads as bf16(128 + q), exact for q < 128 (b <= 7): vdpbf16ps takes the codes
// as they are and the 128 * sum(x) they add comes out of the offset below. For the f32 path the
// high byte is 0 and the lanes are converted.
//   mask decoder: one mask load + one merge-masked add per plane and pair; the adds of a pair
//     form a dependent chain (about 3 cycles each on Sapphire Rapids).
//   GFNI decoder: two pairs at once and independent of the bit-width: vpermb gathers, for every
//     8 lanes, the plane bytes into a qword (plane p at byte 7 - p, missing planes zeroed);
//     vgf2p8affineqb with the data as the bit matrix transposes each 8x8 bit block, so byte w
//     becomes the code of lane w; two unpacks interleave the codes with the high bytes.
// The includer includes <immintrin.h>, <array> and kernel.h first (this file is inside a namespace).
// Per (tile, group): y += s * acc + o * xsum with s = 2 alpha and
//   o = beta - alpha * (2^b - 1 + 2 * base), since w = alpha * (2q - (2^b - 1)) + beta.



struct MaskDecoder {
  static constexpr int kStep = 1;  // pairs per decode

  template <int NB, bool BF16>
  static inline void decode(const uint32_t* masks, __m512i* codes) {
    __m512i c = _mm512_set1_epi16(BF16 ? 0x4300 : 0);
#pragma GCC unroll 8
    for (int p = 0; p < NB; ++p)
      c = _mm512_mask_add_epi16(c, _load_mask32((__mmask32*)(masks + p)), c,
                                _mm512_set1_epi16((short)(1 << p)));
    codes[0] = c;
  }
};

#ifdef SFMP_GFNI
// vpermb indices and zeroing mask for NB planes: output qword q = 2 * (lane byte b) + pair,
// byte r = plane 7 - r of that pair's mask byte b.
template <int NB>
struct GfniTable {
  static constexpr std::array<uint8_t, 64> make_index() {
    std::array<uint8_t, 64> idx{};
    for (int q = 0; q < 8; ++q)
      for (int r = 0; r < 8; ++r) {
        const int p = 7 - r;
        idx[8 * q + r] = p < NB ? (uint8_t)((q % 2) * NB * 4 + p * 4 + q / 2) : 0;
      }
    return idx;
  }
  static constexpr uint64_t make_mask() {
    uint64_t mask = 0;
    for (int q = 0; q < 8; ++q)
      for (int r = 8 - NB; r < 8; ++r) mask |= 1ULL << (8 * q + r);
    return mask;
  }
  alignas(64) static constexpr std::array<uint8_t, 64> index = make_index();
  static constexpr uint64_t mask = make_mask();
};

struct GfniDecoder {
  static constexpr int kStep = 2;

  // Reads 64 bytes from `masks` (the buffer is padded for the last pairs).
  template <int NB, bool BF16>
  static inline void decode(const uint32_t* masks, __m512i* codes) {
    const __m512i idx = _mm512_load_si512((const void*)GfniTable<NB>::index.data());
    __m512i t = _mm512_maskz_permutexvar_epi8(GfniTable<NB>::mask, idx, _mm512_loadu_si512(masks));
    t = _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(0x8040201008040201LL), t, 0);
    const __m512i high = _mm512_set1_epi8(BF16 ? 0x43 : 0);
    codes[0] = _mm512_unpacklo_epi8(t, high);
    codes[1] = _mm512_unpackhi_epi8(t, high);
  }
};
using Decoder = GfniDecoder;
#else
using Decoder = MaskDecoder;
#endif

static inline __m512 load_scales(const void* base, ScaleKind kind, int64_t idx) {
  switch (kind) {
    case ScaleKind::F32:
      return _mm512_loadu_ps((const float*)base + idx * 16);
    case ScaleKind::BF16: {
      __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + idx * 16));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default: {
      __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + idx * 16));
      return _mm512_cvtph_ps(h);
    }
  }
}

// fp32 -> bf16, round to nearest even, NaN kept NaN (torch's .to(torch.bfloat16)).
static inline __m256i to_bf16(__m512 v) {
#ifdef SFMP_BF16
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
#endif
}

// 16 outputs in the activation dtype.
static inline void store_out(void* y, int64_t offset, __m512 v, OutKind kind) {
  switch (kind) {
    case OutKind::F32:
      _mm512_storeu_ps((float*)y + offset, v);
      break;
    case OutKind::BF16:
      _mm256_storeu_si256((__m256i*)((uint16_t*)y + offset), to_bf16(v));
      break;
    default:
      _mm256_storeu_si256((__m256i*)((uint16_t*)y + offset),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

// s = 2 alpha and o = beta - alpha * (levels + 2 * base) of one (tile, group).
static inline void group_scales(const LayerView& L, int64_t idx, int nb, float base, __m512& s,
                                __m512& o) {
  const __m512 al = load_scales(L.alpha, L.scale_kind, idx);
  const __m512 be = load_scales(L.beta, L.scale_kind, idx);
  s = _mm512_add_ps(al, al);
  o = _mm512_fnmadd_ps(al, _mm512_set1_ps((float)((1 << nb) - 1) + 2.f * base), be);
}

// Even and odd columns of a decoded pair vector as floats (codes without the bf16 high byte).
static inline void split_pairs(__m512i codes, __m512& even, __m512& odd) {
  even = _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0xFFFF)));
  odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 16));
}

struct F32Path {
  using X = float;
  static constexpr int kXPerPair = 2;
  static constexpr int kMaxBits = 8;
  static constexpr bool kBf16Codes = false;
  static constexpr float kBase = 0.f;
  struct Acc {
    __m512 e, o;
  };
  // Independent FMA chains (2 per accumulator) to cover the FMA latency at small MB.
  static constexpr int chains(int mb) { return mb == 1 ? 4 : (mb == 2 ? 2 : 1); }
  static inline void zero(Acc& a) { a.e = a.o = _mm512_setzero_ps(); }
  static inline __m512 total(const Acc& a) { return _mm512_add_ps(a.e, a.o); }
  static inline __m512 add(__m512 t, const Acc& a) { return _mm512_add_ps(t, total(a)); }

  template <int MB>
  static inline void dot(Acc (&a)[MB], __m512i codes, const float* xk) {
    __m512 ev, od;
    split_pairs(codes, ev, od);
    for (int m = 0; m < MB; ++m) {
      a[m].e = _mm512_fmadd_ps(ev, _mm512_set1_ps(xk[2 * m]), a[m].e);
      a[m].o = _mm512_fmadd_ps(od, _mm512_set1_ps(xk[2 * m + 1]), a[m].o);
    }
  }
};

#ifdef SFMP_BF16
struct Bf16Path {
  using X = uint32_t;
  static constexpr int kXPerPair = 1;
  static constexpr int kMaxBits = 7;  // 128 + q stays exact in bf16's 8 significant bits
  static constexpr bool kBf16Codes = true;
  static constexpr float kBase = 128.f;
  struct Acc {
    __m512 a;
  };
  // vdpbf16ps: ~9 cycles latency, ~1 per cycle.
  static constexpr int chains(int mb) { return mb == 1 ? 8 : (mb == 2 ? 4 : (mb <= 4 ? 2 : 1)); }
  static inline void zero(Acc& a) { a.a = _mm512_setzero_ps(); }
  static inline __m512 total(const Acc& a) { return a.a; }
  static inline __m512 add(__m512 t, const Acc& a) { return _mm512_add_ps(t, a.a); }

  template <int MB>
  static inline void dot(Acc (&a)[MB], __m512i codes, const uint32_t* xk) {
    for (int m = 0; m < MB; ++m)
      a[m].a = _mm512_dpbf16_ps(a[m].a, (__m512bh)codes, (__m512bh)_mm512_set1_epi32((int)xk[m]));
  }
};
#endif

// One decode step's worth of plane words, kPrefetchWords ahead: a single thread streaming
// from DRAM needs its misses issued early to approach the read bandwidth (the hardware
// prefetchers alone gave ~40% of it at M = 1).
constexpr int kPrefetchWords = 1024;  // 4 KB ahead
static inline void prefetch_planes(const uint32_t* pl, int words) {
  for (int w = 0; w < words; w += 16) _mm_prefetch((const char*)(pl + kPrefetchWords + w), _MM_HINT_T0);
}

// acc[m] = sum over the group's pairs of codes . x[m] (before scales).
template <class P, int MB, int NB>
static inline void group_dot(const uint32_t* pl, int kp, const typename P::X* x, __m512 (&acc)[MB]) {
  constexpr int S = Decoder::kStep, U = P::chains(MB), STEP = U > S ? U : S;
  typename P::Acc a[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) P::zero(a[u][m]);
  constexpr int XS = MB * P::kXPerPair;  // x slots per pair
  int k = 0;
  for (; k + STEP <= kp; k += STEP) {
    prefetch_planes(pl + k * NB, STEP * NB);
#pragma GCC unroll 8
    for (int j = 0; j < STEP; j += S) {
      __m512i codes[S];
      Decoder::template decode<NB, P::kBf16Codes>(pl + (k + j) * NB, codes);
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) P::template dot<MB>(a[(j + s) % U], codes[s], x + (k + j + s) * XS);
    }
  }
  for (; k < kp; k += S) {
    __m512i codes[S];
    Decoder::template decode<NB, P::kBf16Codes>(pl + k * NB, codes);
    for (int s = 0; s < S && k + s < kp; ++s) P::template dot<MB>(a[s % U], codes[s], x + (k + s) * XS);
  }
  for (int m = 0; m < MB; ++m) {
    acc[m] = P::total(a[0][m]);
    for (int u = 1; u < U; ++u) acc[m] = P::add(acc[m], a[u][m]);
  }
}

template <class P, int MB>
static void gemv_tiles(const GemvArgs& a) {
  const LayerView& L = *a.layer;
  const int64_t ng = L.n_groups, half = L.group_size / 2;
  const auto* x = static_cast<const typename P::X*>(a.xpk);
  for (int64_t t = a.t0; t < a.t1; ++t) {
    __m512 y[MB];
    for (int m = 0; m < MB; ++m) y[m] = _mm512_setzero_ps();
    const uint32_t* pl = L.planes + L.tile_off[t];
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t idx = t * ng + g;
      const int nb = L.bits[idx], kp = L.kpairs[g];
      const typename P::X* xg = x + g * half * MB * P::kXPerPair;
      __m512 acc[MB];
      switch (nb) {
        case 1: group_dot<P, MB, 1>(pl, kp, xg, acc); break;
        case 2: group_dot<P, MB, 2>(pl, kp, xg, acc); break;
        case 3: group_dot<P, MB, 3>(pl, kp, xg, acc); break;
        case 4: group_dot<P, MB, 4>(pl, kp, xg, acc); break;
        case 5: group_dot<P, MB, 5>(pl, kp, xg, acc); break;
        case 6: group_dot<P, MB, 6>(pl, kp, xg, acc); break;
        case 7: group_dot<P, MB, 7>(pl, kp, xg, acc); break;
        default:
          if constexpr (P::kMaxBits >= 8) group_dot<P, MB, 8>(pl, kp, xg, acc);
          break;
      }
      pl += (int64_t)kp * nb;
      __m512 s, o;
      group_scales(L, idx, nb, P::kBase, s, o);
      for (int m = 0; m < MB; ++m) {
        y[m] = _mm512_fmadd_ps(s, acc[m], y[m]);
        y[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(a.xsum[g * MB + m]), y[m]);
      }
    }
    for (int m = 0; m < MB; ++m) store_out(a.y, m * a.ldy + t * kTileRows, y[m], a.out);
  }
}

template <class P>
static void gemv(const GemvArgs& a) {
  switch (a.mb) {
    case 1: gemv_tiles<P, 1>(a); break;
    case 2: gemv_tiles<P, 2>(a); break;
    case 3: gemv_tiles<P, 3>(a); break;
    case 4: gemv_tiles<P, 4>(a); break;
    case 5: gemv_tiles<P, 5>(a); break;
    case 6: gemv_tiles<P, 6>(a); break;
    case 7: gemv_tiles<P, 7>(a); break;
    default: gemv_tiles<P, 8>(a); break;
  }
}

template <int NB>
static void dequant_group(const uint32_t* pl, int kp, __m512 s, __m512 o, float* tile) {
  constexpr int S = Decoder::kStep;
  for (int k = 0; k < kp; k += S) {
    __m512i codes[S];
    Decoder::template decode<NB, false>(pl + k * NB, codes);
    for (int j = 0; j < S && k + j < kp; ++j) {
      __m512 w[2];
      split_pairs(codes[j], w[0], w[1]);
      _mm512_storeu_ps(tile + (2 * (k + j)) * kTileRows, _mm512_fmadd_ps(s, w[0], o));
      _mm512_storeu_ps(tile + (2 * (k + j) + 1) * kTileRows, _mm512_fmadd_ps(s, w[1], o));
    }
  }
}

// r[i] = row i of a 16 x 16 block -> r[j] = column j (unpack, then 128-bit lane shuffles).
static inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[k + 4] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
    r[k + 4] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0x88);
    r[k + 12] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0xDD);
  }
}

// 32 floats -> 32 bf16 (round to nearest even, NaN kept).
static inline __m512i to_bf16x32(__m512 lo, __m512 hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(lo)), to_bf16(hi), 1);
}

// The tile [ld columns][16 rows] (fp32, original column order) -> its rows of w, through
// register transposes of 16 x 16 blocks. Every row receives whole 64-byte lines (32 bf16 or
// 16 fp32 columns per step), written with non-temporal stores where aligned: the dense
// weight is far larger than the caches and is read back only by the GEMM, so reading its
// lines in before overwriting them (what ordinary stores do) would double the traffic.
static void write_rows(const float* tile, const DequantArgs& a, const int32_t* rows) {
  const int64_t ld = a.ld;
  const int64_t step = a.bf16_out ? 32 : 16;
  const int64_t elem = a.bf16_out ? 2 : 4;
  // Streaming stores only where the dense weight outgrows the caches.
  const bool stream = ((uintptr_t)a.w % 64 == 0) && (ld * elem % 64 == 0) &&
                      a.layer->n_tiles * kTileRows * ld * elem > (8 << 20);
  const int64_t full = ld / step * step;
  for (int64_t c0 = 0; c0 < full; c0 += step) {
    __m512 r[2][16];
    for (int h = 0; h < step / 16; ++h) {
      for (int c = 0; c < 16; ++c)
        r[h][c] = _mm512_loadu_ps(tile + (int64_t)a.col_src[c0 + 16 * h + c] * kTileRows);
      transpose16(r[h]);  // r[h][i] = row i, columns c0 + 16h ...
    }
    for (int i = 0; i < kTileRows; ++i) {
      if (rows[i] < 0) continue;
      char* dst = static_cast<char*>(a.w) + ((int64_t)rows[i] * ld + c0) * elem;
      const __m512i v = a.bf16_out ? to_bf16x32(r[0][i], r[1][i]) : _mm512_castps_si512(r[0][i]);
      if (stream)
        _mm512_stream_si512((__m512i*)dst, v);
      else
        _mm512_storeu_si512(dst, v);
    }
  }
  for (int i = 0; i < kTileRows; ++i) {
    if (rows[i] < 0) continue;
    for (int64_t c = full; c < ld; ++c) {
      const float v = tile[(int64_t)a.col_src[c] * kTileRows + i];
      if (a.bf16_out)
        ((uint16_t*)a.w)[(int64_t)rows[i] * ld + c] =
            (uint16_t)_mm256_extract_epi16(to_bf16(_mm512_set1_ps(v)), 0);
      else
        ((float*)a.w)[(int64_t)rows[i] * ld + c] = v;
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
      __m512 s, o;
      group_scales(L, idx, nb, 0.f, s, o);
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
  _mm_sfence();  // non-temporal stores visible before the GEMM (other threads) reads them
}
