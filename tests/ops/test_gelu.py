"""The fused GELU kernel of the MLP's training path (``csrc/gelu_cpu.cpp``, through
:class:`pale_mm.ops.linear.GeluLinear`) against float64 ``F.gelu`` and its autograd,
for every build this CPU runs (``kernel_isa``: tests/ops/conftest.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pale_mm.models.layers import Mlp
from pale_mm.ops import kernels
from pale_mm.ops import linear as ops_linear
from pale_mm.ops.pale import mlp as mlp_fast
from tests.switches import switched_off
from tests.tolerances import fp_tol, module_scales

EPS = torch.finfo(torch.float32).eps
ERF_BOUND = 1.5e-7  # |error| of the erf approximation (Abramowitz & Stegun 7.1.26)
EXP_BOUND = 2.5e-7  # relative error of the kernels' exp (csrc/simd.h)


def _inputs(n, seed=0):
    """``n`` values: a sweep over [-12, 12] (both tails, where Phi is 0 or 1 in fp32)
    and normal draws."""
    g = torch.Generator().manual_seed(seed)
    sweep = torch.linspace(-12, 12, max(n // 2, 1))
    return torch.cat([sweep, 3 * torch.randn(n - sweep.numel(), generator=g)])


def _bound_forward(x):
    """|gelu error| <= x/2 * erf's error, plus fp32 rounding of the few ops after it."""
    x = x.double().abs()
    return 0.5 * x * ERF_BOUND + 8 * EPS * (x + 1e-30)


def _bound_backward(x, g):
    """gelu'(x) = Phi(x) + x phi(x): erf's error / 2, the exp's relative error on
    x phi(x) (<= 0.25), and rounding, times the incoming gradient."""
    x = x.double().abs()
    xphi = x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return g.double().abs() * (0.5 * ERF_BOUND + EXP_BOUND * xphi + 8 * EPS * (1 + xphi))


@pytest.mark.parametrize('n', [1, 7, 8, 15, 16, 17, 100, 40001])
def test_kernel_matches_float64_gelu(n, kernel_isa):
    """Sizes below, at and between the vector widths (8, 16), with a ragged last
    vector, and large enough to split over threads. Element-wise bounds from the erf
    approximation and fp32 rounding."""
    x = _inputs(n)
    out = torch.empty_like(x)
    kernels.load().gelu(x, out)
    want = F.gelu(x.double())
    assert ((out.double() - want).abs() <= _bound_forward(x)).all()
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    grad, act = g.clone(), torch.empty_like(x)
    kernels.load().gelu_backward(x, grad, act)
    xd = x.double().requires_grad_()
    F.gelu(xd).backward(g.double())
    assert ((grad.double() - xd.grad).abs() <= _bound_backward(x, g)).all()
    torch.testing.assert_close(act, out, rtol=0, atol=0)  # the same activation


@pytest.mark.parametrize('n', [1, 15, 17, 40001])
def test_kernel_in_place_equals_out_of_place(n, kernel_isa):
    """``gelu(x, x)`` (what :func:`linear` runs on oneDNN's output with the AVX2
    build) gives bit for bit the out-of-place result, ragged tail included; the
    neighbours of a slice are left alone."""
    x = _inputs(n, seed=3)
    want = torch.empty_like(x)
    kernels.load().gelu(x, want)
    buf = torch.cat([torch.full((3,), 7.), x, torch.full((3,), -7.)])
    inner = buf[3:3 + n]
    kernels.load().gelu(inner, inner)
    assert torch.equal(inner, want)
    assert (buf[:3] == 7).all() and (buf[-3:] == -7).all()


def test_kernel_propagates_nan(kernel_isa):
    x = torch.tensor([float('nan'), 1., -1., float('nan')] * 5)
    out = torch.empty_like(x)
    kernels.load().gelu(x, out)
    grad, act = torch.ones_like(x), torch.empty_like(x)
    kernels.load().gelu_backward(x, grad, act)
    for t in (out, grad, act):
        assert torch.equal(t.isnan(), x.isnan())


def test_kernel_refuses_bad_arguments(kernel_isa):
    ext, x = kernels.load(), torch.randn(10)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        ext.gelu(x.double(), torch.empty(10, dtype=torch.float64))
    buf = torch.randn(20)
    with pytest.raises(RuntimeError, match="does not overlap it"):
        ext.gelu(buf[:10], buf[5:15])  # overlapping, not the same
    with pytest.raises(RuntimeError, match="does not overlap it"):
        ext.gelu(buf[5:15], buf[:10])
    with pytest.raises(RuntimeError, match="does not overlap it"):
        ext.gelu(x, torch.empty(11))
    with pytest.raises(RuntimeError, match='three different tensors'):
        ext.gelu_backward(x, x, torch.empty_like(x))


def _mlp(dim=32, seed=0):
    torch.manual_seed(seed)
    return Mlp(dim, 4 * dim).train()


@pytest.mark.parametrize('shape', [(2, 5, 7, 32), (1, 33, 32)])
def test_training_mlp_uses_it_and_matches_f_gelu(shape, kernel_isa, monkeypatch):
    """The MLP's training fast path calls the kernel (forward, and backward once), and
    its output and gradients equal those of the same path on F.gelu: fp32 rounding of
    fc2's and fc1's sums (4C and C terms; weight gradients sum over the tokens)."""
    x = torch.randn(shape)
    results = []
    for fused in (False, True):
        m = _mlp(shape[-1])
        xi = x.clone().requires_grad_()
        calls = []
        if fused:
            ext = kernels.load()

            class Spy:
                def gelu(self, *a):
                    calls.append('gelu')
                    return ext.gelu(*a)

                def gelu_backward(self, *a):
                    calls.append('gelu_backward')
                    return ext.gelu_backward(*a)
            monkeypatch.setattr(ops_linear.kernels, 'load', lambda: Spy())
            out = mlp_fast(m, xi)
        else:
            with switched_off(ops_linear.set_fused_gelu):
                out = mlp_fast(m, xi)
        out.backward(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
        monkeypatch.undo()
        assert calls == (['gelu', 'gelu_backward'] if fused else [])
        results.append((out, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (want, want_gx, want_g), (got, got_gx, got_g) = results
    C = shape[-1]
    torch.testing.assert_close(got, want, **fp_tol(4 * C, depth=2, ref=want))
    torch.testing.assert_close(got_gx, want_gx, **fp_tol(4 * C, depth=3, ref=want_gx))
    scales = module_scales(want_g.items())
    tokens = x.numel() // C
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, msg=name,
                                   **fp_tol(max(tokens, 4 * C), depth=3, scale=scales[name]))


def test_where_it_is_not_used(kernel_build):
    h = torch.randn(4, 16)
    assert (ops_linear._gelu_kernels(h) is not None) == (kernel_build is not None)
    assert ops_linear._gelu_kernels(h.double()) is None                  # float64
    assert ops_linear._gelu_kernels(h.bfloat16()) is None                # bf16
    assert ops_linear._gelu_kernels(h.t()) is None                       # not contiguous
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert ops_linear._gelu_kernels(h) is None                       # autocast
    with switched_off(ops_linear.set_fused_gelu):
        assert ops_linear._gelu_kernels(h) is None                       # switched off
