// Depthwise 3x3 convolutions (stride 1, padding 1) on channels-last fp32 maps for the
// CPU, inference only; used by the Pale block (pale_mm/ops/dwconv.py). Written once
// against simd.h's vector layer and built for AVX-512 and for AVX2 (W = 16 or 8
// channels per vector; see pale_mm/ops/kernels.py).
//
// x is a contiguous (B, H, W, C) map. T weight sets (T = 1 or 3), stored (T, 3, 3, C),
// give T outputs of x's shape:
//   out[t][b, h, w, c] = bias[t][c] + sum_{i, j} x[b, h+i-1, w+j-1, c] * weight[t][i][j][c]
// (taps outside the map are zero), plus x[b, h, w, c] itself with `residual` (T = 1:
// the Pale block's x + CPE(x)). With T = 3 (PS-Attention's q, k and v convs over the
// same map) each input vector is loaded once for all three outputs. PyTorch's oneDNN
// depthwise conv reads and writes each map once per call, at a fraction of this
// machine's bandwidth at these sizes; this kernel keeps each channel block's weights
// in registers (AVX2's 16 registers hold them for T = 1; for T = 3 the compiler
// keeps some in L1, read by the FMAs) and runs one pass over the map for all T
// outputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using namespace pale_simd;

// One block of channels [c0, c0 + W) of rows [r0, r1); kFull: all W channels are
// real (plain loads and stores), else the first C - c0 (masked).
template <int T, bool kResidual, bool kFull>
inline void dwconv_block(const float* x, const float* wt, const float* bias, float* const* out,
                         int64_t H, int64_t Wd, int64_t C, int64_t r, int64_t c0) {
  const int64_t h = r % H;  // r = b * H + h
  const float* rows[3] = {h > 0 ? x + (r - 1) * Wd * C : nullptr, x + r * Wd * C,
                          h + 1 < H ? x + (r + 1) * Wd * C : nullptr};
  const mask m = lanes_below(static_cast<int>(std::min<int64_t>(C - c0, W)));
  auto ld = [&](const float* p) { return kFull ? load(p) : maskz_load(m, p); };
  vec wv[T][9], bv[T];
  for (int t = 0; t < T; t++) {
    for (int k = 0; k < 9; k++) wv[t][k] = ld(wt + (static_cast<int64_t>(t) * 9 + k) * C + c0);
    bv[t] = ld(bias + t * C + c0);
  }
  for (int64_t w = 0; w < Wd; w++) {
    vec acc[T];
    for (int t = 0; t < T; t++) acc[t] = bv[t];
    for (int i = 0; i < 3; i++) {
      if (!rows[i]) continue;
      const float* p = rows[i] + w * C + c0;
      for (int j = 0; j < 3; j++) {
        if ((j == 0 && w == 0) || (j == 2 && w + 1 == Wd)) continue;
        const vec xv = ld(p + (j - 1) * C);
        for (int t = 0; t < T; t++) acc[t] = fmadd(xv, wv[t][i * 3 + j], acc[t]);
      }
    }
    const int64_t o = (r * Wd + w) * C + c0;
    if (kResidual) acc[0] = add(acc[0], ld(x + o));
    for (int t = 0; t < T; t++) {
      if (kFull)
        store(out[t] + o, acc[t]);
      else
        mask_store(out[t] + o, m, acc[t]);
    }
  }
}

template <int T, bool kResidual>
void dwconv_rows(const float* x, const float* wt, const float* bias, float* const* out, int64_t H,
                 int64_t Wd, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W)
      dwconv_block<T, kResidual, true>(x, wt, bias, out, H, Wd, C, r, c0);
    if (c0 < C) dwconv_block<T, kResidual, false>(x, wt, bias, out, H, Wd, C, r, c0);
  }
}

}  // namespace

void dwconv3x3_nhwc(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                    std::vector<torch::Tensor> outs, bool residual) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == torch::kFloat &&
                  x.device().is_cpu(),
              "pale_mm dwconv3x3: x must be a contiguous float32 CPU (B, H, W, C) tensor");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int T = static_cast<int>(outs.size());
  TORCH_CHECK(T == 1 || T == 3, "pale_mm dwconv3x3: 1 or 3 outputs, got ", T);
  TORCH_CHECK(!residual || T == 1, "pale_mm dwconv3x3: the residual form has one output");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kFloat &&
                  weight.sizes() == torch::IntArrayRef({T, 3, 3, C}),
              "pale_mm dwconv3x3: weight must be a contiguous float32 (T, 3, 3, C) tensor");
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == torch::kFloat &&
                  bias.sizes() == torch::IntArrayRef({T, C}),
              "pale_mm dwconv3x3: bias must be a contiguous float32 (T, C) tensor");
  std::vector<float*> op(T);
  for (int t = 0; t < T; t++) {
    TORCH_CHECK(outs[t].is_contiguous() && outs[t].scalar_type() == torch::kFloat &&
                    outs[t].sizes() == x.sizes() && outs[t].data_ptr() != x.data_ptr(),
                "pale_mm dwconv3x3: each output must be a new contiguous float32 tensor of x's shape");
    op[t] = outs[t].data_ptr<float>();
  }
  if (x.numel() == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    if (T == 3)
      dwconv_rows<3, false>(xp, wp, bp, op.data(), H, W, C, r0, r1);
    else if (residual)
      dwconv_rows<1, true>(xp, wp, bp, op.data(), H, W, C, r0, r1);
    else
      dwconv_rows<1, false>(xp, wp, bp, op.data(), H, W, C, r0, r1);
  });
}
