"""pale_mm.ops: the fast forwards compute the reference model's function (values,
gradients and BatchNorm statistics; float64 exactly, float32 within tolerances
derived from the reductions), and the one dispatch point sends every module to its
reference forward wherever a fast path could hide the model from a standard tool:
switched off, converted, replaced, hooked, traced."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import pale_mm.ops as ops
from pale_mm.models import PaleTransformer
from pale_mm.models.layers import Mlp
from pale_mm.models.pale_transformer import PaleBlock
from pale_mm.ops import fast_path, set_fast_paths
from tests.switches import switched_off
from tests.tolerances import fp_tol


def _randomise_bn(module: nn.Module):
    """Non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)


def _block(dim, heads, pale, dtype, drop_path=0.):
    torch.manual_seed(0)
    blk = PaleBlock(dim, heads, pale, drop_path_rate=drop_path).to(dtype)
    _randomise_bn(blk)
    return blk


def _run(blk, x, fast_on, seed=1):
    """Output, gradients of the input and every parameter, and the buffers after one
    forward of a copy of ``blk``."""
    blk = copy.deepcopy(blk)
    x = x.clone().requires_grad_()
    previous = set_fast_paths(fast_on)
    try:
        assert (fast_path(blk, x) is not None) == fast_on
        torch.manual_seed(seed)
        out = blk(x)
    finally:
        set_fast_paths(previous)
    g = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    grads = torch.autograd.grad(out, [x] + list(blk.parameters()), g)
    return out.detach(), grads, [b.clone() for b in blk.buffers()]


CASES = [((2, 14, 14), 64, 2, 7),         # no padding; head dim 32 (the CPU kernel)
         ((2, 9, 23), 24, 4, (7, 3)),     # padded both ways, non-square pale, head dim 6
         ((1, 16, 5), 96, 4, 7)]          # head dim 24 (Pale-S), one group of columns


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('shape,dim,heads,pale', CASES)
def test_fast_block_equals_reference_in_float64(shape, dim, heads, pale, training):
    """Copy-once grouping without padding, BatchNorm folded into the projections (batch
    statistics in training, running statistics in eval), fused residual adds: the
    same function as the reference, to float64 rounding."""
    blk = _block(dim, heads, pale, torch.float64).train(training)
    x = torch.randn(*shape, dim, dtype=torch.float64)
    (out_f, grads_f, bufs_f), (out_r, grads_r, bufs_r) = (_run(blk, x, on) for on in (True, False))
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    names = ['x'] + [n for n, _ in blk.named_parameters()]
    for n, a, b in zip(names, grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=n)
    for a, b in zip(bufs_f, bufs_r):  # BN running statistics and num_batches_tracked
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if training:
        assert not torch.equal(bufs_f[0], blk.attn.qkv_bn.running_mean)


def test_fast_block_with_drop_path_equals_reference():
    """Drop path draws its masks in the same order on both paths (same seed, same
    samples dropped)."""
    blk = _block(24, 4, 5, torch.float64, drop_path=0.5).train()
    x = torch.randn(8, 7, 6, 24, dtype=torch.float64)
    (out_f, grads_f, _), (out_r, grads_r, _) = (_run(blk, x, on) for on in (True, False))
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('shape,dim,heads,pale', CASES)
def test_fast_block_in_float32_within_rounding_of_float64_reference(
        shape, dim, heads, pale, training, kernel_build):
    """In float32 the fast path also runs oneDNN's linear and, on AVX2 and AVX-512
    CPUs, the fused attention and depthwise-conv kernels (each build the CPU runs:
    ``kernel_build``, tests/ops/conftest.py). Both paths are compared with the
    float64 reference; the fast path's error may not exceed the tolerance of a
    computation with these reductions (the MLP's 4C-term GEMM, a group's keys). A
    gradient's error is relative to the size of its terms, not of its value (the
    key bias's gradient is zero: softmax ignores a shift of all scores), so gradients
    are compared at the scale of all the block's gradients."""
    blk = _block(dim, heads, pale, torch.float32).train(training)
    x = torch.randn(*shape, dim)
    out_d, grads_d, _ = _run(copy.deepcopy(blk).double(), x.double(), False)
    grad_scale = torch.cat([g.flatten() for g in grads_d])
    B, H, W = shape
    K = max(4 * dim, H * W)  # the longest reduction: fc2, or a weight gradient's tokens
    for on in (True, False):
        out, grads, _ = _run(blk, x, on)
        torch.testing.assert_close(out.double(), out_d, **fp_tol(K, depth=6, ref=out_d))
        for a, b in zip(grads, grads_d):
            torch.testing.assert_close(a.double(), b,
                                       **fp_tol(B * H * W, depth=12, ref=grad_scale))


def test_fast_block_inference_leaves_its_input():
    blk = _block(64, 2, (3, 4), torch.float32).eval()
    x = torch.randn(2, 10, 13, 64)
    x0 = x.clone()
    with torch.no_grad():
        blk(x)
    assert torch.equal(x, x0)


def test_fast_block_under_autocast_equals_reference():
    """bf16 autocast at inference: the fast path keeps autocast's casts (F.linear,
    SDPA; no oneDNN or kernels) and the residual stream in fp32."""
    blk = _block(64, 2, 3, torch.float32).eval()
    x = torch.randn(1, 6, 7, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        got = blk(x)
        with switched_off(set_fast_paths):
            want = blk(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **fp_tol(256, depth=6, dtype=torch.bfloat16))


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_fast_mlp_equals_reference_in_float64(training):
    torch.manual_seed(0)
    m = Mlp(12, 40).double().train(training)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    (out_f, grads_f, _), (out_r, grads_r, _) = (_run(m, x, on) for on in (True, False))
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fast_backbone_equals_reference_with_cp():
    """The whole backbone under gradient checkpointing, fast and reference: the same
    outputs, gradients and BatchNorm statistics (moved once per step on both paths:
    the recompute runs BatchNorm with momentum 0)."""
    torch.manual_seed(0)
    arch = dict(embed_dims=[32, 64], depths=[2, 1], num_heads=[2, 4])
    ref = PaleTransformer(arch, out_indices=(0, 1), drop_path_rate=0.3).double().train()
    _randomise_bn(ref)
    x = torch.randn(2, 3, 45, 39, dtype=torch.float64)
    results = []
    for with_cp in (False, True):
        for on in (True, False):
            m = copy.deepcopy(ref)
            m.with_cp = with_cp
            # (the backward recomputes under with_cp: on the same path as the forward)
            with switched_off(set_fast_paths) if not on else contextlib.nullcontext():
                torch.manual_seed(5)
                outs = m(x)
                sum((o * torch.arange(o.numel()).view_as(o).cos()).sum() for o in outs).backward()
            results.append((outs, [p.grad for p in m.parameters()], list(m.buffers())))
    base = results[0]
    for outs, grads, bufs in results[1:]:
        for a, b in zip(outs, base[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads, base[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        for a, b in zip(bufs, base[2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- where the dispatch says no
def _fast_calls(monkeypatch):
    """Record the names of the fast forwards that run."""
    calls = []
    for cls, name in ((PaleBlock, 'pale_block'), (Mlp, 'mlp')):
        fn, layout, applies, compiles = ops._REGISTRY[cls, 'cpu']
        monkeypatch.setitem(ops._REGISTRY, (cls, 'cpu'), (
            lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a), layout, applies,
            compiles))
    return calls


def test_fast_path_is_taken_by_default(monkeypatch):
    calls = _fast_calls(monkeypatch)
    blk = _block(16, 2, 3, torch.float32)
    blk(torch.randn(1, 5, 5, 16))
    assert calls == ['pale_block']
    Mlp(8, 16)(torch.randn(2, 8))
    assert calls == ['pale_block', 'mlp']


def test_switched_off_at_run_time_and_by_environment(monkeypatch):
    calls = _fast_calls(monkeypatch)
    blk = _block(16, 2, 3, torch.float32)
    with switched_off(set_fast_paths):
        assert not ops.fast_paths_enabled()
        blk(torch.randn(1, 5, 5, 16))
    assert calls == [] and ops.fast_paths_enabled()
    for value, enabled in (('0', False), ('off', False), ('1', True), ('', True)):
        monkeypatch.setenv(ops.ENV, value)
        assert ops._env_enabled() is enabled
    monkeypatch.setenv(ops.ENV, 'fast')
    with pytest.raises(ValueError, match='PALE_MM_FAST_PATHS must be 1 .* or 0'):
        ops._env_enabled()


def test_environment_variable_turns_every_fast_path_off_at_import():
    import subprocess
    import sys
    code = ('import torch, pale_mm; from pale_mm.ops import fast_path, fast_paths_enabled;'
            'from pale_mm.ops.attention import cpu_attention_available;'
            'from pale_mm.models.pale_transformer import PaleBlock;'
            'b = PaleBlock(16, 2, 3); x = torch.randn(1, 4, 4, 16);'
            'print(fast_paths_enabled(), fast_path(b, x), cpu_attention_available())')
    env = dict(__import__('os').environ, PALE_MM_FAST_PATHS='0')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ['False', 'None', 'False']


def _hooked(blk, where):
    fired = []
    dict(blk.named_modules())[where].register_forward_hook(lambda *a: fired.append(where))
    return fired


@pytest.mark.parametrize('where', ['', 'attn', 'attn.qkv_bn', 'attn.qkv', 'attn.proj',
                                   'mlp.fc1', 'mlp.fc2', 'cpe', 'norm1'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_a_hook_anywhere_in_the_block_sends_it_to_the_reference(where, training, monkeypatch):
    calls = _fast_calls(monkeypatch)
    blk = _block(16, 2, 3, torch.float32).train(training)
    fired = _hooked(blk, where)
    with torch.set_grad_enabled(training):
        blk(torch.randn(2, 5, 5, 16))
    assert fired == [where] and 'pale_block' not in calls


def test_global_hooks_send_modules_to_the_reference(monkeypatch):
    calls = _fast_calls(monkeypatch)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        blk = _block(16, 2, 3, torch.float32)
        blk(torch.randn(1, 4, 4, 16))
    finally:
        handle.remove()
    assert calls == [] and blk.attn.qkv_bn in seen


def test_converted_or_replaced_submodules_send_the_block_to_the_reference(monkeypatch):
    calls = _fast_calls(monkeypatch)
    blk = _block(16, 2, 3, torch.float32)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(blk))
    assert type(sync.attn.qkv_bn) is nn.SyncBatchNorm
    assert fast_path(sync, torch.randn(1, 4, 4, 16)) is None
    replaced = copy.deepcopy(blk)
    replaced.mlp.act = nn.GELU(approximate='tanh')  # same class, other function
    assert fast_path(replaced, torch.randn(1, 4, 4, 16)) is None
    replaced.mlp.act = nn.ReLU()
    assert fast_path(replaced, torch.randn(1, 4, 4, 16)) is None
    no_stats = copy.deepcopy(blk)
    no_stats.attn.qkv_bn = nn.BatchNorm2d(48, track_running_stats=False)
    assert fast_path(no_stats, torch.randn(1, 4, 4, 16)) is None

    class MyBlock(PaleBlock):  # a user's subclass keeps its own forward semantics
        pass
    sub = MyBlock(16, 2, 3)
    assert fast_path(sub, torch.randn(1, 4, 4, 16)) is None
    torch.nn.utils.parametrizations.weight_norm(blk.attn.proj)
    assert fast_path(blk, torch.randn(1, 4, 4, 16)) is None
    assert calls == []


def test_tracing_sees_the_reference(monkeypatch):
    """torch.jit.trace (the FLOP counter, ONNX) and torch.fx record the reference ops:
    the modules' own layers, SDPA, no fast path."""
    calls = _fast_calls(monkeypatch)
    blk = _block(16, 2, 3, torch.float32).eval()
    x = torch.randn(1, 5, 5, 16)
    traced = torch.jit.trace(blk, (x,), check_trace=False)
    assert calls == []
    assert 'scaled_dot_product_attention' in str(traced.inlined_graph)
    gm = torch.fx.symbolic_trace(blk)
    assert calls == []
    targets = {n.target for n in gm.graph.nodes if n.op in ('call_module', 'get_attr')}
    # attn.qkv (an nn.Linear subclass, so no leaf for FX) is traced into: its weight
    assert {'attn.qkv_dw', 'attn.qkv_bn', 'attn.qkv.weight', 'attn.proj', 'mlp.fc1',
            'mlp.fc2'} <= targets
    with torch.no_grad():
        torch.testing.assert_close(gm(x), blk(x), **fp_tol(64, depth=6))
