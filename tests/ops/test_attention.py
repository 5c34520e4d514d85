"""The fused fp32 CPU attention kernel (head dims 24 and 32) against float64
references: the kernel alone against SDPA, and PS-Attention through it against the
dense oracle, values and gradients; plus when it is (not) used. Every test of the
kernel runs once per build this CPU runs (``kernel_isa``, ``kernel_build``:
tests/ops/conftest.py): AVX-512 and AVX2 on an AVX-512 CPU, AVX2 on an AVX2 CPU."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from pale_mm.models import PSAttention
from pale_mm.models.pale_transformer import PaleBlock
from pale_mm.ops import attention as cpu_attention
from pale_mm.ops import dwconv as cpu_dwconv
from pale_mm.ops import kernels
from pale_mm.ops.pale import pale_attention_fast
from tests.pale_oracle import dense_pale_attention
from tests.switches import switched_off
from tests.tolerances import fp_tol, module_scales, rms

pale_mod = importlib.import_module('pale_mm.ops.pale')


def pale_attention(q, k, v, hw_shape, pale_size, num_heads):
    """The fast path's pale attention on (B, H*W, C) tokens."""
    B, N, C = q.shape
    H, W = hw_shape
    pale = (pale_size, pale_size) if isinstance(pale_size, int) else tuple(pale_size)
    q, k, v = (t.reshape(B, H, W, C) for t in (q, k, v))
    return pale_attention_fast(q, k, v, pale, num_heads).reshape(B, N, C)


def test_kernel_is_built_where_the_cpu_supports_it(kernel_build):
    """Every build the CPU runs must build: a broken build would otherwise only show
    as a warning and a silent fallback to the slower SDPA. Each is its own extension
    (its own build cache)."""
    assert cpu_attention.cpu_attention_available() == (kernel_build is not None)
    if kernel_build is not None:
        assert kernels.load().__name__ == f'pale_mm_cpu_{kernel_build}'


def _fp64_reference(q, k, v, scale, grad_out):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
    return (out, *torch.autograd.grad(out, (qd, kd, vd), grad_out.double()))


@pytest.mark.parametrize('head_dim', [32, 24])
@pytest.mark.parametrize('shape', [(1, 1, 1), (3, 1, 5), (1, 2, 8), (2, 1, 9), (2, 2, 16),
                                   (2, 2, 17), (1, 1, 25), (1, 3, 31), (4, 100), (3, 97),
                                   (2, 1, 333), (2, 1, 896)])
def test_kernel_matches_float64_sdpa(shape, head_dim, kernel_isa):
    """Every length class of both builds: one key; fewer than a vector (8 or 16) of
    keys; exact vectors; a ragged last vector and register tile (AVX-512: 8 query
    rows x 32 keys; AVX2: 6 x 16, and the backward's keys padded to 24); several
    tiles, forward work items (96 or 128 query rows) and backward blocks (24 or 32);
    batch dims folded; at head dim 32 and at 24 (Pale-S; zero-padded to 32 inside).
    Errors against float64 must be within the fp32 tolerance of reductions over the
    N keys (three in sequence in the backward). The gradients of q and k are exactly
    zero with one key, so their error is measured at dv's scale (their terms' size),
    not at their own."""
    shape = shape + (head_dim,)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    g = torch.randn(shape)
    scale = 0.37
    assert cpu_attention.can_fuse(q, head_dim)
    out = cpu_attention.fused_attention(q, k, v, scale=scale)
    got = (out, *torch.autograd.grad(out, (q, k, v), g))
    want = _fp64_reference(q, k, v, scale, g)
    n = shape[-2]
    for name, a, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
        assert a.shape == w.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), w, msg=name, **fp_tol(
            n, depth=3, ref=w if name == 'out' else want[3]))


def test_kernel_softmax_is_stable_for_large_scores(kernel_isa):
    """Scores in the hundreds: the row maximum is subtracted before exp (else
    exp overflows to inf). A score's rounding error is relative to the size of its
    32 terms, here hundreds, and softmax turns an absolute score error into a
    relative error of the weights: the tolerance is fp32's for the 32-term score
    times the largest score, and the 40-key sum after it."""
    q, k, v = (torch.randn(2, 40, 32) * 6 for _ in range(3))
    out = cpu_attention.fused_attention(q, k, v, scale=1.)
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = F.scaled_dot_product_attention(qd, kd, vd, scale=1.)
    assert torch.isfinite(out).all()
    score_size = (qd.abs() @ kd.abs().transpose(-1, -2)).max().item()
    assert score_size > 300
    tol = fp_tol(32 + 40)['rtol'] * score_size
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * rms(ref))


def test_kernel_propagates_nan_like_sdpa(kernel_isa):
    """A NaN in one query row makes that row of the output NaN and leaves the other
    rows exact; a NaN in a key reaches every row (as in SDPA). The exp of AVX2 clamps
    its argument, in an order that lets NaN through."""
    q, k, v = (torch.randn(2, 20, 32) for _ in range(3))
    q[1, 3, 5] = float('nan')
    out = cpu_attention.fused_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out[1, 3].isnan().all()
    rows = torch.ones(2, 20, dtype=torch.bool)
    rows[1, 3] = False
    torch.testing.assert_close(out[rows].double(), ref[rows], **fp_tol(20, depth=2, ref=ref[rows]))
    k[0, 7, 0] = float('nan')
    assert cpu_attention.fused_attention(q, k, v)[0].isnan().all()


@pytest.mark.parametrize('head_dim', [32, 24])
@pytest.mark.parametrize('H,W,pale', [(14, 14, 7), (16, 16, 7), (9, 23, (7, 3)), (30, 5, 7)])
def test_pale_attention_through_kernel_matches_oracle(H, W, pale, head_dim, kernel_isa,
                                                      monkeypatch):
    """PS-Attention at head dim 32 or 24 in fp32 goes through the kernel (SDPA is
    never called), and values and gradients match the float64 dense oracle. At head
    dim 24 each row of a group is 24 floats of a 96-channel map: the kernel must read
    and write exactly those (its packed copies are zero-padded to 32). Tolerance: fp32
    over a group's keys (at most a pale's rows times W, or its columns times H),
    three reductions in sequence; gradients at the scale of v's (q's and k's can
    cancel)."""
    def no_sdpa(*a, **kw):
        raise AssertionError('SDPA called although the fused kernel applies')
    monkeypatch.setattr(pale_mod.F, 'scaled_dot_product_attention', no_sdpa)
    heads, C = 4, 4 * head_dim
    qkv = [torch.randn(2, H * W, C, requires_grad=True) for _ in range(3)]
    out = pale_attention(*qkv, (H, W), pale, heads)
    ref_in = [t.detach().double().requires_grad_() for t in qkv]
    ref = dense_pale_attention(*ref_in, (H, W), pale, heads)
    ph, pw = (pale, pale) if isinstance(pale, int) else pale
    n = max(ph * W, H * pw)
    torch.testing.assert_close(out.double(), ref, **fp_tol(n, depth=3, ref=ref))
    w = torch.randn_like(out)
    grads = torch.autograd.grad(out, qkv, w)
    want = torch.autograd.grad(ref, ref_in, w.double())
    for name, a, b in zip('qkv', grads, want):
        torch.testing.assert_close(a.double(), b, msg=f'd{name}',
                                   **fp_tol(n, depth=3, ref=want[2]))


@pytest.mark.parametrize('dim,heads', [(64, 2), (96, 4)])
def test_psattention_fast_path_same_with_and_without_kernel(dim, heads, kernel_isa):
    """Pale-T's and Pale-S's first-stage widths (64 channels, 2 heads: head dim 32;
    96 channels, 4 heads: head dim 24), train and eval. Both paths are fp32: the
    tolerance is fp32's over the longest reduction (a weight gradient's 2 x 360
    tokens) through the module's reductions in sequence (q/k/v, scores, values,
    proj, and the backward's), gradients at their module's scale (the key bias's
    is zero: softmax ignores a shift of all scores)."""
    attn = PSAttention(dim, heads, 7)
    x = torch.randn(2, 20 * 18, dim, requires_grad=True)
    names = ['out', 'x'] + [n for n, _ in attn.named_parameters()]
    for training in (True, False):
        attn.train(training)
        outs = []
        for fused in (True, False):
            previous = cpu_attention.set_cpu_attention(fused)
            try:
                out = pale_mod.ps_attention(attn, x, (20, 18))
                outs.append((out, *torch.autograd.grad(out.square().sum(), [x] +
                                                       list(attn.parameters()))))
            finally:
                cpu_attention.set_cpu_attention(previous)
        scales = module_scales(zip(names[1:], outs[1][1:]))
        for name, a, b in zip(names, *outs):
            torch.testing.assert_close(a, b, msg=name, **fp_tol(
                x.shape[0] * x.shape[1], depth=6, ref=b, scale=scales.get(name)))


def test_where_the_kernel_is_not_used(kernel_build):
    q = torch.randn(1, 1, 8, 64)
    built = kernel_build is not None
    assert cpu_attention.can_fuse(q, 32) == built
    assert not cpu_attention.can_fuse(q.double(), 32)           # float64
    assert cpu_attention.can_fuse(q, 24) == built               # Pale-S
    assert not cpu_attention.can_fuse(q, 16)                    # head dim 16
    assert not cpu_attention.can_fuse(q, 32, 0.1)               # attention dropout
    assert not cpu_attention.can_fuse(q.bfloat16(), 32)         # autocast's dtype
    with switched_off(cpu_attention.set_cpu_attention):
        assert not cpu_attention.can_fuse(q, 32)
    seen = []
    torch.jit.trace(lambda t: seen.append(cpu_attention.can_fuse(t, 32)) or t, (q,),
                    check_trace=False)
    assert seen == [False]  # the FLOP counter traces and must see SDPA


@pytest.mark.parametrize('shape,pale,heads', [((2, 14, 14, 128), (7, 7), 2),
                                              ((1, 16, 9, 64), (7, 3), 1),
                                              ((3, 5, 23, 192), (7, 7), 3)])
def test_token_offsets_name_every_row_once_in_its_group(shape, pale, heads):
    """The offsets that replace the grouped copies: every (token, head) row of the
    map exactly once per call set, and each sequence is one pale group of one
    branch and head: same row group (row branch) or column group (column branch)."""
    B, H, W, C = shape
    offsets = pale_mod._token_offsets(shape, pale, heads)
    assert cpu_attention._offsets_ok(B * H * W * C, offsets)
    d = C // 2 // heads
    G = [pale_mod.pale_groups(L, s)[0] for L, s in ((H, pale[0]), (W, pale[1]))]
    for off in offsets:
        token, chan = off // C, off % C
        h, w = (token // W) % H, token % W
        branch = chan // (C // 2)
        assert (branch == branch[:, :1]).all() and (chan == chan[:, :1]).all()
        assert (chan % d == 0).all()
        group = torch.where(branch == 0, h % G[0], w % G[1])
        assert (group == group[:, :1]).all()


def test_bad_inputs_named(kernel_build):
    with pytest.raises(ValueError, match='one shape'):
        cpu_attention.fused_attention(torch.randn(1, 4, 32), torch.randn(1, 5, 32),
                                      torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match=r'needs a head dim in \(24, 32\), got 16'):
        cpu_attention.fused_attention(*(torch.randn(1, 4, 16) for _ in range(3)))
    with pytest.raises(ValueError, match=r'serves head dims \(24, 32\), got 16'):
        cpu_attention.gathered_attention(*(torch.randn(1, 4, 16) for _ in range(3)),
                                         [torch.arange(0, 64, 16).view(1, 4)], 1., head_dim=16)
    q = torch.randn(2, 8, 32)
    rows = torch.arange(0, 512, 32).view(2, 8)
    bad = rows.clone()
    bad[1, 7] = 0  # row 0 twice, the last row never
    with pytest.raises(ValueError, match='every row of 32 floats .* exactly once'):
        cpu_attention.gathered_attention(q, q, q, [bad], 1.)
    if kernel_build is not None:  # the kernel's own checks
        bad[1, 7] = 512  # past the end
        with pytest.raises(RuntimeError, match='offset is out of range'):
            cpu_attention.gathered_attention(q, q, q, [bad], 1., check=False)
        q24 = torch.randn(2, 8, 24)
        rows = torch.arange(0, 384, 24).view(2, 8)
        assert cpu_attention._offsets_ok(q24.numel(), [rows], 24)
        rows[1, 7] = 368  # in range for rows of 16 floats, not for rows of 24
        with pytest.raises(RuntimeError, match='offset is out of range'):
            cpu_attention.gathered_attention(q24, q24, q24, [rows], 1., check=False,
                                             head_dim=24)


def test_backbone_with_cp_through_kernel(kernel_isa, monkeypatch):
    """Head dim 32 at every stage, so every block's attention runs the kernel, also
    when gradient checkpointing recomputes it: outputs equal, gradients and BatchNorm
    statistics as without checkpointing."""
    import copy

    from pale_mm.models import PaleTransformer
    calls = []
    real = pale_mod.gathered_attention
    monkeypatch.setattr(pale_mod, 'gathered_attention',
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    torch.manual_seed(0)
    ref = PaleTransformer(arch=dict(embed_dims=[64, 128, 128, 128], depths=[1, 1, 1, 1],
                                    num_heads=[2, 4, 4, 4]), drop_path_rate=0.3).train()
    cp = copy.deepcopy(ref)
    cp.with_cp = True
    x = torch.randn(2, 3, 90, 76)
    outs = []
    for m in (ref, cp):
        torch.manual_seed(42)  # drop path replays under checkpointing
        o = m(x)
        sum((oi * torch.arange(oi.numel()).view_as(oi).sin()).sum() for oi in o).backward()
        outs.append(o)
    assert len(calls) == 4 + 8  # ref: one per block; cp: forward + recompute
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (n, p), (_, q) in zip(ref.named_parameters(), cp.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, b1), (_, b2) in zip(ref.named_buffers(), cp.named_buffers()):
        assert torch.equal(b1, b2), n


@pytest.fixture
def fresh_loader(monkeypatch):
    """No build loaded yet, no limit on the builds; restored afterwards."""
    monkeypatch.setattr(kernels, '_exts', {})
    monkeypatch.setattr(kernels, '_max_isa', [None])
    return monkeypatch


def _failing_build(*a, **kw):
    raise OSError('no compiler here')


@pytest.mark.parametrize('isa,name', [('avx512', 'AVX-512'), ('avx2', 'AVX2')])
def test_failed_build_warns_once_and_falls_back_to_sdpa(isa, name, fresh_loader):
    import torch.utils.cpp_extension as cpp
    fresh_loader.setattr(kernels, 'available_isas', lambda: (isa,))
    fresh_loader.setattr(cpp, 'load', _failing_build)
    with pytest.warns(UserWarning, match=f'{name} build.*could not be built.*no compiler here'):
        assert not cpu_attention.cpu_attention_available()
    assert not cpu_attention.can_fuse(torch.randn(2, 64), 32)  # no second warning
    with torch.no_grad():  # the depthwise convs of the same extension fall back too
        assert not cpu_dwconv.can_fuse_dwconv(torch.randn(1, 4, 4, 16))
        blk = PaleBlock(64, 2, 7).eval()
        calls, conv2d = [], F.conv2d
        fresh_loader.setattr(F, 'conv2d', lambda *a, **k: calls.append(1) or conv2d(*a, **k))
        out = blk(torch.randn(1, 9, 9, 64))
    assert len(calls) == 4 and torch.isfinite(out).all()  # the CPE and q, k, v convs
    heads, C = 2, 64
    q, k, v = (torch.randn(1, 14 * 14, C) for _ in range(3))
    out = pale_attention(q, k, v, (14, 14), 7, heads)  # SDPA path, still exact
    torch.testing.assert_close(out.double(), dense_pale_attention(q, k, v, (14, 14), 7, heads),
                               rtol=1e-5, atol=1e-6)


def test_no_avx2_or_avx512_means_sdpa_without_a_warning(fresh_loader, recwarn):
    import torch.utils.cpp_extension as cpp
    fresh_loader.setattr(kernels, 'available_isas', lambda: ())
    fresh_loader.setattr(cpp, 'load', _failing_build)  # must not even be tried
    assert not cpu_attention.cpu_attention_available()
    assert not [w for w in recwarn if 'pale_mm' in str(w.message)]
