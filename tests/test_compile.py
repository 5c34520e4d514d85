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


def _compare_compiled(backend, shape):
    """Outputs, gradients, BN statistics and eval outputs of the compiled model against
    eager's. Compiled code may order a reduction differently (inductor fuses and
    splits them), so the tolerance is fp32 rounding of the longest one: the weight
    gradients' sum over batch x positions at stride 4, through the model's depth."""
    eager = _build('pale')
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend=backend, fullgraph=True, dynamic=False)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    k = max(512, shape[0] * -(-shape[2] // 4) * -(-shape[3] // 4))

    def close(a, b, msg=None):
        assert_close_fp(a, b, k, depth=TINY_DEPTH, msg=msg)
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
        assert_close_fp(a, b, k, depth=TINY_DEPTH, msg=n, scale=scale[n])
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


@pytest.mark.slow
def test_inductor_matches_eager(_sdpa_in_eager):
    _compare_compiled('inductor', (1, 3, 64, 96))
