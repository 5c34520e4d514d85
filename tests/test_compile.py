"""torch.compile: the backbones trace into one graph (no graph breaks) in training
and inference, and compiled models give eager's outputs, gradients and BatchNorm
statistics. ``aot_eager`` checks what AOTAutograd makes of our autograd Functions
and in-place buffer updates; the slow test runs inductor itself."""
import copy

import pytest
import torch

from test_backbone_interface import FAMILIES

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
    """Compiled code computes attention with SDPA (the fused CPU kernel is eager-only),
    so eager runs SDPA too and the comparison stays exact to the tolerances below;
    the kernel against SDPA is tests/test_cpu_attention.py's subject."""
    from pale_mm.models.cpu_attention import set_cpu_attention
    previous = set_cpu_attention(False)
    yield
    set_cpu_attention(previous)


def _compare_compiled(backend, shape, rtol, atol):
    eager = _build('pale')
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend=backend, fullgraph=True, dynamic=False)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    g = [torch.randn_like(o) for o in eager(x)]
    eager.train()
    compiled_src.train()
    # the first training step made eager's BN statistics move: copy them back
    compiled_src.load_state_dict(eager.state_dict())
    want_out, want_grads = _train_step(eager, x, g)
    got_out, got_grads = _train_step(compiled, x, g)
    for a, b in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    # BatchNorm running statistics moved exactly once, as in eager mode
    for (k, a), b in zip(compiled_src.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=k)
    eager.eval()
    compiled_src.eval()
    with torch.no_grad():
        for a, b in zip(compiled(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_aot_eager_matches_eager(_sdpa_in_eager):
    """Odd sizes (padded pale groups, several parts per branch) through AOTAutograd."""
    _compare_compiled('aot_eager', (2, 3, 70, 90), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_matches_eager(_sdpa_in_eager):
    _compare_compiled('inductor', (1, 3, 64, 96), rtol=1e-4, atol=1e-4)
