// Exact attention forward/backward for CPU float32, with log-sum-exp, for longnet's dilated attention.
//
// Inputs are (B, G, Lq, D) queries and (B, G, Lk, D) keys/values, strided views with a contiguous last
// dimension: G independent problems per batch row. Causal means key j <= query i (top-left aligned, as
// PyTorch's CPU kernel). Work is split into (problem, query block) items; each item computes S = Q_blk K^T one key block
// at a time with GEMMs (the BLAS torch uses, called directly where it exports sgemm_), an online softmax
// in plain loops that the compiler vectorises, and O += P V. With is_causal, query block [s, s + bq)
// reads keys [0, s + bq) only, the diagonal keys [s, s + bq) in sub-blocks of bd rows, and each row's
// softmax stops at its own position: no masked score is ever exponentiated, and the diagonal costs
// under bd / 2 wasted keys per row (PyTorch's CPU flash kernel wastes up to its 256-row query block,
// about 12% of a 2048-long causal segment). The forward can merge its rows into the running output
// and log-sum-exp of other branches instead of returning new ones (attention_forward_into).
//
// Backward recomputes P = exp(S * scale - lse) from the given (possibly merged) lse, then
// dV += P^T dO, dP = dO V^T, dS = P * (dP - delta) * scale, dQ += dS K, dK += dS^T Q, delta =
// rowsum(dO * O) from the given out. Rows whose lse is +inf contribute nothing.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// The Fortran BLAS entry point, where the BLAS torch links exports it (MKL and OpenBLAS builds do); a weak
// reference, null where it is absent, in which case gemm() goes through ATen (the same BLAS, behind the
// dispatcher: a few microseconds more per call, which adds up over thousands of block products).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// False routes every product through ATen, as on builds whose BLAS does not export sgemm_ (tests use it)
std::atomic<bool> direct_blas{true};

// Row-major C (M x N, leading dimension ldc) = op(A) op(B) + beta C, where op(X) is X or its transpose
// (ta / tb) and A, B are row-major with leading dimensions lda, ldb; beta is 0 (overwrite) or 1.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  // BLAS wants each leading dimension >= its row length; a one-row matrix may carry any stride (set it
  // to its length), a smaller one (rows overlapping, as in an expanded view) goes through ATen
  auto fix = [](int64_t& ld, int64_t rows, int64_t cols) {
    if (rows <= 1) ld = std::max<int64_t>(ld, std::max<int64_t>(cols, 1));
    return ld >= std::max<int64_t>(cols, 1);
  };
  const bool blas_ok = fix(lda, ta ? K : M, ta ? M : K) && fix(ldb, tb ? N : K, tb ? K : N) && fix(ldc, M, N);
  if (sgemm_ != nullptr && blas_ok && direct_blas.load(std::memory_order_relaxed) && std::max({M, N, K, lda, ldb, ldc}) < (int64_t{1} << 31)) {
    // a row-major product is the column-major product of the transposes: swap the operands
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.0f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto a = ta ? mat(A, K, M, lda).t() : mat(A, M, K, lda);
  auto b = tb ? mat(B, N, K, ldb).t() : mat(B, K, N, ldb);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.0f) at::mm_out(c, a, b);
  else c.addmm_(a, b);
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

// Where a forward writes its rows: out (B, G, L, D) and lse (B, G, L), strided, out's last dimension
// contiguous. With merge, each row is combined with what the row already holds by the log-sum-exp rule
// (lse = logaddexp(lse_old, lse_new), out = exp(lse_old - lse) out_old + exp(lse_new - lse) out_new,
// rows with no key on either side stay out = 0, lse = -inf), the branch merge of dilated attention
// fused into the kernel's epilogue: no per-branch output is allocated, and each row is read and
// written once while it is in cache.
struct Sink {
  float* o; int64_t o0, o1, o2;
  float* l; int64_t l0, l1, l2;
  bool merge;
  Sink(at::Tensor& out, at::Tensor& lse, bool merge_)
      : o(out.data_ptr<float>()), o0(out.stride(0)), o1(out.stride(1)), o2(out.stride(2)),
        l(lse.data_ptr<float>()), l0(lse.stride(0)), l1(lse.stride(1)), l2(lse.stride(2)), merge(merge_) {}
};

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bq, int64_t bk,
                  int64_t bd) {
  check(q, "query"); check(k, "key"); check(v, "value");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "key and value must be (B, G, Lk, D) for query (B, G, Lq, D)");
  TORCH_CHECK(bq >= 1 && bk >= 1 && bd >= 1, "block sizes must be >= 1");
}

void forward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Sink& sink,
                  bool is_causal, double scale, int64_t bq, int64_t bk, int64_t bd) {
  const int64_t B = q.size(0), G = q.size(1), L = q.size(2), D = q.size(3), Lk = k.size(2);
  if (L == 0 || B * G == 0) return;
  const View Qv(q), Kv(k), Vv(v);
  const float sc = static_cast<float>(scale);
  const int64_t P = B * G, nb = (L + bq - 1) / bq;
  at::parallel_for(0, P * nb, 1, [&](int64_t begin, int64_t end) {
    // scalars copied into locals: stores through float pointers cannot alias them, so the inner loops
    // keep them in registers and vectorise (captured by reference, they are reloaded every step)
    const int64_t G_ = G, L_ = L, D_ = D, Lk_ = Lk, nb_ = nb, bq_ = bq, bk_ = bk, bd_ = bd;
    const bool is_causal_ = is_causal, merge_ = sink.merge;
    const float sc_ = sc;
    std::vector<float> sbuf(bq_ * std::max<int64_t>(1, std::min(bk_, Lk_))), acc(bq_ * D_), m(bq_), l(bq_);
    for (int64_t item = begin; item < end; ++item) {
      // a problem's query blocks run back to back, so its keys and values stay in cache
      const int64_t pb = item / nb_, blk = zigzag(item % nb_, nb_);
      const int64_t b = pb / G_, g = pb % G_;
      const float* Q = Qv.problem(b, g); const float* K = Kv.problem(b, g); const float* V = Vv.problem(b, g);
      const int64_t s = blk * bq_, rows = std::min(bq_, L_ - s);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      // rows [r0, r1) of the block against keys [t, t + cols): S = Q K^T, the online softmax (row r sees
      // keys t + j <= s + r when causal), acc += P V
      // (a lambda capturing by value: captured by reference, its scalars could alias the stores through
      // float pointers and would be reloaded every step of the loops)
      float* const sb = sbuf.data(); float* const ac = acc.data(); float* const mp = m.data(); float* const lp = l.data();
      const float* const Qs = Q + s * Qv.s2;
      const int64_t qs2 = Qv.s2, ks2 = Kv.s2, vs2 = Vv.s2;
      auto step = [=](int64_t r0, int64_t r1, int64_t t, int64_t cols) {
        const int64_t nr = r1 - r0;
        gemm(false, true, nr, cols, D_, Qs + r0 * qs2, qs2, K + t * ks2, ks2, 0.0f, sb, cols);
        for (int64_t r = r0; r < r1; ++r) {
          float* x = sb + (r - r0) * cols;
          const int64_t n = is_causal_ ? std::max<int64_t>(0, std::min(cols, s + r - t + 1)) : cols;
          float mx = -INFINITY;  // of the scaled scores (scale may be negative)
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < n; ++j) mx = mx > x[j] * sc_ ? mx : x[j] * sc_;
          const float m_old = mp[r];
          const float m_new = mx > m_old ? mx : m_old;
          const float corr = (m_old == -INFINITY) ? 0.0f : exp_nonpos(m_old - m_new);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            const float e = exp_nonpos(x[j] * sc_ - m_new);
            x[j] = e;
            sum += e;
          }
          for (int64_t j = n; j < cols; ++j) x[j] = 0.0f;
          if (corr != 1.0f) {
            float* a = ac + r * D_;
#pragma omp simd
            for (int64_t d = 0; d < D_; ++d) a[d] *= corr;
          }
          lp[r] = lp[r] * corr + sum;
          mp[r] = m_new;
        }
        gemm(false, false, nr, D_, cols, sb, cols, V + t * vs2, vs2, 1.0f, ac + r0 * D_, D_);
      };
      // keys every row of the block sees, whole rows at a time; when causal, the keys of the diagonal
      // [s, s + rows) in sub-blocks of bd rows, each reading keys up to its own last row: a row wastes
      // under bd / 2 masked scores on average instead of bq / 2
      const int64_t full = is_causal_ ? std::min(s, Lk_) : Lk_;
      for (int64_t t = 0; t < full; t += bk_) step(0, rows, t, std::min(bk_, full - t));
      if (is_causal_ && s < Lk_)
        for (int64_t r0 = 0; r0 < rows; r0 += bd_) {
          const int64_t r1 = std::min(rows, r0 + bd_), kend = std::min(s + r1, Lk_);
          for (int64_t t = s; t < kend; t += bk_) step(r0, r1, t, std::min(bk_, kend - t));
        }
      float* O = sink.o + b * sink.o0 + g * sink.o1;
      float* LS = sink.l + b * sink.l0 + g * sink.l1;
      for (int64_t r = 0; r < rows; ++r) {
        const float* a = acc.data() + r * D_;
        float* o = O + (s + r) * sink.o2;
        float* ls = LS + (s + r) * sink.l2;
        // a row with no key (l = 0: Lk = 0, or causal rows past the keys) has out 0 and lse -inf
        const float lse_new = l[r] > 0.0f ? m[r] + std::log(l[r]) : -INFINITY;
        if (!merge_) {
          const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma omp simd
          for (int64_t d = 0; d < D_; ++d) o[d] = a[d] * inv;
          *ls = lse_new;
          continue;
        }
        const float lse_old = *ls;
        const float hi = lse_old > lse_new ? lse_old : lse_new;
        if (hi == -INFINITY) continue;  // no key on either side: the row stays as it is
        // weights of the old row and of this one's unnormalised accumulator (acc = l * out_new)
        const float w_old = lse_old == -INFINITY ? 0.0f : std::exp(lse_old - hi);
        const float e_new = lse_new == -INFINITY ? 0.0f : std::exp(lse_new - hi);
        const float total = w_old + e_new;
        const float c_old = w_old / total, c_new = lse_new == -INFINITY ? 0.0f : (e_new / total) / l[r];
#pragma omp simd
        for (int64_t d = 0; d < D_; ++d) o[d] = o[d] * c_old + a[d] * c_new;
        *ls = hi + std::log(total);
      }
    }
  });
}

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          bool is_causal, double scale, int64_t bq, int64_t bk, int64_t bd) {
  check_common(q, k, v, bq, bk, bd);
  auto out = at::empty(q.sizes(), q.options());  // every row is written
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  forward_into(q, k, v, Sink(out, lse, false), is_causal, scale, bq, bk, bd);
  return {out, lse};
}

// The forward of q, k, v written into (merge = false) or merged into (merge = true) the given out
// (B, G, Lq, D) and lse (B, G, Lq): float32 CPU views, out's last dimension contiguous, not
// overlapping the inputs.
void attention_forward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                            at::Tensor lse, bool merge, bool is_causal, double scale, int64_t bq, int64_t bk,
                            int64_t bd) {
  check_common(q, k, v, bq, bk, bd);
  check(out, "out");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have query's shape");
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
              lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be float32 (B, G, Lq)");
  forward_into(q, k, v, Sink(out, lse, merge), is_causal, scale, bq, bk, bd);
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
        const float* Qb = Q + s * Qv.s2; const float* dOb = dO + s * dOv.s2;
        float* dQb = dQ + s * D_;
        std::fill(dQb, dQb + rows * D_, 0.0f);
        for (int64_t t = 0; t < kend; t += bk_) {
          const int64_t cols = std::min(bk_, kend - t);
          const float* Kb = K + t * Kv.s2; const float* Vb = V + t * Vv.s2;
          gemm(false, true, rows, cols, D_, Qb, Qv.s2, Kb, Kv.s2, 0.0f, pbuf.data(), cols);  // S = Q K^T
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
          gemm(true, false, cols, D_, rows, pbuf.data(), cols, dOb, dOv.s2, 1.0f, dV + t * D_, D_);  // dV += P^T dO
          gemm(false, true, rows, cols, D_, dOb, dOv.s2, Vb, Vv.s2, 0.0f, dpbuf.data(), cols);  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            float* y = dpbuf.data() + r * cols;
            const float* x = pbuf.data() + r * cols;
            const float dl = delta[r];
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) y[j] = x[j] * (y[j] - dl) * sc_;
          }
          gemm(false, false, rows, D_, cols, dpbuf.data(), cols, Kb, Kv.s2, 1.0f, dQb, D_);  // dQ += dS K
          gemm(true, false, cols, D_, rows, dpbuf.data(), cols, Qb, Qv.s2, 1.0f, dK + t * D_, D_);  // dK += dS^T Q
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

// Whether block products call the BLAS's sgemm_ directly (when it is exported); sets it to `on` where
// on >= 0, and returns what it was. Without it every product goes through ATen (at::mm_out).
bool direct_blas_calls(int64_t on) {
  const bool was = direct_blas.load() && sgemm_ != nullptr;
  if (on >= 0) direct_blas.store(on != 0);
  return was;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("direct_blas_calls", &direct_blas_calls,
        "whether block products call BLAS sgemm_ directly; sets it where on >= 0 (-1: only read)");
  m.def("threads_used", &threads_used, "distinct threads at::parallel_for uses for n items (a build check)");
  m.def("attention_forward", &attention_forward, "exact attention forward with log-sum-exp (float32)");
  m.def("attention_forward_into", &attention_forward_into,
        "exact attention forward written into, or merged by log-sum-exp into, given out and lse views");
  m.def("attention_backward", &attention_backward, "exact attention backward from out and lse (float32)");
}
