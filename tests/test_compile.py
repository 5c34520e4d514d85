"""torch.compile: the backbones trace into one graph (no graph breaks) in training
and inference, and compiled models give eager's outputs, gradients and BatchNorm
statistics. ``aot_eager`` checks what AOTAutograd makes of our autograd Functions
and in-place buffer updates; the slow test runs inductor itself."""
import copy

import pytest
import torch

from tests.models.test_pale_transformer import TINY_DEPTH
from tests.models.test_pyramid import FAMILIES
from tests.tolerances import assert_close_fp, module_scales

dynamo = pytest.importorskip('torch._dynamo')


def _build(family):
    torch.manual_seed(0)
    m = FAMILIES[family][0](drop_path_rate=0.)
    m.init_weights()
    return m


# What inductor compiles in the slow tests: Pale with two stages of one block each.
# That holds every kind of layer of the backbone (the stride-4 stem, a stride-2 patch
# merge, Pale blocks with their CPE, BatchNorms and output norms) and, at the tests'
# sizes, pale groups padded and masked (rows at 64x96, columns at 45x62) and unpadded;
# stages 3 and 4 of the small model repeat stage 2 at smaller sizes. The cost of a
# compilation grows with the stages faster than linearly: with dynamic shapes each
# stage nests the sizes' floor divisions one level deeper, and SymPy weighs each new
# guard against those already made (the four-stage model took 17 minutes on a 2-core
# Zen 2, in dynamo's and inductor's symbolic-shape reasoning); static, each stage adds
# its own C++ kernels to build.
COMPILE_ARCH = dict(embed_dims=16, depths=[1, 1], num_heads=[2, 2])
# sequential reductions: 2 patch embeds + 2 blocks x (q/k/v, attention, proj, fc1, fc2)
COMPILE_DEPTH = 2 + 2 * 5


def _build_for_compile():
    from pale_mm.models import PaleTransformer
    torch.manual_seed(0)
    m = PaleTransformer(arch=COMPILE_ARCH, out_indices=(0, 1), drop_path_rate=0.)
    m.init_weights()
    return m


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('family', FAMILIES)
def test_one_graph_without_breaks(family, training):
    m = _build(family).train(training)
    with torch.set_grad_enabled(training):
        ex = dynamo.explain(m)(torch.randn(1, 3, 64, 64))
    reasons = [b.reason.splitlines()[0] for b in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons


def _train_step(model, x, g):
    outs = model(x)
    loss = sum((o * gi).sum() for o, gi in zip(outs, g))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return [o.detach() for o in outs], grads


@pytest.fixture
def _sdpa_in_eager():
    """Compiled code runs the reference forward (the fast paths and the fused CPU
    kernels are eager-only), so eager runs it too and the comparison is of the same
    computation; the fast paths against the reference are other tests' subject."""
    try:
        from pale_mm.ops import set_fast_paths as switch
    except ImportError:  # before pale_mm.ops: the CPU kernel's own switch
        from pale_mm.models.cpu_attention import set_cpu_attention as switch
    previous = switch(False)
    yield
    switch(previous)


def _compare_compiled(backend, shape, dynamic=False, small=False):
    """Outputs, gradients, BN statistics and eval outputs of the compiled model against
    eager's. Compiled code may order a reduction differently (inductor fuses and
    splits them), so the tolerance is fp32 rounding of the longest one: the weight
    gradients' sum over batch x positions at stride 4, through the model's depth.
    ``small``: the two-stage model of ``COMPILE_ARCH`` instead of the tests' TINY."""
    eager = _build_for_compile() if small else _build('pale')
    depth = COMPILE_DEPTH if small else TINY_DEPTH
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend=backend, fullgraph=True, dynamic=dynamic)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    k = max(512, shape[0] * -(-shape[2] // 4) * -(-shape[3] // 4))

    def close(a, b, msg=None):
        assert_close_fp(a, b, k, depth=depth, msg=msg)
    g = [torch.randn_like(o) for o in eager(x)]
    eager.train()
    compiled_src.train()
    # the first training step made eager's BN statistics move: copy them back
    compiled_src.load_state_dict(eager.state_dict())
    want_out, want_grads = _train_step(eager, x, g)
    got_out, got_grads = _train_step(compiled, x, g)
    for a, b in zip(got_out, want_out):
        close(a, b)
    # a gradient that is zero in exact arithmetic (the blocks' norm1.weight: a
    # BatchNorm follows) is compared on its module's scale
    names = [n for n, _ in eager.named_parameters()]
    scale = module_scales(zip(names, want_grads))
    for n, a, b in zip(names, got_grads, want_grads):
        assert_close_fp(a, b, k, depth=depth, msg=n, scale=scale[n])
    # BatchNorm running statistics moved exactly once, as in eager mode
    for (name, a), b in zip(compiled_src.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            close(a, b, msg=name)
        else:
            assert torch.equal(a, b), name
    eager.eval()
    compiled_src.eval()
    with torch.no_grad():
        for a, b in zip(compiled(x), eager(x)):
            close(a, b)


def test_aot_eager_matches_eager(_sdpa_in_eager):
    """Odd sizes (padded pale groups, several parts per branch) through AOTAutograd."""
    _compare_compiled('aot_eager', (2, 3, 70, 90))


@pytest.mark.parametrize('shape', [(1, 3, 4, 64), (1, 10, 9, 64)],
                         ids=['one-group-unpadded', 'padded-columns'])
def test_aot_eager_with_dynamic_shapes_runs_pale_attention(shape):
    """PS-attention compiled with ``dynamic=True`` and run by ``aot_eager`` (eager
    kernels on the traced graph), forward and backward. At 3x4 with pale 7 each
    branch is one group with no padding: F.pad's zero pad then clones its strided
    input with its strides, while the trace, for sizes where the pad may not be zero,
    had a new contiguous tensor there, and the grouping's ``reshape``, traced as a
    view, stopped the run with "view size is not compatible with input tensor's size
    and stride". At 10x9 the columns are padded and masked."""
    from pale_mm.models.pale_attention import pale_attention_nhwc
    f = torch.compile(pale_attention_nhwc, backend='aot_eager', fullgraph=True, dynamic=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    got = f(q, k, v, (7, 7), 4)
    want = pale_attention_nhwc(q, k, v, (7, 7), 4)
    seq = max(shape[1], shape[2]) * 7  # the longest group: at most 7 lines of the map
    assert_close_fp(got, want, seq)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for name, a, b in zip('qkv', grads, torch.autograd.grad(want, (q, k, v), g)):
        assert_close_fp(a, b, seq, depth=2, msg=name)


@pytest.mark.slow
def test_inductor_matches_eager(_sdpa_in_eager):
    """Inductor's C++ code, on the two-stage model (``COMPILE_ARCH``)."""
    _compare_compiled('inductor', (1, 3, 64, 96), small=True)


@pytest.mark.slow
def test_inductor_with_dynamic_shapes_matches_eager(_sdpa_in_eager):
    """``dynamic=True``, as for detection batches: needs pale_mm's backport of
    pytorch/pytorch#185871 (``pale_mm.compat.fix_inductor_stride_order``; without it
    the two-stage model stops in inductor's lowering of the training graph with
    "TypeError: cannot determine truth value of Relational", checked 2026-12-07)."""
    _compare_compiled('inductor', (1, 3, 45, 62), dynamic=True, small=True)


class _NHWCConvs(torch.nn.Module):
    """The pattern behind pytorch/pytorch#185871 in our models: a strided stem, then a
    depthwise conv on a permuted view of a (B, H, W, C) map (saved for backward)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 7, 4, 3)
        self.dw = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1) * 2
        return x + self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def test_inductor_orders_symbolic_strides_of_nhwc_views(monkeypatch):
    """Without the backport, inductor stops here with "TypeError: cannot determine
    truth value of Relational" (torch 2.11 to 2.14.1): it sorts the view's strides,
    (H'W'C, 1, W'C, C) with H' = (H - 1)//4 + 1, by plain SymPy comparisons. With it,
    the compiled module gives eager's output and gradients at two sizes."""
    import pale_mm  # noqa: F401  (registers the backport)
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config
    # lowered here, not served from the on-disk caches of an earlier run
    monkeypatch.setattr(inductor_config, 'fx_graph_cache', False)
    monkeypatch.setattr(aot_config, 'enable_autograd_cache', False)
    torch.manual_seed(0)
    m = _NHWCConvs()
    compiled = torch.compile(copy.deepcopy(m), dynamic=True)
    for shape in ((2, 3, 64, 64), (1, 3, 45, 70)):
        x = torch.randn(*shape)
        got, want = compiled(x), m(x)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want)
        for (n, p), q in zip(compiled.named_parameters(), m.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n, rtol=1e-4, atol=1e-4)
            p.grad = q.grad = None


def test_importing_pale_mm_does_not_import_inductor():
    """The backport waits for inductor to load (the first compilation), then wraps
    its ``get_fill_order``; it survives ``torch._dynamo.reset()``."""
    import subprocess
    import sys
    code = ('import sys, torch, pale_mm; a = "torch._inductor.ir" in sys.modules; '
            'torch._dynamo.reset(); from torch._inductor import ir; '
            'print(a, getattr(ir.get_fill_order, "_pale_mm_fix", False), '
            'ir.get_fill_order([8, 1, 4]))')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ['False', 'True', '[1,', '2,', '0]'], \
        r.stdout + r.stderr[-2000:]
