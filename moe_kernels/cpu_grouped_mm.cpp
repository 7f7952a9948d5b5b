// Grouped GEMMs for the CPU whose groups run side by side, one per thread (cpu_grouped_mm.py builds and
// loads this file, and says why). Every product is at::mm's, so the arithmetic is torch's own (float32: the
// BLAS call at::mm makes, made directly, see gemm); only the threading differs: a product run inside a
// parallel region uses one thread. fused_experts below is the grouped backend's whole dispatch (gather,
// both GEMMs, activation, weighted sum) as one op, and its backward as another: a small MoE layer's time
// went to a hundred small ops around the GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>
#include <dlfcn.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// What one thread does: rows [r0, r1) of group g's output, for each of its pieces.
struct Piece { int64_t g, r0, r1; };
using Plan = std::vector<std::vector<Piece>>;  // the pieces of each thread

// Cut the groups' output rows (sizes[g] rows of group g, each costing cost[g]) into one contiguous run
// of pieces per thread, of equal cost.
Plan even_cut(const std::vector<int64_t>& sizes, const std::vector<int64_t>& cost) {
  int64_t total = 0;
  for (size_t g = 0; g < sizes.size(); ++g) total += sizes[g] * cost[g];
  const int64_t T = at::get_num_threads();
  Plan plan(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t lo = total * t / T, hi = total * (t + 1) / T;  // this thread's share of the cost
    for (int64_t g = 0, c = 0; g < (int64_t)sizes.size() && c < hi; c += sizes[g] * cost[g], ++g) {
      auto row = [&](int64_t x) { return std::clamp<int64_t>((x - c + cost[g] - 1) / cost[g], 0, sizes[g]); };
      if (row(lo) < row(hi)) plan[t].push_back({g, row(lo), row(hi)});
    }
  }
  return plan;
}

// The non-empty groups whole, the largest first, each to the thread with the fewest rows so far; no plan
// (empty) where that leaves a thread more than 5% over an even share.
Plan whole_groups(const std::vector<int64_t>& sizes) {
  const int64_t T = at::get_num_threads();
  std::vector<int64_t> order(sizes.size()), rows(T, 0);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  Plan plan(T);
  int64_t total = 0;
  for (int64_t g : order) {
    if (sizes[g] == 0) continue;
    const int64_t t = std::min_element(rows.begin(), rows.end()) - rows.begin();
    rows[t] += sizes[g], total += sizes[g];
    plan[t].push_back({g, 0, sizes[g]});
  }
  for (int64_t r : rows)
    if (r * T > total * 1.05) return {};
  return plan;
}

// out = a @ b (+ the row bias: each row of out starts from it), as at::mm_out and at::addmm_out compute
// it. For float32 at::mm makes one call to BLAS's sgemm_ (MKL's, in torch's builds), with operands and
// leading dimensions from the tensors' strides; made here directly, it skips ~3-5 us of dispatch and
// checks per product, and a small MoE layer makes ~50 products a step. Where torch would copy an operand
// first (strides no BLAS takes), for other dtypes, or where a check on first use (blas_is_torchs) finds
// that the direct call does not give at::mm's bits, at::mm_out runs instead.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*, const int*);

// torch's sgemm_: looked up in the library that holds at::mm (not the first any library exports)
Sgemm torchs_sgemm() {
  Dl_info info;
  if (!at::hasMKL() || !dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) || !info.dli_fname)
    return nullptr;
  void* torch_cpu = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  return torch_cpu ? reinterpret_cast<Sgemm>(dlsym(torch_cpu, "sgemm_")) : nullptr;
}

bool blas_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool beta) {
  static const Sgemm sgemm = torchs_sgemm();
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  if (!sgemm || out.scalar_type() != at::kFloat || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || m == 0 || n == 0 || k == 0)
    return false;
  // at::mm's view of a row-major out (addmm_impl_cpu_): the column-major out^T = b^T a^T
  if (out.stride(1) != 1 || out.stride(0) < std::max<int64_t>(1, n) || out.stride(0) == 1) return false;
  auto operand = [](const at::Tensor& t, int64_t cols, int64_t rows, char& op, int64_t& ld) {  // (>= 1)
    if (t.stride(1) == 1 && t.stride(0) >= cols) return op = 'n', ld = t.stride(0), true;
    if (t.stride(0) == 1 && t.stride(1) >= rows) return op = 't', ld = t.stride(1), true;
    return false;  // torch copies it first
  };
  char op_b, op_a;
  int64_t ldb, lda;
  const int64_t ldc = out.stride(0);
  if (!operand(b, n, k, op_b, ldb) || !operand(a, k, m, op_a, lda)) return false;
  const int64_t big = std::numeric_limits<int>::max();
  if (std::max({m, n, k, lda, ldb, ldc}) > big) return false;
  const int M = n, N = m, K = k, LDA = ldb, LDB = lda, LDC = ldc;
  const float one = 1.f, zero = 0.f;
  sgemm(&op_b, &op_a, &M, &N, &K, &one, b.data_ptr<float>(), &LDA, a.data_ptr<float>(), &LDB,
        beta ? &one : &zero, out.data_ptr<float>(), &LDC);
  return true;
}

// Whether blas_mm gives at::mm_out's bits here: not where torch's float32 matmul precision sends at::mm to
// oneDNN in lower precision (torch.set_float32_matmul_precision('high' or 'medium')); else as checked once
// on fixed values: products of each layout the kernels use (a row-major or transposed operand, with and
// without a bias), odd sizes
bool blas_is_torchs() {
  using at::Float32Precision;
  auto precision = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  if (precision != Float32Precision::NONE && precision != Float32Precision::IEEE) return false;
  static const bool same = [] {
    auto fill = [](at::IntArrayRef sizes) {
      auto t = at::empty(sizes, at::dtype(at::kFloat).device(at::kCPU));  // (whatever torch's default dtype)
      float* v = t.data_ptr<float>();
      for (int64_t i = 0; i < t.numel(); ++i) v[i] = std::sin(0.37 * i + t.numel());
      return t;
    };
    const int64_t m = 37, k = 29, n = 45;
    auto a = fill({m, k + 3}).narrow(1, 1, k), at_ = fill({k, m}).t();
    auto b = fill({k, n}), bt = fill({n + 2, k}).narrow(0, 2, n).t();
    auto bias = fill({n});
    for (const auto& [x, y] : {std::pair{a, b}, {a, bt}, {at_, b}, {at_, bt}}) {
      for (bool with_bias : {false, true}) {
        auto got = fill({m, n}), want = fill({m, n});
        if (with_bias) got.copy_(bias.expand_as(got));
        if (!blas_mm(got, x, y, with_bias)) return false;
        if (with_bias) at::addmm_out(want, bias, x, y);
        else at::mm_out(want, x, y);
        if (!at::equal(got, want)) return false;
      }
    }
    return true;
  }();
  return same;
}

void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
          const std::optional<at::Tensor>& bias = std::nullopt) {
  if (bias) {  // addmm: out starts as the bias, row by row, then the product adds to it (beta = 1)
    if (out.scalar_type() == at::kFloat && blas_is_torchs()) {  // (where blas_mm declines, addmm overwrites)
      out.copy_(bias->expand_as(out));
      if (blas_mm(out, a, b, true)) return;
    }
    at::addmm_out(out, *bias, a, b);
  } else if (!(blas_is_torchs() && blas_mm(out, a, b, false))) {
    at::mm_out(out, a, b);
  }
}

// f on each thread's pieces, the threads side by side.
void run_threads(const Plan& plan, const std::function<void(const std::vector<Piece>&)>& f) {
  at::parallel_for(0, plan.size(), 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // plain products: the worker threads know no autograd
    for (int64_t t = t0; t < t1; ++t) f(plan[t]);
  });
}

// f on every piece of the plan, the threads side by side.
void run(const Plan& plan, const std::function<void(const Piece&)>& f) {
  run_threads(plan, [&](const std::vector<Piece>& pieces) {
    for (const Piece& p : pieces) f(p);
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
  run(even_cut(sizes, std::vector<int64_t>(sizes.size(), 1)), [&](const Piece& p) {
    auto o = out.narrow(0, start[p.g] + p.r0, p.r1 - p.r0);
    gemm(o, a.narrow(0, start[p.g] + p.r0, p.r1 - p.r0), b[p.g]);
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
  run(even_cut(std::vector<int64_t>(G, K), cost), [&](const Piece& p) {
    auto o = out[p.g].narrow(0, p.r0, p.r1 - p.r0);
    const int64_t s = start[p.g], n = start[p.g + 1] - s;
    if (n == 0) o.zero_();
    else gemm(o, a.narrow(0, s, n).narrow(1, p.r0, p.r1 - p.r0).t(), c.narrow(0, s, n));
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// fused_experts: the token-slots (slot s = n * k + j: token n's j-th expert) sorted by expert, each
// expert's MLP on its rows, and y[n] = sum_j topk_weight[n, j] * out[slot n * k + j] in float32. The rows
// stay in expert order throughout (pos maps a slot to its row), so nothing is scattered but y itself.

struct Sorted {
  std::vector<int64_t> start;  // expert e has the sorted rows [start[e], start[e + 1])
  std::vector<int64_t> pos;    // the sorted row of each slot
  at::Tensor order;            // int64 [S]: the slot of each sorted row (pos's inverse)
};

// A counting sort, stable: an expert's slots keep token order (as moe_model.sort_by_expert's argsort).
Sorted sort_slots(const at::Tensor& topk_idx, int64_t E) {
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong, "fused_experts: topk_idx must be int64");
  auto idx = topk_idx.contiguous();
  const int64_t S = idx.numel();
  const int64_t* e = idx.data_ptr<int64_t>();
  Sorted r{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(S), at::empty({S}, idx.options())};
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(0 <= e[s] && e[s] < E, "fused_experts: expert index ", e[s], " out of range [0, ", E, ")");
    ++r.start[e[s] + 1];
  }
  for (int64_t g = 0; g < E; ++g) r.start[g + 1] += r.start[g];
  std::vector<int64_t> next(r.start.begin(), r.start.end() - 1);
  int64_t* order = r.order.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    r.pos[s] = next[e[s]]++;
    order[r.pos[s]] = s;
  }
  return r;
}

// Rows per task for rows that cost `row` simple operations each: ATen's grain (32768 of them), so that a
// loop too small to gain from a second thread runs on one (a parallel region costs some microseconds).
int64_t grain(int64_t row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row, 1));
}

// f(s) for each slot s of token n, in expert order (the order of their rows): sums then add up as loop's
// index_add and the export's do, expert by expert, so that y matches theirs bit for bit at any top_k
template <typename F>
void each_slot_in_expert_order(const std::vector<int64_t>& pos, int64_t n, int64_t k, const F& f) {
  int64_t few[16];
  std::vector<int64_t> many(k > 16 ? k : 0);
  int64_t* slots = k > 16 ? many.data() : few;
  for (int64_t j = 0; j < k; ++j) {  // insertion sort: k is a handful
    int64_t s = n * k + j, i = j;
    for (; i > 0 && pos[slots[i - 1]] > pos[s]; --i) slots[i] = slots[i - 1];
    slots[i] = s;
  }
  for (int64_t j = 0; j < k; ++j) f(slots[j]);
}

// y[n] = sum_j w[n, j] * out[pos[n * k + j]], in float32
template <typename T>
void weighted_sum(float* y, const T* out, const float* w, const std::vector<int64_t>& pos, int64_t N,
                  int64_t k, int64_t d) {
  at::parallel_for(0, N, grain(k * d), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* yn = y + n * d;
      std::fill(yn, yn + d, 0.f);
      each_slot_in_expert_order(pos, n, k, [&](int64_t s) {
        const T* row = out + pos[s] * d;
        const float ws = w[s];
        for (int64_t c = 0; c < d; ++c) yn[c] += ws * static_cast<float>(row[c]);
      });
    }
  });
}

void check_experts(const at::Tensor& c_fc, const at::Tensor& c_proj, bool swiglu) {
  TORCH_CHECK(c_fc.dim() == 3 && c_proj.dim() == 3 && c_fc.size(0) == c_proj.size(0) &&
              c_fc.size(1) == c_proj.size(2) && c_fc.size(2) == (swiglu ? 2 : 1) * c_proj.size(1) &&
              c_fc.scalar_type() == c_proj.scalar_type(),
              "fused_experts: want c_fc [E, d, w], c_proj [E, h, d] of one dtype, w = h (gelu), 2h (swiglu)");
}

bool is_swiglu(c10::string_view act) {
  TORCH_CHECK(act == "gelu" || act == "swiglu", "fused_experts: act must be gelu or swiglu, got ", act);
  return act == "swiglu";
}

// x [N, d], topk_idx [N, k] (int64), topk_weight [N, k], c_fc [E, d, w], c_proj [E, h, d], biases [E, w],
// [E, d] -> y [N, d] float32, the slots per expert [E], and what the backward needs: the slot of each sorted
// row, and per sorted row its x, c_fc output h, activation a, and expert output (before the router weight)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_experts(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weight, const at::Tensor& c_fc,
    const std::optional<at::Tensor>& c_fc_bias, const at::Tensor& c_proj,
    const std::optional<at::Tensor>& c_proj_bias, c10::string_view act) {
  const bool swiglu = is_swiglu(act);
  check_experts(c_fc, c_proj, swiglu);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == c_fc.size(1) && x.scalar_type() == c_fc.scalar_type(),
              "fused_experts: want x [N, d] in the experts' dtype");
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) && topk_weight.sizes() == topk_idx.sizes(),
              "fused_experts: want topk_idx and topk_weight [N, k]");
  const int64_t N = x.size(0), k = topk_idx.size(1), S = N * k, E = c_fc.size(0), d = x.size(1);
  const int64_t H = c_proj.size(1);
  Sorted sorted = sort_slots(topk_idx, E);
  const auto& start = sorted.start;
  auto token = sorted.order.div(k, "floor");  // the token of each sorted row
  auto xs = at::empty({S, d}, x.options()), h = at::empty({S, c_fc.size(2)}, x.options());
  auto a = at::empty({S, H}, x.options()), out = at::empty({S, d}, x.options());
  std::vector<int64_t> sizes(E);
  for (int64_t g = 0; g < E; ++g) sizes[g] = start[g + 1] - start[g];
  // a thread's pieces are one run of sorted rows (even_cut): its gather is one call, the GEMMs one per piece.
  // The activation runs between two parallel regions, on all rows at once: torch's gelu is oneDNN's for
  // float32, whose bits the model's other paths (the loop backend, the export) share, and which scales on
  // torch's threads but not inside a parallel region (there, two threads each on half the rows took as long
  // as one thread on all of them, and each call costs ~10 us)
  const Plan plan = even_cut(sizes, std::vector<int64_t>(E, 1));
  run_threads(plan, [&](const std::vector<Piece>& pieces) {
    if (pieces.empty()) return;
    const int64_t s0 = start[pieces.front().g] + pieces.front().r0;
    const int64_t rows = start[pieces.back().g] + pieces.back().r1 - s0;
    auto xs_t = xs.narrow(0, s0, rows);
    at::index_select_out(xs_t, x, 0, token.narrow(0, s0, rows));
    for (const Piece& p : pieces) {
      const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
      auto h_p = h.narrow(0, s, n);
      gemm(h_p, xs.narrow(0, s, n), c_fc[p.g], c_fc_bias ? std::optional((*c_fc_bias)[p.g]) : std::nullopt);
    }
  });
  if (swiglu) {  // h holds the gate and the up projection side by side: silu(gate) * up
    at::silu_out(a, h.narrow(1, 0, H));
    a.mul_(h.narrow(1, H, H));
  } else {
    at::gelu_out(a, h);
  }
  run(plan, [&](const Piece& p) {
    const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
    auto out_p = out.narrow(0, s, n);
    gemm(out_p, a.narrow(0, s, n), c_proj[p.g],
         c_proj_bias ? std::optional((*c_proj_bias)[p.g]) : std::nullopt);
  });
  auto y = at::empty({N, d}, x.options().dtype(at::kFloat));
  auto w = topk_weight.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fused_experts", [&] {
    weighted_sum(y.data_ptr<float>(), out.data_ptr<scalar_t>(), w.data_ptr<float>(), sorted.pos, N, k, d);
  });
  auto counts = at::empty({E}, topk_idx.options());
  for (int64_t g = 0; g < E; ++g) counts.data_ptr<int64_t>()[g] = sizes[g];
  return {y, counts, sorted.order, xs, h, a, out};
}

// fused_experts' backward, from the gradient of y and what the forward kept -> the gradients of x (in
// the experts' dtype), topk_weight (float32), c_fc, c_fc_bias, c_proj, c_proj_bias (the biases' empty
// when bias is false). The row-wise work of each sorted row in two passes, the activation's backward on
// all rows between them: its output gradient and c_proj's product, then c_fc's product (its x gradient);
// after each, of an expert whole on one thread its weight gradient, a_e^T g_e, from warm caches; last the
// weight gradients of the experts cut between threads, from cold ones. So the threads take whole experts
// where they share them evenly so (whole_groups), else cut them evenly.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_experts_backward(
    const at::Tensor& grad_y, const at::Tensor& topk_weight, const at::Tensor& c_fc, const at::Tensor& c_proj,
    bool bias, c10::string_view act, const at::Tensor& counts, const at::Tensor& order, const at::Tensor& xs,
    const at::Tensor& h, const at::Tensor& a, const at::Tensor& out) {
  const bool swiglu = is_swiglu(act);
  check_experts(c_fc, c_proj, swiglu);
  const int64_t N = grad_y.size(0), k = topk_weight.size(1), S = N * k, E = c_fc.size(0), d = c_fc.size(1);
  const int64_t W = c_fc.size(2), H = c_proj.size(1);
  TORCH_CHECK(order.numel() == S && counts.numel() == E && out.size(0) == S,
              "fused_experts_backward: shapes do not match the forward's");
  auto gy = grad_y.to(at::kFloat).contiguous();  // (y.sum() hands back a stride-0 gradient)
  auto w = topk_weight.to(at::kFloat).contiguous();
  auto ends = counts.contiguous();
  std::vector<int64_t> start(E + 1, 0), sizes(E), pos(S);
  for (int64_t g = 0; g < E; ++g) start[g + 1] = start[g] + (sizes[g] = ends.data_ptr<int64_t>()[g]);
  const int64_t* slot = order.data_ptr<int64_t>();
  for (int64_t r = 0; r < S; ++r) pos[slot[r]] = r;
  auto grad_w = at::empty({N, k}, w.options());
  auto g_out = at::empty({S, d}, out.options()), g_h = at::empty({S, W}, out.options());
  auto g_xs = at::empty({S, d}, out.options()), grad_x = at::empty({N, d}, out.options());
  auto grad_c_fc = at::empty_like(c_fc), grad_c_proj = at::empty_like(c_proj);
  auto grad_c_fc_bias = at::empty({bias ? E : 0, W}, c_fc.options());
  auto grad_c_proj_bias = at::empty({bias ? E : 0, d}, c_fc.options());
  // rows [r0, r1) of expert g's weight gradient, c_fc's or c_proj's: a_g^T times its output's gradient
  auto weight_grad = [&](bool proj, int64_t g, int64_t r0, int64_t r1) {
    const int64_t s = start[g], n = sizes[g];
    auto grad = (proj ? grad_c_proj : grad_c_fc)[g].narrow(0, r0, r1 - r0);
    auto g_rows = (proj ? g_out : g_h).narrow(0, s, n);
    if (n == 0) grad.zero_();
    else gemm(grad, (proj ? a : xs).narrow(0, s, n).narrow(1, r0, r1 - r0).t(), g_rows);
    if (bias && r0 == 0) {
      auto grad_bias = (proj ? grad_c_proj_bias : grad_c_fc_bias)[g];
      if (n == 0) grad_bias.zero_();
      else at::sum_out(grad_bias, g_rows, at::IntArrayRef{0});
    }
  };
  std::vector<char> done(E, 0);  // the experts whose weight gradients are computed
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fused_experts_backward", [&] {
    const float *gy_ = gy.data_ptr<float>(), *w_ = w.data_ptr<float>();
    const scalar_t* out_ = out.data_ptr<scalar_t>();
    float* grad_w_ = grad_w.data_ptr<float>();
    at::parallel_for(0, S, grain(d), [&](int64_t s0, int64_t s1) {  // topk_weight's: <dy[n], out[slot]>
      for (int64_t s = s0; s < s1; ++s) {
        const float* gyn = gy_ + (s / k) * d;
        const scalar_t* row = out_ + pos[s] * d;
        float acc = 0.f;
        // in vector lanes (_Pragma: inside AT_DISPATCH's macro): a sum left to right waits on every add
        _Pragma("omp simd reduction(+ : acc)") for (int64_t c = 0; c < d; ++c) acc += gyn[c] * static_cast<float>(row[c]);
        grad_w_[s] = acc;
      }
    });
    scalar_t* g_out_ = g_out.data_ptr<scalar_t>();
    Plan whole = whole_groups(sizes);
    const Plan plan = whole.empty() ? even_cut(sizes, std::vector<int64_t>(E, 1)) : whole;
    // the activation's gradient g_a, in place in g_h (in the gate's half with swiglu): no buffer of its own
    auto g_a = g_h.narrow(1, 0, H);
    run(plan, [&](const Piece& p) {
      const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
      for (int64_t r = s; r < s + n; ++r) {  // the expert output's gradient: w[slot] * dy[token]
        const float* gyn = gy_ + (slot[r] / k) * d;
        const float ws = w_[slot[r]];
        for (int64_t c = 0; c < d; ++c) g_out_[r * d + c] = static_cast<scalar_t>(ws * gyn[c]);
      }
      gemm(g_a.narrow(0, s, n), g_out.narrow(0, s, n), c_proj[p.g].t());
      if (n == sizes[p.g]) weight_grad(true, p.g, 0, H);  // a whole expert here: from warm caches
    });
    // the activation's backward on all rows at once, between the parallel regions (as in the forward)
    if (swiglu) {  // as autograd does silu(gate) * up
      auto gate = h.narrow(1, 0, H), up = h.narrow(1, H, H), g_up = g_h.narrow(1, H, H);
      at::silu_out(g_up, gate).mul_(g_a);
      at::silu_backward_out(g_a, g_a.mul_(up), gate);  // (g_a becomes the gate's gradient)
    } else {
      at::gelu_backward_out(g_a, g_a, h);
    }
    run(plan, [&](const Piece& p) {
      const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
      gemm(g_xs.narrow(0, s, n), g_h.narrow(0, s, n), c_fc[p.g].t());
      if (n == sizes[p.g]) {  // a whole expert on this thread: its weight gradient now, from warm caches
        weight_grad(false, p.g, 0, d);
        done[p.g] = 1;
      }
    });
    const scalar_t* g_xs_ = g_xs.data_ptr<scalar_t>();
    scalar_t* grad_x_ = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(k * d), [&](int64_t n0, int64_t n1) {  // x's: its slots' rows, summed
      std::vector<float> acc(d);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(acc.begin(), acc.end(), 0.f);
        each_slot_in_expert_order(pos, n, k, [&](int64_t s) {
          for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<float>(g_xs_[pos[s] * d + c]);
        });
        for (int64_t c = 0; c < d; ++c) grad_x_[n * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  // the rest of the weight gradients (of experts cut between threads, and the zeros of empty ones): groups
  // 0..E-1 are c_fc's (d rows each), E..2E-1 c_proj's (h rows); a row of expert e's costs its token count
  // (an empty expert: its zeros) times the row's length
  std::vector<int64_t> rows(2 * E), cost(2 * E);
  for (int64_t g = 0; g < E; ++g) {
    rows[g] = done[g] ? 0 : d, cost[g] = std::max<int64_t>(sizes[g], 1) * W;
    rows[E + g] = done[g] ? 0 : H, cost[E + g] = std::max<int64_t>(sizes[g], 1) * d;
  }
  run(even_cut(rows, cost), [&](const Piece& p) { weight_grad(p.g >= E, p.g % E, p.r0, p.r1); });
  return {grad_x, grad_w, grad_c_fc, grad_c_fc_bias, grad_c_proj, grad_c_proj_bias};
}


// ---------------------------------------------------------------------------------------------------
// softmax_router: moe_model.Router's softmax path (the gate, the softmax over the experts, the top-k and the
// chosen weights) with the same bits as its torch ops, and the layer's routing losses (the slots per expert,
// the balance loss and the z-loss, as moe_model.count_per_expert, load_balance_loss and router_z_loss), and
// its backward in one pass over the rows: the gradients that reach the chosen weights, the logits, the
// probabilities and the two losses become the logits' gradient, then the gate's two products. (The losses
// were ops of their own, forward and backward: each op of a small layer costs some 50 us in the model, more
// than the work in it.) torch's softmax over a last dimension shorter than a vector register (8 experts: 16
// floats on AVX512) is slow, ~20 ns per element, and its top-k is slow on short rows at any width (64
// experts, top 8: ~0.5 us a row): here they are plain loops.
// The softmax is the one torch runs there, step for step: exp of (x - max) by the same Sleef function as
// torch's Vectorized::exp, the sum left to right (as vec_reduce_all over a partial vector), times 1 / sum;
// a check against at::_softmax on first use falls back to torch's softmax (rows as wide as a vector or
// wider: it is fast there). The top-k is a selection, the same as torch's but where values tie or are NaN:
// any row with one falls back to at::topk.

#pragma GCC push_options
#pragma GCC target("avx512f")
extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's Vectorized<float>::exp on AVX512 (libtorch_cpu has it)
void exp_avx512(float* v, int64_t n) {  // n: a multiple of 16
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(v + i, Sleef_expf16_u10(_mm512_loadu_ps(v + i)));
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
extern "C" __m256 Sleef_expf8_u10(__m256);  // ... and on AVX2
void exp_avx2(float* v, int64_t n) {  // n: a multiple of 8
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(v + i, Sleef_expf8_u10(_mm256_loadu_ps(v + i)));
}
#pragma GCC pop_options

// The exp and the vector width (in floats) of torch's softmax kernel on this CPU; width 0: none of ours.
struct VecExp { void (*exp)(float*, int64_t); int64_t width; };
VecExp vec_exp() {
  static const std::string capability = at::get_cpu_capability();  // what torch's kernels were picked for
  return capability == "AVX512" ? VecExp{exp_avx512, 16} : capability == "AVX2" ? VecExp{exp_avx2, 8}
                                                                                : VecExp{nullptr, 0};
}

// softmax over the last dimension of `rows` rows of E (E < the vector width) from x into out, as torch's
// _vec_softmax_lastdim computes it there; buf: scratch
void softmax_rows(const float* x, float* out, int64_t rows, int64_t E, const VecExp& ve,
                  std::vector<float>& buf) {
  const int64_t n = rows * E;
  buf.assign((n + ve.width - 1) / ve.width * ve.width, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * E;
    float m = xr[0];  // (vec::maximum: NaN if either is)
    for (int64_t e = 1; e < E; ++e) m = std::isnan(m) || std::isnan(xr[e]) ? NAN : std::max(m, xr[e]);
    for (int64_t e = 0; e < E; ++e) buf[r * E + e] = xr[e] - m;
  }
  ve.exp(buf.data(), buf.size());  // lane by lane, as torch's exp of a partial vector
  for (int64_t r = 0; r < rows; ++r) {
    const float* er = buf.data() + r * E;
    float sum = er[0];
    for (int64_t e = 1; e < E; ++e) sum += er[e];
    sum = 1 / sum;
    for (int64_t e = 0; e < E; ++e) out[r * E + e] = er[e] * sum;
  }
}

// Whether softmax_rows reproduces at::_softmax for rows of E here (checked once per E, on fixed values:
// no random numbers are drawn, so that a run's random stream does not depend on it)
bool softmax_rows_exact(int64_t E, const VecExp& ve) {
  static std::array<std::atomic<int>, 64> known{};  // 0: not checked, 1: exact, 2: not
  if (ve.width == 0 || E >= ve.width || E >= 64) return false;
  if (known[E] == 0) {
    const int64_t N = 4096;
    auto x = at::empty({N, E}, at::kFloat);
    float* xd = x.data_ptr<float>();
    for (int64_t i = 0; i < N * E; ++i) xd[i] = std::sin(0.37 * i) * std::pow(10.0, (i / E) % 5 - 2);
    auto ref = at::_softmax(x, -1, false), got = at::empty_like(x);
    std::vector<float> buf;
    softmax_rows(xd, got.data_ptr<float>(), N, E, ve, buf);
    known[E] = at::equal(got, ref) ? 1 : 2;
  }
  return known[E] == 1;
}

// The top k of a row of E, largest first, as at::topk gives them where no two values tie and none is NaN;
// false where they do (the caller then takes at::topk's answer, whose order of ties is its own)
bool topk_row(const float* v, int64_t E, int64_t k, float* values, int64_t* indices) {
  int64_t filled = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (std::isnan(v[e])) return false;
    int64_t i = std::min(filled, k);
    for (; i > 0 && v[e] >= values[i - 1]; --i) {
      if (v[e] == values[i - 1]) return false;
      if (i < k) values[i] = values[i - 1], indices[i] = indices[i - 1];
    }
    if (i < k) {
      values[i] = v[e], indices[i] = e;
      filled = std::min(filled + 1, k);
    } else if (v[e] == values[k - 1]) {
      return false;  // equal to the k-th: which of the two is chosen is a tie
    }
  }
  return true;
}

// The routing losses of logits, probs (their softmax) [N, E] and the top-k topk_idx [N, k] -> the slots per
// expert [E], the balance loss (n_expert * sum_i f_i * P_i, f_i the fraction of slots, P_i the mean
// probability), the z-loss (the mean of logsumexp(logits)^2) and each row's logsumexp (for the backward)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_losses(
    const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& topk_idx) {
  const int64_t N = logits.size(0), E = logits.size(1), S = topk_idx.numel();
  auto l = logits.contiguous(), p = probs.contiguous(), idx = topk_idx.contiguous();
  auto counts = at::zeros({E}, idx.options()), lse = at::empty({N}, l.options());
  const float *l_ = l.data_ptr<float>(), *p_ = p.data_ptr<float>();
  const int64_t* idx_ = idx.data_ptr<int64_t>();
  int64_t* c_ = counts.data_ptr<int64_t>();
  float* lse_ = lse.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) c_[idx_[s]] += 1;
  double z = 0, balance = 0;
  std::vector<double> P(E, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const float *x = l_ + n * E, *pn = p_ + n * E;
    const int64_t top = std::max_element(x, x + E) - x;
    // logsumexp from the softmax: the largest logit's probability is exp(0) / sum(exp(x - max)), so
    // lse = max - log(that); a row with an infinite or NaN logit as torch.logsumexp computes it
    if (std::isfinite(x[top]) && pn[top] > 0) {
      lse_[n] = x[top] - std::log(pn[top]);
    } else {
      const float m = std::isinf(x[top]) ? 0.f : x[top];
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(x[e] - m);
      lse_[n] = std::log(sum) + m;
    }
    z += double(lse_[n]) * lse_[n];
    for (int64_t e = 0; e < E; ++e) P[e] += pn[e];
  }
  for (int64_t e = 0; e < E; ++e) balance += double(c_[e]) / S * P[e] / N;
  auto scalar = [&](double v) {  // (as a float first: past float's range, inf as torch's, not an error)
    const bool over = std::isfinite(v) && std::abs(v) > std::numeric_limits<float>::max();
    return at::scalar_tensor(over ? std::copysign(INFINITY, v) : v, l.options());
  };
  return {counts, scalar(E * balance), scalar(z / N), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
softmax_router(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& expert_bias,
    int64_t top_k, bool norm_topk, double temperature, double route_scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
              x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "softmax_router: want x [N, d] and weight [E, d], float32");
  const int64_t N = x.size(0), E = weight.size(0), k = top_k;
  TORCH_CHECK(0 < k && k <= E, "softmax_router: want 0 < top_k <= ", E, ", got ", k);
  // in float32 whatever autocast says (as the Router's torch path, which turns it off): the router's Python
  // then needs no autocast context, whose cost exceeds the rest of the Router's Python
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto logits = at::mm(x, weight.t());  // F.linear(x, weight)
  if (temperature != 1.0) logits = logits / temperature;
  const VecExp ve = vec_exp();
  // torch's top-k and chosen weights, op for op as the Router's torch path (its order of ties is its own)
  auto torch_topk = [&](const at::Tensor& probs) -> std::tuple<at::Tensor, at::Tensor> {
    at::Tensor chosen, idx;
    if (expert_bias) {  // the bias only selects
      idx = std::get<1>(at::topk(probs + *expert_bias, k));
      chosen = logits.gather(1, idx);
    } else {
      std::tie(chosen, idx) = at::topk(logits, k);
    }
    return {idx, norm_topk ? at::_softmax(chosen, -1, false) : probs.gather(1, idx)};
  };
  auto routed = [&](const at::Tensor& idx, const at::Tensor& w, const at::Tensor& probs) {
    auto [counts, balance, z, lse] = routing_losses(logits, probs, idx);
    return std::make_tuple(idx, route_scale != 1.0 ? w * route_scale : w, logits, probs, counts, balance, z,
                           lse);
  };
  if (expert_bias && expert_bias->scalar_type() != at::kFloat) {  // torch's kernels throughout
    auto probs = at::_softmax(logits, -1, false);
    auto [idx, w] = torch_topk(probs);
    return routed(idx, w, probs);
  }
  // our softmax where it is torch's to the bit and faster (rows shorter than a vector), else torch's own
  const bool own_softmax = softmax_rows_exact(E, ve), own_softmax_k = softmax_rows_exact(k, ve);
  auto probs = own_softmax ? at::empty({N, E}, logits.options()) : at::_softmax(logits, -1, false);
  auto w = at::empty({N, k}, logits.options()), chosen = at::empty({N, k}, logits.options());
  auto idx = at::empty({N, k}, logits.options().dtype(at::kLong));
  const float* l = logits.data_ptr<float>();
  auto bias_ = expert_bias ? expert_bias->contiguous() : at::Tensor();
  const float* bias = expert_bias ? bias_.data_ptr<float>() : nullptr;
  float *p = probs.data_ptr<float>(), *w_ = w.data_ptr<float>(), *c_ = chosen.data_ptr<float>();
  int64_t* idx_ = idx.data_ptr<int64_t>();
  std::atomic<bool> exact{true};
  // (a row costs ~100 ns at 8 experts: the softmax's exps, the selection's compares and branches)
  at::parallel_for(0, N, grain(32 * E), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf, biased(E), values(k);
    if (own_softmax) softmax_rows(l + n0 * E, p + n0 * E, n1 - n0, E, ve, buf);
    for (int64_t n = n0; n < n1; ++n) {
      int64_t* in = idx_ + n * k;
      float* cn = c_ + n * k;
      if (bias)  // the bias only selects: (probs + bias), then the chosen logits
        for (int64_t e = 0; e < E; ++e) biased[e] = p[n * E + e] + bias[e];
      // a tie or a NaN: torch's top-k after the loop (in[] is unfinished then: no index to read at)
      if (!(bias ? topk_row(biased.data(), E, k, values.data(), in) : topk_row(l + n * E, E, k, cn, in))) {
        exact = false;
        continue;
      }
      if (bias)
        for (int64_t j = 0; j < k; ++j) cn[j] = l[n * E + in[j]];
      if (!norm_topk)
        for (int64_t j = 0; j < k; ++j) w_[n * k + j] = p[n * E + in[j]];
    }
    if (norm_topk && own_softmax_k) softmax_rows(c_ + n0 * k, w_ + n0 * k, n1 - n0, k, ve, buf);
  });
  if (norm_topk && !own_softmax_k) w = at::_softmax(chosen, -1, false);
  if (!exact) std::tie(idx, w) = torch_topk(probs);  // a tie or a NaN somewhere
  return routed(idx, w, probs);
}

std::tuple<at::Tensor, at::Tensor> softmax_router_backward(
    const std::optional<at::Tensor>& grad_w, const std::optional<at::Tensor>& grad_logits,
    const std::optional<at::Tensor>& grad_probs, const std::optional<at::Tensor>& grad_balance,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& topk_idx, const at::Tensor& topk_weight, const at::Tensor& probs,
    const at::Tensor& counts, const at::Tensor& lse, bool norm_topk, double temperature, double route_scale) {
  const int64_t N = probs.size(0), E = probs.size(1), k = topk_idx.size(1);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // (as the forward)
  auto dense = [](const std::optional<at::Tensor>& t) {  // an expanded gradient, contiguous; an absent one
    return t ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  auto gw = dense(grad_w), gl_in = dense(grad_logits), gp_in = dense(grad_probs);
  auto idx = topk_idx.contiguous(), w = topk_weight.contiguous(), p = probs.contiguous();
  auto gl = at::empty({N, E}, probs.options());
  const float scale = route_scale, inv_t = 1.0 / temperature;
  // the losses': d balance / d probs[n, e] = n_expert * f_e / N, the same in every row; d z / d logits[n, e]
  // = 2 lse_n / N * softmax(logits)[n, e], and softmax(logits) is probs
  const double gb = grad_balance ? grad_balance->item<double>() : 0.0;
  const double gz = grad_z ? grad_z->item<double>() : 0.0;
  std::vector<float> balance_row(E);
  auto c = counts.contiguous();
  for (int64_t e = 0; e < E; ++e) balance_row[e] = gb * E * (double(c.data_ptr<int64_t>()[e]) / (N * k)) / N;
  const float* lse_ = lse.data_ptr<float>();
  const int64_t* idx_ = idx.data_ptr<int64_t>();
  const float *w_ = w.data_ptr<float>(), *p_ = p.data_ptr<float>();
  const float* gw_ = gw.defined() ? gw.data_ptr<float>() : nullptr;
  const float* gl_in_ = gl_in.defined() ? gl_in.data_ptr<float>() : nullptr;
  const float* gp_in_ = gp_in.defined() ? gp_in.data_ptr<float>() : nullptr;
  float* gl_ = gl.data_ptr<float>();
  at::parallel_for(0, N, grain(E + k), [&](int64_t n0, int64_t n1) {
    std::vector<float> gp(E);  // the probabilities' gradient
    for (int64_t n = n0; n < n1; ++n) {
      float* g = gl_ + n * E;
      const float* pn = p_ + n * E;
      const float z_row = 2.0 * gz * lse_[n] / N;
      for (int64_t e = 0; e < E; ++e) g[e] = (gl_in_ ? gl_in_[n * E + e] : 0.f) + z_row * pn[e];
      for (int64_t e = 0; e < E; ++e) gp[e] = (gp_in_ ? gp_in_[n * E + e] : 0.f) + balance_row[e];
      if (gw_) {
        const float *wn = w_ + n * k, *gwn = gw_ + n * k;
        const int64_t* in = idx_ + n * k;
        if (norm_topk) {  // w = scale * softmax(chosen logits): its backward, into the chosen logits
          float s = 0.f;
          for (int64_t j = 0; j < k; ++j) s += wn[j] * gwn[j];
          for (int64_t j = 0; j < k; ++j) g[in[j]] += wn[j] * (gwn[j] - s / scale);
        } else {  // w = scale * the chosen probabilities
          for (int64_t j = 0; j < k; ++j) gp[in[j]] += scale * gwn[j];
        }
      }
      float s = 0.f;  // the softmax's backward: p * (gp - <gp, p>)
      for (int64_t e = 0; e < E; ++e) s += gp[e] * pn[e];
      for (int64_t e = 0; e < E; ++e) g[e] = (g[e] + pn[e] * (gp[e] - s)) * inv_t;
    }
  });
  return {at::mm(gl, weight), at::mm(gl.t(), x)};
}


// ---------------------------------------------------------------------------------------------------
// The two ops' autograd, here rather than in Python (torch.library.register_autograd): its Python
// wrapper cost ~0.1 ms per op and per pass, some 3 ms of a small MoE's step. Each forward calls its op
// below autograd through the dispatcher (under torch.compile the inputs are fake tensors, which only
// fused.py's fake implementations take); each backward calls the backward op.

template <typename F>
auto op(const char* name) {  // the op's dispatcher handle, looked up on first use (fused.py defines it)
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
OptTensor given(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A node of the autograd graph: a std::shared_ptr to torch 2.12, a c10::intrusive_ptr since
template <typename Ptr, typename N, typename... Args>
Ptr make_node(Args&&... args) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<N>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
}

// The backward ops have no autograd of their own: a backward that builds a graph (create_graph=True, for
// second derivatives) would give zeros in their place, with a warning only. As Python's
// @once_differentiable: the gradients come back all the same, from a node that raises an error if they
// are differentiated again. That node follows the incoming gradients and the op's inputs (which lead to
// everything the gradients depend on: a loss linear in the op's output sends gradients that need none).
template <typename F>
variable_list once_differentiable(const char* name, const variable_list& grads, const variable_list& inputs,
                                  const F& backward) {
  auto any_requires_grad = [](const variable_list& v) {
    return std::any_of(v.begin(), v.end(), [](const auto& t) { return t.defined() && t.requires_grad(); });
  };
  const bool graph = at::GradMode::is_enabled() && (any_requires_grad(grads) || any_requires_grad(inputs));
  variable_list out;
  {
    at::NoGradGuard no_grad;  // (else torch warns that the backward op has no autograd)
    out = backward();
  }
  if (graph) {
    variable_list after(grads);
    after.insert(after.end(), inputs.begin(), inputs.end());
    auto error = make_node<decltype(torch::autograd::Edge::function), torch::autograd::Error>(
        std::string(name) + ": second derivatives (create_graph=True) are not implemented in "
        "moe_kernels/cpu_grouped_mm.cpp; with NANOMOE_CPU_GROUPED_MM=0, torch's ops compute them",
        torch::autograd::collect_next_edges(after));
    for (const auto& g : out) torch::autograd::set_history(g, error);
  }
  return out;
}

struct FusedExperts : torch::autograd::Function<FusedExperts> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weight, const at::Tensor& c_fc,
                               const OptTensor& c_fc_bias,
                               const at::Tensor& c_proj, const OptTensor& c_proj_bias, c10::string_view act) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto f = op<decltype(fused_experts)>("nanomoe::fused_experts");
    auto [y, counts, order, xs, h, a, out] = f.call(x, topk_idx, topk_weight, c_fc, c_fc_bias, c_proj,
                                                     c_proj_bias, act);
    ctx->mark_non_differentiable({counts, order, xs, h, a, out});  // kept for the backward, not results
    ctx->set_materialize_grads(false);  // their gradients stay undefined, not zeros the size of activations
    // (x and the biases: for once_differentiable only; x is xs's source, kept alive by the router anyway)
    ctx->save_for_backward({topk_weight, c_fc, c_proj, counts, order, xs, h, a, out, x,
                            c_fc_bias.value_or(at::Tensor()), c_proj_bias.value_or(at::Tensor())});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["fc_bias"] = c_fc_bias.has_value();
    ctx->saved_data["proj_bias"] = c_proj_bias.has_value();
    return {y, counts, order, xs, h, a, out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);
    auto s = ctx->get_saved_variables();
    const bool fc_bias = ctx->saved_data["fc_bias"].toBool();
    const bool proj_bias = ctx->saved_data["proj_bias"].toBool();
    static auto f = op<decltype(fused_experts_backward)>("nanomoe::fused_experts_backward");
    return once_differentiable("nanomoe::fused_experts", grads, {s[9], s[0], s[1], s[10], s[2], s[11]},
                               [&]() -> variable_list {
      auto [gx, gw, g_fc, g_fc_bias, g_proj, g_proj_bias] = f.call(
          grads[0], s[0], s[1], s[2], fc_bias || proj_bias, ctx->saved_data["act"].toStringRef(), s[3], s[4],
          s[5], s[6], s[7], s[8]);
      return {gx, at::Tensor(), gw, g_fc, fc_bias ? g_fc_bias : at::Tensor(), g_proj,
              proj_bias ? g_proj_bias : at::Tensor(), at::Tensor()};
    });
  }
};

struct SoftmaxRouter : torch::autograd::Function<SoftmaxRouter> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& expert_bias, int64_t top_k, bool norm_topk,
                               double temperature,
                               double route_scale) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto f = op<decltype(softmax_router)>("nanomoe::softmax_router");
    auto [idx, w, logits, probs, counts, balance, z, lse] = f.call(x, weight, expert_bias, top_k, norm_topk,
                                                                   temperature, route_scale);
    ctx->mark_non_differentiable({idx, counts, lse});
    ctx->set_materialize_grads(false);  // an output without a gradient (the z-loss off, eval) costs nothing
    ctx->save_for_backward({x, weight, idx, w, probs, counts, lse});
    ctx->saved_data["norm_topk"] = norm_topk;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["route_scale"] = route_scale;
    return {idx, w, logits, probs, counts, balance, z, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (std::none_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.defined(); }))
      return variable_list(7);
    auto s = ctx->get_saved_variables();
    static auto f = op<decltype(softmax_router_backward)>("nanomoe::softmax_router_backward");
    return once_differentiable("nanomoe::softmax_router", grads, {s[0], s[1]}, [&]() -> variable_list {
      auto [gx, g_weight] = f.call(given(grads[1]), given(grads[2]), given(grads[3]), given(grads[5]),
                                   given(grads[6]), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                                   ctx->saved_data["norm_topk"].toBool(),
                                   ctx->saved_data["temperature"].toDouble(),
                                   ctx->saved_data["route_scale"].toDouble());
      return {gx, g_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    });
  }
};

// the autograd kernels: the ops' schemas' results, from each Function
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_experts_autograd(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weight,
                       const at::Tensor& c_fc, const OptTensor& c_fc_bias, const at::Tensor& c_proj,
                       const OptTensor& c_proj_bias, c10::string_view act) {
  auto r = FusedExperts::apply(x, topk_idx, topk_weight, c_fc, c_fc_bias, c_proj, c_proj_bias, act);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
softmax_router_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& expert_bias,
                        int64_t top_k, bool norm_topk, double temperature, double route_scale) {
  auto r = SoftmaxRouter::apply(x, weight, expert_bias, top_k, norm_topk, temperature, route_scale);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}

}  // namespace

TORCH_LIBRARY(nanomoe_cpu, m) {
  // whether float32 products go to BLAS directly (else through at::mm_out): bench.py says which
  m.def("blas_direct() -> bool", blas_is_torchs);
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor");
  m.def("grouped_mm_t(Tensor a, Tensor c, Tensor offs) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanomoe_cpu, CPU, m) {
  m.impl("grouped_mm", grouped_mm);
  m.impl("grouped_mm_t", grouped_mm_t);
}

// moe_kernels/fused.py defines these ops (and their fake implementations)
TORCH_LIBRARY_IMPL(nanomoe, CPU, m) {
  m.impl("fused_experts", fused_experts);
  m.impl("fused_experts_backward", fused_experts_backward);
  m.impl("softmax_router", softmax_router);
  m.impl("softmax_router_backward", softmax_router_backward);
}

TORCH_LIBRARY_IMPL(nanomoe, Autograd, m) {
  m.impl("fused_experts", fused_experts_autograd);
  m.impl("softmax_router", softmax_router_autograd);
}
