// Second pass of the split-K LUT GEMM: y[m, output_perm[n]] = sum_s partial[s, m, n] + bias.
// The splits are summed in a fixed order, so the result does not depend on scheduling.
#pragma once

#include "common.cuh"

namespace sfmp {

template <class T> struct FinishArgs {
  const float* partial;     // [splits][M][N], reordered rows
  const int* output_perm;   // [N]
  const T* bias;            // [N] original order, or null
  T* y;                     // [M, ldy] original order
  int M, N, ldy, splits;
};

template <class T, class Block>
SFMP_HD void finish_block(Block& blk, const FinishArgs<T>& a, int bx, int, int) {
  blk.each([&](int tid, NoState&) {
    const long long i = static_cast<long long>(bx) * blk.threads() + tid;
    const long long plane = static_cast<long long>(a.M) * a.N;
    if (i >= plane) return;
    const int m = static_cast<int>(i / a.N);
    const int n = static_cast<int>(i - static_cast<long long>(m) * a.N);
    float acc = 0.0f;
    for (int s = 0; s < a.splits; ++s) acc += a.partial[s * plane + i];
    const int out = a.output_perm[n];
    if (a.bias != nullptr) acc += to_float(a.bias[out]);
    a.y[static_cast<long long>(m) * a.ldy + out] = from_float<T>(acc);
  });
}

}  // namespace sfmp
