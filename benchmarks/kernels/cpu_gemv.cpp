// The CPU kernels (kernels/csrc/cpu_kernels.h) without torch: a standalone GEMV timing, and the binary
// that valgrind --tool=callgrind counts (instructions repeat exactly, whatever else the machine does).
//   g++ -O3 -std=c++17 -pthread -I kernels/csrc benchmarks/kernels/cpu_gemv.cpp -o /tmp/cpu_gemv
//   /tmp/cpu_gemv KIND N K SPARSITY THREADS ITERS ISA      KIND: dense | bitmask | 24; ISA: 0 scalar, 1 avx2, 2 avx512
// Prints one line: kind, shape, isa, median microseconds, GB/s of weight bytes read.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "cpu_kernels.h"

using namespace oneshot_cpu;

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s dense|bitmask|24 N K SPARSITY THREADS ITERS ISA\n", argv[0]);
    return 2;
  }
  const std::string kind = argv[1];
  const bool is24 = kind == "24", isdense = kind == "dense";
  const int64_t N = std::atol(argv[2]), K = std::atol(argv[3]);
  const double sparsity = kind == "24" ? 0.5 : std::atof(argv[4]);
  const int threads = std::atoi(argv[5]), iters = std::atoi(argv[6]);
  const int64_t isa = std::atol(argv[7]);
  const int64_t Kp = (K + 31) / 32 * 32, ldm = (K + 7) / 8;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  std::vector<float> x(Kp, 0.f), y(N);
  for (int64_t k = 0; k < K; k++) x[k] = uni(rng) - 0.5f;
  std::vector<uint16_t> dense(N * K), values;
  std::vector<uint8_t> mask(N * ldm, 0);
  std::vector<int64_t> row_ptr(N + 1, 0);
  // copies of the weight, rotated between runs, so that their bytes (> 256 MB) cannot stay in the caches
  for (int64_t r = 0; r < N; r++) {
    for (int64_t k = 0; k < K; k++) {
      bool keep = is24 ? false : uni(rng) >= sparsity;
      if (is24) {
        int64_t g = k / 4 * 4, a = (r * 7 + g) % 4, b = (a + 1 + (r + g) % 3) % 4;
        keep = (k - g == a) || (k - g == b);
      }
      uint16_t bits = 0x3F80 + (uint16_t)(rng() & 0x7F);  // a bf16 near 1
      dense[r * K + k] = bits;
      if (keep || isdense) {
        if (!isdense) {
          values.push_back(bits);
          mask[r * ldm + k / 8] |= 1 << (k % 8);
        }
      }
    }
    row_ptr[r + 1] = values.size();
  }
  const int64_t nnz = values.size();
  std::vector<float> xq(Kp);
  permute_x_bf16(x.data(), xq.data(), 1, Kp);
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  std::vector<int64_t> start(blocks + 1, 0);
  std::vector<uint8_t> blocked;
  std::vector<uint32_t> goff;
  if (!isdense) {
    blocked_sizes(mask.data(), ldm, N, K, 2, 0, blocks, start.data() + 1);
    for (int64_t b = 0; b < blocks; b++) start[b + 1] += start[b];
    blocked.assign(start[blocks] + PAD, 0);
    goff.assign(blocks * groups_of(K), 0);
    blocked_fill(reinterpret_cast<const uint8_t*>(values.data()), mask.data(), ldm, row_ptr.data(), N, K, 2,
                 start.data(), blocked.data(), goff.data(), 0, blocks);
  }
  double bytes = kind == "dense" ? 2.0 * N * K : (double)blocked.size() + 4.0 * goff.size();
  const int copies = std::getenv("CPU_GEMV_HOT") ? 1 : std::max(2, (int)(256e6 / bytes));  // HOT: in cache
  std::vector<std::vector<uint16_t>> dense_c(isdense ? copies : 0, dense);
  std::vector<std::vector<uint8_t>> blocked_c(isdense ? 0 : copies, blocked);
  std::vector<double> times;
  for (int it = 0; it < iters + 2; it++) {
    const int cp = it % copies;
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; t++) {
      if (threads == 1) break;
      int64_t r0 = N / 4 * t / threads * 4, r1 = N / 4 * (t + 1) / threads * 4;  // whole blocks of 4 rows
      if (t == threads - 1) r1 = N;
      pool.emplace_back([&, r0, r1] {
        if (isdense) {
          if (isa == AVX512) dense_avx512<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
          else if (isa == AVX2) dense_avx2<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
          else dense_scalar<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
        } else {
          const int64_t b0 = r0 / ROWS, b1 = t == threads - 1 ? blocks : r1 / ROWS;
          if (isa == AVX512) blocked_avx512<BF16>(blocked_c[cp].data(), start.data(), goff.data(), xq.data(), y.data(), 1, N, K, Kp, b0, b1);
          else if (isa == AVX2) blocked_avx2<BF16>(blocked_c[cp].data(), start.data(), goff.data(), x.data(), y.data(), 1, N, K, Kp, b0, b1);
          else blocked_scalar<BF16>(blocked_c[cp].data(), start.data(), goff.data(), x.data(), y.data(), 1, N, K, Kp, b0, b1);
        }
      });
    }
    if (threads == 1) {
      const int64_t r0 = 0, r1 = N;
      if (isdense) {
        if (isa == AVX512) dense_avx512<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
        else if (isa == AVX2) dense_avx2<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
        else dense_scalar<BF16>(dense_c[cp].data(), x.data(), y.data(), 1, N, K, Kp, r0, r1);
      } else {
        if (isa == AVX512) blocked_avx512<BF16>(blocked_c[cp].data(), start.data(), goff.data(), xq.data(), y.data(), 1, N, K, Kp, 0, blocks);
        else if (isa == AVX2) blocked_avx2<BF16>(blocked_c[cp].data(), start.data(), goff.data(), x.data(), y.data(), 1, N, K, Kp, 0, blocks);
        else blocked_scalar<BF16>(blocked_c[cp].data(), start.data(), goff.data(), x.data(), y.data(), 1, N, K, Kp, 0, blocks);
      }
    }
    for (auto& t : pool) t.join();
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (it >= 2) times.push_back(us);
  }
  std::sort(times.begin(), times.end());
  double med = times[times.size() / 2];
  double check = 0;
  for (float v : y) check += v;
  std::printf("%s %ldx%ld sparsity %.2f isa %ld threads %d: %.1f us, %.1f GB/s (checksum %.3f)\n", kind.c_str(),
              (long)N, (long)K, sparsity, (long)isa, threads, med, bytes / med / 1e3, check);
  return 0;
}
