"""oneDNN's linear for fp32 CPU inference, and the MLP's GELU recomputed in the
backward (on fp32 CPU tensors by the fused kernel of ``csrc/gelu_cpu.cpp``): speed
paths of :mod:`pale_mm.ops` (see :mod:`.pale` for where they are used).
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import fast_paths_enabled, is_tracing, kernels

__all__ = ['linear', 'set_fast_cpu_linear', 'set_fused_gelu', 'set_blas_on_avx2', 'GeluLinear',
           'autocast_on', 'needs_grad']


def _find_onednn_linear(overload: str):
    """``mkldnn::_linear_pointwise.<overload>``, or ``None`` on builds without it."""
    try:
        return getattr(torch.ops.mkldnn._linear_pointwise, overload)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear('default')
_ONEDNN_LINEAR_ADD = _find_onednn_linear('binary')  # with a binary post-op ('add')
_fast_cpu_linear = [True]
_fused_gelu = [True]
_blas_on_avx2 = [True]
# the smallest in and out features for which the AVX2 path keeps the BLAS's GEMM
BLAS_MIN_FEATURES = 256


def set_fast_cpu_linear(enabled: bool) -> bool:
    """Turn the oneDNN inference path of :func:`linear` on or off; returns the
    previous setting (used by the benchmark to show its effect)."""
    previous = _fast_cpu_linear[0]
    _fast_cpu_linear[0] = bool(enabled)
    return previous


def set_fused_gelu(enabled: bool) -> bool:
    """Turn the fused GELU kernel on or off (:class:`GeluLinear`'s training path, and
    :func:`linear`'s GELU at inference with the AVX2 build); returns the previous
    setting."""
    previous = _fused_gelu[0]
    _fused_gelu[0] = bool(enabled)
    return previous


def set_blas_on_avx2(enabled: bool) -> bool:
    """Turn off (or back on) :func:`linear`'s use of the BLAS's GEMM instead of
    oneDNN's for wide layers at fp32 inference where PyTorch runs at AVX2
    (:func:`_blas_is_faster`); returns the previous setting."""
    previous = _blas_on_avx2[0]
    _blas_on_avx2[0] = bool(enabled)
    return previous


def _blas_is_faster(in_features: int, out_features: int) -> bool:
    """Whether :func:`linear` at fp32 inference keeps ``F.linear``'s GEMM (the BLAS
    of the torch build: MKL in the pip wheels) rather than oneDNN's: where PyTorch
    runs at AVX2, for layers at least :data:`BLAS_MIN_FEATURES` wide on both sides.
    On an AVX2-only AMD EPYC (Zen 2) MKL's GEMM was the faster one there
    (1024x256x256: 152 against 144 GFLOP/s; 3800x256x256: 154 against 129), and
    oneDNN's for narrower layers (16384x64x64: 158 against 139), so taking the BLAS
    for the wide ones made Pale-T's forward 2-4% faster at 512x512 and 800x1216
    (docs/performance.md). On AVX-512 CPUs oneDNN's linear stays for every width:
    this has not been measured there, and on AMD CPUs MKL runs at AVX2 only."""
    return (_blas_on_avx2[0] and in_features >= BLAS_MIN_FEATURES
            and out_features >= BLAS_MIN_FEATURES and kernels.torch_capability() == 'AVX2')


def autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's linear serves fp32 CPU tensors outside autocast, tracing (the FLOP
    counter traces ``aten::linear``) and torch.compile (inductor picks its own kernels)."""
    if is_tracing():  # first: the checks below would break the graph
        return False
    return (_fast_cpu_linear[0] and _ONEDNN_LINEAR is not None and x.device.type == 'cpu'
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not autocast_on())


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, gelu: bool = False,
           residual=None):
    """``F.linear`` (then exact GELU when ``gelu``) on the last dim of ``x``; with a
    ``residual`` (shaped like the output), ``residual + out``.

    At fp32 CPU inference it runs oneDNN's linear (``mkldnn::_linear_pointwise``,
    what inductor uses on CPU) with the GELU, or the residual add, fused as a
    post-op: one pass less over the output, and on some CPUs (an AMD EPYC with
    AVX-512, where MKL runs at AVX2 only) oneDNN's GEMM is markedly faster than the
    BLAS behind ``F.linear``. With the AVX2 build of the CPU kernels the GELU is the
    fused kernel's instead, in place after the GEMM (:func:`_gelu_after_gemm`).
    Where PyTorch runs at AVX2, layers at least :data:`BLAS_MIN_FEATURES` wide on
    both sides keep ``F.linear``'s GEMM instead, with the GELU kernel in place after
    it and the residual added in place (:func:`_blas_is_faster`;
    :func:`set_blas_on_avx2` turns that off). With autograd, autocast,
    tracing or on other devices it is ``F.linear`` (+ ``F.gelu``, + ``residual``).
    :func:`set_fast_cpu_linear` turns it off."""
    inference = not needs_grad(x, weight, bias, residual) and _onednn_ok(x, weight)
    blas = inference and _blas_is_faster(weight.shape[1], weight.shape[0])
    if inference and not blas:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        shape = (*x.shape[:-1], weight.shape[0])
        if residual is not None and not gelu and _ONEDNN_LINEAR_ADD is not None \
                and residual.shape == shape and residual.dtype == x.dtype:
            out = _ONEDNN_LINEAR_ADD(x2, residual.reshape(x2.shape[0], -1).contiguous(),
                                     weight.contiguous(), bias, 'add')
            return out.view(shape)
        gelu_ext = _gelu_after_gemm(x2) if gelu else None
        out = _ONEDNN_LINEAR(x2, weight.contiguous(), bias,
                             'gelu' if gelu and gelu_ext is None else 'none', [], 'none')
        if gelu_ext is not None:
            gelu_ext.gelu(out, out)  # in place: the GEMM's output is a new tensor
        out = out.view(shape)
    else:
        out = F.linear(x, weight, bias)
        # with the BLAS's GEMM at inference: the GELU kernel in place on the new output
        gelu_ext = _gelu_kernels(out) if gelu and blas else None
        if gelu_ext is not None:
            gelu_ext.gelu(out, out)
        elif gelu:
            out = F.gelu(out)
        if blas and residual is not None and residual.shape == out.shape \
                and residual.dtype == out.dtype:
            return out.add_(residual)  # the same sums as residual + out
    return out if residual is None else residual + out


def _gelu_kernels(h: torch.Tensor):
    """The CPU kernels' extension where its GELU serves ``h`` (a contiguous fp32 CPU
    tensor, outside autocast, a build for this CPU), else ``None``."""
    if not (_fused_gelu[0] and fast_paths_enabled() and h.device.type == 'cpu'
            and h.dtype == torch.float32 and h.is_contiguous() and not autocast_on()):
        return None
    return kernels.load()


def _gelu_after_gemm(x2: torch.Tensor):
    """The kernels' extension where :func:`linear`'s GELU at inference is the fused
    kernel, run in place on oneDNN's output, instead of oneDNN's GELU post-op: with
    the AVX2 build, where :func:`_gelu_kernels` serves the GEMM's output (a new
    contiguous tensor of ``x2``'s dtype and device, so ``x2`` is asked in its place).
    oneDNN's AVX2 erf-GELU post-op is slow: on an AVX2-only AMD EPYC (Zen 2) it added
    1.3 ms to a 1024x256x1024 linear (4.1 ms), the kernel 0.46 ms, and Pale-T's
    forward ran 4.8% (512x512) and 2.7% (800x1216) faster with it
    (docs/performance.md). With the AVX-512 build oneDNN's post-op stays: the kernel
    has not been measured against it on an AVX-512 CPU. ``None`` elsewhere."""
    return _gelu_kernels(x2) if kernels.cpu_isa() == 'avx2' else None


def _gelu(h: torch.Tensor) -> torch.Tensor:
    ext = _gelu_kernels(h)
    if ext is None:
        return F.gelu(h)
    out = torch.empty_like(h)
    ext.gelu(h, out)
    return out


class GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` that saves ``h`` but not ``gelu(h)``:
    the backward recomputes the activation (one elementwise op) instead of keeping
    a second hidden-width tensor alive per block. Under autocast the weight is cast
    like ``F.linear`` does. On fp32 CPU tensors the GELU is the fused kernel's
    (``csrc/gelu_cpu.cpp``: the erf approximation of PyTorch's own vectorised GELU),
    and the backward gets the activation and the input gradient from one pass over
    ``h``; elsewhere the gradients are the same ops as autograd's."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gelu(h), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = grad_w = grad_b = None
        a = None
        if ctx.needs_input_grad[0]:
            grad_a = g.mm(weight.to(g.dtype)).view(h.shape).to(h.dtype)
            ext = _gelu_kernels(h)
            if ext is not None and grad_a.is_contiguous():
                a = torch.empty_like(h)
                ext.gelu_backward(h, grad_a, a)  # grad_a becomes the input gradient
                grad_h = grad_a
            else:
                grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        if ctx.needs_input_grad[1]:
            a = _gelu(h) if a is None else a
            grad_w = g.t().mm(a.reshape(-1, h.shape[-1]).to(g.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_h, grad_w, grad_b
