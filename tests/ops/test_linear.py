"""The MLP's fast path (pale_mm.ops.pale.mlp: GELU recomputed in the backward,
oneDNN at inference) gives the reference forward's results; the oneDNN inference
linear matches F.linear and is used only where it may be."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pale_mm.models.layers import Mlp
from pale_mm.ops import fast_path, set_fast_paths
from pale_mm.ops import linear as fast_linear
from pale_mm.ops.pale import mlp as fast_mlp
from tests.switches import switched_off
from tests.tolerances import fp_tol


def _plain(m, x):
    return m.fc2(F.gelu(m.fc1(x)))


def _grads(m, x, fn, g):
    x = x.detach().clone().requires_grad_()
    out = fn(m, x)
    return [out] + list(torch.autograd.grad(out.float(), [x] + list(m.parameters()), g))


@pytest.mark.parametrize('amp', [False, True])
def test_mlp_recompute_equals_autograd(amp):
    """Bit for bit, with PyTorch's GELU (the fused fp32 CPU GELU, which rounds
    differently, is compared with it in tests/ops/test_gelu.py)."""
    torch.manual_seed(0)
    m = Mlp(16, 64)
    x = torch.randn(2, 5, 7, 16)
    g = torch.randn(2, 5, 7, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp), \
            switched_off(fast_linear.set_fused_gelu):
        assert fast_path(m, x) is not None
        got = _grads(m, x, lambda m, x: m(x), g)
        want = _grads(m, x, _plain, g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mlp_gradcheck():
    m = Mlp(4, 8).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


def _saved_numel(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_mlp_does_not_keep_the_activation():
    """The fc1 output is kept, the GELU output is not: one hidden-width tensor less."""
    m = Mlp(16, 64)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    hidden = 8 * 8 * 64
    plain = _saved_numel(lambda: _plain(m, x))
    fused = _saved_numel(lambda: m(x))
    assert plain - fused == hidden
    with switched_off(set_fast_paths):  # the reference keeps it
        assert _saved_numel(lambda: m(x)) == plain
    # dropout needs the standard path (its masks); it is still taken there
    m_drop = copy.deepcopy(m)
    m_drop.drop.p = 0.1
    assert _saved_numel(lambda: m_drop(x)) > plain


# ------------------------------------------------------------------ oneDNN inference linear
onednn = pytest.mark.skipif(
    fast_linear._ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available(),
    reason='this torch build has no mkldnn::_linear_pointwise')


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = fast_linear._ONEDNN_LINEAR

    def counting(*args):
        calls.append(args[3])
        return real(*args)
    monkeypatch.setattr(fast_linear, '_ONEDNN_LINEAR', counting)
    return calls


@pytest.fixture
def gelu_kernel_calls(monkeypatch):
    """The fused GELU kernel's calls through :mod:`pale_mm.ops.linear`, as (in place?)."""
    calls = []
    load = fast_linear.kernels.load

    class Spy:
        def __getattr__(self, name):
            return getattr(load(), name)

        def gelu(self, x, out):
            calls.append(x.data_ptr() == out.data_ptr())
            return load().gelu(x, out)
    monkeypatch.setattr(fast_linear.kernels, 'load', lambda: Spy() if load() else None)
    return calls


@onednn
@pytest.mark.parametrize('gelu', [False, True])
def test_linear_fast_path_matches_f_linear(onednn_calls, gelu_kernel_calls, kernel_build, gelu):
    """oneDNN's linear, with its GELU post-op, or with the AVX2 build of the CPU
    kernels the fused GELU kernel in place after it; against float64, within fp32
    rounding of the 48-term dot products."""
    x = torch.randn(2, 9, 11, 48)
    w, b = torch.randn(80, 48), torch.randn(80)
    want = F.linear(x.double(), w.double(), b.double())
    want = F.gelu(want) if gelu else want
    got = fast_linear.linear(x, w, b, gelu=gelu)
    kernel_gelu = gelu and kernel_build == 'avx2'
    assert onednn_calls == ['gelu' if gelu and not kernel_gelu else 'none']
    assert gelu_kernel_calls == ([True] if kernel_gelu else [])
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **fp_tol(48, ref=want))
    if gelu:  # the switch gives oneDNN's post-op back
        with switched_off(fast_linear.set_fused_gelu):
            again = fast_linear.linear(x, w, b, gelu=True)
        assert onednn_calls[-1] == 'gelu' and len(gelu_kernel_calls) == int(kernel_gelu)
        torch.testing.assert_close(again.double(), want, **fp_tol(48, ref=want))
    # strided input (a channel slice) and no bias
    xs = torch.randn(2, 9, 11, 96)[..., ::2]
    want = F.linear(xs.double(), w.double())
    torch.testing.assert_close(fast_linear.linear(xs, w).double(), want, **fp_tol(48, ref=want))


@onednn
def test_linear_fast_path_only_for_fp32_cpu_inference(onednn_calls):
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4)
    fast_linear.linear(x, w).sum().backward()                     # autograd: F.linear
    assert w.grad is not None
    with torch.no_grad():
        fast_linear.linear(x.double(), w.double())                # float64
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert fast_linear.linear(x, w).dtype == torch.bfloat16  # autocast keeps its rules
        wd = w.detach()
        # the FLOP counter traces
        torch.jit.trace(lambda t: fast_linear.linear(t, wd), (x,), check_trace=False)
        with switched_off(fast_linear.set_fast_cpu_linear):
            torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), rtol=0, atol=0)
    assert onednn_calls == []
    with torch.no_grad():
        fast_linear.linear(x, w)
    assert onednn_calls == ['none']


@onednn
def test_backbone_inference_same_with_and_without_fast_linear(onednn_calls):
    from pale_mm.models import PaleTransformer
    torch.manual_seed(0)
    model = PaleTransformer(dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2]),
                            pale_size=3).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        fast = model(x)
        assert onednn_calls  # qkv, proj and both MLP layers
        with switched_off(fast_linear.set_fast_cpu_linear):
            plain = model(x)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@onednn
def test_linear_residual_add_is_fused_at_inference(monkeypatch):
    calls = []
    real = fast_linear._ONEDNN_LINEAR_ADD

    def counting(*args):
        calls.append(args[-1])
        return real(*args)
    monkeypatch.setattr(fast_linear, '_ONEDNN_LINEAR_ADD', counting)
    x, r = torch.randn(2, 9, 11, 48), torch.randn(2, 9, 11, 80)
    w, b = torch.randn(80, 48), torch.randn(80)
    want = r + F.linear(x, w, b)
    r0 = r.clone()
    with torch.no_grad():
        got = fast_linear.linear(x, w, b, residual=r)
        assert calls == ['add']
        assert torch.equal(r, r0)  # the residual is read, not written
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # a residual that only broadcasts is added after the GEMM
        r1 = torch.randn(80)
        torch.testing.assert_close(fast_linear.linear(x, w, b, residual=r1), r1 + F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
        assert calls == ['add']
    # with autograd: F.linear, then the add; the residual gets its gradient
    rg = r.clone().requires_grad_()
    out = fast_linear.linear(x, w, b, residual=rg)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert calls == ['add']
    torch.testing.assert_close(rg.grad, torch.ones_like(r), rtol=0, atol=0)


def test_mlp_identity_is_added_after_the_projection():
    """The Pale block's fast path adds its residual inside the MLP (fused into fc2 at
    inference): identity + mlp(x), in training and at inference."""
    torch.manual_seed(0)
    mlp = Mlp(16, 64).train()
    x, identity = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(fast_mlp(mlp, x, identity=identity), identity + mlp(x),
                               rtol=0, atol=0)
    mlp.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast_mlp(mlp, x, identity=identity), identity + mlp(x),
                                   rtol=1e-6, atol=1e-6)


def test_mlp_with_dropout_in_training_runs_the_reference():
    mlp = Mlp(16, 64, drop=0.5)
    x = torch.randn(2, 5, 16)
    assert fast_path(mlp.train(), x) is None and fast_path(mlp.eval(), x) is not None


@onednn
@pytest.mark.parametrize('capability', ['AVX2', 'AVX512'])
def test_wide_linears_keep_the_blas_gemm_where_torch_runs_at_avx2(
        monkeypatch, onednn_calls, gelu_kernel_calls, capability):
    """Where PyTorch runs at AVX2, layers at least BLAS_MIN_FEATURES wide on both sides
    take F.linear's GEMM at fp32 inference (MKL was faster there on a Zen 2), with the
    GELU kernel in place after it and the residual added in place; narrower layers,
    AVX-512 and the switch keep oneDNN's. Values against float64, within fp32 rounding
    of the dot products."""
    monkeypatch.setattr(fast_linear.kernels, 'torch_capability', lambda: capability)
    blas = capability == 'AVX2'
    wide = fast_linear.BLAS_MIN_FEATURES
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, wide)
    w, b = torch.randn(wide, wide) / wide ** 0.5, torch.randn(wide)
    r = torch.randn(2, 5, 7, wide)
    r0 = r.clone()
    want = F.linear(x.double(), w.double(), b.double())
    tol = fp_tol(wide, ref=want)
    with torch.no_grad():
        got = fast_linear.linear(x, w, b)
        torch.testing.assert_close(got.double(), want, **tol)
        assert onednn_calls == ([] if blas else ['none'])
        got = fast_linear.linear(x, w, b, gelu=True)
        torch.testing.assert_close(got.double(), F.gelu(want), **tol)
        kernel_gelu = fast_linear.kernels.cpu_isa() == 'avx2'  # also oneDNN's with AVX2
        assert gelu_kernel_calls == ([True] if kernel_gelu else [])
        got = fast_linear.linear(x, w, b, residual=r)
        torch.testing.assert_close(got.double(), r.double() + want, **tol)
        assert torch.equal(r, r0)  # the residual is read, not written
        # a residual of another dtype promotes, as residual + out does
        assert fast_linear.linear(x, w, b, residual=r.double()).dtype == torch.float64
        # a channel slice (strided) and no bias
        xs = torch.randn(2, 5, 7, 2 * wide)[..., ::2]
        want_s = F.linear(xs.double(), w.double())
        torch.testing.assert_close(fast_linear.linear(xs, w).double(), want_s,
                                   **fp_tol(wide, ref=want_s))
        n_onednn = len(onednn_calls)
        # one side narrower: oneDNN's
        fast_linear.linear(x, w[:wide - 8])
        fast_linear.linear(x[..., :wide - 8], w[:, :wide - 8])
        assert len(onednn_calls) == n_onednn + 2
        with switched_off(fast_linear.set_blas_on_avx2):
            fast_linear.linear(x, w, b)
        assert len(onednn_calls) == n_onednn + 3
