// oneshot's CPU kernels: y[M, N] = x[M, K] . W[N, K]^T for a dense weight and for a bitmask weight
// (kept values row by row + one bit per weight; 2:4 weights are given to the bitmask kernel with their
// 2-bit positions turned into bits at load, the same bytes). fp32 accumulation, x in fp32, W in
// fp32 / bf16 / fp16. Three paths, chosen at run time from the CPU's flags: AVX-512 (F, BW, VBMI2:
// vpexpandw / vexpandps place the kept values of 32 columns in one instruction), AVX2 + FMA + F16C (a
// lookup table of lane permutations per mask byte), and portable scalar code. Threads come from
// PyTorch's pool (at::parallel_for); every output is summed by one thread in a fixed order, so the
// bits do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "cpu_kernels.h"

#include <atomic>
#include <vector>

namespace {

using namespace oneshot_cpu;

// ------------------------------------------------------------------ entry points

int wtype(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kFloat) return F32;
  if (t.scalar_type() == torch::kBFloat16) return BF16;
  TORCH_CHECK(t.scalar_type() == torch::kHalf, "weights must be float32, bfloat16 or float16");
  return F16;
}

int64_t resolve(int64_t isa) {
  static const int64_t best = detect_isa();
  TORCH_CHECK(isa <= best, "this CPU cannot run the requested instruction set");
  return isa < 0 ? best : isa;
}

// x [M, K] -> fp32 [M, Kp] padded with zeros to a multiple of 32 columns
torch::Tensor padded(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, K]");
  const int64_t Kp = (K + 31) / 32 * 32;
  if (Kp == K && x.scalar_type() == torch::kFloat && x.is_contiguous()) return x;  // read as it is
  auto out = torch::empty({x.size(0), Kp}, x.options().dtype(torch::kFloat));
  out.narrow(1, 0, K).copy_(x);
  if (Kp > K) out.narrow(1, K, Kp - K).zero_();
  return out;
}

int64_t grain(int64_t N) { return std::max<int64_t>(16, N / 64); }

torch::Tensor dense_linear(torch::Tensor x, torch::Tensor w, int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous [N, K] matrix");
  const int64_t N = w.size(0), K = w.size(1);
  auto xp = padded(x, K);
  const int64_t M = xp.size(0), Kp = xp.size(1);
  auto y = torch::empty({M, N}, xp.options());
  const int64_t path = resolve(isa);
  const int wt = wtype(w);
  const void* wp = w.data_ptr();
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N), [&](int64_t r0, int64_t r1) {
#define DENSE(T)                                                     \
  if (path == AVX512) dense_avx512<T>(wp, xd, yd, M, N, K, Kp, r0, r1); \
  else if (path == AVX2) dense_avx2<T>(wp, xd, yd, M, N, K, Kp, r0, r1); \
  else dense_scalar<T>(wp, xd, yd, M, N, K, Kp, r0, r1);
    if (wt == F32) { DENSE(F32) } else if (wt == BF16) { DENSE(BF16) } else { DENSE(F16) }
#undef DENSE
  });
  return y;
}

int64_t element_size(int64_t wt) { return wt == F32 ? 4 : 2; }

// the blocked layout (cpu_kernels.h) of a bitmask weight: (data uint8 [bytes + PAD], block starts int64 [blocks + 1],
// group offsets int32 [blocks, groups], each a uint32 byte offset within its block)
std::vector<torch::Tensor> build_blocked(torch::Tensor values, torch::Tensor mask, torch::Tensor row_ptr, int64_t K) {
  TORCH_CHECK(mask.dim() == 2 && mask.is_contiguous() && mask.scalar_type() == torch::kByte, "mask: [N, ceil(K/8)] uint8");
  TORCH_CHECK(mask.size(1) == (K + 7) / 8, "mask width does not match K");
  TORCH_CHECK(values.is_contiguous() && row_ptr.is_contiguous() && row_ptr.scalar_type() == torch::kLong,
              "values and row_ptr (int64) must be contiguous");
  const int64_t N = mask.size(0), ldm = mask.size(1), blocks = (N + ROWS - 1) / ROWS, es = values.element_size();
  TORCH_CHECK(row_ptr.numel() == N + 1 && row_ptr[N].item<int64_t>() == values.numel(),
              "row_ptr must hold N+1 offsets ending at the number of values");
  auto start = torch::zeros({blocks + 1}, torch::kLong);
  int64_t* sp = start.data_ptr<int64_t>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) { blocked_sizes(mp, ldm, N, K, es, b0, b1, sp + 1); });
  for (int64_t b = 0; b < blocks; b++) sp[b + 1] += sp[b];
  auto data = torch::zeros({sp[blocks] + PAD}, torch::kByte);
  auto goff = torch::empty({blocks, groups_of(K)}, torch::kInt);
  uint32_t* gp = reinterpret_cast<uint32_t*>(goff.data_ptr<int32_t>());
  const uint8_t* vp = static_cast<const uint8_t*>(values.data_ptr());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  uint8_t* dp = data.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) { blocked_fill(vp, mp, ldm, rp, N, K, es, sp, dp, gp, b0, b1); });
  return {data, start, goff};
}

torch::Tensor bitmask_linear(torch::Tensor x, torch::Tensor data, torch::Tensor start, torch::Tensor goff, int64_t N,
                             int64_t K, int64_t wt, int64_t isa) {
  TORCH_CHECK(data.scalar_type() == torch::kByte && start.scalar_type() == torch::kLong &&
              goff.scalar_type() == torch::kInt, "a blocked layout");
  TORCH_CHECK(start.numel() == (N + ROWS - 1) / ROWS + 1 && goff.numel() == (start.numel() - 1) * groups_of(K),
              "the blocked layout does not match N and K");
  TORCH_CHECK(wt >= 0 && wt <= 2, "weight type: 0 fp32, 1 bf16, 2 fp16");
  auto xp = padded(x, K);
  const int64_t M = xp.size(0), Kp = xp.size(1), blocks = (N + ROWS - 1) / ROWS;
  auto y = torch::empty({M, N}, xp.options());
  const int64_t path = resolve(isa);
  if (path == AVX512 && wt == BF16) {  // the column order the AVX-512 bf16 path reads x in
    auto xq = torch::empty_like(xp);
    permute_x_bf16(xp.data_ptr<float>(), xq.data_ptr<float>(), M, Kp);
    xp = xq;
  }
  const uint8_t* dp = data.data_ptr<uint8_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  const uint32_t* gp = reinterpret_cast<const uint32_t*>(goff.data_ptr<int32_t>());
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(4, blocks / 64), [&](int64_t b0, int64_t b1) {
#define BLOCKED(T)                                                              \
  if (path == AVX512) blocked_avx512<T>(dp, sp, gp, xd, yd, M, N, K, Kp, b0, b1);      \
  else if (path == AVX2) blocked_avx2<T>(dp, sp, gp, xd, yd, M, N, K, Kp, b0, b1);     \
  else blocked_scalar<T>(dp, sp, gp, xd, yd, M, N, K, Kp, b0, b1);
    if (wt == F32) { BLOCKED(F32) } else if (wt == BF16) { BLOCKED(BF16) } else { BLOCKED(F16) }
#undef BLOCKED
  });
  return y;
}

int64_t best_isa() { return detect_isa(); }

// the machine's read bandwidth, the bound every GEMV here is measured against: each thread sums its share of
// `data` (8-byte words, four independent sums: loads, not adds, are the limit); returns the sum (so nothing is
// optimised away)
int64_t read_sum(torch::Tensor data) {
  TORCH_CHECK(data.is_contiguous() && data.nbytes() % 64 == 0, "a contiguous buffer of a multiple of 64 bytes");
  const uint64_t* p = static_cast<const uint64_t*>(data.data_ptr());
  const int64_t words = data.nbytes() / 8, chunks = words / 8;
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, chunks, 4096, [&](int64_t c0, int64_t c1) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (int64_t i = c0 * 8; i < c1 * 8; i += 8) {
      a += p[i] + p[i + 4];
      b += p[i + 1] + p[i + 5];
      c += p[i + 2] + p[i + 6];
      d += p[i + 3] + p[i + 7];
    }
    total.fetch_add(a + b + c + d);  // integer sums: the same whatever the order
  });
  return static_cast<int64_t>(total.load());
}


}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dense_linear", &dense_linear, "y[M, N] = x[M, K] . W[N, K]^T, fp32 out (isa: -1 best, 0 scalar, 1 avx2, 2 avx512)");
  m.def("build_blocked", &build_blocked, "the blocked layout of a bitmask weight: (data, block starts, group offsets)");
  m.def("bitmask_linear", &bitmask_linear, "the same for a bitmask weight in the blocked layout");
  m.def("element_size", &element_size, "bytes of a weight type code");
  m.def("read_sum", &read_sum, "sum of a buffer's 8-byte words, read by every thread (read bandwidth)");
  m.def("best_isa", &best_isa, "the fastest path this CPU runs: 0 scalar, 1 avx2, 2 avx512");
}
