import copy

import pytest
import torch
import torch.nn as nn

from pale_mm.models import PaleTransformer
from tests.backbones import assert_output_pyramid
from tests.tolerances import assert_close_fp, module_scales

TINY = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4])
# sequential reductions in TINY: 4 patch embeds + 5 blocks x (q/k/v, attention, proj, fc1, fc2)
TINY_DEPTH = 4 + 5 * 5


def _small(**kw):
    kw.setdefault('arch', TINY)
    return PaleTransformer(**kw)


@pytest.mark.parametrize('size,expected', [
    ((511, 511), [(128, 128), (64, 64), (32, 32), (16, 16)]),
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
    ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
    ((33, 17), [(9, 5), (5, 3), (3, 2), (2, 1)]),
    ((1, 1), [(1, 1)] * 4),
])
def test_output_pyramid(size, expected):
    assert_output_pyramid(_small(), size, expected)


def test_tiny_arch_channels_and_norms():
    model = PaleTransformer('tiny', out_indices=(1, 3)).eval()
    assert model.embed_dims == [64, 128, 256, 512]
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 12), (1, 512, 2, 3)]


def test_per_stage_pale_size_and_pairs():
    model = _small(pale_size=[3, (2, 5), 7, 1])
    assert model.pale_sizes == [(3, 3), (2, 5), (7, 7), (1, 1)]
    assert model.stages[1][0].attn.pale_size == (2, 5)
    model = _small(pale_size=(3, 4))
    assert model.pale_sizes == [(3, 4)] * 4


def test_train_returns_self_and_eval_chains():
    model = _small()
    assert model.train() is model
    assert model.eval() is model


def test_frozen_stem_only():
    model = _small(frozen_stages=0)
    assert not any(p.requires_grad for p in model.patch_embeds[0].parameters())
    assert all(p.requires_grad for p in model.stages[0].parameters())


def test_padding_invariance_end_to_end():
    """A real image pixel's features do not depend on the image size class:
    outputs are finite and the stage maps have no NaN from fully masked rows."""
    model = _small().eval()
    for hw in [(29, 31), (7, 100), (100, 7)]:
        with torch.no_grad():
            for o in model(torch.randn(1, 3, *hw)):
                assert torch.isfinite(o).all()


@pytest.mark.parametrize('bad,match', [
    (torch.randn(3, 32, 32), '4-D'),
    (torch.randn(1, 1, 3, 32, 32), '4-D'),
    (torch.randn(1, 4, 32, 32), 'in_channels=3 but got an input with 4 channels'),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        _small()(bad)


@pytest.mark.parametrize('alias,name', [('t', 'tiny'), ('S', 'small'), ('b', 'base'),
                                        ('Tiny', 'tiny')])
def test_arch_aliases_as_in_mmpretrain(alias, name):
    arch = PaleTransformer._parse_arch(alias)
    assert arch == PaleTransformer._parse_arch(name) == {
        k: list(v) for k, v in PaleTransformer.arch_zoo[name].items()}


def test_bad_input_type():
    with pytest.raises(TypeError, match='torch.Tensor'):
        _small()([1, 2, 3])


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(arch='huge'), ValueError,
     r"unknown PaleTransformer arch 'huge'; valid archs are \['b', 'base', .*'tiny'\]"),
    (dict(arch=['tiny']), TypeError, 'arch must be a str or a dict'),
    (dict(arch=dict(embed_dims=16, depths=[1, 1])), ValueError, 'missing keys'),
    (dict(arch=dict(embed_dims=16, depths=[1], num_heads=[3])), ValueError, 'even'),
    (dict(arch=dict(embed_dims=20, depths=[1], num_heads=[8])), ValueError,
     'cannot be split into two branches'),
    (dict(arch=dict(embed_dims=[16, 32], depths=[1], num_heads=[2])), ValueError,
     'one entry per stage'),
    (dict(pale_size=0), ValueError, 'pale_size must be >= 1'),
    (dict(pale_size=[7, 7, 0, 7]), ValueError, 'pale_size must be >= 1'),
    (dict(pale_size=[7, 7, 7]), ValueError, 'one entry per stage'),
    (dict(pale_size=7.0), TypeError, 'pale_size'),
    (dict(out_indices=(0, 4)), ValueError, 'out_indices'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages'),
    (dict(in_channels=0), ValueError, 'in_channels'),
    (dict(pretrained=123), TypeError, 'pretrained must be a str'),
    (dict(mlp_ratio=[4, 4]), TypeError,
     r'PaleTransformer: mlp_ratio must be a number > 0, got \[4, 4\]'),
    (dict(arch=dict(TINY, depths=[1, 2, -1, 1])), ValueError,
     r'PaleTransformer arch depths \[1, 2, -1, 1\]: stage 2 has -1'),
    (dict(arch=dict(TINY, embed_dims=[16, 32, 64, True])), ValueError,
     r'PaleTransformer arch embed_dims .*: stage 3 has True'),
])
def test_bad_construction(kwargs, exc, match):
    kwargs.setdefault('arch', TINY)
    with pytest.raises(exc, match=match):
        PaleTransformer(**kwargs)


def test_in_channels():
    model = _small(in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32))[0].shape == (1, 16, 8, 8)


def test_init_weights_default():
    model = _small()
    model.init_weights()
    w = model.stages[0][0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.005
    assert torch.count_nonzero(model.stages[0][0].mlp.fc1.bias) == 0


def test_backward_all_params_used():
    model = _small().train()
    sum(o.mean() for o in model(torch.randn(2, 3, 40, 40))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('dims,heads', [(64, 2), (24, 4)])  # kernel (head dim 32) and SDPA
def test_block_inference_path_leaves_its_input_and_matches_autograd(dims, heads):
    """At inference the block adds the CPE in place into the conv's output and fuses
    the residual adds into the output GEMMs; its input stays untouched and the
    result is the autograd path's."""
    from pale_mm.models.pale_transformer import PaleBlock
    torch.manual_seed(0)
    blk = PaleBlock(dims, heads, pale_size=(3, 4)).eval()
    x = torch.randn(2, 10, 13, dims)
    x0 = x.clone()
    with torch.no_grad():
        fast = blk(x)
    assert torch.equal(x, x0)
    slow = blk(x.clone().requires_grad_())  # F.linear and separate adds
    # other kernels: equal to fp32 rounding of fc2's K = 4 * dims over the block's
    # five reductions (q/k/v, attention, proj, fc1, fc2)
    assert_close_fp(fast, slow.detach(), 4 * dims, depth=5)


def test_block_inference_under_autocast_keeps_the_fp32_residual_stream():
    from pale_mm.models.pale_transformer import PaleBlock
    torch.manual_seed(0)
    blk = PaleBlock(64, 2, pale_size=3).eval()
    x = torch.randn(1, 6, 7, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            fast = blk(x)
        slow = blk(x.clone().requires_grad_())
    assert fast.dtype == slow.dtype == torch.float32
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


def test_block_drop_path_applies_to_both_branches():
    from pale_mm.models.pale_transformer import PaleBlock
    torch.manual_seed(0)
    blk = PaleBlock(16, 2, pale_size=3, drop_path_rate=0.5).train()
    x = torch.randn(4, 6, 6, 16)
    # drop path on a sample: that sample's branch contribution is zero or scaled by 2
    for m in blk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(3)
    out = blk(x)
    torch.manual_seed(3)
    keep = [torch.empty(4, 1, 1, 1).bernoulli_(0.5) for _ in range(2)]  # timm's DropPath
    cpe = x + blk.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = cpe + blk.attn(blk.norm1(cpe).reshape(4, 36, 16), (6, 6)).view(4, 6, 6, 16) * keep[0] / 0.5
    y = y + blk.mlp(blk.norm2(y)) * keep[1] / 0.5
    assert_close_fp(out, y, 4 * 16, depth=5)


def test_patch_embed_weights_stay_channels_last_and_change_nothing():
    """The stem and merge conv weights are stored channels-last (no per-call weight
    copy in oneDNN's conv); init, load_state_dict and .to() keep that, and the
    outputs and gradients are those of plain (contiguous) weights."""
    torch.manual_seed(0)
    model = _small()
    model.init_weights()
    cl = torch.channels_last

    def layouts(m):
        return [e.proj.weight.is_contiguous(memory_format=cl) for e in m.patch_embeds]
    assert all(layouts(model))
    plain = copy.deepcopy(model)
    for e in plain.patch_embeds:
        e.proj.weight.data = e.proj.weight.data.contiguous()
    assert not any(layouts(plain)[1:])  # merges (the 3-channel stem may be both)
    model.load_state_dict(plain.state_dict())
    assert all(layouts(model)) and all(layouts(model.double().float()))
    x = torch.randn(2, 3, 45, 61)
    for train in (False, True):
        outs = []
        for m in (model, plain):
            torch.manual_seed(1)  # the same drop path
            outs.append(m.train(train)(x))
        # the two weight layouts run different conv kernels (oneDNN's blocking, and
        # AVX2 vs AVX-512 ones): equal up to fp32 rounding of the longest reductions
        # (the last stage's fc2, K = 4 * 128) through the network's sequential layers
        for a, b in zip(*outs):
            assert_close_fp(a, b, 4 * 128, depth=TINY_DEPTH)
    # random output weights: the gradient of a plain sum of LayerNorm outputs is 0 in
    # exact arithmetic, so both sides would be rounding noise
    g = [torch.randn_like(o) for o in outs[0]]
    for out in outs:
        sum((o * w).sum() for o, w in zip(out, g)).backward()
    # A LayerNorm weight followed by BatchNorm (the blocks' norm1) still has a zero
    # gradient in exact arithmetic: compare each gradient on the scale of its module's
    # largest one. Weight gradients sum over batch x positions (2 x 12 x 16 at stride
    # 4, shorter than fc2's K) and carry the forward's rounding: the same bound.
    scale = module_scales((n, q.grad) for n, q in plain.named_parameters())
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert_close_fp(p.grad, q.grad, 4 * 128, depth=TINY_DEPTH, msg=n, scale=scale[n])
    assert all(e.proj.weight.grad.is_contiguous(memory_format=cl) for e in model.patch_embeds)


def test_channels_last_patch_embeds_keep_the_seeded_init(monkeypatch):
    """The same seed gives the same initial weights as plain conv weights did."""
    from pale_mm.models import layers

    def seeded():
        torch.manual_seed(0)
        model = _small()
        model.init_weights()
        return model
    models = [seeded()]
    init = layers.ConvPatchEmbed.__init__  # then with channels_last ignored: plain weights
    monkeypatch.setattr(layers.ConvPatchEmbed, '__init__',
                        lambda self, *a, channels_last=False: init(self, *a))
    models.append(seeded())
    assert models[0].patch_embeds[1].proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert not models[1].patch_embeds[1].proj.weight.is_contiguous(
        memory_format=torch.channels_last)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
