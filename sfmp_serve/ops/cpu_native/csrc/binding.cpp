// Python binding of the compiled CPU kernels: the load-time repack of an SFMP layer into the
// runtime layout of kernel.h, and the per-call work around the kernels (input gather and
// packing, threads over output tiles, output scatter, the dense prefill path).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <atomic>
#include <string>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "kernel.h"

namespace sfmp_cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// ISA selection: the best one the CPU and the OS support, unless a test or benchmark forces one.
// ---------------------------------------------------------------------------------------------
// Linux keeps AMX tile state off until a process asks for it (arch_prctl); oneDNN asks too.
bool os_grants_amx() {
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

std::vector<IsaKernels> supported_isas() {
  std::vector<IsaKernels> out;
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16") &&
                    __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
  if (bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
      os_grants_amx())
    out.push_back(amx_kernels());
  if (bf16) out.push_back(avx512_bf16_kernels());
  if (avx512) out.push_back(avx512_kernels());
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    out.push_back(avx2_kernels());
  return out;
}

const std::vector<IsaKernels>& isas() {
  static const std::vector<IsaKernels> all = supported_isas();
  return all;
}

std::atomic<int> g_isa{0};  // index into isas()

const IsaKernels& current_isa() {
  TORCH_CHECK(!isas().empty(), "sfmp: this CPU has neither AVX-512 nor AVX2+FMA+F16C");
  return isas()[g_isa.load()];
}

std::vector<std::string> isa_names() {
  std::vector<std::string> names;
  for (const auto& k : isas()) names.emplace_back(k.name);
  return names;
}

void set_isa(const std::string& name) {
  for (size_t i = 0; i < isas().size(); ++i)
    if (name == isas()[i].name) {
      g_isa = (int)i;
      return;
    }
  TORCH_CHECK(false, "sfmp: ISA '", name, "' is not supported by this CPU");
}

std::string get_isa() { return current_isa().name; }

// ---------------------------------------------------------------------------------------------
// Scalar conversions (RNE for bf16, as torch's .to()).
// ---------------------------------------------------------------------------------------------
template <class Fn>
void dispatch_act(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "sfmp: activations must be float32, bfloat16 or float16, got ", t);
  }
}

ScaleKind scale_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScaleKind::F32;
    case at::kBFloat16: return ScaleKind::BF16;
    case at::kHalf: return ScaleKind::F16;
    default: TORCH_CHECK(false, "sfmp: alpha/beta dtype ", t, " is not supported");
  }
}

constexpr int64_t kTileBlock = 4;  // tiles per step of a thread: their planes stay in L2 across
                                   // the m-chunks of a batch

// ---------------------------------------------------------------------------------------------
// One layer
// ---------------------------------------------------------------------------------------------
struct Shard {
  at::Tensor qweight, block_bits, block_offsets, alpha, beta;
};

class Layer {
 public:
  Layer(const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>>&
            shards,
        int64_t in_features, int64_t group_size, int64_t block_rows, const at::Tensor& input_perm,
        const at::Tensor& scatter)
      : in_features_(in_features), group_size_(group_size) {
    TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "sfmp: group_size must be even");
    TORCH_CHECK(input_perm.numel() == in_features, "sfmp: input_perm has ", input_perm.numel(),
                " entries, expected ", in_features);
    n_groups_ = (in_features + group_size - 1) / group_size;
    std::vector<Shard> parts;
    for (const auto& s : shards)
      parts.push_back({std::get<0>(s).contiguous(), std::get<1>(s).contiguous(),
                       std::get<2>(s).contiguous(), std::get<3>(s).contiguous(),
                       std::get<4>(s).contiguous()});
    TORCH_CHECK(!parts.empty(), "sfmp: a layer needs at least one shard");
    scale_kind_ = scale_kind(parts[0].alpha.scalar_type());
    build(parts, block_rows, input_perm.to(at::kLong).contiguous(),
          scatter.to(at::kLong).contiguous());
  }

  int64_t out_features() const { return out_features_; }
  int64_t n_tiles() const { return n_tiles_; }
  int64_t max_bits() const { return max_bits_; }

  int64_t nbytes() const {
    int64_t n = 0;
    for (const auto* t : {&planes_, &tile_off_, &bits_, &kpairs_, &alpha_, &beta_, &scatter_,
                          &out_pos_, &in_pos_, &gather_safe_})
      n += t->numel() * t->element_size();
    return n;
  }

  at::Tensor forward(const at::Tensor& x_in, int64_t dense_min_m) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in_features_, "sfmp: input of shape ",
                x_in.sizes(), ", expected [M, ", in_features_, "]");
    const at::Tensor x = x_in.contiguous();
    at::Tensor out = at::empty({x.size(0), out_features_}, x.options());
    if (x.size(0) == 0) return out;
    const IsaKernels& isa = current_isa();
    dispatch_act(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t switch_m = dense_min_m > 0 ? dense_min_m
                               : out_features_ * in_features_ < kSmallLayerWeights
                                   ? isa.dense_min_m_small
                                   : isa.dense_min_m;
      if (x.size(0) >= switch_m)
        dense<T>(x, out, isa);
      else
        gemv<T>(x, out, isa);
    });
    return out;
  }

  // W [out_features, in_features] in the original order, float32 (for tests and evaluation).
  at::Tensor dense_weight() const {
    at::Tensor w = at::empty({out_features_, in_features_}, at::kFloat);
    dequantize_into(w.data_ptr(), false, current_isa());
    return w;
  }

 private:
  LayerView view() const {
    return {n_tiles_,
            n_groups_,
            group_size_,
            reinterpret_cast<const uint32_t*>(planes_.data_ptr<int32_t>()),
            tile_off_.data_ptr<int64_t>(),
            bits_.data_ptr<uint8_t>(),
            kpairs_.data_ptr<int32_t>(),
            alpha_.data_ptr(),
            beta_.data_ptr(),
            scale_kind_};
  }

  struct TileSrc {
    int64_t shard, block_row, row0, rows, cat_row0;  // row0: first row inside the block-row
  };

  void build(const std::vector<Shard>& shards, int64_t block_rows, const at::Tensor& perm,
             const at::Tensor& scatter) {
    const int64_t ng = n_groups_, gs = group_size_;
    std::vector<int64_t> cols(ng), words(ng);
    std::vector<int32_t> kpairs(ng);
    for (int64_t g = 0; g < ng; ++g) {
      cols[g] = std::min(gs, in_features_ - g * gs);
      words[g] = (cols[g] + 31) / 32;
      kpairs[g] = (int32_t)((cols[g] + 1) / 2);
    }
    // Tiles: 16 rows of one block-row of one shard, in the concatenated reordered order.
    std::vector<TileSrc> tiles;
    std::vector<int64_t> shard_rows;
    int64_t cat = 0;
    for (size_t s = 0; s < shards.size(); ++s) {
      const int64_t n = shards[s].alpha.size(0);
      TORCH_CHECK(shards[s].alpha.size(1) == ng && shards[s].beta.sizes() == shards[s].alpha.sizes(),
                  "sfmp: alpha/beta of shard ", s, " must be [out_features, n_groups]");
      TORCH_CHECK(shards[s].alpha.scalar_type() == shards[0].alpha.scalar_type(),
                  "sfmp: shards disagree on the dtype of alpha");
      const int64_t nbr = (n + block_rows - 1) / block_rows;
      TORCH_CHECK(shards[s].block_bits.size(0) == nbr && shards[s].block_bits.size(1) == ng,
                  "sfmp: block_bits of shard ", s, " must be [", nbr, ", ", ng, "]");
      for (int64_t r = 0; r < nbr; ++r) {
        const int64_t rows = std::min(block_rows, n - r * block_rows);
        for (int64_t r0 = 0; r0 < rows; r0 += kTileRows)
          tiles.push_back({(int64_t)s, r, r0, std::min<int64_t>(kTileRows, rows - r0),
                           cat + r * block_rows + r0});
      }
      cat += n;
    }
    out_features_ = cat;
    TORCH_CHECK(scatter.numel() == cat, "sfmp: scatter has ", scatter.numel(), " entries, the "
                "shards have ", cat, " rows");
    n_tiles_ = (int64_t)tiles.size();

    // Bits and plane offsets per tile.
    bits_ = at::empty({n_tiles_ * ng}, at::kByte);
    tile_off_ = at::empty({n_tiles_ + 1}, at::kLong);
    uint8_t* bits = bits_.data_ptr<uint8_t>();
    int64_t* off = tile_off_.data_ptr<int64_t>();
    off[0] = 0;
    max_bits_ = 0;
    for (int64_t t = 0; t < n_tiles_; ++t) {
      const auto& ts = tiles[t];
      const uint8_t* bb = shards[ts.shard].block_bits.data_ptr<uint8_t>() + ts.block_row * ng;
      int64_t words_of_tile = 0;
      for (int64_t g = 0; g < ng; ++g) {
        TORCH_CHECK(bb[g] >= 1 && bb[g] <= 8, "sfmp: block bit-width ", (int)bb[g],
                    " outside 1..8");
        bits[t * ng + g] = bb[g];
        max_bits_ = std::max<int64_t>(max_bits_, bb[g]);
        words_of_tile += (int64_t)kpairs[g] * bb[g];
      }
      off[t + 1] = off[t] + words_of_tile;
    }
    // +16 words: the GFNI decoder reads 64 bytes from the last pairs of the last tile.
    planes_ = at::zeros({off[n_tiles_] + 16}, at::kInt);
    const int64_t es = shards[0].alpha.element_size();
    alpha_ = at::zeros({n_tiles_ * ng * kTileRows}, shards[0].alpha.options());
    beta_ = at::zeros_like(alpha_);
    scatter_ = at::full({n_tiles_ * kTileRows}, -1, at::kInt);
    const int64_t* scat_in = scatter.data_ptr<int64_t>();
    int32_t* scat = scatter_.data_ptr<int32_t>();
    uint32_t* planes = reinterpret_cast<uint32_t*>(planes_.data_ptr<int32_t>());

    at::parallel_for(0, n_tiles_, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const auto& ts = tiles[t];
        const Shard& sh = shards[ts.shard];
        const int64_t n = sh.alpha.size(0);
        const int64_t br_rows = std::min(block_rows, n - ts.block_row * block_rows);
        const int64_t shard_row0 = ts.block_row * block_rows + ts.row0;
        const uint32_t* qw = reinterpret_cast<const uint32_t*>(sh.qweight.data_ptr<int32_t>());
        const int32_t* boff = sh.block_offsets.data_ptr<int32_t>() + ts.block_row * ng;
        const int64_t qlen = sh.qweight.numel();
        uint32_t* dst = planes + off[t];
        for (int64_t g = 0; g < ng; ++g) {
          const int nb = bits[t * ng + g];
          const int64_t base = boff[g];
          TORCH_CHECK(base >= 0 && base + nb * words[g] * br_rows <= qlen,
                      "sfmp: block offsets exceed qweight");
          // Block layout [plane][word][row]: bits (2q, 2q+1) of a word are one column pair.
          for (int p = 0; p < nb; ++p)
            for (int64_t w = 0; w < words[g]; ++w)
              for (int64_t i = 0; i < ts.rows; ++i) {
                const uint32_t word = qw[base + (p * words[g] + w) * br_rows + ts.row0 + i];
                const int64_t pairs = std::min<int64_t>(16, kpairs[g] - w * 16);
                for (int64_t q = 0; q < pairs; ++q)
                  dst[(w * 16 + q) * nb + p] |= ((word >> (2 * q)) & 3u) << (2 * i);
              }
          dst += (int64_t)kpairs[g] * nb;
          // Scales of the tile's rows, 16 per (tile, group); padding rows stay zero.
          for (const auto& [src, out] : {std::pair{&sh.alpha, &alpha_}, std::pair{&sh.beta, &beta_}}) {
            const char* s = static_cast<const char*>(src->data_ptr());
            char* d = static_cast<char*>(out->data_ptr());
            for (int64_t i = 0; i < ts.rows; ++i)
              std::memcpy(d + ((t * ng + g) * kTileRows + i) * es,
                          s + ((shard_row0 + i) * ng + g) * es, es);
          }
        }
        for (int64_t i = 0; i < ts.rows; ++i)
          scat[t * kTileRows + i] = (int32_t)scat_in[ts.cat_row0 + i];
      }
    });

    kpairs_ = at::tensor(kpairs, at::kInt);
    // Input of every padded reordered column (-1: padding), and its inverse. 32-bit tables:
    // on small layers they are a visible part of the resident bytes.
    std::vector<int32_t> gather(ng * gs, -1);
    const int64_t* p = perm.data_ptr<int64_t>();
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t j = 0; j < cols[g]; ++j) {
        TORCH_CHECK(p[g * gs + j] >= 0 && p[g * gs + j] < in_features_,
                    "sfmp: input_perm entry out of range");
        gather[g * gs + j] = (int32_t)p[g * gs + j];
      }
    out_pos_ = at::empty({out_features_}, at::kInt);
    int32_t* pos = out_pos_.data_ptr<int32_t>();
    for (int64_t r = 0; r < n_tiles_ * kTileRows; ++r)
      if (scat[r] >= 0) pos[scat[r]] = (int32_t)r;
    in_pos_ = at::empty({in_features_}, at::kInt);
    gather_safe_ = at::empty({ng * gs}, at::kInt);
    int32_t* in_pos = in_pos_.data_ptr<int32_t>();
    int32_t* safe = gather_safe_.data_ptr<int32_t>();
    for (int64_t k = 0; k < ng * gs; ++k) {
      safe[k] = std::max(gather[k], 0);
      if (gather[k] >= 0)
        in_pos[gather[k]] = (int32_t)k;
      else
        padding_.push_back(k);
    }
  }

  // The gemv kernel for this call: bf16 kernels need every block within their exact width.
  template <class T>
  const GemvKernel& pick_gemv(const IsaKernels& isa, int64_t m) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (isa.bf16.fn && max_bits_ <= isa.bf16.max_bits) {
        if (isa.bf16_batch.fn && m >= isa.batch_min_m) return isa.bf16_batch;
        return isa.bf16;
      }
    }
    return isa.f32;
  }

  // One activation row in the reordered, group-padded order (padding zero).
  template <class T>
  void gather_row(const T* row, T* dst) const {
    const int64_t n = n_groups_ * group_size_;
    const int32_t* gather = gather_safe_.data_ptr<int32_t>();
    for (int64_t k = 0; k < n; ++k) dst[k] = row[gather[k]];
    for (int64_t p : padding_) dst[p] = T(0.f);
  }

  // Activation rows [m0, m0 + mb) gathered and packed in the kernel's layout, plus their
  // per-group sums.
  template <class T>
  void pack_x(const T* x, int64_t m0, int64_t mb, XLayout layout, int32_t* xp, float* sums) const {
    const int64_t ng = n_groups_, gs = group_size_, n = ng * gs, row_stride = n + kRowPad;
    std::vector<T> tmp(layout == XLayout::RowsBf16 ? 0 : n);
    if (layout == XLayout::RowsBf16)
      std::memset(xp, 0, (mb + 15) / 16 * 16 * row_stride * 2);
    for (int64_t m = 0; m < mb; ++m) {
      T* r = layout == XLayout::RowsBf16 ? reinterpret_cast<T*>(xp) + m * row_stride : tmp.data();
      gather_row(x + (m0 + m) * in_features_, r);
      for (int64_t g = 0; g < ng; ++g) {
        // 8 partial sums (group_size is a multiple of 8): one serial chain would cost the
        // add latency per element.
        float part[8] = {};
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8)
          for (int j = 0; j < 8; ++j) part[j] += static_cast<float>(r[k + j]);
        sums[g * mb + m] = ((part[0] + part[1]) + (part[2] + part[3])) +
                           ((part[4] + part[5]) + (part[6] + part[7]));
      }
      if (layout == XLayout::PairsBf16) {
        const auto* bits = reinterpret_cast<const uint16_t*>(r);
        for (int64_t k = 0; k < n / 2; ++k)
          xp[k * mb + m] = (int32_t)(bits[2 * k] | ((uint32_t)bits[2 * k + 1] << 16));
      } else if (layout == XLayout::PairsF32) {
        float* xf = reinterpret_cast<float*>(xp);
        for (int64_t k = 0; k < n / 2; ++k) {
          xf[(k * mb + m) * 2] = static_cast<float>(r[2 * k]);
          xf[(k * mb + m) * 2 + 1] = static_cast<float>(r[2 * k + 1]);
        }
      }
    }
  }

  // Decode-sized batches: the gemv kernel over chunks of max_mb activation rows.
  template <class T>
  void gemv(const at::Tensor& x, at::Tensor& out, const IsaKernels& isa) const {
    const int64_t m_total = x.size(0), ng = n_groups_;
    const GemvKernel& kernel = pick_gemv<T>(isa, m_total);
    const int64_t mbmax = kernel.max_mb, n_chunks = (m_total + mbmax - 1) / mbmax;
    // 32-bit slots of one chunk's packed activations (the row layout holds 16-bit values).
    // The row layout is padded to whole blocks of 16 rows (AMX tiles read them).
    const int64_t slots = kernel.layout == XLayout::PairsF32   ? ng * group_size_ * mbmax
                          : kernel.layout == XLayout::PairsBf16 ? ng * group_size_ / 2 * mbmax
                                                                : (ng * group_size_ + kRowPad) *
                                                                      ((mbmax + 15) / 16 * 16) / 2;
    at::Tensor xpk = at::empty({n_chunks * slots}, at::kInt);
    at::Tensor xsum = at::empty({n_chunks * ng * mbmax}, at::kFloat);
    const int64_t ldy = n_tiles_ * kTileRows;
    at::Tensor ycat = at::empty({m_total, ldy}, x.options());  // outputs in tile order
    auto chunk_rows = [&](int64_t c) { return std::min(mbmax, m_total - c * mbmax); };
    int32_t* xp_all = xpk.data_ptr<int32_t>();
    float* xsum_all = xsum.data_ptr<float>();
    for (int64_t c = 0; c < n_chunks; ++c)
      pack_x(x.data_ptr<T>(), c * mbmax, chunk_rows(c), kernel.layout, xp_all + c * slots,
             xsum_all + c * ng * mbmax);

    const LayerView v = view();
    T* yc = ycat.data_ptr<T>();
    const OutKind out_kind = std::is_same_v<T, float>            ? OutKind::F32
                             : std::is_same_v<T, c10::BFloat16> ? OutKind::BF16
                                                                : OutKind::F16;
    const int64_t grain = std::max<int64_t>(1, n_tiles_ / (4 * at::get_num_threads()));
    at::parallel_for(0, n_tiles_, grain, [&](int64_t b, int64_t e) {
      // One chunk: the thread's whole range in one call; several: a few tiles at a time, so
      // their planes stay in cache across the chunks.
      const int64_t step = n_chunks == 1 ? e - b : kTileBlock;
      for (int64_t t0 = b; t0 < e; t0 += step)
        for (int64_t c = 0; c < n_chunks; ++c)
          kernel.fn({&v, (int)chunk_rows(c), xp_all + c * slots, xsum_all + c * ng * mbmax,
                     yc + c * mbmax * ldy, ldy, out_kind, t0, std::min(e, t0 + step)});
    });
    // The output permutation: sequential writes, reads within one row of ycat.
    const int32_t* pos = out_pos_.data_ptr<int32_t>();
    T* y = out.data_ptr<T>();
    at::parallel_for(0, m_total, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        for (int64_t j = 0; j < out_features_; ++j) y[m * out_features_ + j] = yc[m * ldy + pos[j]];
    });
  }

  // Every weight, dequantized into `w` [out_features, in_features] in the original order.
  void dequantize_into(void* w, bool bf16_out, const IsaKernels& isa) const {
    const LayerView v = view();
    const int32_t* rows = scatter_.data_ptr<int32_t>();
    const int32_t* cols = in_pos_.data_ptr<int32_t>();
    at::parallel_for(0, n_tiles_, 4, [&](int64_t b, int64_t e) {
      std::vector<float> tile(n_groups_ * group_size_ * kTileRows);  // one decoded tile
      isa.dequant({&v, b, e, w, in_features_, rows, cols, bf16_out, tile.data()});
    });
  }

  // Prefill-sized batches: the layer dequantized (bf16 for bf16 activations, rounded once as
  // the GPU path does, else float32) into a per-thread scratch and ONE torch GEMM (oneDNN,
  // AMX where present). The activations are used as they are: both permutations were folded
  // into the dequantizer's stores. The scratch is reused by every layer (the largest one's
  // size stays allocated per thread).
  template <class T>
  void dense(const at::Tensor& x, at::Tensor& out, const IsaKernels& isa) const {
    constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
    const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
    at::Tensor w = scratch(out_features_, in_features_, dtype);
    dequantize_into(w.data_ptr(), bf16, isa);
    if constexpr (bf16 || std::is_same_v<T, float>)
      at::mm_out(out, x, w.t());
    else
      out.copy_(at::mm(x.to(at::kFloat), w.t()));
  }

  static at::Tensor scratch(int64_t rows, int64_t cols, at::ScalarType dtype) {
    thread_local at::Tensor buffer;
    const int64_t bytes = rows * cols * (int64_t)c10::elementSize(dtype);
    if (!buffer.defined() || buffer.numel() < bytes) {
      buffer = at::Tensor();  // free the old one first
      buffer = at::empty({bytes}, at::kByte);
    }
    return buffer.narrow(0, 0, bytes).view(dtype).view({rows, cols});
  }

  int64_t in_features_, group_size_, n_groups_ = 0, out_features_ = 0, n_tiles_ = 0,
                                     max_bits_ = 0;
  ScaleKind scale_kind_ = ScaleKind::F32;
  at::Tensor planes_, tile_off_, bits_, kpairs_, alpha_, beta_;
  at::Tensor scatter_;            // int32 [n_tiles * 16]: original output of each tile row, -1
  at::Tensor out_pos_;            // int32 [out_features]: tile row (t * 16 + i) of each output
  at::Tensor in_pos_;             // int32 [in_features]: padded reordered column of each input
  at::Tensor gather_safe_;        // int32: input of each padded column, padding at input 0 ...
  std::vector<int64_t> padding_;  // ... and the padding positions, zeroed after gathering
};

}  // namespace
}  // namespace sfmp_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using sfmp_cpu::Layer;
  m.doc() = "SFMP CPU kernels (bit-plane gemv and dequantization, AVX-512/AVX2)";
  m.def("isas", &sfmp_cpu::isa_names, "ISAs this CPU runs, best first");
  m.def("set_isa", &sfmp_cpu::set_isa, "force one ISA (tests and benchmarks)");
  m.def("get_isa", &sfmp_cpu::get_isa);
  pybind11::class_<Layer>(m, "Layer")
      .def(pybind11::init<const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                                       at::Tensor, at::Tensor>>&,
                          int64_t, int64_t, int64_t, const at::Tensor&, const at::Tensor&>(),
           pybind11::arg("shards"), pybind11::arg("in_features"), pybind11::arg("group_size"),
           pybind11::arg("block_rows"), pybind11::arg("input_perm"), pybind11::arg("scatter"))
      .def("forward", &Layer::forward, pybind11::arg("x"), pybind11::arg("dense_min_m") = -1,
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("dense_weight", &Layer::dense_weight)
      .def_property_readonly("nbytes", &Layer::nbytes)
      .def_property_readonly("out_features", &Layer::out_features)
      .def_property_readonly("n_tiles", &Layer::n_tiles)
      .def_property_readonly("max_bits", &Layer::max_bits);
}
