// Exact (erf) GELU of fp32 CPU tensors, and its backward with the activation
// recomputed, for the MLP's GeluLinear (pale_mm/ops/linear.py). Written once against
// simd.h's vector layer, built for AVX-512 and for AVX2 with the other kernels.
//
//   gelu(x)  = x * Phi(x),                 Phi(x) = (1 + erf(x / sqrt(2))) / 2,
//   gelu'(x) = Phi(x) + x * phi(x),        phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
//
// erf is the approximation PyTorch's own vectorised GELU uses on these CPUs
// (Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-z^2),
// t = 1 / (1 + p |z|), |error| < 1.5e-7), and the exp(-z^2) it needs is phi's as well,
// so the backward gets gelu(h) and gelu'(h) from one exp per element. One pass reads
// h and the gradient and writes the activation and, in place, the input gradient:
// PyTorch's gelu and gelu_backward would read h twice and write a fresh tensor each.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

namespace {

using namespace pale_simd;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Phi(x) and exp(-x^2 / 2) of the lanes of x.
inline void cdf_and_gauss(vec x, vec& cdf, vec& gauss) {
  const vec z = mul(x, set1(kInvSqrt2));
  const vec az = abs_ps(z);
  const vec t = div(set1(1.f), fmadd(set1(0.3275911f), az, set1(1.f)));
  vec r = fmadd(set1(1.061405429f), t, set1(-1.453152027f));
  r = fmadd(r, t, set1(1.421413741f));
  r = fmadd(r, t, set1(-0.284496736f));
  r = fmadd(r, t, set1(0.254829592f));
  gauss = exp_ps(mul(set1(-1.f), mul(z, z)));
  const vec erf_abs = sub(set1(1.f), mul(mul(r, t), gauss));  // erf(|z|)
  const vec erf = copy_sign(erf_abs, z);
  cdf = mul(set1(0.5f), add(set1(1.f), erf));
}

template <bool kFull>
inline void gelu_block(const float* x, float* y, int64_t i, int k) {
  const mask m = lanes_below(k);
  const vec xv = kFull ? load(x + i) : maskz_load(m, x + i);
  vec cdf, gauss;
  cdf_and_gauss(xv, cdf, gauss);
  const vec out = mul(xv, cdf);
  if (kFull)
    store(y + i, out);
  else
    mask_store(y + i, m, out);
}

template <bool kFull>
inline void gelu_backward_block(const float* h, float* g, float* a, int64_t i, int k) {
  const mask m = lanes_below(k);
  const vec xv = kFull ? load(h + i) : maskz_load(m, h + i);
  const vec gv = kFull ? load(g + i) : maskz_load(m, g + i);
  vec cdf, gauss;
  cdf_and_gauss(xv, cdf, gauss);
  const vec act = mul(xv, cdf);
  const vec grad = mul(gv, fmadd(mul(xv, gauss), set1(kInvSqrt2Pi), cdf));
  if (kFull) {
    store(a + i, act);
    store(g + i, grad);
  } else {
    mask_store(a + i, m, act);
    mask_store(g + i, m, grad);
  }
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu(),
              "pale_mm gelu: ", name, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// out = gelu(x) (exact, erf form); out is x itself (in place: each vector is read
// before it is written) or a tensor of x's size that does not overlap it.
void gelu_forward(const torch::Tensor& x, const torch::Tensor& out) {
  check(x, "x");
  check(out, "out");
  const auto* xb = static_cast<const char*>(x.data_ptr());
  const auto* ob = static_cast<const char*>(out.data_ptr());
  const int64_t bytes = x.numel() * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(out.numel() == x.numel() && (ob == xb || ob + bytes <= xb || xb + bytes <= ob),
              "pale_mm gelu: out must be x itself or a tensor of x's size that does not "
              "overlap it");
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) gelu_block<true>(xp, yp, i, W);
    if (i < i1) gelu_block<false>(xp, yp, i, static_cast<int>(i1 - i));
  });
}

// act = gelu(h); grad <- grad * gelu'(h), in place.
void gelu_backward(const torch::Tensor& h, const torch::Tensor& grad, const torch::Tensor& act) {
  check(h, "h");
  check(grad, "grad");
  check(act, "act");
  TORCH_CHECK(grad.numel() == h.numel() && act.numel() == h.numel(),
              "pale_mm gelu_backward: h, grad and act must have the same size");
  TORCH_CHECK(act.data_ptr() != h.data_ptr() && act.data_ptr() != grad.data_ptr() &&
                  grad.data_ptr() != h.data_ptr(),
              "pale_mm gelu_backward: h, grad and act must be three different tensors");
  const float* hp = h.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  at::parallel_for(0, h.numel(), 16384, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) gelu_backward_block<true>(hp, gp, ap, i, W);
    if (i < i1) gelu_backward_block<false>(hp, gp, ap, i, static_cast<int>(i1 - i));
  });
}
