// Fused fp32 softmax attention for the CPU at head dims up to 32 (AVX-512), forward
// and backward, used by PS-Attention (pale_mm/models/cpu_attention.py).
//
// Attention runs within sequences of N rows; row r of sequence s lies at element
// offset offsets[s][r] of the q, k, v and o tensors (head_dim contiguous floats; the
// tiles work at 32, a smaller head dim is zero-padded in the packed copies), so the
// pale groups are gathered from and scattered back to the (B, H, W, C) maps inside
// the kernel, without grouped copies. Each row of scores (N <= a few
// thousand for pale groups) is computed whole, so the softmax is exact per row
// (no online rescaling). Register tiles: 8 query rows x 32 key columns for the
// score GEMM (contraction over the head dim), 8 rows x 32 head channels for the
// value GEMM (contraction over keys); K is packed transposed per sequence with
// 16 x 16 register transposes. The forward scales q by scale * log2(e), so its
// scores are in log2 units and the softmax is 2^(s - max), the max taken in the
// score GEMM's epilogue. It returns o and the row log-sum-exp (natural log), which
// the backward uses to recompute the probabilities.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int D = 32;   // head dim of the register tiles; a real head dim d <= 32 is
                        // zero-padded to D in the packed copies (same scores and outputs)
constexpr int MR = 8;   // rows per register tile
constexpr int MB = 32;  // query rows per backward block (a multiple of MR)
constexpr int QCHUNK = 128;  // query rows per forward work item

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 2^x for finite x <= 0 (differences to a row maximum, in log2 units); |rel err|
// < 2.5e-7 (a degree-5 relative-error minimax fit of 2^f on [-0.5, 0.5], evaluated
// in fp32). No clamp is needed: for very negative x, f = x - round(x) stays in
// [-0.5, 0.5] and scalef underflows to 0.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.32765e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67554e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314697e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007f));
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// exp(x) for finite x <= 0.
inline __m512 exp_ps(__m512 x) { return exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e))); }

// Lanes of the 16-wide block at j that lie below n: the real keys (columns < n) of a
// block of score columns, or the real floats of a row of n floats.
inline __mmask16 key_mask(int j, int n) {
  return n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : n <= j ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// C[MR][ldc] = A[MR][D] (row stride D) x Bt[D][ldb], columns [0, np), np % 16 == 0.
// With kMax, also row_max[i] = max of row i of C over the columns [0, n), n > np - 16.
template <bool kMax>
void gemm_abt(const float* A, const float* Bt, int ldb, int np, float* C, int ldc,
              int n = 0, float* row_max = nullptr) {
  __m512 mx[MR];
  if (kMax)
    for (int i = 0; i < MR; i++) mx[i] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int j = 0;
  for (; j + 32 <= np; j += 32) {
    __m512 c0[MR], c1[MR];
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int kk = 0; kk < D; kk++) {
      const __m512 b0 = _mm512_loadu_ps(Bt + kk * ldb + j);
      const __m512 b1 = _mm512_loadu_ps(Bt + kk * ldb + j + 16);
      for (int i = 0; i < MR; i++) {
        const __m512 a = _mm512_set1_ps(A[i * D + kk]);
        c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
        c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
      }
    }
    for (int i = 0; i < MR; i++) {
      _mm512_storeu_ps(C + i * ldc + j, c0[i]);
      _mm512_storeu_ps(C + i * ldc + j + 16, c1[i]);
    }
    if (kMax) {
      const __mmask16 m0 = key_mask(j, n), m1 = key_mask(j + 16, n);
      for (int i = 0; i < MR; i++) {
        mx[i] = _mm512_mask_max_ps(mx[i], m0, mx[i], c0[i]);
        mx[i] = _mm512_mask_max_ps(mx[i], m1, mx[i], c1[i]);
      }
    }
  }
  for (; j < np; j += 16) {
    __m512 c0[MR];
    for (int i = 0; i < MR; i++) c0[i] = _mm512_setzero_ps();
    for (int kk = 0; kk < D; kk++) {
      const __m512 b0 = _mm512_loadu_ps(Bt + kk * ldb + j);
      for (int i = 0; i < MR; i++)
        c0[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * D + kk]), b0, c0[i]);
    }
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(C + i * ldc + j, c0[i]);
    if (kMax)
      for (int i = 0; i < MR; i++) mx[i] = _mm512_mask_max_ps(mx[i], key_mask(j, n), mx[i], c0[i]);
  }
  if (kMax)
    for (int i = 0; i < MR; i++) row_max[i] = _mm512_reduce_max_ps(mx[i]);
}

// C[MR][D] (= or +=) sum_l A[r*sr + l*sl] * B[l][0:D], l in [0, L).
void gemm_ab(const float* A, int64_t sr, int64_t sl, const float* B, int L, float* C,
             bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; i++) {
    c0[i] = accumulate ? _mm512_loadu_ps(C + i * D) : _mm512_setzero_ps();
    c1[i] = accumulate ? _mm512_loadu_ps(C + i * D + 16) : _mm512_setzero_ps();
  }
  for (int l = 0; l < L; l++) {
    const __m512 b0 = _mm512_loadu_ps(B + l * D);
    const __m512 b1 = _mm512_loadu_ps(B + l * D + 16);
    const float* a = A + l * sl;
    for (int i = 0; i < MR; i++) {
      const __m512 ai = _mm512_set1_ps(a[i * sr]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; i++) {
    _mm512_storeu_ps(C + i * D, c0[i]);
    _mm512_storeu_ps(C + i * D + 16, c1[i]);
  }
}

// In place: r[k] (row k of a 16 x 16 block) becomes column k of it.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; i++) {  // per 128-bit lane L: rows 2i, 2i+1 of columns 4L.. 4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; c++) {  // column 4L + c gathers lane L of u[c], u[4+c], u[8+c], u[12+c]
    const __m512 x = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 x2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
    const __m512 y2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_f32x4(x, y, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(x, y, 0xdd);
    r[8 + c] = _mm512_shuffle_f32x4(x2, y2, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(x2, y2, 0xdd);
  }
}

// Row r of a sequence lies at base + off[r] (d <= D contiguous floats).
// Kt[D][np] = rows^T, zero in columns [n, np) and in rows [d, D). Blocks of 16 rows
// are transposed in registers; the last n % 16 rows element by element.
void pack_transposed(const float* base, const int64_t* off, int n, int np, int d, float* Kt) {
  for (int kk = 0; kk < D; kk++) std::fill(Kt + kk * np + n, Kt + (kk + 1) * np, 0.f);
  const int full = n / 16 * 16;
  __m512 r[16];
  for (int j = 0; j < full; j += 16) {
    for (int h = 0; h < D; h += 16) {
      const __mmask16 m = key_mask(h, d);
      for (int x = 0; x < 16; x++) r[x] = _mm512_maskz_loadu_ps(m, base + off[j + x] + h);
      transpose16(r);
      for (int x = 0; x < 16; x++) _mm512_storeu_ps(Kt + (h + x) * np + j, r[x]);
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
  const int full = n / 16 * 16;
  for (int i = 0; i < MR; i++) {
    float* s = S + static_cast<size_t>(i) * np;
    const __m512 mv = _mm512_set1_ps(row_max[i]);
    __m512 sum = _mm512_setzero_ps();
    int j = 0;
    for (; j < full; j += 16) {
      const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < np) {  // the tail block: padded key columns are zeroed
      const __m512 e = _mm512_maskz_mov_ps(key_mask(j, n),
                                           exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    row_sum[i] = _mm512_reduce_add_ps(sum);
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
  const int np = round_up(n, 16);
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
  const int np = round_up(n, 16);
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
            const __m512 l = _mm512_set1_ps(lp[s * n + r]), dl = _mm512_set1_ps(delta);
            for (int j = 0; j < np; j += 16) {
              const __m512 e = _mm512_maskz_mov_ps(
                  key_mask(j, n), exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p + j), l)));
              _mm512_storeu_ps(p + j, e);
              _mm512_storeu_ps(ds + j, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(ds + j), dl)));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv3x3", &dwconv3x3_nhwc,
        "depthwise 3x3 convs (stride 1, padding 1) of a channels-last fp32 map, T = 1 or 3 "
        "weight sets in one pass (inference)");
  m.def("forward", &attention_forward, "fused attention forward over gathered rows (fp32, head dim <= 32)");
  m.def("backward", &attention_backward, "fused attention backward over gathered rows (fp32, head dim <= 32)");
}
