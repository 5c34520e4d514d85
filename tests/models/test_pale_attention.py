import random

import pytest
import torch

from pale_mm.models import PSAttention, pale_attention
from pale_mm.models.pale_attention import pale_groups
from tests.pale_oracle import dense_pale_attention


def _random_case(rng):
    H, W = rng.randint(1, 23), rng.randint(1, 23)
    pale = rng.choice([1, 2, 3, 5, 7, (3, 5), (7, 2), 30])
    heads = rng.choice([2, 4, 6])
    d = rng.choice([1, 3, 4])
    return H, W, pale, heads, heads * d


SHAPES = [
    (14, 14, 7, 4, 32),    # exact multiple: no padding, no mask
    (16, 16, 7, 2, 8),     # non-multiple
    (5, 3, 7, 2, 8),       # smaller than the pale: global over real tokens
    (1, 1, 7, 2, 4),
    (1, 9, 7, 2, 4),
    (9, 1, (3, 2), 2, 4),
    (13, 29, (7, 3), 4, 16),
    (32, 32, 7, 8, 32),
]


@pytest.mark.parametrize('H,W,pale,heads,C', SHAPES)
def test_matches_dense_oracle(H, W, pale, heads, C):
    B = 2
    q, k, v = (torch.randn(B, H * W, C, dtype=torch.float64) for _ in range(3))
    out = pale_attention(q, k, v, (H, W), pale, heads)
    ref = dense_pale_attention(q, k, v, (H, W), pale, heads)
    assert out.shape == (B, H * W, C)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('H,W,pale,heads,C', SHAPES)
def test_autograd_path_matches_oracle_with_gradients(H, W, pale, heads, C):
    """The training implementation: values and gradients equal the dense oracle's."""
    qkv = [torch.randn(2, H * W, C, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ref_in = [t.detach().clone().requires_grad_() for t in qkv]
    out = pale_attention(*qkv, (H, W), pale, heads)
    ref = dense_pale_attention(*ref_in, (H, W), pale, heads)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(qkv, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_matches_dense_oracle_random_shapes():
    rng = random.Random(1234)
    for _ in range(60):
        H, W, pale, heads, C = _random_case(rng)
        q, k, v = (torch.randn(2, H * W, C, dtype=torch.float64) for _ in range(3))
        out = pale_attention(q, k, v, (H, W), pale, heads)
        ref = dense_pale_attention(q, k, v, (H, W), pale, heads)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f'H={H} W={W} pale={pale} heads={heads} '
                                                 f'C={C}: {m}')


def test_float32_close_to_oracle():
    q, k, v = (torch.randn(1, 20 * 27, 16) for _ in range(3))
    out = pale_attention(q, k, v, (20, 27), 7, 4)
    ref = dense_pale_attention(q, k, v, (20, 27), 7, 4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_group_rule():
    # G = ceil(H/sr); lines per group shrink to ceil(H/G) without changing groups
    assert pale_groups(56, 7) == (8, 7)
    assert pale_groups(16, 7) == (3, 6)
    assert pale_groups(200, 7) == (29, 7)
    assert pale_groups(5, 7) == (1, 5)
    assert pale_groups(1, 7) == (1, 1)


def test_oracle_is_not_global_attention():
    """Guard the oracle itself: with real groups it must differ from global attention."""
    q, k, v = (torch.randn(1, 14 * 14, 8, dtype=torch.float64) for _ in range(3))
    pale = dense_pale_attention(q, k, v, (14, 14), 7, 2)
    glob = dense_pale_attention(q, k, v, (14, 14), 14, 2)
    assert (pale - glob).abs().max() > 1e-3


@pytest.mark.parametrize('H,W,pale', [(9, 11, 7), (16, 16, 7), (14, 14, 7), (3, 20, 7),
                                      (13, 29, (7, 3))])
def test_reference_pads_and_masks_exactly_the_padded_keys(H, W, pale, monkeypatch):
    """The reference pads each branch to G groups of s lines and masks the padded
    keys; with no padding it builds no mask. Every real token is a query once per
    branch."""
    import importlib
    mod = importlib.import_module('pale_mm.models.pale_attention')
    real_sdpa, calls = mod.F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(mod.F, 'scaled_dot_product_attention', spy)
    B = 2
    q, k, v = (torch.randn(B, H * W, 8, dtype=torch.float64) for _ in range(3))
    out = pale_attention(q, k, v, (H, W), pale, 2)
    torch.testing.assert_close(out, dense_pale_attention(q, k, v, (H, W), pale, 2),
                               rtol=1e-10, atol=1e-10)
    sr, sc = (pale, pale) if isinstance(pale, int) else pale
    assert len(calls) == 2  # one SDPA call per branch
    for (shape, mask), (L, other, s) in zip(calls, ((H, W, sr), (W, H, sc))):
        G, lines = pale_groups(L, s)
        assert shape == (B * G, 1, lines * other, 4)
        if G * lines == L:
            assert mask is None
        else:
            assert mask.shape == (B * G, 1, 1, lines * other)
            assert int(mask.sum()) == B * L * other  # the real keys, each once


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'autograd'])
@pytest.mark.parametrize('H,W,pale', [(9, 11, 7), (16, 16, 7), (3, 20, 7), (128, 20, 7),
                                      (13, 29, (7, 3))])
def test_fast_path_never_computes_padding(H, W, pale, grad, monkeypatch):
    """The design pads to a multiple of the pale and masks the padded keys; the fast
    path gets the same result without computing any padded token: every query and
    key that reaches SDPA is a real token, each exactly once per branch, and no mask
    is needed."""
    import importlib
    mod = importlib.import_module('pale_mm.ops.pale')
    real_sdpa, calls = mod.F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(mod.F, 'scaled_dot_product_attention', spy)
    B = 2
    q, k, v = (torch.randn(B, H * W, 8, dtype=torch.float64, requires_grad=grad)
               for _ in range(3))
    pale_pair = (pale, pale) if isinstance(pale, int) else pale
    out = mod.pale_attention_fast(*(t.view(B, H, W, 8) for t in (q, k, v)), pale_pair,
                                  2).view(B, H * W, 8)
    torch.testing.assert_close(out, dense_pale_attention(q, k, v, (H, W), pale, 2),
                               rtol=1e-10, atol=1e-10)
    assert calls and all(mask is None for _, _, mask in calls)
    assert all(qs == ks for qs, ks, _ in calls)
    tokens = sum(qs[0] * qs[2] for qs, _, _ in calls)  # (batch*groups) * group length
    assert tokens == 2 * B * H * W  # row branch + column branch, real tokens only

    # one call per distinct group length of each branch (G groups of interlaced lines
    # have one length if G divides the side, else two); a square map and pale share
    # each call between its row and column branch
    sr, sc = (pale, pale) if isinstance(pale, int) else pale
    lengths = [1 if L % -(-L // s) == 0 else 2 for L, s in ((H, sr), (W, sc))]
    assert len(calls) == (lengths[0] if (H, sr) == (W, sc) else sum(lengths))


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F
    return F.max_pool2d(mask[None, None].double(), 3, 1, 1)[0, 0] > 0


@pytest.mark.parametrize('H,W,pale,token', [
    (14, 14, 7, (3, 5)), (13, 10, 7, (12, 9)), (11, 17, (5, 3), (0, 16)), (4, 6, 7, (2, 2))])
def test_dependency_is_exactly_the_pale(H, W, pale, token):
    """In eval mode, output token (r, w) depends on exactly the inputs in its pale
    (real rows of its row group, real columns of its column group), widened by the
    3x3 depthwise convs of Q/K/V."""
    attn = PSAttention(16, 4, pale_size=pale).double().eval()
    with torch.no_grad():  # non-trivial BN statistics
        attn.qkv_bn.running_mean.normal_()
        attn.qkv_bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, H * W, 16, dtype=torch.float64, requires_grad=True)
    out = attn(x, (H, W))
    r, w = token
    out[0, r * W + w].sum().backward()
    dep = x.grad[0].abs().sum(-1).view(H, W) > 0
    sr, sc = (pale, pale) if isinstance(pale, int) else pale
    G, Gc = -(-H // sr), -(-W // sc)
    rows = (torch.arange(H) % G == r % G).view(H, 1).expand(H, W)
    cols = (torch.arange(W) % Gc == w % Gc).view(1, W).expand(H, W)
    expected = _dilate(rows | cols)
    assert torch.equal(dep, expected), f'\n{dep.int()}\n{expected.int()}'


def test_errors():
    q = torch.randn(1, 12, 8)
    with pytest.raises(ValueError, match='pale_size must be >= 1'):
        pale_attention(q, q, q, (3, 4), 0, 2)
    with pytest.raises(TypeError, match='pale_size'):
        pale_attention(q, q, q, (3, 4), 2.5, 2)
    with pytest.raises(ValueError, match='even'):
        pale_attention(q, q, q, (3, 4), 7, 3)
    with pytest.raises(ValueError, match='not divisible'):
        pale_attention(q, q, q, (3, 4), 7, 6)
    with pytest.raises(ValueError, match='gives 15 tokens'):
        pale_attention(q, q, q, (3, 5), 7, 2)
    with pytest.raises(ValueError, match='got a 2-D tensor'):
        pale_attention(q[0], q[0], q[0], (3, 4), 7, 2)
    with pytest.raises(ValueError, match='even'):
        PSAttention(8, 1)
    attn = PSAttention(8, 2)
    with pytest.raises(ValueError, match='hw_shape'):
        attn(q, (4, 4))


@pytest.mark.parametrize('qkv_bias', [True, False])
def test_psattention_matches_unfused_reference(qkv_bias):
    """PSAttention in train and eval mode against a plain re-statement of the spec:
    three (depthwise 3x3 -> BN -> pointwise) projections, pale attention, proj."""
    import torch.nn.functional as F
    C, H, W = 12, 9, 10
    attn = PSAttention(C, 4, pale_size=(4, 3), qkv_bias=qkv_bias).double()
    with torch.no_grad():
        attn.qkv_bn.running_mean.normal_()
        attn.qkv_bn.running_var.uniform_(0.5, 2)
        attn.qkv_bn.weight.normal_()
        attn.qkv_bn.bias.normal_()
    x = torch.randn(2, H * W, C, dtype=torch.float64)

    def reference(training, mean, var):
        img = x.transpose(1, 2).reshape(2, C, H, W)
        bn = attn.qkv_bn
        outs = []
        for t in range(3):  # branch t owns channels [t*C, (t+1)*C) of qkv_dw / qkv_bn
            idx = torch.arange(C) + t * C
            y = F.conv2d(img, attn.qkv_dw.weight[idx], None, 1, 1, 1, C)
            m, v = mean[idx].clone(), var[idx].clone()
            y = F.batch_norm(y, m, v, bn.weight[idx], bn.bias[idx], training, 0.1, bn.eps)
            mean[idx], var[idx] = m, v
            y = y.flatten(2).transpose(1, 2)
            b = attn.qkv.bias[t * C:(t + 1) * C] if qkv_bias else None
            outs.append(F.linear(y, attn.qkv.weight[t * C:(t + 1) * C], b))
        o = dense_pale_attention(*outs, (H, W), (4, 3), 4)
        return attn.proj(o)

    for training in (False, True):
        attn.train(training)
        before = attn.qkv_bn.running_mean.clone()
        mean = attn.qkv_bn.running_mean.clone()
        var = attn.qkv_bn.running_var.clone()
        with torch.no_grad():
            torch.testing.assert_close(attn(x, (H, W)), reference(training, mean, var))
        # running statistics: untouched in eval, updated exactly once in training
        torch.testing.assert_close(attn.qkv_bn.running_mean, mean)
        torch.testing.assert_close(attn.qkv_bn.running_var, var)
        assert attn.qkv_bn.num_batches_tracked.item() == int(training)
        assert torch.equal(attn.qkv_bn.running_mean, before) != training

    # training-mode gradients: BN folded into the projection with the batch
    # statistics (and their fast two-pass backward) against plain F.batch_norm
    attn.train()
    xg = x.clone().requires_grad_()
    params = [xg] + list(attn.parameters())
    g = torch.randn(2, H * W, C, dtype=torch.float64)
    got = torch.autograd.grad(attn(xg, (H, W)), params, g)
    x_saved, x = x, xg
    want = torch.autograd.grad(reference(True, mean.clone(), var.clone()), params, g)
    x = x_saved
    for a, b, n in zip(got, want, ['x'] + [n for n, _ in attn.named_parameters()]):
        torch.testing.assert_close(a, b, msg=n)
