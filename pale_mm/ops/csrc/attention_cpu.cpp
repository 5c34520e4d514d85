// Fused fp32 softmax attention for the CPU at head dims up to 32, forward and
// backward, used by PS-Attention (pale_mm/ops/attention.py). Written once against
// the vector layer of simd.h and built twice by pale_mm/ops/kernels.py: AVX-512
// (16-float vectors, 32 registers) and AVX2 (8-float vectors, 16 registers); the
// register tile shape follows from the width (MR, NV below).
//
// Attention runs within sequences of N rows; row r of sequence s lies at element
// offset offsets[s][r] of the q, k, v and o tensors (head_dim contiguous floats; the
// tiles work at 32, a smaller head dim is zero-padded in the packed copies), so the
// pale groups are gathered from and scattered back to the (B, H, W, C) maps inside
// the kernel, without grouped copies. Each row of scores (N <= a few
// thousand for pale groups) is computed whole, so the softmax is exact per row
// (no online rescaling). Register tiles: MR query rows x NV vectors of key columns
// for the score GEMM (contraction over the head dim), MR rows x NV vectors of head
// channels for the value GEMM (contraction over keys; AVX2 takes the 32 channels in
// two passes); K is packed transposed per sequence with W x W register transposes.
// The forward scales q by scale * log2(e), so its scores are in log2 units and the
// softmax is 2^(s - max), the max taken in the score GEMM's epilogue. It returns o
// and the row log-sum-exp (natural log), which the backward uses to recompute the
// probabilities.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "simd.h"

namespace {

using namespace pale_simd;

constexpr int D = 32;   // head dim of the register tiles; a real head dim d <= 32 is
                        // zero-padded to D in the packed copies (same scores and outputs)
#if PALE_MM_VEC == 16
constexpr int MR = 8;   // rows per register tile
constexpr int NV = 2;   // vectors per row of a tile: 32 columns
#else
constexpr int MR = 6;   // 6 x 2 vectors (16 columns): 12 accumulators, the two B
constexpr int NV = 2;   // vectors and a broadcast fit the 16 registers
#endif
static_assert(MR * NV + NV + 1 <= kRegisters, "a register tile must fit the registers");
static_assert(D % (NV * W) == 0, "the value GEMM covers the head dim in whole tiles");
constexpr int MB = 4 * MR;       // query rows per backward block (a multiple of MR)
constexpr int QCHUNK = 16 * MR;  // query rows per forward work item
// The backward steps over key rows (dK, dV) MR at a time, and over score columns W
// at a time: its padded length is a multiple of both.
constexpr int NP_BWD = std::lcm(W, MR);  // 16 (AVX-512), 24 (AVX2)

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Lanes of the W-wide block at j that lie below n: the real keys (columns < n) of a
// block of score columns, or the real floats of a row of n floats.
inline mask key_mask(int j, int n) { return lanes_below(n - j); }

// One tile of gemm_abt: columns [j, j + kNV * W).
template <int kNV, bool kMax>
inline __attribute__((always_inline)) void abt_tile(const float* A, const float* Bt, int ldb,
                                                    int j, float* C, int ldc, int n, vec* mx) {
  vec c[MR][kNV];
  for (int i = 0; i < MR; i++)
    for (int v = 0; v < kNV; v++) c[i][v] = zero();
  for (int kk = 0; kk < D; kk++) {
    vec b[kNV];
    for (int v = 0; v < kNV; v++) b[v] = load(Bt + kk * ldb + j + v * W);
    for (int i = 0; i < MR; i++) {
      const vec a = set1(A[i * D + kk]);
      for (int v = 0; v < kNV; v++) c[i][v] = fmadd(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int v = 0; v < kNV; v++) store(C + i * ldc + j + v * W, c[i][v]);
  if (kMax)
    for (int v = 0; v < kNV; v++) {
      const mask m = key_mask(j + v * W, n);
      for (int i = 0; i < MR; i++) mx[i] = mask_max(mx[i], m, c[i][v]);
    }
}

// C[MR][ldc] = A[MR][D] (row stride D) x Bt[D][ldb], columns [0, np), np % W == 0.
// With kMax, also row_max[i] = max of row i of C over the columns [0, n), n > np - W.
template <bool kMax>
void gemm_abt(const float* A, const float* Bt, int ldb, int np, float* C, int ldc,
              int n = 0, float* row_max = nullptr) {
  vec mx[MR];
  if (kMax)
    for (int i = 0; i < MR; i++) mx[i] = neg_inf();
  int j = 0;
  for (; j + NV * W <= np; j += NV * W) abt_tile<NV, kMax>(A, Bt, ldb, j, C, ldc, n, mx);
  for (; j < np; j += W) abt_tile<1, kMax>(A, Bt, ldb, j, C, ldc, n, mx);
  if (kMax)
    for (int i = 0; i < MR; i++) row_max[i] = reduce_max(mx[i]);
}

// C[MR][D] (= or +=) sum_l A[r*sr + l*sl] * B[l][0:D], l in [0, L); NV vectors of
// columns at a time.
void gemm_ab(const float* A, int64_t sr, int64_t sl, const float* B, int L, float* C,
             bool accumulate) {
  for (int h = 0; h < D; h += NV * W) {
    vec c[MR][NV];
    for (int i = 0; i < MR; i++)
      for (int v = 0; v < NV; v++)
        c[i][v] = accumulate ? load(C + i * D + h + v * W) : zero();
    for (int l = 0; l < L; l++) {
      vec b[NV];
      for (int v = 0; v < NV; v++) b[v] = load(B + l * D + h + v * W);
      const float* a = A + l * sl;
      for (int i = 0; i < MR; i++) {
        const vec ai = set1(a[i * sr]);
        for (int v = 0; v < NV; v++) c[i][v] = fmadd(ai, b[v], c[i][v]);
      }
    }
    for (int i = 0; i < MR; i++)
      for (int v = 0; v < NV; v++) store(C + i * D + h + v * W, c[i][v]);
  }
}

// Row r of a sequence lies at base + off[r] (d <= D contiguous floats).
// Kt[D][np] = rows^T, zero in columns [n, np) and in rows [d, D). Blocks of W rows
// are transposed in registers; the last n % W rows element by element.
void pack_transposed(const float* base, const int64_t* off, int n, int np, int d, float* Kt) {
  for (int kk = 0; kk < D; kk++) std::fill(Kt + kk * np + n, Kt + (kk + 1) * np, 0.f);
  const int full = n / W * W;
  vec r[W];
  for (int j = 0; j < full; j += W) {
    for (int h = 0; h < D; h += W) {
      for (int x = 0; x < W; x++) r[x] = load_first(base + off[j + x] + h, d - h);
      transpose(r);
      for (int x = 0; x < W; x++) store(Kt + (h + x) * np + j, r[x]);
    }
  }
  for (int j = full; j < n; j++) {
    const float* row = base + off[j];
    for (int kk = 0; kk < D; kk++) Kt[kk * np + j] = kk < d ? row[kk] : 0.f;
  }
}

// dst[i][D] = mul * row i (d floats at base + off[i], zero-padded to D) for i < rows;
// zero for i in [rows, pad_rows).
void gather_rows(const float* base, const int64_t* off, int rows, int pad_rows, int d,
                 float mul, float* dst) {
  for (int i = 0; i < rows; i++) {
    const float* row = base + off[i];
    for (int x = 0; x < d; x++) dst[i * D + x] = row[x] * mul;
    std::fill(dst + i * D + d, dst + (i + 1) * D, 0.f);
  }
  std::fill(dst + rows * D, dst + pad_rows * D, 0.f);
}

// the first d floats of rows i < rows of src[i][D], times mul -> base + off[i].
void scatter_rows(const float* src, int rows, int d, float mul, float* base, const int64_t* off) {
  for (int i = 0; i < rows; i++) {
    float* row = base + off[i];
    for (int x = 0; x < d; x++) row[x] = src[i * D + x] * mul;
  }
}

// Rows of MR x np scores (log2 units) -> 2^(s - m), m the row max over the real
// columns [0, n) (given); columns >= n become exactly 0. Returns each row's sum.
void softmax_rows(float* S, int n, int np, const float* row_max, float* row_sum) {
  const int full = n / W * W;
  for (int i = 0; i < MR; i++) {
    float* s = S + static_cast<size_t>(i) * np;
    const vec mv = set1(row_max[i]);
    vec sum = zero();
    int j = 0;
    for (; j < full; j += W) {
      const vec e = exp2_ps(sub(load(s + j), mv));
      store(s + j, e);
      sum = add(sum, e);
    }
    for (; j < np; j += W) {  // the tail blocks: padded key columns are zeroed
      const vec e = maskz(key_mask(j, n), exp2_ps(sub(load(s + j), mv)));
      store(s + j, e);
      sum = add(sum, e);
    }
    row_sum[i] = reduce_add(sum);
  }
}

void check_inputs(const std::vector<torch::Tensor>& maps, const torch::Tensor& offsets, int64_t d) {
  TORCH_CHECK(d >= 1 && d <= D, "pale_mm attention_cpu: head dim must be in [1, ", D, "], got ", d);
  for (const auto& t : maps)
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() == maps[0].numel(),
                "pale_mm attention_cpu: expected contiguous float32 CPU tensors of one size");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.is_contiguous(),
              "pale_mm attention_cpu: offsets must be a contiguous (S, N) int64 tensor");
  if (offsets.numel()) {
    const int64_t lo = offsets.min().item<int64_t>(), hi = offsets.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi + d <= maps[0].numel(),
                "pale_mm attention_cpu: a row offset is out of range of the tensors");
  }
}

}  // namespace

// Attention within each sequence s of N rows; row r of sequence s of q, k, v and o
// lies at offsets[s][r] (head_dim <= 32 contiguous floats). Writes those rows of o
// and returns the row log-sum-exp (S, N).
torch::Tensor attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                torch::Tensor o, torch::Tensor offsets, double scale,
                                int64_t head_dim) {
  check_inputs({q, k, v, o}, offsets, head_dim);
  const int d = static_cast<int>(head_dim);
  const int64_t S = offsets.size(0);
  const int n = static_cast<int>(offsets.size(1));
  auto lse = torch::empty({S, n}, q.options());
  if (n == 0 || S == 0) return lse;
  const int np = round_up(n, W);
  const int chunks = (n + QCHUNK - 1) / QCHUNK;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* offp = offsets.data_ptr<int64_t>();
  float* op = o.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc2 = static_cast<float>(scale) * kLog2e;
  at::parallel_for(0, S * chunks, 1, [&](int64_t w0, int64_t w1) {
    const size_t npd = static_cast<size_t>(D) * np;
    std::vector<float> Kt(npd), V(npd), Sc(static_cast<size_t>(MR) * np);
    float Qs[MR * D], Ot[MR * D], mx[MR], sum[MR], inv[MR];
    int64_t packed = -1;
    for (int64_t w = w0; w < w1; w++) {
      const int64_t s = w / chunks;
      const int c = static_cast<int>(w % chunks);
      const int64_t* off = offp + s * n;
      if (s != packed) {
        pack_transposed(kp, off, n, np, d, Kt.data());
        gather_rows(vp, off, n, n, d, 1.f, V.data());
        packed = s;
      }
      const int r1 = std::min(n, (c + 1) * QCHUNK);
      for (int r0 = c * QCHUNK; r0 < r1; r0 += MR) {
        const int mr = std::min(MR, r1 - r0);
        gather_rows(qp, off + r0, mr, MR, d, sc2, Qs);  // scores in log2 units
        gemm_abt<true>(Qs, Kt.data(), np, np, Sc.data(), np, n, mx);
        softmax_rows(Sc.data(), n, np, mx, sum);
        gemm_ab(Sc.data(), np, 1, V.data(), n, Ot, false);
        for (int i = 0; i < mr; i++) {
          inv[i] = 1.f / sum[i];
          lp[s * n + r0 + i] = (mx[i] + std::log2(sum[i])) * kLn2;  // natural log
          float* row = op + off[r0 + i];
          for (int x = 0; x < d; x++) row[x] = Ot[i * D + x] * inv[i];
        }
      }
    }
  });
  return lse;
}

// Gradients of attention_forward: writes the rows named by offsets of dq, dk, dv.
void attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                        torch::Tensor v, torch::Tensor o, torch::Tensor lse,
                        torch::Tensor offsets, double scale, torch::Tensor dq, torch::Tensor dk,
                        torch::Tensor dv, int64_t head_dim) {
  check_inputs({grad_out, q, k, v, o, dq, dk, dv}, offsets, head_dim);
  const int d = static_cast<int>(head_dim);
  const int64_t S = offsets.size(0);
  const int n = static_cast<int>(offsets.size(1));
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == S && lse.size(1) == n,
              "pale_mm attention_cpu: lse must be a contiguous (S, N) tensor");
  if (n == 0 || S == 0) return;
  const int np = round_up(n, NP_BWD);
  const float* gp = grad_out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* op = o.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int64_t* offp = offsets.data_ptr<int64_t>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    const size_t npd = static_cast<size_t>(np) * D, blk = static_cast<size_t>(MB) * np;
    std::vector<float> Kt(npd), Vt(npd), K(npd), dK(npd), dV(npd), P(blk), dS(blk);
    std::vector<float> Qs(MB * D), G(MB * D), O(MB * D);
    float dQt[MR * D];
    for (int64_t s = s0; s < s1; s++) {
      const int64_t* off = offp + s * n;
      pack_transposed(kp, off, n, np, d, Kt.data());
      pack_transposed(vp, off, n, np, d, Vt.data());
      gather_rows(kp, off, n, n, d, 1.f, K.data());
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int r0 = 0; r0 < n; r0 += MB) {
        const int mb = std::min(MB, n - r0);
        const int mbp = round_up(mb, MR);
        gather_rows(qp, off + r0, mb, MB, d, sc, Qs.data());
        gather_rows(gp, off + r0, mb, MB, d, 1.f, G.data());
        gather_rows(op, off + r0, mb, MB, d, 1.f, O.data());
        for (int t = 0; t < mbp; t += MR) {
          float* Pt = P.data() + static_cast<size_t>(t) * np;
          float* dSt = dS.data() + static_cast<size_t>(t) * np;
          gemm_abt<false>(Qs.data() + t * D, Kt.data(), np, np, Pt, np);     // scores
          gemm_abt<false>(G.data() + t * D, Vt.data(), np, np, dSt, np);     // dP
          for (int i = 0; i < MR; i++) {
            float* p = Pt + static_cast<size_t>(i) * np;
            float* ds = dSt + static_cast<size_t>(i) * np;
            const int r = r0 + t + i;
            if (r >= n) {
              std::fill(p, p + np, 0.f);
              std::fill(ds, ds + np, 0.f);
              continue;
            }
            float delta = 0.f;
            for (int x = 0; x < D; x++) delta += G[(t + i) * D + x] * O[(t + i) * D + x];
            const vec l = set1(lp[s * n + r]), dl = set1(delta);
            for (int j = 0; j < np; j += W) {
              const vec e = maskz(key_mask(j, n), exp_ps(sub(load(p + j), l)));
              store(p + j, e);
              store(ds + j, mul(e, sub(load(ds + j), dl)));
            }
          }
          gemm_ab(dSt, np, 1, K.data(), n, dQt, false);
          scatter_rows(dQt, std::min(MR, n - r0 - t), d, sc, dqp, off + r0 + t);
        }
        for (int j = 0; j < np; j += MR) {
          gemm_ab(P.data() + j, 1, np, G.data(), mbp, dV.data() + static_cast<size_t>(j) * D, true);
          gemm_ab(dS.data() + j, 1, np, Qs.data(), mbp, dK.data() + static_cast<size_t>(j) * D, true);
        }
      }
      scatter_rows(dK.data(), n, d, 1.f, dkp, off);
      scatter_rows(dV.data(), n, d, 1.f, dvp, off);
    }
  });
}

// dwconv_cpu.cpp, built into the same extension
void dwconv3x3_nhwc(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                    std::vector<torch::Tensor> outs, bool residual);
void dwconv3x3_nhwc_backward(const torch::Tensor& x, const torch::Tensor& weight,
                             std::vector<torch::Tensor> grads, bool residual,
                             const std::optional<torch::Tensor>& grad_x_opt,
                             const std::optional<torch::Tensor>& grad_w_opt,
                             const std::optional<torch::Tensor>& grad_b_opt);
// gelu_cpu.cpp
void gelu_forward(const torch::Tensor& x, const torch::Tensor& out);
void gelu_backward(const torch::Tensor& h, const torch::Tensor& grad, const torch::Tensor& act);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv3x3", &dwconv3x3_nhwc,
        "depthwise 3x3 convs (stride 1, padding 1) of a channels-last fp32 map, T = 1 or 3 "
        "weight sets in one pass");
  m.def("dwconv3x3_backward", &dwconv3x3_nhwc_backward,
        "the backward of dwconv3x3: input, weight and bias gradients in one pass");
  m.def("gelu", &gelu_forward, "exact GELU of a contiguous fp32 tensor into out");
  m.def("gelu_backward", &gelu_backward,
        "act = gelu(h) and grad *= gelu'(h) (in place), in one pass");
  m.def("forward", &attention_forward, "fused attention forward over gathered rows (fp32, head dim <= 32)");
  m.def("backward", &attention_backward, "fused attention backward over gathered rows (fp32, head dim <= 32)");
}
