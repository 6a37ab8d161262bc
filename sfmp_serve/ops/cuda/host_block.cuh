// Host execution of the kernel bodies (only with -DSFMP_HOST_EMULATION; see common.cuh).
// Every thread of a block runs one phase before any thread runs the next, which is what the
// __syncthreads() between phases guarantees on the GPU. Shared memory and per-thread state are
// filled with NaN bytes before every block, so reading a table entry or a register that the
// kernel never wrote shows up as NaN in the output. Two phases without a sync() between them
// (a missing __syncthreads on the GPU) are reported through sfmp_emulator_error().
#pragma once

#include <cstdio>
#include <cstring>
#include <vector>

namespace sfmp {

inline char g_emulator_error[256] = "";

template <class State> struct HostBlock {
  std::vector<State> states;
  void* smem;
  int n;
  bool synced = true;

  int threads() const { return n; }
  template <class Body> void each(Body&& body) {
    if (!synced)
      std::snprintf(g_emulator_error, sizeof(g_emulator_error),
                    "two phases without sync() between them");
    for (int t = 0; t < n; ++t) body(t, states[t]);
    synced = false;
  }
  void sync() { synced = true; }
};

constexpr int kGuardBytes = 64 << 10;  // catches overruns up to the largest table
constexpr unsigned char kGuard = 0xA5;

// Runs every block of the grid; shared memory gets a guard zone that must stay untouched.
template <class State, class Body>
void run_grid(int gx, int gy, int gz, int threads, int smem_bytes, Body&& body) {
  const size_t vecs = (static_cast<size_t>(smem_bytes) + kGuardBytes) / sizeof(float4) + 1;
  std::vector<float4> smem(vecs);
  unsigned char* bytes = reinterpret_cast<unsigned char*>(smem.data());
  for (int bz = 0; bz < gz; ++bz)
    for (int by = 0; by < gy; ++by)
      for (int bx = 0; bx < gx; ++bx) {
        std::memset(bytes, 0xFF, smem_bytes);  // NaN in every float
        std::memset(bytes + smem_bytes, kGuard, vecs * sizeof(float4) - smem_bytes);
        HostBlock<State> blk{std::vector<State>(threads), smem.data(), threads};
        std::memset(static_cast<void*>(blk.states.data()), 0xFF, threads * sizeof(State));
        body(blk, bx, by, bz);
        for (size_t i = smem_bytes; i < vecs * sizeof(float4); ++i)
          if (bytes[i] != kGuard) {
            std::snprintf(g_emulator_error, sizeof(g_emulator_error),
                          "shared memory written beyond the %d bytes of the launch", smem_bytes);
            return;
          }
      }
}

}  // namespace sfmp

extern "C" const char* sfmp_emulator_error() { return sfmp::g_emulator_error; }
extern "C" void sfmp_emulator_clear() { sfmp::g_emulator_error[0] = '\0'; }
