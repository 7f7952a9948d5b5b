// Grouped GEMMs for the CPU whose groups run side by side, one per thread (cpu_grouped_mm.py builds and
// loads this file, and says why). Every product is an at::mm, so the arithmetic is torch's own; only the
// threading differs: at::mm run inside a parallel region uses one thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace {

// What one thread does: rows [r0, r1) of group g's output, for each of its pieces.
struct Piece { int64_t g, r0, r1; };

// Cut the groups' output rows (sizes[g] rows of group g, each costing cost[g]) into one contiguous run
// of pieces per thread, of equal cost, and run f on every piece; threads run side by side.
void run(const std::vector<int64_t>& sizes, const std::vector<int64_t>& cost,
         const std::function<void(const Piece&)>& f) {
  int64_t total = 0;
  for (size_t g = 0; g < sizes.size(); ++g) total += sizes[g] * cost[g];
  const int64_t T = at::get_num_threads();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // plain products: the worker threads know no autograd
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / T, hi = total * (t + 1) / T;  // this thread's share of the cost
      for (int64_t g = 0, c = 0; g < (int64_t)sizes.size() && c < hi; c += sizes[g] * cost[g], ++g) {
        auto row = [&](int64_t x) { return std::clamp<int64_t>((x - c + cost[g] - 1) / cost[g], 0, sizes[g]); };
        if (row(lo) < row(hi)) f({g, row(lo), row(hi)});
      }
    }
  });
}

std::vector<int64_t> group_starts(const at::Tensor& offs, int64_t rows) {  // offs: the end row of each group
  TORCH_CHECK(offs.dim() == 1, "grouped_mm: offs must be 1-d, got ", offs.dim(), " dims");
  auto ends = offs.to(at::kLong).contiguous();
  std::vector<int64_t> starts(ends.numel() + 1, 0);
  for (int64_t g = 0; g < ends.numel(); ++g) {
    starts[g + 1] = ends.data_ptr<int64_t>()[g];
    TORCH_CHECK(starts[g] <= starts[g + 1], "grouped_mm: offs must not decrease, got ", offs);
  }
  TORCH_CHECK(starts.back() == rows, "grouped_mm: offs must end at the row count ", rows, ", got ", offs);
  return starts;
}

// a [M, K] with rows sorted by group, b [G, K, N] -> [M, N]: the rows of group g times b[g]
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && a.size(1) == b.size(1) && offs.numel() == b.size(0),
              "grouped_mm: want a [M, K], b [G, K, N], offs [G]");
  auto start = group_starts(offs, a.size(0));
  std::vector<int64_t> sizes(b.size(0));
  for (size_t g = 0; g < sizes.size(); ++g) sizes[g] = start[g + 1] - start[g];
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  run(sizes, std::vector<int64_t>(sizes.size(), 1), [&](const Piece& p) {
    auto o = out.narrow(0, start[p.g] + p.r0, p.r1 - p.r0);
    at::mm_out(o, a.narrow(0, start[p.g] + p.r0, p.r1 - p.r0), b[p.g]);
  });
  return out;
}

// a [M, K], c [M, N], rows sorted by group -> [G, K, N]: a_g^T c_g, the weight gradient of grouped_mm
// (a group of no rows gets zeros)
at::Tensor grouped_mm_t(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offs) {
  TORCH_CHECK(a.dim() == 2 && c.dim() == 2 && a.size(0) == c.size(0), "grouped_mm_t: want a [M, K], c [M, N]");
  auto start = group_starts(offs, a.size(0));
  const int64_t G = offs.numel(), K = a.size(1);
  auto out = at::empty({G, K, c.size(1)}, a.options());
  std::vector<int64_t> cost(G);  // a row of a_g^T c_g costs group g's row count (an empty group: its zeros)
  for (int64_t g = 0; g < G; ++g) cost[g] = std::max<int64_t>(start[g + 1] - start[g], 1);
  run(std::vector<int64_t>(G, K), cost, [&](const Piece& p) {
    auto o = out[p.g].narrow(0, p.r0, p.r1 - p.r0);
    const int64_t s = start[p.g], n = start[p.g + 1] - s;
    if (n == 0) o.zero_();
    else at::mm_out(o, a.narrow(0, s, n).narrow(1, p.r0, p.r1 - p.r0).t(), c.narrow(0, s, n));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nanomoe_cpu, m) {
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor");
  m.def("grouped_mm_t(Tensor a, Tensor c, Tensor offs) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanomoe_cpu, CPU, m) {
  m.impl("grouped_mm", grouped_mm);
  m.impl("grouped_mm_t", grouped_mm_t);
}
