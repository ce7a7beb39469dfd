// Exact attention forward/backward for CPU float32, with log-sum-exp, for longnet's dilated attention.
//
// Inputs are (B, G, Lq, D) queries and (B, G, Lk, D) keys/values, strided views with a contiguous last
// dimension: G independent problems per batch row. Causal means key j <= query i (top-left aligned, as
// PyTorch's CPU kernel). Work is split into (problem, query block) items; each item computes S = Q_blk K^T one key block
// at a time with GEMMs (at::mm_out, i.e. the BLAS torch uses), an online softmax in plain loops that
// the compiler vectorises, and O += P V. With is_causal, query block [s, s + bq) reads keys [0, s + bq)
// only and each row's softmax stops at its own position: no masked score is ever exponentiated, and
// the diagonal costs at most bq / 2 wasted keys per row (PyTorch's CPU flash kernel wastes up to
// its 256-row query block, about 12% of a 2048-long causal segment).
//
// Backward recomputes P = exp(S * scale - lse) from the given (possibly merged) lse, then
// dV += P^T dO, dP = dO V^T, dS = P * (dP - delta) * scale, dQ += dS K, dK += dS^T Q, delta =
// rowsum(dO * O) from the given out. Rows whose lse is +inf contribute nothing.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// exp(x) for x <= 0: 2^t = 2^round(t) * poly(t - round(t)), degree-6 Taylor on [-1/2, 1/2]
// (relative error < 2e-7); exactly 0 below -87. Branch-free so the loops vectorise.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.4426950408889634f;
  const float fi = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float f = t - fi;
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  const float y = p * __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : y;
}

inline at::Tensor mat(const float* p, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(at::kFloat));
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be 4-D with a contiguous last dimension");
}

// block i of nb in an order that alternates cheap and expensive causal blocks, so that contiguous
// ranges of work items carry similar work
inline int64_t zigzag(int64_t i, int64_t nb) { return (i % 2 == 0) ? i / 2 : nb - 1 - i / 2; }

struct View {  // a (B, G, L, D) view's data and strides
  const float* p; int64_t s0, s1, s2;
  View(const at::Tensor& t) : p(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const float* problem(int64_t b, int64_t g) const { return p + b * s0 + g * s1; }
};

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          bool is_causal, double scale, int64_t bq, int64_t bk) {
  check(q, "query"); check(k, "key"); check(v, "value");
  const int64_t B = q.size(0), G = q.size(1), L = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == G && k.size(3) == D && v.sizes() == k.sizes(),
              "key and value must be (B, G, Lk, D) for query (B, G, Lq, D)");
  TORCH_CHECK(bq >= 1 && bk >= 1, "block sizes must be >= 1");
  if (L == 0 || Lk == 0 || B * G == 0)  // no key: output 0, lse -inf
    return {at::zeros({B, G, L, D}, q.options()), at::full({B, G, L}, -INFINITY, q.options())};
  auto out = at::empty({B, G, L, D}, q.options());  // every row is written below
  auto lse = at::empty({B, G, L}, q.options());
  const View Qv(q), Kv(k), Vv(v);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t P = B * G, nb = (L + bq - 1) / bq;
  at::parallel_for(0, P * nb, 1, [&](int64_t begin, int64_t end) {
    // scalars copied into locals: stores through float pointers cannot alias them, so the inner loops
    // keep them in registers and vectorise (captured by reference, they are reloaded every step)
    const int64_t G_ = G, L_ = L, D_ = D, Lk_ = Lk, nb_ = nb, bq_ = bq, bk_ = bk;
    const bool is_causal_ = is_causal;
    const float sc_ = sc;
    std::vector<float> sbuf(bq_ * bk_), acc(bq_ * D_), m(bq_), l(bq_);
    for (int64_t item = begin; item < end; ++item) {
      // a problem's query blocks run back to back, so its keys and values stay in cache
      const int64_t pb = item / nb_, blk = zigzag(item % nb_, nb_);
      const int64_t b = pb / G_, g = pb % G_;
      const float* Q = Qv.problem(b, g); const float* K = Kv.problem(b, g); const float* V = Vv.problem(b, g);
      const int64_t s = blk * bq_, rows = std::min(bq_, L_ - s);
      const int64_t kend = is_causal_ ? std::min(s + rows, Lk_) : Lk_;
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      auto Qb = mat(Q + s * Qv.s2, rows, D_, Qv.s2);
      auto A = at::from_blob(acc.data(), {rows, D_}, at::TensorOptions().dtype(at::kFloat));
      for (int64_t t = 0; t < kend; t += bk_) {
        const int64_t cols = std::min(bk_, kend - t);
        auto S = at::from_blob(sbuf.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
        at::mm_out(S, Qb, mat(K + t * Kv.s2, cols, D_, Kv.s2).t());
        for (int64_t r = 0; r < rows; ++r) {
          float* x = sbuf.data() + r * cols;
          // keys t + j <= s + r when causal
          const int64_t n = is_causal_ ? std::max<int64_t>(0, std::min(cols, s + r - t + 1)) : cols;
          float mx = -INFINITY;  // of the scaled scores (scale may be negative)
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < n; ++j) mx = mx > x[j] * sc_ ? mx : x[j] * sc_;
          const float m_new = mx > m[r] ? mx : m[r];
          const float corr = (m[r] == -INFINITY) ? 0.0f : exp_nonpos(m[r] - m_new);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            const float e = exp_nonpos(x[j] * sc_ - m_new);
            x[j] = e;
            sum += e;
          }
          for (int64_t j = n; j < cols; ++j) x[j] = 0.0f;
          if (corr != 1.0f) {
            float* a = acc.data() + r * D_;
#pragma omp simd
            for (int64_t d = 0; d < D_; ++d) a[d] *= corr;
          }
          l[r] = l[r] * corr + sum;
          m[r] = m_new;
        }
        A.addmm_(S, mat(V + t * Vv.s2, cols, D_, Vv.s2));
      }
      float* O = op + pb * L_ * D_;
      float* LS = lp + pb * L_;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / l[r];
        const float* a = acc.data() + r * D_;
        float* o = O + (s + r) * D_;
#pragma omp simd
        for (int64_t d = 0; d < D_; ++d) o[d] = a[d] * inv;
        LS[s + r] = m[r] + std::log(l[r]);
      }
    }
  });
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           bool is_causal, double scale, int64_t bq, int64_t bk) {
  check(dout, "grad_out"); check(q, "query"); check(k, "key"); check(v, "value"); check(out, "out");
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3, "lse must be float32 (B, G, L)");
  const int64_t B = q.size(0), G = q.size(1), L = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == G && k.size(3) == D && v.sizes() == k.sizes(),
              "key and value must be (B, G, Lk, D) for query (B, G, Lq, D)");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have query's shape");
  TORCH_CHECK(bq >= 1 && bk >= 1, "block sizes must be >= 1");
  auto dq = at::empty({B, G, L, D}, q.options());  // every query block zeroes its rows first
  auto dk = at::zeros({B, G, Lk, D}, q.options());
  auto dv = at::zeros({B, G, Lk, D}, q.options());
  if (L == 0 || Lk == 0 || B * G == 0) return {dq.zero_(), dk, dv};
  const View Qv(q), Kv(k), Vv(v), dOv(dout), Ov(out);
  const float* lsp = lse.data_ptr<float>();
  const int64_t l0 = lse.stride(0), l1 = lse.stride(1), l2 = lse.stride(2);
  const float sc = static_cast<float>(scale);
  const int64_t P = B * G, nb = (L + bq - 1) / bq;
  // several chunks of query blocks per problem when there are fewer problems than threads; each chunk
  // accumulates dK, dV of its problem into its own buffer, summed afterwards
  const int64_t threads = at::get_num_threads();
  const int64_t C = std::max<int64_t>(1, std::min<int64_t>(nb, (threads + P - 1) / P));
  at::Tensor dk_part, dv_part;
  if (C > 1) {
    dk_part = at::zeros({C, P, Lk, D}, q.options());
    dv_part = at::zeros({C, P, Lk, D}, q.options());
  }
  float* dqp = dq.data_ptr<float>();
  float* dkp = C > 1 ? dk_part.data_ptr<float>() : dk.data_ptr<float>();
  float* dvp = C > 1 ? dv_part.data_ptr<float>() : dv.data_ptr<float>();
  at::parallel_for(0, P * C, 1, [&](int64_t begin, int64_t end) {
    // scalars copied into locals: stores through float pointers cannot alias them, so the inner loops
    // keep them in registers and vectorise (captured by reference, they are reloaded every step)
    const int64_t P_ = P, C_ = C, G_ = G, L_ = L, D_ = D, Lk_ = Lk, nb_ = nb, bq_ = bq, bk_ = bk, l0_ = l0, l1_ = l1, l2_ = l2;
    const bool is_causal_ = is_causal;
    const float sc_ = sc;
    std::vector<float> pbuf(bq_ * bk_), dpbuf(bq_ * bk_), delta(bq_), ls(bq_);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pb = item % P_, c = item / P_;
      const int64_t b = pb / G_, g = pb % G_;
      const float* Q = Qv.problem(b, g); const float* K = Kv.problem(b, g); const float* V = Vv.problem(b, g);
      const float* dO = dOv.problem(b, g); const float* O = Ov.problem(b, g);
      const float* LS = lsp + b * l0_ + g * l1_;
      float* dQ = dqp + pb * L_ * D_;
      float* dK = dkp + (c * P_ + pb) * Lk_ * D_;
      float* dV = dvp + (c * P_ + pb) * Lk_ * D_;
      for (int64_t i = c; i < nb_; i += C_) {
        const int64_t s = zigzag(i, nb_) * bq_, rows = std::min(bq_, L_ - s);
        const int64_t kend = is_causal_ ? std::min(s + rows, Lk_) : Lk_;
        for (int64_t r = 0; r < rows; ++r) {
          const float* a = dO + (s + r) * dOv.s2; const float* o = O + (s + r) * Ov.s2;
          float d = 0.0f;
#pragma omp simd reduction(+ : d)
          for (int64_t j = 0; j < D_; ++j) d += a[j] * o[j];
          delta[r] = d;
          ls[r] = LS[(s + r) * l2_];
        }
        auto Qb = mat(Q + s * Qv.s2, rows, D_, Qv.s2);
        auto dOb = mat(dO + s * dOv.s2, rows, D_, dOv.s2);
        auto dQb = mat(dQ + s * D_, rows, D_, D_);
        dQb.zero_();
        for (int64_t t = 0; t < kend; t += bk_) {
          const int64_t cols = std::min(bk_, kend - t);
          auto Pm = at::from_blob(pbuf.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
          auto dPm = at::from_blob(dpbuf.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
          auto Kb = mat(K + t * Kv.s2, cols, D_, Kv.s2);
          auto Vb = mat(V + t * Vv.s2, cols, D_, Vv.s2);
          at::mm_out(Pm, Qb, Kb.t());
          for (int64_t r = 0; r < rows; ++r) {
            float* x = pbuf.data() + r * cols;
            const int64_t n = is_causal_ ? std::max<int64_t>(0, std::min(cols, s + r - t + 1)) : cols;
            const float lr = ls[r];
            if (lr == INFINITY) {
              std::fill(x, x + cols, 0.0f);
              continue;
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpos(x[j] * sc_ - lr);
            for (int64_t j = n; j < cols; ++j) x[j] = 0.0f;
          }
          mat(dV + t * D_, cols, D_, D_).addmm_(Pm.t(), dOb);
          at::mm_out(dPm, dOb, Vb.t());
          for (int64_t r = 0; r < rows; ++r) {
            float* y = dpbuf.data() + r * cols;
            const float* x = pbuf.data() + r * cols;
            const float dl = delta[r];
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) y[j] = x[j] * (y[j] - dl) * sc_;
          }
          dQb.addmm_(dPm, Kb);
          mat(dK + t * D_, cols, D_, D_).addmm_(dPm.t(), Qb);
        }
      }
    }
  });
  if (C > 1) {
    dk.view({P, Lk, D}).copy_(dk_part.sum(0));
    dv.view({P, Lk, D}).copy_(dv_part.sum(0));
  }
  return {dq, dk, dv};
}

// How many distinct threads at::parallel_for hands `items` work items to, as this binary was compiled:
// 1 whatever torch's thread count when it was built without OpenMP (the loop is inline).
int64_t threads_used(int64_t items) {
  std::vector<int64_t> seen(std::max<int64_t>(items, 1), -1);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) seen[i] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("threads_used", &threads_used, "distinct threads at::parallel_for uses for n items (a build check)");
  m.def("attention_forward", &attention_forward, "exact attention forward with log-sum-exp (float32)");
  m.def("attention_backward", &attention_backward, "exact attention backward from out and lse (float32)");
}
