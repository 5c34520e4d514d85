"""Tolerances for comparing two floating-point computations of the same quantity,
derived from the dtype and the size of the reductions instead of hand-tightened
numbers that happen to pass on one CPU.

Why these numbers. Two correct fp32 paths (oneDNN vs. ATen conv, channels-last vs.
contiguous weights, AVX2 vs. AVX-512 GEMM blocking, FMA vs. separate multiply-add,
a fused kernel vs. the reference) differ only in the order and grouping of the
roundings inside their reductions. A sum of K products computed in some order has a
rounding error of at most ``gamma_K = K*u/(1 - K*u)`` (u = eps/2) relative to the sum
of the absolute values of its terms (Higham, *Accuracy and Stability of Numerical
Algorithms*, sec. 3.1). That worst case is linear in K and is never reached in
practice: the individual roundings are close to independent and of random sign, so
the error behaves like a random walk and grows like ``sqrt(K) * u`` (Higham sec. 3.6;
this is also the model behind ``torch.testing``'s defaults). For terms of random
sign the result itself has magnitude ``sqrt(K) * |term|``, so relative to the
result's typical size (its RMS) the error is again about ``sqrt(K) * u``.

So for one reduction of size K the tolerance is ``c * sqrt(K) * eps`` with a safety
factor c that covers (a) both paths erring, in opposite directions (x2), (b) the
largest of many compared elements, a Gaussian tail at ~5 standard deviations for
up to ~10^6 elements (x5), and (c) the few ulps the non-reduction ops add (layer
norm, softmax, GELU; x1.5): c = 16. A network of L sequential layers adds L such
errors, which also pass through the following layers; counting them as
independent gives ``sqrt(L)``, and the layers' amplification (normalisations
divide by small standard deviations) is what ``depth`` is for. ``depth`` counts the
reductions in sequence, so the tolerance is ``16 * eps * sqrt(K * depth)``.

Relative tolerance alone fails where the result is near zero by cancellation (a
weight gradient, a difference of two branches): the error is relative to the size
of the terms, not of the result. The absolute tolerance is therefore the same
factor times the *typical* size of the compared values, the RMS of the expected
tensor (``ref``), or 1 when the values are of unit scale (after a LayerNorm). Where
a whole tensor is cancellation residue, zero in exact arithmetic (the gradient of a
LayerNorm's weight when a BatchNorm follows, which cancels any per-channel scale;
the gradient of a plain sum of LayerNorm outputs), its own RMS is rounding noise and
says nothing about the terms: pass ``scale``, the size of the terms, e.g. the RMS of
the gradients of the other parameters of the same module.

For fp32 and K = 256, depth 4 this gives 6e-5, orders of magnitude below what a
real bug (a wrong mask, a missing term, a transposed weight) produces (>= 1e-3
relative) and far above the 1e-6-level differences between CPU kernels.
Use ``rtol=0, atol=0`` where a test claims bit-identical results (same kernel, same
order), and float64 references where the reference itself must be exact.
"""
import math

import torch

SAFETY = 16.0


def fp_tol(reduction_size, *, depth=1, ref=None, scale=None, dtype=torch.float32,
           safety=SAFETY):
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close`` comparing two
    computations in ``dtype`` whose longest reductions sum ``reduction_size`` terms
    (a GEMM's K, a conv's ``C_in * kh * kw``, a weight gradient's ``N * H * W``),
    ``depth`` of them in sequence. The absolute tolerance is relative to ``scale``,
    else to the RMS of ``ref`` (the expected tensor), else to 1."""
    if reduction_size < 1 or depth < 1:
        raise ValueError(f'reduction_size and depth must be >= 1, got {reduction_size}, {depth}')
    rtol = safety * torch.finfo(dtype).eps * math.sqrt(reduction_size * depth)
    if scale is None:
        scale = rms(ref) if ref is not None else 1.0
    return dict(rtol=rtol, atol=rtol * (scale if scale > 0 else 1.0))


def rms(t) -> float:
    """Root mean square of a tensor (0 for an empty one), in float64."""
    t = t.detach().double()
    return float(t.pow(2).mean().sqrt()) if t.numel() else 0.0


def module_scales(named_tensors):
    """``{name: scale}`` for a model's named gradients (or other per-parameter
    tensors): the largest RMS among the tensors of the same module (``a.b.weight``
    and ``a.b.bias`` share ``a.b``). The scale for gradients that are zero in exact
    arithmetic, e.g. a LayerNorm weight followed by a BatchNorm."""
    named = [(n, t) for n, t in named_tensors]
    per_module = {}
    for n, t in named:
        m = n.rsplit('.', 1)[0]
        per_module[m] = max(per_module.get(m, 0.), rms(t))
    return {n: per_module[n.rsplit('.', 1)[0]] for n, _ in named}


def fp32_tol(reduction_size, *, depth=1, ref=None, scale=None, safety=SAFETY):
    """:func:`fp_tol` for float32."""
    return fp_tol(reduction_size, depth=depth, ref=ref, scale=scale, dtype=torch.float32,
                  safety=safety)


def assert_close_fp(actual, expected, reduction_size, *, depth=1, scale=None, msg=None,
                    safety=SAFETY):
    """``torch.testing.assert_close`` with :func:`fp_tol` for ``expected``'s dtype and
    scale (or the given ``scale``). On failure the message also names the tolerance."""
    tol = fp_tol(reduction_size, depth=depth, ref=expected, scale=scale,
                 dtype=expected.dtype, safety=safety)
    prefix = f'{msg}: ' if msg else ''
    torch.testing.assert_close(
        actual, expected,
        msg=lambda m: f'{prefix}{m}\n(fp tolerance for K={reduction_size}, depth={depth}: '
                      f'rtol={tol["rtol"]:.2e}, atol={tol["atol"]:.2e})', **tol)
