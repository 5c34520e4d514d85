"""The fused depthwise 3x3 convs of the Pale block (fp32 CPU, forward and backward)
against float64 ``F.conv2d``; the block and backbone through them against the same model on
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
from tests.tolerances import fp_tol, module_scales

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
    # with gradients too (the backward kernel)
    assert cpu_dwconv.can_fuse_dwconv(x, w) == (kernel_build is not None)
    frozen = w.detach()
    seen = []
    torch.jit.trace(lambda t: seen.append(cpu_dwconv.can_fuse_dwconv(t, frozen)) or t, (x,),
                    check_trace=False)
    assert seen == [False]  # the FLOP counter traces and must see the convs


def _reference_grads(x, weight, bias, sets, residual, grads):
    """Float64 input, weight and bias gradients of :func:`_reference` for the output
    gradients ``grads`` (``None`` for an unused output)."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    outs = _reference(xd, wd, bd, sets, residual)
    used = [(o, g.double()) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return xd.grad, wd.grad, None if bd is None else bd.grad


@pytest.mark.parametrize('shape', [(1, 1, 1, 16), (2, 1, 5, 20), (1, 5, 1, 7), (1, 3, 3, 8),
                                   (2, 4, 2, 24), (2, 7, 9, 96), (1, 16, 13, 64), (1, 3, 4, 300)])
@pytest.mark.parametrize('sets,residual,with_bias', [(3, False, False), (1, True, True),
                                                     (1, False, True), (3, False, True)])
def test_kernel_gradients_match_float64_conv(shape, sets, residual, with_bias, kernel_isa):
    """The backward kernel: input, weight and bias gradients against float64 autograd
    through ``F.conv2d``, at the forward test's edge cases. Tolerances: fp32's for the
    input gradient's 9 taps per set (plus the residual), and for the weight and bias
    gradients' sums over all ``B * H * W`` pixels."""
    torch.manual_seed(1)
    C = shape[-1]
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(sets * C, 1, 3, 3, requires_grad=True)
    bias = torch.randn(sets * C, requires_grad=True) if with_bias else None
    assert cpu_dwconv.can_fuse_dwconv(x, weight, bias)
    outs = cpu_dwconv.fused_dwconv3x3(x, weight, bias, sets=sets, residual=residual)
    want = _reference(x.detach(), weight.detach(), bias, sets, residual)
    for g, w in zip(outs, want):
        assert g.requires_grad
        torch.testing.assert_close(g.double(), w, **fp_tol(11, ref=w))
    grads = [torch.randn(shape) for _ in range(sets)]
    torch.autograd.backward(outs, grads)
    gx, gw, gb = _reference_grads(x, weight, bias, sets, residual, grads)
    pixels = shape[0] * shape[1] * shape[2]
    torch.testing.assert_close(x.grad.double(), gx, **fp_tol(9 * sets + 1, ref=gx))
    torch.testing.assert_close(weight.grad.double(), gw, **fp_tol(pixels, ref=gw))
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), gb, **fp_tol(pixels, ref=gb))


def test_kernel_gradients_of_some_outputs_and_inputs(kernel_isa):
    """An unused output (its gradient ``None``) counts as zero; gradients are computed
    only for the inputs that need them (a frozen weight, an input without gradient)."""
    torch.manual_seed(2)
    C = 24
    x = torch.randn(2, 6, 5, C, requires_grad=True)
    weight = torch.randn(3 * C, 1, 3, 3, requires_grad=True)
    q, k, v = cpu_dwconv.fused_dwconv3x3(x, weight, None, sets=3)
    grads = [torch.randn_like(q), None, torch.randn_like(v)]
    (q * grads[0]).sum().add((v * grads[2]).sum()).backward()
    gx, gw, _ = _reference_grads(x, weight, None, 3, False, grads)
    torch.testing.assert_close(x.grad.double(), gx, **fp_tol(28, ref=gx))
    torch.testing.assert_close(weight.grad.double(), gw, **fp_tol(60, ref=gw))
    frozen = weight.detach()
    x.grad = None
    cpu_dwconv.fused_dwconv3x3(x, frozen, None, sets=3)[0].sum().backward()
    assert x.grad is not None
    x2 = x.detach()
    (out,) = cpu_dwconv.fused_dwconv3x3(x2, weight[:C], torch.zeros(C, requires_grad=True))
    out.sum().backward()  # no input gradient asked


def _train_block(dim=64, heads=2, seed=0):
    torch.manual_seed(seed)
    blk = PaleBlock(dim, heads, 7).train()
    with torch.no_grad():
        blk.attn.qkv_bn.weight.normal_()
        blk.attn.qkv_bn.bias.normal_()
        blk.cpe.bias.normal_()
    return blk


@pytest.mark.parametrize('shape', [(2, 14, 14, 64), (1, 9, 23, 64)])
def test_training_block_uses_it_and_matches_conv2d(shape, kernel_isa, monkeypatch):
    """In training (BatchNorm on batch statistics, gradients) the CPE and the three
    q/k/v convs go through the kernel, forward and backward, and the block's output,
    input gradient and parameter gradients equal those of the block on F.conv2d, and
    so do the BatchNorm running statistics. Tolerance: fp32 rounding of fc2's 4C-term
    sums through the block's five reductions in sequence, forward and back (gradient
    scales per module: a weight gradient sums over every pixel)."""
    x = torch.randn(shape)
    results = []
    for fused in (False, True):
        blk = _train_block(shape[-1])
        xi = x.clone().requires_grad_()
        calls = []
        if fused:
            kernel = cpu_dwconv.fused_dwconv3x3
            for mod in CALLERS:
                monkeypatch.setattr(mod, 'fused_dwconv3x3', lambda *a, **k: calls.append(
                    k.get('sets', 1)) or kernel(*a, **k))
            monkeypatch.setattr(F, 'conv2d', _no_conv)
            out = blk(xi)
        else:
            with switched_off(cpu_dwconv.set_fused_dwconv):
                out = blk(xi)
        out.backward(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
        monkeypatch.undo()
        assert sorted(calls) == ([1, 3] if fused else [])
        results.append((out, xi.grad, {n: p.grad for n, p in blk.named_parameters()},
                        {n: b.clone() for n, b in blk.named_buffers()}))
    (want, want_gx, want_g, want_b), (got, got_gx, got_g, got_b) = results
    tol = dict(depth=10)
    torch.testing.assert_close(got, want, **fp_tol(4 * shape[-1], ref=want, **tol))
    torch.testing.assert_close(got_gx, want_gx, **fp_tol(4 * shape[-1], ref=want_gx, **tol))
    scales = module_scales(want_g.items())
    pixels = shape[0] * shape[1] * shape[2]
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, msg=name,
                                   **fp_tol(pixels, scale=scales[name], **tol))
    for name, b in want_b.items():
        torch.testing.assert_close(got_b[name], b, msg=name,
                                   **fp_tol(pixels, ref=b, **tol))


def _no_conv(*a, **k):
    raise AssertionError('F.conv2d called on the fused path')


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
