"""Shared layers: the memory-saving MLP gives autograd's exact results."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pale_mm.models.layers import Mlp


def _plain(m, x):
    return m.fc2(F.gelu(m.fc1(x)))


def _grads(m, x, fn, g):
    x = x.detach().clone().requires_grad_()
    out = fn(m, x)
    return [out] + list(torch.autograd.grad(out.float(), [x] + list(m.parameters()), g))


@pytest.mark.parametrize('amp', [False, True])
def test_mlp_recompute_equals_autograd(amp):
    torch.manual_seed(0)
    m = Mlp(16, 64)
    x = torch.randn(2, 5, 7, 16)
    g = torch.randn(2, 5, 7, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
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
    # dropout needs the standard path (its masks); it is still taken there
    m_drop = copy.deepcopy(m)
    m_drop.drop.p = 0.1
    assert _saved_numel(lambda: m_drop(x)) > plain
