"""The fused depthwise 3x3 convs of the Pale block (fp32 CPU inference) against
float64 ``F.conv2d``; the block and backbone through them against the same model on
``F.conv2d``; and where they are (not) used. Every test of the kernel runs once per
build this CPU runs (``kernel_isa``, ``kernel_build``: tests/ops/conftest.py):
AVX-512 and AVX2 on an AVX-512 CPU, AVX2 on an AVX2 CPU."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from pale_mm.models import PaleTransformer
from pale_mm.models.pale_transformer import PaleBlock
from pale_mm.ops import dwconv as cpu_dwconv
from pale_mm.ops import kernels
from tests.switches import switched_off
from tests.tolerances import fp_tol

# the module that calls the kernel: the Pale block's fast path
CALLERS = [importlib.import_module('pale_mm.ops.pale')]


def _reference(x, weight, bias, sets, residual):
    """Float64 ``F.conv2d`` per set, channels-last, plus ``x`` with ``residual``."""
    C = x.shape[-1]
    xc = x.double().permute(0, 3, 1, 2)
    outs = []
    for t in range(sets):
        b = None if bias is None else bias[t * C:(t + 1) * C].double()
        y = F.conv2d(xc, weight[t * C:(t + 1) * C].double(), b, padding=1, groups=C)
        outs.append(y.permute(0, 2, 3, 1) + (x.double() if residual else 0))
    return outs


@pytest.mark.parametrize('shape', [(1, 1, 1, 16), (2, 1, 5, 20), (1, 5, 1, 7), (1, 3, 3, 8),
                                   (1, 2, 2, 32), (2, 4, 2, 24), (2, 7, 9, 96), (1, 16, 13, 64),
                                   (1, 3, 4, 300)])
@pytest.mark.parametrize('sets,residual,with_bias', [(3, False, True), (1, True, True),
                                                     (1, False, False), (3, False, False)])
def test_kernel_matches_float64_conv(shape, sets, residual, with_bias, kernel_isa):
    """One-pixel, one-row and one-column maps (every tap at an edge), channel counts
    below, at and between the vector widths (8 for AVX2, 16 for AVX-512) with a
    ragged last block, batches. Tolerance: fp32's for the 9 taps plus bias and
    residual."""
    torch.manual_seed(0)
    C = shape[-1]
    x = torch.randn(shape)
    weight = torch.randn(sets * C, 1, 3, 3)
    bias = torch.randn(sets * C) if with_bias else None
    assert cpu_dwconv.can_fuse_dwconv(x, weight, bias)
    got = cpu_dwconv.fused_dwconv3x3(x, weight, bias, sets=sets, residual=residual)
    want = _reference(x, weight, bias, sets, residual)
    assert len(got) == sets
    for g, w in zip(got, want):
        assert g.shape == x.shape and g.dtype == torch.float32 and g.is_contiguous()
        torch.testing.assert_close(g.double(), w, **fp_tol(11, ref=w))
    assert not any(g.data_ptr() == x.data_ptr() for g in got)  # x is left alone


def test_kernel_reads_any_strides(kernel_isa):
    """A non-contiguous map (a channels-first tensor's permuted view) gives the same."""
    x = torch.randn(2, 24, 6, 5).permute(0, 2, 3, 1)
    weight, bias = torch.randn(24, 1, 3, 3), torch.randn(24)
    (got,) = cpu_dwconv.fused_dwconv3x3(x, weight, bias)
    (want,) = _reference(x, weight, bias, 1, False)
    torch.testing.assert_close(got.double(), want, **fp_tol(10, ref=want))


def _eval_block(dim=64, heads=2):
    torch.manual_seed(0)
    blk = PaleBlock(dim, heads, 7).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics to fold
        bn = blk.attn.qkv_bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return blk


@pytest.mark.parametrize('shape', [(2, 14, 14, 64), (1, 9, 23, 64)])
def test_pale_block_uses_it_at_inference_and_matches_conv2d(shape, kernel_isa, monkeypatch):
    """In an eval-mode block under no_grad both the CPE and the folded q/k/v convs
    go through the kernel (F.conv2d is never called), and the output equals the
    block on F.conv2d to fp32 rounding: of fc2's 4C-term sums after the block's five
    reductions in sequence (q/k/v, attention, proj, fc1, fc2)."""
    blk = _eval_block(shape[-1])
    x = torch.randn(shape)
    with torch.no_grad():
        with switched_off(cpu_dwconv.set_fused_dwconv):
            want = blk(x)
        calls = []
        kernel = cpu_dwconv.fused_dwconv3x3
        for mod in CALLERS:
            monkeypatch.setattr(mod, 'fused_dwconv3x3',
                                lambda *a, **k: calls.append(k.get('sets', 1)) or kernel(*a, **k))

        def no_conv(*a, **k):
            raise AssertionError('F.conv2d called on the fused path')
        monkeypatch.setattr(F, 'conv2d', no_conv)
        got = blk(x)
    assert sorted(calls) == [1, 3]
    torch.testing.assert_close(got, want, **fp_tol(4 * shape[-1], depth=5, ref=want))


def test_backbone_inference_matches_conv2d(kernel_isa):
    """The whole backbone (every stage's CPE and q/k/v convs), fused against F.conv2d:
    fp32 rounding of the widest block's fc2 (4 x 64 terms) through the three blocks'
    five reductions each."""
    torch.manual_seed(0)
    m = PaleTransformer(dict(embed_dims=32, depths=[1, 2], num_heads=[2, 2]),
                        out_indices=(0, 1)).eval()
    x = torch.randn(2, 3, 61, 47)
    with torch.no_grad():
        got = m(x)
        with switched_off(cpu_dwconv.set_fused_dwconv):
            want = m(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **fp_tol(4 * 64, depth=15, ref=w))


def test_where_it_is_not_used(kernel_build):
    x = torch.randn(1, 4, 4, 16)
    w = torch.nn.Parameter(torch.randn(16, 1, 3, 3))
    with torch.no_grad():
        assert cpu_dwconv.can_fuse_dwconv(x, w) == (kernel_build is not None)
        assert not cpu_dwconv.can_fuse_dwconv(x.double(), w.double())   # float64
        assert not cpu_dwconv.can_fuse_dwconv(x.bfloat16(), w)           # bf16
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not cpu_dwconv.can_fuse_dwconv(x, w)                  # autocast
        with switched_off(cpu_dwconv.set_fused_dwconv):
            assert not cpu_dwconv.can_fuse_dwconv(x, w)                  # switched off
    assert not cpu_dwconv.can_fuse_dwconv(x, w)        # a parameter that needs a gradient
    frozen = w.detach()
    assert not cpu_dwconv.can_fuse_dwconv(x.clone().requires_grad_(), frozen)  # input gradient
    seen = []
    torch.jit.trace(lambda t: seen.append(cpu_dwconv.can_fuse_dwconv(t, frozen)) or t, (x,),
                    check_trace=False)
    assert seen == [False]  # the FLOP counter traces and must see the convs


def test_training_block_does_not_use_it(monkeypatch):
    """Training (BatchNorm on batch statistics, gradients) stays on F.conv2d."""
    for mod in CALLERS:
        monkeypatch.setattr(mod, 'fused_dwconv3x3', None)
    blk = PaleBlock(32, 2, 7).train()
    blk(torch.randn(2, 7, 7, 32)).sum().backward()
    assert blk.cpe.weight.grad is not None and blk.attn.qkv_dw.weight.grad is not None


def test_bad_inputs_named(kernel_isa):
    x = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match=r'expected \(48, 1, 3, 3\)'):
        cpu_dwconv.fused_dwconv3x3(x, torch.randn(16, 1, 3, 3), None, sets=3)
    with pytest.raises(ValueError, match='sets must be 1 or 3'):
        cpu_dwconv.fused_dwconv3x3(x, torch.randn(32, 1, 3, 3), None, sets=2)
    with pytest.raises(ValueError, match='residual only with 1'):
        cpu_dwconv.fused_dwconv3x3(x, torch.randn(48, 1, 3, 3), None, sets=3, residual=True)
    with pytest.raises(ValueError, match=r'bias of shape \(8,\)'):
        cpu_dwconv.fused_dwconv3x3(x, torch.randn(16, 1, 3, 3), torch.randn(8))
    ext = kernels.load()
    w, b = torch.randn(1, 3, 3, 16), torch.randn(1, 16)
    with pytest.raises(RuntimeError, match='each output must be a new contiguous'):
        ext.dwconv3x3(x, w, b, [x], False)  # in place would read overwritten taps
    with pytest.raises(RuntimeError, match='x must be a contiguous float32'):
        ext.dwconv3x3(x.double(), w, b, [torch.empty_like(x)], False)
