"""The GPU path of PS-Attention (pale_mm/ops/pale_cuda.py) and its fused Triton kernel
(pale_mm/ops/triton_pale.py): values and gradients equal to the dense masked oracle and
to the reference, at padded, odd and non-square sizes and every head dim up to 128;
the dispatch sends CUDA tensors there (also after SyncBatchNorm conversion) and
nowhere else.

On a GPU the tests run on CUDA tensors (bfloat16 included). Without one they run the
same kernels in Triton's interpreter on CPU tensors (tests/ops/conftest.py), with the
dispatch shown CPU tensors as if they were CUDA tensors (``gpu_dispatch``).
The interpreter computes bfloat16 products wrongly (it multiplies their raw bits), so
bfloat16 is tested on GPUs only; float16 takes the same code path."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

import pale_mm.ops as ops
from pale_mm.models import PaleTransformer, PSAttention
from pale_mm.models.layers import Mlp
from pale_mm.models.pale_transformer import PaleBlock
from pale_mm.ops import fast_path, set_fast_paths
from tests.ops.test_pale import _randomise_bn
from tests.pale_oracle import dense_pale_attention
from tests.switches import switched_off
from tests.tolerances import fp_tol, module_scales, rms

pytest.importorskip('triton')
from pale_mm.ops import triton_pale  # noqa: E402  (after conftest set the interpreter)
from pale_mm.ops.pale_cuda import kernel_serves, qkv_projection  # noqa: E402

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
# float16 runs in the interpreter too; bfloat16 needs a GPU (see the module docstring)
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE.type == 'cuda' else [])
KERNEL = triton_pale.pale_attention_qkv


@pytest.fixture
def gpu_dispatch(monkeypatch):
    """Dispatch as for CUDA tensors: PSAttention to its GPU path, the Pale block and the
    MLP to their reference forwards. Without a GPU, CPU tensors are dispatched so."""
    if DEVICE.type == 'cpu':
        entries = dict(ops._REGISTRY)
        for cls, dev in entries:
            if dev == 'cpu':
                monkeypatch.delitem(ops._REGISTRY, (cls, 'cpu'))
        for (cls, dev), entry in entries.items():
            if dev == 'cuda':
                monkeypatch.setitem(ops._REGISTRY, (cls, 'cpu'), entry)
    calls = []
    monkeypatch.setattr(triton_pale, 'pale_attention_qkv',
                        lambda *a: calls.append(a[0].shape) or KERNEL(*a))
    return calls


def _low_tol(dtype):
    """Norm-wise relative error allowed for attention in a 16-bit dtype against the
    float64 oracle on the same (rounded) inputs: the weights are rounded to the dtype
    before the second product and the result once more (half an ulp each), so the
    error is about ``eps`` relative to the output's size; x4 for the largest of the
    compared groups and for gradients, whose ``dS = P (dP - delta)`` rounds twice more."""
    return 4 * torch.finfo(dtype).eps


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


KERNEL_CASES = [
    ((2, 14, 14), 64, 2, (7, 7)),   # no padding; head dim 32 (Pale-T, Pale-B)
    ((2, 9, 23), 24, 4, (7, 3)),    # padded both ways, non-square pale; head dim 6
    ((1, 16, 5), 96, 4, (7, 7)),    # head dim 24 (Pale-S); a single group of columns
    ((1, 3, 70), 32, 2, (2, 5)),    # 140-token rows: several blocks per sequence
    ((2, 5, 4), 16, 2, (1, 9)),     # one line per row group; all columns in one group
    ((1, 13, 11), 256, 2, (7, 7)),  # head dim 128, the largest served
]


def _qkv(shape, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, *shape, dim, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _oracle(qkv, pale, heads):
    """Dense masked float64 attention of the stacked maps, and its gradients."""
    _, B, H, W, C = qkv.shape
    x = qkv.detach().cpu().double().requires_grad_()
    out = dense_pale_attention(*(t.reshape(B, H * W, C) for t in x), (H, W), pale, heads)
    return x, out.view(B, H, W, C)


@pytest.mark.parametrize('shape,dim,heads,pale', KERNEL_CASES)
def test_kernel_equals_dense_oracle_in_float32(shape, dim, heads, pale):
    qkv = _qkv(shape, dim, torch.float32).requires_grad_()
    out = triton_pale.pale_attention_qkv(qkv, pale, heads)
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    x, want = _oracle(qkv, pale, heads)
    (dwant,) = torch.autograd.grad(want, x, grad.cpu().double())
    B, H, W = shape
    n = max(pale[0] * W, pale[1] * H)  # the longest group: the softmax's reduction
    torch.testing.assert_close(out.cpu().double(), want, **fp_tol(n, depth=2, ref=want))
    for t in range(3):  # dq, dk, dv: reductions over a group's keys or queries
        torch.testing.assert_close(dqkv[t].cpu().double(), dwant[t],
                                   **fp_tol(n, depth=3, ref=dwant[t]), msg='qkv'[t])


@pytest.mark.parametrize('dtype', LOW, ids=str)
@pytest.mark.parametrize('shape,dim,heads,pale', KERNEL_CASES[:4])
def test_kernel_equals_dense_oracle_in_16_bits(shape, dim, heads, pale, dtype):
    qkv = _qkv(shape, dim, dtype).requires_grad_()
    out = triton_pale.pale_attention_qkv(qkv, pale, heads)
    assert out.dtype == dtype
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    x, want = _oracle(qkv, pale, heads)
    (dwant,) = torch.autograd.grad(want, x, grad.cpu().double())
    assert _rel(out, want) < _low_tol(dtype)
    for t in range(3):
        assert _rel(dqkv[t], dwant[t]) < _low_tol(dtype), 'qkv'[t]


def test_kernel_writes_every_output_and_gradient(monkeypatch):
    """Poisoned buffers: every element of the output and of the three gradients is
    written (the token blocks cover each sequence, the sequences each token once)."""
    shape, dim, heads, pale = KERNEL_CASES[1]
    qkv = _qkv(shape, dim, torch.float32)
    heads //= 2
    scale = (dim // heads // 2) ** -0.5
    empty = torch.empty
    monkeypatch.setattr(torch, 'empty', lambda *a, **k: empty(*a, **k).fill_(float('nan')))
    monkeypatch.setattr(torch, 'empty_like', lambda t, **k: torch.empty(
        t.shape, dtype=k.get('dtype', t.dtype), device=t.device))
    out, lse = triton_pale._forward(qkv, pale, heads, scale)
    dqkv = triton_pale._backward(qkv, out, lse, torch.randn_like(out), pale, heads, scale)
    assert torch.isnan(torch.empty(3)).all()  # the poison is in place
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.isfinite(dqkv).all()


def test_launch_plan_covers_every_query_once():
    """The grid's programs, decoded as the kernels decode them, name every
    (branch, image, head, token) exactly once."""
    for (B, H, W), dim, heads, pale in KERNEL_CASES + [((3, 29, 7), 16, 2, (7, 2))]:
        heads //= 2
        for block in (4, 64):
            (grid,), n0, rows, cols = triton_pale.launch_plan((B, H, W, dim), pale, heads,
                                                              block)
            seen = torch.zeros(2, B, heads, H, W, dtype=torch.long)
            for pid in range(grid):
                col = int(pid >= n0)
                r = pid - col * n0
                G, F, NA, NB, S = cols if col else rows
                per_bh = F * NA + (G - F) * NB
                b, head = divmod(r // per_bh, heads)
                r %= per_bh
                g, blk = divmod(r, NA) if r < F * NA else \
                    (F + (r - F * NA) // NB, (r - F * NA) % NB)
                lines = S if g < F else S - 1
                other = H if col else W
                for pos in range(blk * block, min((blk + 1) * block, lines * other)):
                    along = pos // other * G + g
                    h, w = (pos % other, along) if col else (along, pos % other)
                    seen[col, b, head, h, w] += 1
            assert torch.equal(seen, torch.ones_like(seen)), ((B, H, W), pale, block)


def test_kernel_rejects_bad_input():
    qkv = _qkv((1, 4, 4), 16, torch.float32)
    with pytest.raises(ValueError, match=r'\(3, B, H, W, C\)'):
        triton_pale.pale_attention_qkv(qkv[0], (2, 2), 2)
    with pytest.raises(ValueError,
                       match=r'pale_attention_qkv: .* num_heads must be an even int >= 2, got 3'):
        triton_pale.pale_attention_qkv(qkv, (2, 2), 3)
    with pytest.raises(ValueError, match='head dims up to 128, got 256'):
        triton_pale.pale_attention_qkv(_qkv((1, 2, 2), 512, torch.float32), (2, 2), 2)
    with pytest.raises(TypeError, match='float64'):
        triton_pale.pale_attention_qkv(qkv.double(), (2, 2), 2)


# ------------------------------------------------------------------------ PS-Attention
def _step(module, x, *args, fast=True, seed=1):
    """Output, gradients of the input and every parameter, and the buffers after one
    forward and backward of a copy of ``module``."""
    module = copy.deepcopy(module)
    x = x.clone().requires_grad_()
    with switched_off(set_fast_paths) if not fast else contextlib.nullcontext():
        torch.manual_seed(seed)
        out = module(x, *args)
    g = torch.sin(torch.arange(out.numel(), device=out.device, dtype=out.dtype)).view_as(out)
    names = ['x'] + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(out, [x] + list(module.parameters()), g)
    return out.detach(), dict(zip(names, grads)), [b.clone() for b in module.buffers()]


ATTN_CASES = [((2, 14, 14), 64, 2, 7), ((2, 9, 23), 24, 4, (7, 3)), ((1, 16, 5), 96, 4, 7)]


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('shape,dim,heads,pale', ATTN_CASES)
def test_gpu_attention_equals_reference(shape, dim, heads, pale, training, gpu_dispatch):
    """PSAttention on its GPU path and on its reference forward, both in float32, against
    the float64 reference: outputs, gradients and BatchNorm statistics."""
    torch.manual_seed(0)
    attn = PSAttention(dim, heads, pale).train(training)
    _randomise_bn(attn)
    attn = attn.to(DEVICE)
    B, H, W = shape
    x = torch.randn(B, H * W, dim, device=DEVICE)
    assert fast_path(attn, x) is not None
    out, grads, bufs = _step(attn, x, (H, W))
    assert len(gpu_dispatch) == 1
    out_r, grads_r, bufs_r = _step(attn, x, (H, W), fast=False)
    out_d, grads_d, bufs_d = _step(copy.deepcopy(attn).double(), x.double(), (H, W), fast=False)
    assert len(gpu_dispatch) == 1  # float64 and fast paths off: the reference
    n = max(B * H * W, 9 * 3 * dim)  # weight gradients sum over every token
    scales = module_scales(grads_d.items())
    for got in ((out, grads, bufs), (out_r, grads_r, bufs_r)):
        torch.testing.assert_close(got[0].double(), out_d, **fp_tol(n, depth=4, ref=out_d))
        for name, g in got[1].items():
            torch.testing.assert_close(g.double(), grads_d[name], msg=name, **fp_tol(
                n, depth=8, scale=max(scales.get(name, 0), rms(grads_d[name]))))
        for a, b in zip(got[2], bufs_d):
            torch.testing.assert_close(a.double(), b.double(), **fp_tol(n, depth=2, ref=b))
    if training:
        assert not torch.equal(bufs[0], attn.qkv_bn.running_mean)


def test_qkv_projection_is_the_block_diagonal_linear():
    torch.manual_seed(0)
    attn = PSAttention(24, 4, 3).double()
    y = torch.randn(2, 5, 6, 72, dtype=torch.float64)
    got = qkv_projection(attn.qkv, y)
    torch.testing.assert_close(got, torch.stack(attn.qkv(y).chunk(3, -1)), rtol=1e-12,
                               atol=1e-12)
    attn.qkv.bias = None
    got = qkv_projection(attn.qkv, y.permute(0, 2, 1, 3))  # strided input
    torch.testing.assert_close(got, torch.stack(attn.qkv(y.permute(0, 2, 1, 3)).chunk(3, -1)),
                               rtol=1e-12, atol=1e-12)


def test_gpu_backbone_equals_reference(gpu_dispatch):
    """The whole backbone, training with drop path and gradient checkpointing: every
    PSAttention takes the GPU path, everything else its reference forward."""
    torch.manual_seed(0)
    arch = dict(embed_dims=[32, 64], depths=[2, 1], num_heads=[2, 4])
    model = PaleTransformer(arch, out_indices=(0, 1), drop_path_rate=0.3, with_cp=True)
    _randomise_bn(model)
    model = model.to(DEVICE).train()
    x = torch.randn(2, 3, 45, 39, device=DEVICE)
    results = {}
    for fast in (True, False):
        m = copy.deepcopy(model)
        with switched_off(set_fast_paths) if not fast else contextlib.nullcontext():
            torch.manual_seed(5)
            outs = m(x)
            sum((o * torch.arange(o.numel(), device=DEVICE).view_as(o).cos()).sum()
                for o in outs).backward()
        results[fast] = (outs, {n: p.grad for n, p in m.named_parameters()},
                         list(m.buffers()))
    assert len(gpu_dispatch) == 2 * 3  # 3 blocks, forward and recompute
    (outs, grads, bufs), (outs_r, grads_r, bufs_r) = results[True], results[False]
    for a, b in zip(outs, outs_r):
        torch.testing.assert_close(a, b, **fp_tol(45 * 39, depth=12, ref=b))
    scales = module_scales(grads_r.items())
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_r[n], msg=n, **fp_tol(
            2 * 45 * 39, depth=24, scale=max(scales[n], rms(grads_r[n]))))
    for a, b in zip(bufs, bufs_r):
        torch.testing.assert_close(a, b, **fp_tol(2 * 45 * 39, depth=12, ref=b))


# ------------------------------------------------------------------------- dispatch
def test_gpu_registrations():
    """On CUDA tensors only PSAttention has a fast forward; the CPU fast paths of the
    block and the MLP (copy-once grouping, GELU recompute: more launches) stay on the
    CPU."""
    assert (PSAttention, 'cuda') in ops._REGISTRY
    assert (PaleBlock, 'cuda') not in ops._REGISTRY and (Mlp, 'cuda') not in ops._REGISTRY
    assert (PaleBlock, 'cpu') in ops._REGISTRY and (PSAttention, 'cpu') not in ops._REGISTRY


def test_sync_batchnorm_keeps_the_gpu_path(gpu_dispatch, monkeypatch):
    """After ``convert_sync_batchnorm`` the GPU path still runs, and calls the
    SyncBatchNorm module (so a multi-GPU run keeps its cross-GPU statistics). On the
    CPU, where SyncBatchNorm refuses to run, its forward is replaced by plain batch
    norm, counted."""
    torch.manual_seed(0)
    model = PaleTransformer(dict(embed_dims=[32], depths=[2], num_heads=[2]),
                            out_indices=(0,), drop_path_rate=0.).to(DEVICE).train()
    x = torch.randn(2, 3, 40, 36, device=DEVICE)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    want = model(x)[0]
    sync_calls = []
    if DEVICE.type == 'cpu':
        monkeypatch.setattr(nn.SyncBatchNorm, 'forward', lambda self, t: sync_calls.append(
            self) or nn.BatchNorm2d.forward(self, t))
    del gpu_dispatch[:]
    got = synced(x)[0]
    assert len(gpu_dispatch) == 2
    if DEVICE.type == 'cpu':
        assert sync_calls == [blk.attn.qkv_bn for blk in synced.stages[0]]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for blk, ref in zip(synced.stages[0], model.stages[0]):
        torch.testing.assert_close(blk.attn.qkv_bn.running_var, ref.attn.qkv_bn.running_var,
                                   rtol=0, atol=0)


def test_where_the_gpu_path_steps_aside(gpu_dispatch):
    attn = PSAttention(16, 2, 3).to(DEVICE)
    x = torch.randn(1, 16, 16, device=DEVICE)
    assert fast_path(attn, x) is not None
    with switched_off(set_fast_paths):
        assert fast_path(attn, x) is None
    dropping = PSAttention(16, 2, 3, attn_drop_rate=0.1).to(DEVICE)
    assert fast_path(dropping.train(), x) is None  # attention dropout: the reference
    assert fast_path(dropping.eval(), x) is not None
    hooked = copy.deepcopy(attn)
    hooked.qkv_bn.register_forward_hook(lambda *a: None)
    assert fast_path(hooked, x) is None

    class MyAttention(PSAttention):
        pass
    assert fast_path(MyAttention(16, 2, 3).to(DEVICE), x) is None
    replaced = copy.deepcopy(attn)
    replaced.qkv_bn = nn.GroupNorm(1, 48)
    assert fast_path(replaced, x) is None

    class OnMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, t):
            return self.attn(t, (4, 4))
    traced = torch.jit.trace(OnMap(), (x,), check_trace=False)
    assert 'scaled_dot_product_attention' in str(traced.inlined_graph)
    assert gpu_dispatch == []


def test_float64_on_the_gpu_path_runs_the_reference_attention(gpu_dispatch):
    torch.manual_seed(0)
    attn = PSAttention(24, 4, (3, 2)).double().to(DEVICE).eval()
    x = torch.randn(2, 7 * 5, 24, dtype=torch.float64, device=DEVICE)
    qkv = torch.zeros(3, 1, 1, 1, 1, dtype=torch.float64, device=DEVICE)
    assert not kernel_serves(qkv) and kernel_serves(qkv.float())
    with torch.no_grad():
        got = attn(x, (7, 5))
        with switched_off(set_fast_paths):
            want = attn(x, (7, 5))
    assert gpu_dispatch == []
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gpu_path_compiles_in_one_graph_for_every_size(gpu_dispatch, monkeypatch):
    """torch.compile (dynamic shapes) traces the GPU path in one graph, the kernel an
    opaque custom op, and serves new input sizes without recompiling; the compiled
    model gives the eager GPU path's outputs and gradients. (``aot_eager``: the graph
    and its autograd as inductor receives them, without inductor's code generation.)"""
    dynamo = pytest.importorskip('torch._dynamo')
    dynamo.reset()
    torch.manual_seed(0)
    model = PaleTransformer(dict(embed_dims=[32, 64], depths=[1, 1], num_heads=[2, 4]),
                            out_indices=(0, 1), drop_path_rate=0.).to(DEVICE).train()
    # the kernel itself, not the counting wrapper (whose list would become a guard)
    monkeypatch.setattr(triton_pale, 'pale_attention_qkv', KERNEL)
    ex = dynamo.explain(copy.deepcopy(model))(torch.randn(2, 3, 45, 39, device=DEVICE))
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
    ops_called = [str(n.target) for n in ex.graphs[0].graph.nodes if n.op == 'call_function']
    assert sum('pale_mm.pale_attention' in t for t in ops_called) == 2, ops_called
    assert not any('scaled_dot_product' in t for t in ops_called)
    dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend='aot_eager', dynamic=True)
    counters = dynamo.utils.counters
    counters.clear()
    frames = []
    for hw in [(45, 39), (64, 64), (33, 70)]:
        x = torch.randn(2, 3, *hw, device=DEVICE)
        eager = copy.deepcopy(model)
        want = eager(x)
        got = compiled(x)
        sum(o.sum() for o in got).backward()
        sum(o.sum() for o in want).backward()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **fp_tol(hw[0] * hw[1], depth=8, ref=b))
        for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n, **fp_tol(
                2 * hw[0] * hw[1], depth=16, ref=q.grad))
            p.grad = None
        frames.append(counters['frames']['total'])
    assert frames == [1, 1, 1], frames  # compiled once, no recompiles
    dynamo.reset()


@pytest.mark.skipif(DEVICE.type != 'cuda', reason='compiled kernels: GPU only')
def test_one_compiled_kernel_serves_every_size():
    """Detection batches change size every iteration: the kernels compile once per
    dtype and head dim, not per size."""
    kernels = (triton_pale._pale_fwd, triton_pale._pale_bwd_dq, triton_pale._pale_bwd_dkdv)

    def compiled():
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]
    sizes = [(15, 17), (32, 32), (50, 76), (23, 9), (64, 41)]
    before = None
    for H, W in sizes:
        qkv = _qkv((2, H, W), 64, torch.bfloat16).requires_grad_()
        triton_pale.pale_attention_qkv(qkv, (7, 7), 2).sum().backward()
        before = before or compiled()
    assert compiled() == before


@pytest.mark.skipif(DEVICE.type != 'cuda', reason='CUDA autocast: GPU only')
def test_gpu_block_under_bf16_autocast_trains_like_the_reference():
    """A Pale block's training step under bf16 autocast on both paths: the same output
    and gradients to bf16 rounding (norm-wise)."""
    torch.manual_seed(0)
    blk = PaleBlock(64, 2, 7).to(DEVICE).train()
    x = torch.randn(4, 28, 30, 64, device=DEVICE)
    res = []
    for fast in (True, False):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            res.append(_step(blk, x, fast=fast))
    (out, grads, _), (out_r, grads_r, _) = res
    tol = 8 * math.sqrt(2) * torch.finfo(torch.bfloat16).eps  # both paths round
    assert _rel(out, out_r) < tol
    for n in grads:
        assert _rel(grads[n], grads_r[n]) < 4 * tol, n


# ----------------------------------------------------------------------------- launches
class _CountOps:
    """The aten ops that run (each a kernel launch on a GPU; views and allocations
    launch nothing), with each Triton launch counted once and the interpreter's own
    work inside it not at all."""
    FREE = {'empty', 'empty_strided', 'empty_like', 'new_empty', 'new_empty_strided',
            'detach', 'alias', 'lift_fresh', '_local_scalar_dense', 'is_same_size',
            '_reshape_alias', '_unsafe_view'}

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        self.ops, self.paused = [], False
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not (counter.paused or func.is_view or name in counter.FREE):
                    counter.ops.append(name)
                return func(*args, **(kwargs or {}))
        self.mode = Mode
        for fn, launches in (('_forward', 1), ('_backward', 2)):
            orig = getattr(triton_pale, fn)

            def launch(*a, _orig=orig, _n=launches, _name=fn, **k):
                self.paused = True
                try:
                    return _orig(*a, **k)
                finally:
                    self.paused = False
                    self.ops += ['triton' + _name] * _n
            monkeypatch.setattr(triton_pale, fn, launch)

    def step(self, module, x, amp=False):
        for p in module.parameters():
            p.grad = None
        self.ops = []
        with self.mode():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                out = module(x)
            out.float().sum().backward()
        return list(self.ops)


def test_gpu_block_launches(gpu_dispatch, monkeypatch):
    """A Pale block's training step (forward and backward) on the GPU path launches
    under half the kernels of the reference: no padding, partition or reverse copies,
    masks or concatenations around the attention (the reference: 120 ops in float32,
    160 under bf16 autocast), and no more than a Swin block (mmdet's SwinBlock: 61 to
    82 ops in float32, 87 to 108 under bf16 autocast, counted the same way)."""
    counter = _CountOps(monkeypatch)
    torch.manual_seed(0)
    blk = PaleBlock(64, 2, 7).to(DEVICE).train()
    x = torch.randn(2, 16, 16, 64, device=DEVICE, requires_grad=True)
    gpu = counter.step(blk, x)
    with switched_off(set_fast_paths):
        ref = counter.step(blk, x)
    assert gpu.count('triton_forward') == 1 and gpu.count('triton_backward') == 2
    assert not {'constant_pad_nd', 'where', 'repeat', 'scalar_tensor', 'slice_backward'} & \
        set(gpu), gpu
    assert gpu.count('cat') == 1  # [x, x, x] for the q/k/v depthwise conv, as in the model
    assert len(gpu) <= 45 and 2 * len(gpu) < len(ref), (len(gpu), len(ref))
    gpu_amp = counter.step(blk, x, amp=True)
    with switched_off(set_fast_paths):
        ref_amp = counter.step(blk, x, amp=True)
    # autocast adds casts to both (parameters to bf16, their gradients back to fp32),
    # and one in-place add where a gradient arrives in two dtypes
    casts = ref_amp.count('_to_copy')
    assert len(gpu_amp) - gpu_amp.count('_to_copy') <= len(gpu) + 1 and \
        len(gpu_amp) < len(ref_amp) - casts // 2, (len(gpu_amp), len(ref_amp))
