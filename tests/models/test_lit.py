"""LIT backbone / classifier: shapes, paper params and FLOPs, DTM, relative position
bias, backbone interface (frozen_stages, norm_eval, with_cp), official key layouts."""
import argparse
import copy
import math
import os.path as osp
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import pale_mm  # noqa: F401
from pale_mm.flops import count_flops, count_params, flop_analyzer
from pale_mm.models import LIT, LITClassifier
from pale_mm.models.lit import (DeformConv2dPack, LITAttention, relative_position_index,
                                resize_rel_pos_table)
from tests.backbones import (assert_onnx_matches, assert_output_pyramid, onnx_exporter_kwargs,
                             randomize_bn)
from tests.lit_official import (official_index, official_lit_smb_shapes,
                                official_lit_ti_shapes, random_state)
from tests.tolerances import fp_tol

TINY = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 1, 2, 2])
TINY_TI = dict(TINY, mlp_ratios=[8, 8, 4, 4], pos_embed=True, norm_eps=1e-6)
LAYOUTS = {'swin': TINY, 'pvt': TINY_TI}
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# Paper / official README (arXiv 2105.14217): params, multiply-adds at 224.
PAPER = {'ti': (19e6, 3.6e9), 's': (27e6, 4.1e9), 'm': (48e6, 8.6e9), 'b': (86e6, 15.0e9)}


def _small(layout='swin', **kw):
    kw.setdefault('arch', LAYOUTS[layout])
    kw.setdefault('pretrain_img_size', 64)
    return LIT(**kw)


@pytest.mark.parametrize('layout', ['swin', 'pvt'])
@pytest.mark.parametrize('size,expected', [
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
    ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ((33, 17), [(9, 5), (5, 3), (3, 2), (2, 1)]),
    ((1, 1), [(1, 1)] * 4),
])
def test_output_pyramid(layout, size, expected):
    assert_output_pyramid(_small(layout), size, expected)


@pytest.mark.parametrize('layout,size,expected', [
    # the official downstream code: LIT-S's stem pads to 4, its merges floor ...
    ('swin', (75, 107), [(19, 27), (9, 13), (4, 6), (2, 3)]),
    ('swin', (29, 29), [(8, 8), (4, 4), (2, 2), (1, 1)]),
    # ... LIT-Ti's stem floors too
    ('pvt', (75, 107), [(18, 26), (9, 13), (4, 6), (2, 3)]),
    ('pvt', (32, 63), [(8, 15), (4, 7), (2, 3), (1, 1)]),
])
def test_output_pyramid_with_floor_rounding(layout, size, expected):
    assert_output_pyramid(_small(layout, size_rounding='floor'), size, expected)


@pytest.mark.parametrize('layout,size,least', [('swin', (28, 64), 29), ('pvt', (64, 31), 32)])
def test_floor_rounding_names_the_smallest_image(layout, size, least):
    """Where a stage would have no row left, the error says so instead of a
    deformable conv's error on an empty map."""
    with pytest.raises(ValueError, match=rf"size_rounding='floor' needs images of at least "
                                         rf"{least}x{least} .*got {re.escape(str(tuple(size)))}"):
        _small(layout, size_rounding='floor')(torch.randn(1, 3, *size))


def test_out_norm_indices_choose_the_normed_outputs():
    """The outputs without a norm are the stages' own maps (the forward of the stage
    with a norm differs only by it), and frozen stages freeze the norms they have."""
    plain = _small(out_norm_indices=(1, 3), frozen_stages=2).eval()
    assert [n for n, _ in plain.named_children() if n.startswith('norm')] == ['norm1', 'norm3']
    assert not plain.norm1.weight.requires_grad and plain.norm3.weight.requires_grad
    normed = _small(out_norm_indices=None).eval()
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, ref = plain(x), normed(x)
        feats = list(normed._forward_stages(x))
    for i in (0, 2):
        torch.testing.assert_close(outs[i], feats[i].permute(0, 3, 1, 2), rtol=0, atol=0)
    for i in (1, 3):
        torch.testing.assert_close(outs[i], ref[i], rtol=0, atol=0)


def test_arch_zoo_structure():
    ti = LIT('ti', out_indices=(1, 3))
    assert ti.embed_dims == [64, 128, 320, 512] and ti.abs_pos_embed
    assert hasattr(ti, 'norm1') and hasattr(ti, 'norm3') and not hasattr(ti, 'norm0')
    assert not hasattr(ti.block1[0], 'attn') and hasattr(ti.block3[0], 'attn')
    assert ti.pos_embed4.shape == (1, 7 * 7 + 1, 512)
    s = LIT('s')
    assert s.embed_dims == [96, 192, 384, 768] and s.depths == [2, 2, 6, 2]
    assert not hasattr(s.layers[1].blocks[0], 'attn')
    assert s.layers[2].blocks[0].attn.relative_position_bias_table.shape == (27 * 27, 12)
    assert s.layers[3].downsample is None
    assert LIT('m').depths == [2, 2, 18, 2] and LIT('b').embed_dims[0] == 128


@pytest.mark.parametrize('arch', ['ti', 's', 'm', 'b'])
def test_params_and_flops_vs_paper(arch):
    """FLOPs within 5% of the paper. Params: the body (everything but the 1000-class
    head) within 3% of the paper's table, the whole classifier within 5%.

    Why two bounds: the official code (ziplab/LIT classification/code_for_lit_s_m_b/
    models/lit.py, classification/code_for_lit_ti/lit.py) has the same parameter names
    and shapes as this classifier (test_official_layout_matches_classifier_exactly), so
    19.89M / 27.97M / 49.37M / 87.29M with the head is what the official DeiT-style
    main.py logs as n_parameters. The README / paper values 19 / 27 / 48 / 86 are the
    headless counts 19.37M / 27.20M / 48.60M / 86.27M rounded down, so LIT-Ti and LIT-S
    with the head sit +4.7% / +3.6% above them. The 5% bound on the whole model is that
    documented gap, not slack for a different architecture: the body bound is the tight
    one, and test_mask_rcnn_params_vs_official_readme cross-checks the backbone through
    the authors' own detection table."""
    model = LITClassifier(arch, num_classes=1000)
    p_ref, f_ref = PAPER[arch]
    flops = count_flops(model, (3, 224, 224))
    assert abs(flops / f_ref - 1) < 0.05, flops
    params = count_params(model)
    body = params - count_params(model.head)
    assert abs(body / p_ref - 1) < 0.03, body
    assert abs(params / p_ref - 1) < 0.05, params


# Official README (ziplab/LIT README.md, detection/README.md): Mask R-CNN 1x whole-detector
# params, given in whole millions.
MASK_RCNN_README = {'ti': 40e6, 's': 48e6}


@pytest.mark.parametrize('arch', ['ti', 's'])
def test_mask_rcnn_params_vs_official_readme(arch, tmp_path, monkeypatch):
    """Independent cross-check of the backbone against the authors' own detection table:
    the Mask R-CNN built from configs/lit/ (mmdet's Mask R-CNN heads have the same
    parameters as the mmdet 2.x ones the authors used) must round to the README's whole
    millions, i.e. be within 0.5M of it, with no extra slack.

    LIT-Ti: the official detection backbone (detection/mmdet/models/backbones/lit_ti.py)
    keeps the 224-px position embeddings, like this config: 39.54M -> 40M.
    LIT-S: the official detection backbone (detection/mmdet/models/backbones/lit.py) sizes
    each relative position bias table for an 800-px input (``input_resolution = 800 //
    patch_size``) and resizes the 224-px tables of the ImageNet checkpoint into them; so
    does this config (``pretrain_img_size=800``): 48.24M -> 48M. The documented
    single-resize option (``pretrain_img_size=224``: 224-px tables, 0.76M fewer
    parameters) must differ from it by exactly the table sizes, so both numbers are tied
    to the architecture.
    (Only other difference: our per-output LayerNorms ``norm0..3``; the official Ti has
    none, the official S lacks ``norm0``: 2,048 / 192 parameters, far below rounding.)"""
    pytest.importorskip('mmdet')
    from tests.configs.test_configs import _load, _registry

    path = osp.join(ROOT, 'configs', 'lit', f'mask-rcnn_lit-{arch}_fpn_1x_coco.py')
    cfg = _load(path)
    # the official weights are named, but building downloads nothing (init_weights would)
    assert cfg.model.backbone.init_cfg.checkpoint.startswith('https://github.com/ziplab/')
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    models = _registry('mmdet')
    shipped = count_params(models.build(cfg.model))
    assert not (tmp_path / 'hub').exists()
    official = shipped
    if arch != 'ti':
        assert cfg.model.backbone.pretrain_img_size == 800  # as the official detector
        cfg.model.backbone.pretrain_img_size = 224
        single = count_params(models.build(cfg.model))
        # stages 3-4 (6 + 2 blocks, 12 / 24 heads): tables (2*50-1)^2 and (2*25-1)^2 at
        # 800 px against (2*14-1)^2 and (2*7-1)^2 at 224 px
        tables = 6 * 12 * (99 ** 2 - 27 ** 2) + 2 * 24 * (49 ** 2 - 13 ** 2)
        assert official - single == tables == 760320
    assert abs(official - MASK_RCNN_README[arch]) < 0.5e6, official


def test_deformable_merging_flops_counted():
    model = LITClassifier('s')
    with torch.no_grad():
        by_op = flop_analyzer(model.eval(), (torch.zeros(1, 3, 224, 224), )).by_operator()
    # three 2x2/s2 DTMs C -> 2C: hw * 2C * C * 4 each at output size hw
    hand = sum((56 // 2 ** (i + 1)) ** 2 * 2 * c * c * 4 for i, c in enumerate([96, 192, 384]))
    assert by_op['deform_conv2d'] == hand


def test_dcn_zero_offsets_is_conv_and_offset_layout():
    torch.manual_seed(0)
    dcn = DeformConv2dPack(4, 6, 2, 2, 0)
    assert not dcn.conv_offset.weight.any() and not dcn.conv_offset.bias.any()
    x = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(dcn(x), F.conv2d(x, dcn.weight, dcn.bias, stride=2))
    # offsets are (dy, dx) pairs per kernel position: dx = 1 samples one column right
    with torch.no_grad():
        dcn.conv_offset.bias.copy_(torch.tensor([0., 1.] * 4))
    shifted = F.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(dcn(x), F.conv2d(shifted, dcn.weight, dcn.bias, stride=2))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_dcn_in_16_bits_on_the_cpu(dtype):
    """torchvision's deform_conv2d has no bfloat16 kernel: a bf16 DCN computes in
    float32 and rounds once; float16 runs torchvision's own kernel. Both are within
    the dtype's rounding of the float64 result on the same rounded inputs, gradients
    included."""
    torch.manual_seed(0)
    dcn = DeformConv2dPack(8, 16)
    with torch.no_grad():
        dcn.conv_offset.weight.normal_(0, 0.3)  # fractional offsets: bilinear sampling
    x = torch.randn(2, 8, 10, 14)
    low = copy.deepcopy(dcn).to(dtype)
    ref = copy.deepcopy(low).double()
    xl = x.to(dtype).requires_grad_()
    xr = xl.detach().double().requires_grad_()
    out, want = low(xl), ref(xr)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    # the offsets conv runs in the dtype (a 32-term reduction, rounded), then the DCN
    assert (out.double() - want).norm() / want.norm() < 4 * eps
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    want.backward(g)
    assert (xl.grad.double() - xr.grad).norm() / xr.grad.norm() < 4 * eps
    for (n, p), q in zip(low.named_parameters(), ref.parameters()):
        if n.startswith('conv_offset'):  # its gradient sums products of rounded terms
            continue
        assert (p.grad.double() - q.grad).norm() / q.grad.norm() < 4 * eps, n


def test_dcn_in_bfloat16_on_the_meta_device():
    """timm's model tests build and run models on 'meta' in bfloat16; there is no
    autocast to turn off there."""
    dcn = DeformConv2dPack(4, 8).to('meta', torch.bfloat16)
    out = dcn(torch.empty(2, 4, 6, 10, device='meta', dtype=torch.bfloat16))
    assert out.shape == (2, 8, 3, 5) and out.dtype == torch.bfloat16 and out.is_meta


def test_training_step_under_cpu_autocast():
    """LIT trains under bf16 autocast on the CPU (``benchmark.py --amp bf16``): it
    used to stop at torchvision's DCN ('deformable_im2col' not implemented for
    'BFloat16'). Outputs stay within bf16 rounding of float32, accumulated over the
    blocks; every gradient is finite."""
    torch.manual_seed(0)
    model = _small(drop_path_rate=0.).train()
    x = torch.randn(2, 3, 45, 62)
    ref = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    sum(o.float().sum() for o in outs).backward()
    eps, depth = torch.finfo(torch.bfloat16).eps, sum(TINY['depths']) + 3  # + 3 DTMs
    for o, r in zip(outs, ref):
        assert (o.float() - r).norm() / r.norm() < 4 * eps * math.sqrt(depth)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_relative_position_bias_lookup_and_interpolation():
    attn = LITAttention(8, 2, rel_pos_size=(3, 3))
    table = attn.relative_position_bias_table
    bias = attn.position_bias(3, 3)
    # the official lookup: table[index].view(N, N, heads).permute(2, 0, 1)
    idx = relative_position_index(3, 3)
    torch.testing.assert_close(bias, table[idx.view(-1)].view(9, 9, 2).permute(2, 0, 1))
    assert bias[:, 0, 0].equal(table[(3 - 1) * 5 + 3 - 1])  # zero offset -> centre
    big = attn.position_bias(4, 5)
    assert big.shape == (2, 20, 20)
    # same (dy, dx) -> same bias
    assert torch.equal(big[:, 0, 6], big[:, 7, 13])
    # attention output equals an explicit softmax with that bias
    x = torch.randn(2, 4, 5, 8)
    q, k, v = attn.qkv(x.view(2, 20, 8)).view(2, 20, 3, 2, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) * 4 ** -0.5 + big).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 20, 8)).view(2, 4, 5, 8)
    torch.testing.assert_close(attn(x), ref)


@pytest.mark.parametrize('hw', [(3, 3), (4, 5), (1, 6), (6, 1)])
def test_relative_position_bias_gradient_is_the_official_lookups(hw):
    """The table's gradient through the bias equals that of the official lookup
    (``table[index].view(N, N, heads).permute(2, 0, 1)``, float64, after the same
    bicubic resize), and the bias is contiguous. The former strided bias (a view of
    ``table[index].t()``) was copied by ``scaled_dot_product_attention`` in every
    block: LIT-S's forward at 800x1216 took 9.0 s with it and 5.0 s without."""
    H, W = hw
    attn = LITAttention(12, 3, rel_pos_size=(3, 3))
    table = attn.relative_position_bias_table
    bias = attn.position_bias(H, W)
    assert bias.shape == (3, H * W, H * W) and bias.is_contiguous()
    g = torch.randn(bias.shape, dtype=torch.float64)
    grad, = torch.autograd.grad(bias, table, g.float())
    t64 = table.detach().double().requires_grad_()
    grid = resize_rel_pos_table(t64, (3, 3), (H, W))
    ref_bias = grid[official_index(H, W).view(-1)].view(H * W, H * W, 3).permute(2, 0, 1)
    torch.testing.assert_close(bias.double(), ref_bias.detach(), **fp_tol(16, ref=ref_bias))
    ref, = torch.autograd.grad(ref_bias, t64, g)
    # each table entry sums up to H*W positions, times the 16 taps of the resize
    torch.testing.assert_close(grad.double(), ref, **fp_tol(16 * H * W, ref=ref))


def test_position_embedding_interpolated():
    from pale_mm.models.lit import abs_pos_embed
    model = _small('pvt')
    grid = model.pretrain_grids[0]
    same = abs_pos_embed(model.pos_embed1, grid, torch.empty(1, 16, 16, 0))
    assert same.shape == (1, 16, 16, 16)
    torch.testing.assert_close(same.reshape(1, 256, 16), model.pos_embed1)
    pos4 = model.pos_embed4[:, 1:]  # slot 0 is the classifier's class token's
    other = abs_pos_embed(pos4, model.pretrain_grids[3], torch.empty(1, 3, 5, 0))
    ref = F.interpolate(pos4.reshape(1, 2, 2, 128).permute(0, 3, 1, 2), size=(3, 5),
                        mode='bilinear', align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(other, ref)


@pytest.mark.parametrize('bad,exc,match', [
    (torch.randn(3, 32, 32), ValueError, '4-D'),
    (torch.randn(1, 4, 32, 32), ValueError, 'in_channels=3 but got an input with 4 channels'),
    ([1, 2], TypeError, 'torch.Tensor'),
])
def test_bad_inputs(bad, exc, match):
    with pytest.raises(exc, match=match):
        _small()(bad)


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(arch='huge'), ValueError, r"unknown LIT arch 'huge'; valid archs are "
     r"\['b', 'base', 'm', 'medium', 's', 'small', 't', 'ti', 'tiny'\]"),
    (dict(arch=7), TypeError, 'arch must be a str or a dict'),
    (dict(arch=dict(embed_dims=16, depths=[1, 1])), ValueError, 'missing keys'),
    (dict(arch=dict(TINY, num_heads=[1, 1, 3, 2])), ValueError, 'not divisible'),
    (dict(arch=dict(TINY, mlp_ratios=[4, 4])), ValueError, 'one entry per stage'),
    (dict(arch=dict(TINY, window=7)), ValueError, 'unknown arch keys'),
    (dict(out_indices=(0, 4)), ValueError, 'out_indices'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages'),
    (dict(in_channels=0), ValueError, 'in_channels'),
    (dict(pretrain_img_size=0), ValueError, 'pretrain_img_size'),
    # a 16-px table grid would floor to 0 rows in stage 4 (the official rounding)
    (dict(pretrain_img_size=16), ValueError, r'pretrain_img_size must be an int >= 32 \(one '
     r'table row in the last of 4 stages\), got 16'),
    (dict(pretrained=123), TypeError, 'pretrained must be a str'),
    (dict(out_norm_indices=(0, 4)), ValueError, r'out_norm_indices \(0, 4\) out of range'),
    (dict(out_norm_indices=(2, 1)), ValueError, 'LIT: out_norm_indices must be increasing'),
    (dict(out_norm_indices='0'), ValueError, 'LIT: out_norm_indices must be an int or a'),
    (dict(out_indices=(2, 3), out_norm_indices=(1, 2)), ValueError,
     r'LIT: out_norm_indices \(1, 2\) names stages \[1\] that are not outputs'),
    (dict(size_rounding='round'), ValueError,
     "size_rounding must be 'ceil' or 'floor', got 'round'"),
    # arch entries that would be taken silently (bool('no') is True) or fail deep
    (dict(arch=dict(TINY, has_msa=[False, False, True, 'no'])), TypeError,
     r"LIT: arch has_msa\[3\] must be True or False, got 'no'"),
    (dict(arch=dict(TINY_TI, pos_embed=1)), TypeError,
     'LIT: arch pos_embed must be True or False, got 1'),
    (dict(arch=dict(TINY, norm_eps=0)), ValueError,
     'LIT: arch norm_eps must be a finite number > 0, got 0'),
    (dict(arch=dict(TINY, depths=[1, 0, 1, 1])), ValueError,
     r'LIT arch depths \[1, 0, 1, 1\]: stage 1 has 0; each entry must be an int >= 1'),
    (dict(arch=dict(TINY, embed_dims=16.0)), ValueError,
     r'LIT arch embed_dims \[16\.0, 16\.0, 16\.0, 16\.0\]: stage 0 has 16\.0'),
    (dict(arch=dict(TINY, num_heads=[1, 1, 2, 2.0])), ValueError,
     r'LIT arch num_heads .*: stage 3 has 2\.0'),
])
def test_bad_construction(kwargs, exc, match):
    kwargs.setdefault('arch', TINY)
    with pytest.raises(exc, match=match):
        LIT(**kwargs)


@pytest.mark.parametrize('alias,name', [('tiny', 'ti'), ('t', 'ti'), ('small', 's'),
                                        ('medium', 'm'), ('Base', 'b')])
def test_arch_aliases(alias, name):
    assert LIT.parse_arch(alias) == LIT.parse_arch(name)


def test_init_weights_default_keeps_zero_offsets():
    model = _small()
    model.init_weights()
    w = model.layers[2].blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.006
    assert not model.layers[0].downsample.dconv.conv_offset.weight.any()


def test_nan_input_does_not_crash_dcn():
    dcn = DeformConv2dPack(4, 4)
    with torch.no_grad():
        dcn.conv_offset.weight.normal_()
        x = torch.randn(1, 4, 6, 6)
        x[0, 0, 2, 2] = float('nan')
        assert torch.isnan(dcn(x)).any()


@pytest.mark.parametrize('arch', ['s', 'm', 'b', 'ti'])
def test_official_layout_matches_classifier_exactly(arch):
    """Same keys and shapes as the official classifiers for every size, hence the same
    parameter count (the basis of the params notes in configs/lit/README.md)."""
    smb = {'s': ([96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]),
           'm': ([96, 192, 384, 768], [2, 2, 18, 2], [3, 6, 12, 24]),
           'b': ([128, 256, 512, 1024], [2, 2, 18, 2], [4, 8, 16, 32])}
    if arch in smb:
        shapes = official_lit_smb_shapes(*smb[arch])
    else:
        shapes = official_lit_ti_shapes([64, 128, 320, 512], [3, 4, 6, 3], [8, 8, 4, 4])
    model = LITClassifier(arch)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {k for k in shapes if k.endswith('relative_position_index')}
    assert len(buffers) == (0 if arch == 'ti' else sum(smb[arch][1][2:]))
    assert own == {k: v for k, v in shapes.items() if k not in buffers}
    # strict load of the official layout, relative_position_index buffers included
    # (checked against the computed index and dropped)
    state = random_state(shapes)
    model.load_state_dict(state, strict=True)
    assert all(k in state for k in buffers)  # the caller's dict is left as it was


@pytest.mark.parametrize('layout', ['swin', 'pvt'])
def test_official_checkpoint_loads_through_init_cfg(layout, tmp_path):
    dims, depths = [16, 32, 64, 128], TINY['depths']
    if layout == 'swin':
        shapes = official_lit_smb_shapes(dims, depths, [1, 1, 2, 2], img=64)
    else:
        shapes = official_lit_ti_shapes(dims, depths, [8, 8, 4, 4], img=64)
    state = random_state(shapes)
    path = tmp_path / 'lit.pth'
    torch.save({'model': state, 'epoch': 300, 'args': argparse.Namespace(model='lit')}, path)
    model = _small(layout, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    for k, v in state.items():
        if k in own:
            assert torch.equal(own[k], v), k
    missing = set(own) - set(state)
    assert missing == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    with torch.no_grad():
        assert len(model.eval()(torch.randn(1, 3, 64, 64))) == 4


def test_checkpoint_for_other_size_is_resized(tmp_path):
    shapes = official_lit_smb_shapes([16, 32, 64, 128], TINY['depths'], [1, 1, 2, 2], img=224)
    torch.save({'model': random_state(shapes)}, tmp_path / 'a.pth')
    model = _small(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'a.pth')))
    model.init_weights()  # tables trained for 224 resized to pretrain_img_size=64
    assert model.layers[2].blocks[0].attn.relative_position_bias_table.shape == (49, 2)


def test_computed_index_is_the_official_one():
    for h, w in ((1, 1), (3, 3), (4, 6), (7, 7)):
        assert torch.equal(relative_position_index(h, w), official_index(h, w))


@pytest.mark.parametrize('how', ['values', 'shape'])
def test_bad_relative_position_index_names_key_and_shapes(how, tmp_path):
    shapes = official_lit_smb_shapes([16, 32, 64, 128], TINY['depths'], [1, 1, 2, 2], img=64)
    state = random_state(shapes)
    key = 'layers.2.blocks.0.attn.relative_position_index'
    if how == 'values':
        state[key] = state[key].flip(0)
        match = r'layers\.2\.blocks\.0\.attn\.relative_position_index.*\(16, 16\).*values'
    else:
        state[key] = official_index(3, 3)  # 9 tokens: no grid of 9 fits the 7x7 table
        match = r'layers\.2\.blocks\.0\.attn\.relative_position_index.*\(9, 9\)'
    model = LITClassifier(TINY, pretrain_img_size=64, num_classes=1000)
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state)
    torch.save({'model': state}, tmp_path / 'bad.pth')
    backbone = _small(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'bad.pth')))
    with pytest.raises(ValueError, match=match):
        backbone.init_weights()


def test_official_checkpoint_with_index_buffers_loads_in_timm(tmp_path):
    """timm's loader (pretrained_cfg_overlay=dict(file=...)) loads strictly."""
    dims, depths, heads = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]
    state = random_state(official_lit_smb_shapes(dims, depths, heads))
    path = tmp_path / 'lit_s.pth'
    torch.save({'model': state, 'args': argparse.Namespace(model='lit_s')}, path)
    model = timm.create_model('lit_s', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    assert set(state) - set(own) == {k for k in state if k.endswith('relative_position_index')}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def _official_two_step_bias(table, pretrain_grid, H, W):
    """The official detection code's bias for an ``H x W`` map from a classification
    table, built from its published description: at load (mmcv_custom/checkpoint.py)
    the ``(L1, nH)`` table is viewed as ``(1, nH, S1, S1)`` and bicubically resized to
    the model's ``S2 x S2`` table (``S2 = 2 * pretrain_grid - 1``); in each forward
    (RelPosAttention.forward) that table is resized again, bicubically, to
    ``(2H-1, 2W-1)`` and gathered with the ``H x W`` relative position index."""
    nh, s1 = table.shape[1], math.isqrt(table.shape[0])
    s2 = 2 * pretrain_grid - 1
    loaded = F.interpolate(table.permute(1, 0).view(1, nh, s1, s1), size=(s2, s2),
                           mode='bicubic').view(nh, s2 * s2).permute(1, 0)
    resized = F.interpolate(loaded.permute(1, 0).view(1, nh, s2, s2),
                            size=(2 * H - 1, 2 * W - 1), mode='bicubic')
    resized = resized.reshape(nh, -1).permute(1, 0)
    bias = resized[official_index(H, W).view(-1)].view(H * W, H * W, -1)
    return bias.permute(2, 0, 1)


def test_detection_tables_resized_twice_as_official(tmp_path):
    """With pretrain_img_size=800 (the detection configs), a 224-px classification
    checkpoint gives the official detection backbone's position bias at 256x320; the
    single resize (pretrain_img_size=224, the documented option) gives another one."""
    shapes = official_lit_smb_shapes([16, 32, 64, 128], TINY['depths'], [1, 1, 2, 2], img=224)
    state = random_state(shapes)
    for k in state:  # tables of a trained size (random 0.1-scale tables hide little)
        if k.endswith('relative_position_bias_table'):
            state[k] = torch.randn(state[k].shape, generator=torch.Generator().manual_seed(2))
    torch.save({'model': state}, tmp_path / 'lit.pth')
    cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'lit.pth'))
    det = LIT(arch=TINY, pretrain_img_size=800, init_cfg=cfg)
    det.init_weights()
    single = LIT(arch=TINY, pretrain_img_size=224, init_cfg=cfg)
    single.init_weights()
    H, W = 256, 320
    for i, grid in ((2, 50), (3, 25)):
        h, w = H // 2 ** (i + 2), W // 2 ** (i + 2)
        key = f'layers.{i}.blocks.0.attn.relative_position_bias_table'
        expected = _official_two_step_bias(state[key], grid, h, w)
        attn = det.layers[i].blocks[0].attn
        assert attn.relative_position_bias_table.shape == ((2 * grid - 1) ** 2, 2)
        torch.testing.assert_close(attn.position_bias(h, w), expected)
        other = single.layers[i].blocks[0].attn.position_bias(h, w)
        assert (other - expected).abs().max() > 1e-3
        # at the pretraining grid of the checkpoint (224 px) both are the table itself
        g = 224 // 2 ** (i + 2)
        torch.testing.assert_close(single.layers[i].blocks[0].attn.position_bias(g, g),
                                   state[key][official_index(g, g).view(-1)].view(
                                       g * g, g * g, -1).permute(2, 0, 1))
    with torch.no_grad():
        outs = det.eval()(torch.randn(1, 3, H, W))
    assert [tuple(o.shape[2:]) for o in outs] == [(64, 80), (32, 40), (16, 20), (8, 10)]


# ------------------------------------------------------------------- timm
@pytest.mark.parametrize('layout', ['swin', 'pvt'])
def test_onnx_default_exporter_dynamic_hw_matches_pytorch(layout, tmp_path):
    """``torch.onnx.export``'s default exporter (``dynamo=True``; opset 19, the first with
    ``DeformConv``) with H and W dynamic, exported at 224x224, run in onnxruntime at
    sizes that need the stem's and the merges' zero padding (the export size needs
    none) and at an odd one. The reference padded only where the export size did, so
    the file gave maps one column short at 200x150. (The TorchScript exporter has no
    conversion for torchvision's ``deform_conv2d``.)"""
    assert_onnx_matches(randomize_bn(_small(layout)), tmp_path / 'lit.onnx',
                        ((224, 224), (200, 150), (97, 130), (33, 17)),
                        **onnx_exporter_kwargs('dynamo'))


def test_timm_create_and_features_only():
    for name in ('lit_ti', 'lit_s', 'lit_m', 'lit_b'):
        assert name in timm.list_models('lit_*')
    model = timm.create_model('lit_ti', num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 10)
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 1 + 4, 512)  # class token + 2x2 map
    feat = timm.create_model('lit_s', features_only=True, out_indices=(1, 2, 3)).eval()
    assert feat.feature_info.channels() == [192, 384, 768]
    assert feat.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        out = feat(torch.randn(1, 3, 112, 137))
    assert [tuple(f.shape) for f in out] == [(1, 192, 14, 18), (1, 384, 7, 9), (1, 768, 4, 5)]


def test_registered_in_openmmlab():
    pytest.importorskip('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(dict(type='LIT', arch=TINY, pretrain_img_size=64, out_indices=(3, )))
    assert isinstance(model, LIT) and model.out_indices == (3, )
