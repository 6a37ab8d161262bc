// AMX-BF16 gemv for bfloat16 activations, 2..256 rows per call (Sapphire Rapids and later).
//
// The runtime layout's column pair is exactly one row of an AMX B tile in its pair (VNNI)
// layout: 16 output rows x (column 2kp, 2kp+1). So 16 pairs decoded with the GFNI decoder
// (bf16(128 + q) codes, as in the vector bf16 path) and stored to an L1 buffer form one B tile;
// the activations are the A tile (16 rows x 32 columns, straight from the row layout), and one
// tdpbf16ps does 16 x 16 x 32 multiply-adds in fp32. The B tiles of a (tile, group) are decoded
// once into L1 and serve every block of 16 activation rows; the C tile accumulates the group,
// whose scale and offset are then applied in AVX-512, as in the vector path.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,gfni,fma,f16c,amx-tile,amx-bf16")
#include <immintrin.h>

#include <array>

#include <algorithm>

#include "kernel.h"

#define SFMP_GFNI 1
#define SFMP_BF16 1

namespace sfmp_cpu {
namespace {
#include "avx512_impl.h"

constexpr int kMaxMb = 256;
constexpr int kPairsPerTile = 16;
constexpr int kMBlock = 16;  // activation rows per A/C tile

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One B tile: `pairs` decoded pairs, the rest zero (they meet the next group's columns in A).
template <int NB>
static inline void decode_b(const uint32_t* pl, int pairs, __m512i* buf) {
  int k = 0;
  for (; k < pairs; k += 2) {
    __m512i codes[2];
    GfniDecoder::decode<NB, true>(pl + k * NB, codes);
    _mm512_store_si512(buf + k, codes[0]);
    if (k + 1 < pairs) _mm512_store_si512(buf + k + 1, codes[1]);
  }
  for (k = pairs; k < kPairsPerTile; ++k) _mm512_store_si512(buf + k, _mm512_setzero_si512());
}

// Every B tile of one (tile, group), decoded once for all activation rows.
template <int NB>
static inline void decode_group(const uint32_t* pl, int kp, __m512i* buf) {
  prefetch_planes(pl, kp * NB);
  for (int k0 = 0; k0 < kp; k0 += kPairsPerTile)
    decode_b<NB>(pl + k0 * NB, std::min(kPairsPerTile, kp - k0), buf + k0);
}

static inline void decode_group(int nb, const uint32_t* pl, int kp, __m512i* buf) {
  switch (nb) {
    case 1: decode_group<1>(pl, kp, buf); break;
    case 2: decode_group<2>(pl, kp, buf); break;
    case 3: decode_group<3>(pl, kp, buf); break;
    case 4: decode_group<4>(pl, kp, buf); break;
    case 5: decode_group<5>(pl, kp, buf); break;
    case 6: decode_group<6>(pl, kp, buf); break;
    default: decode_group<7>(pl, kp, buf); break;
  }
}

// NBLK blocks of 16 activation rows at once: tiles 0..3 accumulate them (independent chains,
// so tdpbf16ps pipelines), each B tile is loaded once for all of them, A alternates 4/5.
template <int NBLK>
static inline void group_blocks(const uint16_t* x, int64_t x_row_bytes, int kp, const __m512i* bbuf,
                                float* cbuf) {
  if constexpr (NBLK > 0) _tile_zero(0);
  if constexpr (NBLK > 1) _tile_zero(1);
  if constexpr (NBLK > 2) _tile_zero(2);
  if constexpr (NBLK > 3) _tile_zero(3);
  const int64_t block_elems = kMBlock * x_row_bytes / 2;
  for (int k0 = 0; k0 < kp; k0 += kPairsPerTile) {
    const uint16_t* xa = x + 2 * k0;
    _tile_loadd(6, bbuf + k0, 64);
    _tile_loadd(4, xa, x_row_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NBLK > 1) {
      _tile_loadd(5, xa + block_elems, x_row_bytes);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (NBLK > 2) {
      _tile_loadd(4, xa + 2 * block_elems, x_row_bytes);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (NBLK > 3) {
      _tile_loadd(5, xa + 3 * block_elems, x_row_bytes);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  constexpr int kBlockFloats = kMBlock * kTileRows;
  if constexpr (NBLK > 0) _tile_stored(0, cbuf, 64);
  if constexpr (NBLK > 1) _tile_stored(1, cbuf + kBlockFloats, 64);
  if constexpr (NBLK > 2) _tile_stored(2, cbuf + 2 * kBlockFloats, 64);
  if constexpr (NBLK > 3) _tile_stored(3, cbuf + 3 * kBlockFloats, 64);
}

// mb rows (2..256) in blocks of 16: rows beyond mb in the last block read the zero padding of
// the row layout, which the binding rounds up to a multiple of 16 rows. Tiles are taken
// kTilesPerSweep at a time, group-major inside: a group's slab of activations (mb x 128 bf16)
// is then read once per sweep instead of once per tile, which matters once the activations
// outgrow L2 (mb x in_features x 2 bytes: 3.7 MB at 128 rows of 14336).
constexpr int kTilesPerSweep = 8;

static void gemv_amx(const GemvArgs& a) {
  const LayerView& L = *a.layer;
  const int mb = a.mb, block = std::min(mb, kMBlock);
  const int64_t ng = L.n_groups, gs = L.group_size;
  const int64_t x_row = ng * gs + kRowPad;  // bf16 values per activation row
  const auto* x = static_cast<const uint16_t*>(a.xpk);
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) cfg.rows[i] = (uint8_t)block;  // C: block x 16 fp32
  cfg.rows[4] = cfg.rows[5] = (uint8_t)block;                // A: block x 32 bf16
  cfg.rows[6] = kPairsPerTile;                               // B: 16 pairs x 16 rows x 2
  for (int i = 0; i < 7; ++i) cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  const int max_pairs = (int)((gs / 2 + kPairsPerTile - 1) / kPairsPerTile) * kPairsPerTile;
  __m512i* bbuf = static_cast<__m512i*>(std::aligned_alloc(64, max_pairs * 64));
  alignas(64) float cbuf[4 * kMBlock * kTileRows];
  const int64_t y_tile = (int64_t)mb * kTileRows;  // floats of one tile's accumulators
  float* y = static_cast<float*>(std::aligned_alloc(64, kTilesPerSweep * y_tile * sizeof(float)));
  const uint32_t* pl[kTilesPerSweep];
  for (int64_t t0 = a.t0; t0 < a.t1; t0 += kTilesPerSweep) {
    const int nt = (int)std::min<int64_t>(kTilesPerSweep, a.t1 - t0);
    for (int j = 0; j < nt; ++j) pl[j] = L.planes + L.tile_off[t0 + j];
    for (int64_t i = 0; i < nt * y_tile; i += 16) _mm512_store_ps(y + i, _mm512_setzero_ps());
    for (int64_t g = 0; g < ng; ++g) {
      const int kp = L.kpairs[g];
      for (int j = 0; j < nt; ++j) {
        const int64_t idx = (t0 + j) * ng + g;
        const int nb = L.bits[idx];
        decode_group(nb, pl[j], kp, bbuf);
        pl[j] += (int64_t)kp * nb;
        __m512 s, o;
        group_scales(L, idx, nb, Bf16Path::kBase, s, o);
        float* yt = y + j * y_tile;
        for (int m0 = 0; m0 < mb; m0 += 4 * kMBlock) {
          const uint16_t* xb = x + m0 * x_row + g * gs;
          switch (std::min(4, (mb - m0 + kMBlock - 1) / kMBlock)) {
            case 1: group_blocks<1>(xb, x_row * 2, kp, bbuf, cbuf); break;
            case 2: group_blocks<2>(xb, x_row * 2, kp, bbuf, cbuf); break;
            case 3: group_blocks<3>(xb, x_row * 2, kp, bbuf, cbuf); break;
            default: group_blocks<4>(xb, x_row * 2, kp, bbuf, cbuf); break;
          }
          for (int m = 0; m < std::min(4 * kMBlock, mb - m0); ++m) {
            float* ym = yt + (m0 + m) * kTileRows;
            __m512 v = _mm512_fmadd_ps(s, _mm512_load_ps(cbuf + m * kTileRows), _mm512_load_ps(ym));
            v = _mm512_fmadd_ps(o, _mm512_set1_ps(a.xsum[g * mb + m0 + m]), v);
            _mm512_store_ps(ym, v);
          }
        }
      }
    }
    for (int j = 0; j < nt; ++j)
      for (int m = 0; m < mb; ++m)
        store_out(a.y, m * a.ldy + (t0 + j) * kTileRows,
                  _mm512_load_ps(y + j * y_tile + m * kTileRows), a.out);
  }
  std::free(y);
  std::free(bbuf);
  _tile_release();
}

}  // namespace

IsaKernels amx_kernels() {
  const GemvKernel bf16{gemv<Bf16Path>, 8, Bf16Path::kMaxBits, XLayout::PairsBf16};
  const GemvKernel batch{gemv_amx, kMaxMb, Bf16Path::kMaxBits, XLayout::RowsBf16};
  const GemvKernel f32{gemv<F32Path>, 8, F32Path::kMaxBits, XLayout::PairsF32};
  return {"amx", bf16, batch, 2, f32, dequant, 512, 192};
}

}  // namespace sfmp_cpu
