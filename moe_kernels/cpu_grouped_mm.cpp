// Grouped GEMMs for the CPU whose groups run side by side, one per thread (cpu_grouped_mm.py builds and
// loads this file, and says why). Every product is an at::mm, so the arithmetic is torch's own; only the
// threading differs: at::mm run inside a parallel region uses one thread. fused_experts below is the
// grouped backend's whole dispatch (gather, both GEMMs, activation, weighted sum) as one op, and its
// backward as another: a small MoE layer's time went to a hundred small ops around the GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

// Rows of a few thousand numbers per task: small enough to split, big enough to pay for a thread.
int64_t grain(int64_t row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)); }

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
  run(sizes, std::vector<int64_t>(E, 1), [&](const Piece& p) {
    const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
    auto xs_p = xs.narrow(0, s, n), h_p = h.narrow(0, s, n), a_p = a.narrow(0, s, n);
    auto out_p = out.narrow(0, s, n);
    at::index_select_out(xs_p, x, 0, token.narrow(0, s, n));
    if (c_fc_bias) at::addmm_out(h_p, (*c_fc_bias)[p.g], xs_p, c_fc[p.g]);
    else at::mm_out(h_p, xs_p, c_fc[p.g]);
    if (swiglu) {  // h holds the gate and the up projection side by side: silu(gate) * up
      at::silu_out(a_p, h_p.narrow(1, 0, H));
      a_p.mul_(h_p.narrow(1, H, H));
    } else {
      at::gelu_out(a_p, h_p);
    }
    if (c_proj_bias) at::addmm_out(out_p, (*c_proj_bias)[p.g], a_p, c_proj[p.g]);
    else at::mm_out(out_p, a_p, c_proj[p.g]);
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
// when bias is false). Two passes: the row-wise work of each sorted row (its output gradient, the
// activation's backward, its x gradient), then the weight gradients, a_e^T g_e per expert.
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fused_experts_backward", [&] {
    const float *gy_ = gy.data_ptr<float>(), *w_ = w.data_ptr<float>();
    const scalar_t* out_ = out.data_ptr<scalar_t>();
    float* grad_w_ = grad_w.data_ptr<float>();
    at::parallel_for(0, S, grain(d), [&](int64_t s0, int64_t s1) {  // topk_weight's: <dy[n], out[slot]>
      for (int64_t s = s0; s < s1; ++s) {
        const float* gyn = gy_ + (s / k) * d;
        const scalar_t* row = out_ + pos[s] * d;
        float acc = 0.f;
        for (int64_t c = 0; c < d; ++c) acc += gyn[c] * static_cast<float>(row[c]);
        grad_w_[s] = acc;
      }
    });
    scalar_t* g_out_ = g_out.data_ptr<scalar_t>();
    run(sizes, std::vector<int64_t>(E, 1), [&](const Piece& p) {
      const int64_t s = start[p.g] + p.r0, n = p.r1 - p.r0;
      for (int64_t r = s; r < s + n; ++r) {  // the expert output's gradient: w[slot] * dy[token]
        const float* gyn = gy_ + (slot[r] / k) * d;
        const float ws = w_[slot[r]];
        for (int64_t c = 0; c < d; ++c) g_out_[r * d + c] = static_cast<scalar_t>(ws * gyn[c]);
      }
      auto g_a = at::mm(g_out.narrow(0, s, n), c_proj[p.g].t());
      auto h_p = h.narrow(0, s, n), g_h_p = g_h.narrow(0, s, n), g_xs_p = g_xs.narrow(0, s, n);
      if (swiglu) {  // as autograd does silu(gate) * up
        auto gate = h_p.narrow(1, 0, H), up = h_p.narrow(1, H, H);
        auto g_gate = g_h_p.narrow(1, 0, H), g_up = g_h_p.narrow(1, H, H);
        at::mul_out(g_up, g_a, at::silu(gate));
        at::silu_backward_out(g_gate, g_a * up, gate);
      } else {
        at::gelu_backward_out(g_h_p, g_a, h_p);
      }
      at::mm_out(g_xs_p, g_h_p, c_fc[p.g].t());
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
  // the weight gradients: groups 0..E-1 are c_fc's (d rows each), E..2E-1 c_proj's (h rows); a row of
  // expert e's costs its token count (an empty expert: its zeros) times the row's length
  auto grad_c_fc = at::empty_like(c_fc), grad_c_proj = at::empty_like(c_proj);
  auto grad_c_fc_bias = at::empty({bias ? E : 0, W}, c_fc.options());
  auto grad_c_proj_bias = at::empty({bias ? E : 0, d}, c_fc.options());
  std::vector<int64_t> rows(2 * E), cost(2 * E);
  for (int64_t g = 0; g < E; ++g) {
    rows[g] = d, cost[g] = std::max<int64_t>(sizes[g], 1) * W;
    rows[E + g] = H, cost[E + g] = std::max<int64_t>(sizes[g], 1) * d;
  }
  run(rows, cost, [&](const Piece& p) {
    const bool proj = p.g >= E;
    const int64_t g = p.g % E, s = start[g], n = sizes[g];
    auto grad = (proj ? grad_c_proj : grad_c_fc)[g].narrow(0, p.r0, p.r1 - p.r0);
    auto g_rows = (proj ? g_out : g_h).narrow(0, s, n);  // the gradient of the product's output
    if (n == 0) grad.zero_();
    else at::mm_out(grad, (proj ? a : xs).narrow(0, s, n).narrow(1, p.r0, p.r1 - p.r0).t(), g_rows);
    if (bias && p.r0 == 0) {
      auto grad_bias = (proj ? grad_c_proj_bias : grad_c_fc_bias)[g];
      if (n == 0) grad_bias.zero_();
      else at::sum_out(grad_bias, g_rows, at::IntArrayRef{0});
    }
  });
  return {grad_x, grad_w, grad_c_fc, grad_c_fc_bias, grad_c_proj, grad_c_proj_bias};
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

// moe_kernels/fused.py defines these ops (with their autograd and fake implementations)
TORCH_LIBRARY_IMPL(nanomoe, CPU, m) {
  m.impl("fused_experts", fused_experts);
  m.impl("fused_experts_backward", fused_experts_backward);
}
