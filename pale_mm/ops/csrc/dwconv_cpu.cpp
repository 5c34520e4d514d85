// Depthwise 3x3 convolutions (stride 1, padding 1) on channels-last fp32 maps for the
// CPU, forward and backward; used by the Pale block (pale_mm/ops/dwconv.py). Written once
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
#include <optional>
#include <vector>

#include "simd.h"

namespace {

using namespace pale_simd;

// Rows h - 1, h and h + 1 of the map x around row r = b * H + h, as pointers
// (nullptr for a row outside the map: its taps are zero).
struct InputRows {
  const float* row[3];
  InputRows(const float* x, int64_t r, int64_t H, int64_t Wd, int64_t C)
      : row{r % H > 0 ? x + (r - 1) * Wd * C : nullptr, x + r * Wd * C,
            r % H + 1 < H ? x + (r + 1) * Wd * C : nullptr} {}
  const float* operator[](int i) const { return row[i]; }
};

// One block of channels [c0, c0 + W) of rows [r0, r1); kFull: all W channels are
// real (plain loads and stores), else the first C - c0 (masked).
template <int T, bool kResidual, bool kFull>
inline void dwconv_block(const float* x, const float* wt, const float* bias, float* const* out,
                         int64_t H, int64_t Wd, int64_t C, int64_t r, int64_t c0) {
  const InputRows rows(x, r, H, Wd, C);
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

// The backward of T such convs of one map x (with `residual`: of x + conv(x)), given
// the gradients g[t] of their outputs:
//   grad_x[b, h, w, c] = sum_t sum_{i, j} g[t][b, h+1-i, w+1-j, c] * weight[t][i][j][c]
//                        (+ g[0][b, h, w, c] with `residual`),
//   grad_w[t][i][j][c] = sum_{b, h, w} x[b, h+i-1, w+j-1, c] * g[t][b, h, w, c],
//   grad_b[t][c]       = sum_{b, h, w} g[t][b, h, w, c]
// (taps outside the map are zero). grad_x is a forward conv of the g[t] with the
// kernels flipped, summed over t in registers; the weight and bias gradients of a
// row are summed in registers over its width, then into per-thread partial sums.

// grad_x of channels [c0, c0 + W) of row r.
template <int T, bool kResidual, bool kFull>
inline void dgrad_block(const float* const* g, const float* wt, float* gx, int64_t H, int64_t Wd,
                        int64_t C, int64_t r, int64_t c0) {
  const int64_t h = r % H;
  const mask m = lanes_below(static_cast<int>(std::min<int64_t>(C - c0, W)));
  auto ld = [&](const float* p) { return kFull ? load(p) : maskz_load(m, p); };
  // tap i reads row h + 1 - i
  const bool row_ok[3] = {h + 1 < H, true, h > 0};
  vec wv[T][9];
  for (int t = 0; t < T; t++)
    for (int k = 0; k < 9; k++) wv[t][k] = ld(wt + (static_cast<int64_t>(t) * 9 + k) * C + c0);
  for (int64_t w = 0; w < Wd; w++) {
    const int64_t o = (r * Wd + w) * C + c0;
    vec acc = kResidual ? ld(g[0] + o) : zero();
    for (int i = 0; i < 3; i++) {
      if (!row_ok[i]) continue;
      for (int j = 0; j < 3; j++) {  // tap j reads column w + 1 - j
        if ((j == 0 && w + 1 == Wd) || (j == 2 && w == 0)) continue;
        const int64_t src = o + ((1 - i) * Wd + (1 - j)) * C;
        for (int t = 0; t < T; t++) acc = fmadd(ld(g[t] + src), wv[t][i * 3 + j], acc);
      }
    }
    if (kFull)
      store(gx + o, acc);
    else
      mask_store(gx + o, m, acc);
  }
}

// Adds row r's terms of grad_w and grad_b of one conv (gradient map g) to the partial
// sums pw ((3, 3, C)) and pb ((C,)), channels [c0, c0 + W).
template <bool kFull>
inline void wgrad_block(const float* x, const float* g, float* pw, float* pb, int64_t H, int64_t Wd,
                        int64_t C, int64_t r, int64_t c0) {
  const InputRows rows(x, r, H, Wd, C);
  const mask m = lanes_below(static_cast<int>(std::min<int64_t>(C - c0, W)));
  auto ld = [&](const float* p) { return kFull ? load(p) : maskz_load(m, p); };
  vec aw[9], ab = zero();
  for (int k = 0; k < 9; k++) aw[k] = zero();
  for (int64_t w = 0; w < Wd; w++) {
    const vec gv = ld(g + (r * Wd + w) * C + c0);
    ab = add(ab, gv);
    for (int i = 0; i < 3; i++) {
      if (!rows[i]) continue;
      const float* p = rows[i] + w * C + c0;
      for (int j = 0; j < 3; j++) {
        if ((j == 0 && w == 0) || (j == 2 && w + 1 == Wd)) continue;
        aw[i * 3 + j] = fmadd(ld(p + (j - 1) * C), gv, aw[i * 3 + j]);
      }
    }
  }
  auto acc = [&](float* p, vec v) {
    if (kFull)
      store(p, add(load(p), v));
    else
      mask_store(p, m, add(maskz_load(m, p), v));
  };
  for (int k = 0; k < 9; k++) acc(pw + k * C + c0, aw[k]);
  acc(pb + c0, ab);
}

template <int T, bool kResidual>
void dwconv_backward_rows(const float* x, const float* const* g, const float* wt, float* gx,
                          float* pw, float* pb, int64_t H, int64_t Wd, int64_t C, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) {
      if (gx) dgrad_block<T, kResidual, true>(g, wt, gx, H, Wd, C, r, c0);
      if (pw)
        for (int t = 0; t < T; t++)
          wgrad_block<true>(x, g[t], pw + t * 9 * C, pb + t * C, H, Wd, C, r, c0);
    }
    if (c0 < C) {
      if (gx) dgrad_block<T, kResidual, false>(g, wt, gx, H, Wd, C, r, c0);
      if (pw)
        for (int t = 0; t < T; t++)
          wgrad_block<false>(x, g[t], pw + t * 9 * C, pb + t * C, H, Wd, C, r, c0);
    }
  }
}

// The checks both entry points (`fn`) make: x a contiguous float32 CPU (B, H, W, C)
// map, T = 1 or 3 weight sets (one per output, or per output gradient: `what`), the
// residual form only with T = 1, and weight a contiguous float32 (T, 3, 3, C) tensor.
void check_map_and_weights(const char* fn, const torch::Tensor& x, const torch::Tensor& weight,
                           int T, const char* what, bool residual) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == torch::kFloat &&
                  x.device().is_cpu(),
              "pale_mm ", fn, ": x must be a contiguous float32 CPU (B, H, W, C) tensor");
  TORCH_CHECK(T == 1 || T == 3, "pale_mm ", fn, ": 1 or 3 ", what, ", got ", T);
  TORCH_CHECK(!residual || T == 1, "pale_mm ", fn, ": the residual form has one output");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kFloat &&
                  weight.sizes() == torch::IntArrayRef({T, 3, 3, x.size(3)}),
              "pale_mm ", fn, ": weight must be a contiguous float32 (T, 3, 3, C) tensor");
}

}  // namespace

void dwconv3x3_nhwc(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                    std::vector<torch::Tensor> outs, bool residual) {
  const int T = static_cast<int>(outs.size());
  check_map_and_weights("dwconv3x3", x, weight, T, "outputs", residual);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
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

// grads: T contiguous gradients of the outputs (x's shape); grad_x: a new tensor of
// x's shape, or None when not needed; grad_w ((T, 3, 3, C)) and grad_b ((T, C)):
// both given (overwritten) or both None.
void dwconv3x3_nhwc_backward(const torch::Tensor& x, const torch::Tensor& weight,
                             std::vector<torch::Tensor> grads, bool residual,
                             const std::optional<torch::Tensor>& grad_x_opt,
                             const std::optional<torch::Tensor>& grad_w_opt,
                             const std::optional<torch::Tensor>& grad_b_opt) {
  const int T = static_cast<int>(grads.size());
  check_map_and_weights("dwconv3x3_backward", x, weight, T, "gradients", residual);
  const torch::Tensor grad_x = grad_x_opt.value_or(torch::Tensor());
  const torch::Tensor grad_w = grad_w_opt.value_or(torch::Tensor());
  const torch::Tensor grad_b = grad_b_opt.value_or(torch::Tensor());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  std::vector<const float*> gp(T);
  for (int t = 0; t < T; t++) {
    TORCH_CHECK(grads[t].is_contiguous() && grads[t].scalar_type() == torch::kFloat &&
                    grads[t].sizes() == x.sizes(),
                "pale_mm dwconv3x3_backward: each gradient must be a contiguous float32 tensor "
                "of x's shape");
    gp[t] = grads[t].data_ptr<float>();
  }
  float* gxp = nullptr;
  if (grad_x.defined()) {
    TORCH_CHECK(grad_x.is_contiguous() && grad_x.scalar_type() == torch::kFloat &&
                    grad_x.sizes() == x.sizes(),
                "pale_mm dwconv3x3_backward: grad_x must be a contiguous float32 tensor of x's shape");
    for (int t = 0; t < T; t++)
      TORCH_CHECK(grad_x.data_ptr() != grads[t].data_ptr(),
                  "pale_mm dwconv3x3_backward: grad_x must not be one of the gradients");
    gxp = grad_x.data_ptr<float>();
  }
  TORCH_CHECK(grad_w.defined() == grad_b.defined(),
              "pale_mm dwconv3x3_backward: grad_w and grad_b are both given or neither");
  if (grad_w.defined()) {
    TORCH_CHECK(grad_w.is_contiguous() && grad_w.scalar_type() == torch::kFloat &&
                    grad_w.sizes() == weight.sizes() && grad_b.is_contiguous() &&
                    grad_b.scalar_type() == torch::kFloat &&
                    grad_b.sizes() == torch::IntArrayRef({T, C}),
                "pale_mm dwconv3x3_backward: grad_w must be a contiguous float32 (T, 3, 3, C) "
                "tensor and grad_b a (T, C) one");
    grad_w.zero_();
    grad_b.zero_();
  }
  if (x.numel() == 0) return;
  const bool wgrad = grad_w.defined();
  const int threads = at::get_num_threads();
  // per-thread partial sums of grad_w and grad_b: T * 10 * C floats each
  std::vector<float> partial(wgrad ? static_cast<size_t>(threads) * T * 10 * C : 0, 0.f);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    float* pw = nullptr;
    float* pb = nullptr;
    if (wgrad) {
      pw = partial.data() + static_cast<size_t>(at::get_thread_num()) * T * 10 * C;
      pb = pw + T * 9 * C;
    }
    if (T == 3)
      dwconv_backward_rows<3, false>(xp, gp.data(), wp, gxp, pw, pb, H, W, C, r0, r1);
    else if (residual)
      dwconv_backward_rows<1, true>(xp, gp.data(), wp, gxp, pw, pb, H, W, C, r0, r1);
    else
      dwconv_backward_rows<1, false>(xp, gp.data(), wp, gxp, pw, pb, H, W, C, r0, r1);
  });
  if (wgrad) {
    float* gw = grad_w.data_ptr<float>();
    float* gb = grad_b.data_ptr<float>();
    for (int p = 0; p < threads; p++) {
      const float* pw = partial.data() + static_cast<size_t>(p) * T * 10 * C;
      for (int64_t k = 0; k < T * 9 * C; k++) gw[k] += pw[k];
      for (int64_t k = 0; k < T * C; k++) gb[k] += pw[T * 9 * C + k];
    }
  }
}
