"""ScalableViT backbone / classifier: shapes, paper params and FLOPs, IWSA padding mask
against a dense reference, SSA, backbone interface, official checkpoint layout with the
``{'model': ..., 'args': Namespace}`` wrapper under ``weights_only`` loading."""
import argparse
import os.path as osp

import pytest
import timm
import torch
import torch.nn as nn

import pale_mm  # noqa: F401
from pale_mm.flops import count_flops, count_params
from pale_mm.models import ScalableViT, ScalableViTClassifier, allow_namespace_in_checkpoints
from pale_mm.models.scalablevit import IWSA, SSA
from tests.backbones import (assert_onnx_matches, assert_output_pyramid, onnx_exporter_kwargs,
                             randomize_bn)

TINY = dict(embed_dims=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4],
            c_ratios=[1.25, 1.25, 1.25, 1], window_sizes=3)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# arXiv 2203.10790 / official README: params, multiply-adds at 224.
PAPER = {'s': (32.4e6, 4.2e9), 'b': (81.9e6, 8.6e9), 'l': (104.9e6, 14.7e9)}


def _small(**kw):
    kw.setdefault('arch', TINY)
    return ScalableViT(**kw)


@pytest.mark.parametrize('size,expected', [
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
    ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ((33, 17), [(9, 5), (5, 3), (3, 2), (2, 1)]),
    ((1, 1), [(1, 1)] * 4),
])
def test_output_pyramid(size, expected):
    assert_output_pyramid(_small(), size, expected)


def test_arch_zoo_structure():
    m = ScalableViT('s', out_indices=(2, ))
    assert m.embed_dims == [64, 128, 256, 512] and m.sr_ratios == [8, 4, 2, 1]
    assert isinstance(m.stages[0][0].attn, IWSA) and isinstance(m.stages[0][1].attn, SSA)
    assert m.stages[0][1].attn.c_new == 80 and hasattr(m.stages[3][1].attn, 'kv')
    assert hasattr(m, 'norm2') and not hasattr(m, 'norm0')
    assert ScalableViT('b').c_ratios == [2, 1.25, 1.25, 1]
    assert ScalableViT('l').depths == [2, 6, 12, 4]


@pytest.mark.parametrize('arch', ['s', 'b', 'l'])
def test_params_and_flops_vs_paper(arch):
    """FLOPs within 5% of the paper; whole classifier (official 4096-wide MLP head,
    1000 classes) params within 3% of the paper for S and B, 5% for L.

    Why 5% for L: the classifier has the keys and shapes of the official
    ``scalable_vit_large`` (test_official_layout_matches_classifier_exactly), which gives
    109.29M, +4.2% above the 104.9M of the paper's / README's classification table. The
    authors' own downstream tables contradict that 104.9M: the Mask R-CNN and UperNet
    models built on this backbone match the README's 121.4M and 135.5M to 0.02%
    (test_downstream_params_vs_official_readme), whereas a backbone 4.4M smaller would
    miss them by over 3%. The allowance is that documented table inconsistency; the
    downstream test is the tight check on L."""
    model = ScalableViTClassifier(arch, num_classes=1000)
    p_ref, f_ref = PAPER[arch]
    params, flops = count_params(model), count_flops(model, (3, 224, 224))
    assert abs(params / p_ref - 1) < (0.05 if arch == 'l' else 0.03), params
    assert abs(flops / f_ref - 1) < 0.05, flops


# Official README (Yangr116/ScalableViT README.md): whole-model params of Mask R-CNN 1x
# (COCO, 80 classes) and UperNet 160k (ADE20K, 150 classes, with the FCN auxiliary head,
# as mmseg counts it).
DOWNSTREAM_README = {
    ('mask-rcnn', 's'): 46.3e6, ('mask-rcnn', 'b'): 94.9e6, ('mask-rcnn', 'l'): 121.4e6,
    ('upernet', 's'): 56.5e6, ('upernet', 'b'): 107.0e6, ('upernet', 'l'): 135.5e6,
}


@pytest.mark.parametrize('arch', ['s', 'b', 'l'])
@pytest.mark.parametrize('kind', ['mask-rcnn', 'upernet'])
def test_downstream_params_vs_official_readme(kind, arch):
    """Independent cross-check of the backbone against the authors' downstream tables:
    the detector / segmentor built from configs/scalablevit/ within 1% of the README.
    Measured: Mask R-CNN 45.95M / 94.90M / 121.38M, UperNet 56.10M / 107.05M / 135.52M
    (S is -0.7%, the same ~0.4M the classifier is below the paper's 32.4M; B and L match
    to 0.05%). Parameter counting only, no forward."""
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    from tests.configs.test_configs import _build

    name = (f'mask-rcnn_scalablevit-{arch}_fpn_1x_coco.py' if kind == 'mask-rcnn' else
            f'upernet_scalablevit-{arch}_8xb2-160k_ade20k-512x512.py')
    cfg, model = _build(osp.join(ROOT, 'configs', 'scalablevit', name))
    assert cfg.model.backbone.get('init_cfg') is None  # nothing downloaded
    assert model.backbone.depths == ScalableViT.arch_zoo[arch]['depths']
    if kind == 'upernet':
        assert model.auxiliary_head is not None
    ref = DOWNSTREAM_README[(kind, arch)]
    params = count_params(model)
    assert abs(params / ref - 1) < 0.01, params


def _dense_iwsa_reference(attn: IWSA, x: torch.Tensor) -> torch.Tensor:
    """Window attention over the real tokens of each window only (no padding),
    computed window by window, plus LIM on V, then the projection."""
    B, H, W, C = x.shape
    ws, nh = attn.ws, attn.num_heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    lim = attn.lim_func(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = torch.zeros_like(x)
    for i0 in range(0, H, ws):
        for j0 in range(0, W, ws):
            sl = (slice(None), slice(i0, i0 + ws), slice(j0, j0 + ws))
            h, w = q[sl].shape[1:3]
            qq, kk, vv = (t[sl].reshape(B, h * w, nh, -1).transpose(1, 2) for t in (q, k, v))
            a = (qq @ kk.transpose(-1, -2) * qq.shape[-1] ** -0.5).softmax(-1)
            out[sl] = (a @ vv).transpose(1, 2).reshape(B, h, w, C)
    return attn.proj(out + lim)


@pytest.mark.parametrize('hw', [(7, 5), (3, 3), (1, 8), (6, 6)])
def test_iwsa_padding_mask_matches_dense_reference(hw):
    attn = IWSA(8, 2, ws=3).eval()
    x = torch.randn(2, *hw, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _dense_iwsa_reference(attn, x))


@pytest.mark.parametrize('exporter', ['torchscript', 'dynamo'])
def test_onnx_export_dynamic_hw_matches_pytorch(exporter, tmp_path):
    """``torch.onnx.export`` with H and W dynamic, exported at 192x192 (every stage's
    map a multiple of the window of 3: nothing padded), run in onnxruntime at sizes
    that pad (224x224, 97x130) and at an odd one. The reference padded and masked
    only where the export size did, took ``-(-n // ws)`` for a ceil (the default
    exporter floors it) and gave the attention 5-D tensors: the TorchScript
    exporter's file failed in onnxruntime at other sizes, and the default exporter
    stopped at the attention."""
    assert_onnx_matches(randomize_bn(_small()), tmp_path / 'scalablevit.onnx',
                        ((192, 192), (224, 224), (97, 130), (33, 17)), export_size=(192, 192),
                        **onnx_exporter_kwargs(exporter))


def test_ssa_matches_explicit_formula():
    ssa = SSA(16, 2, sr_ratio=2, c_ratio=1.25).eval()
    x = torch.randn(1, 4, 6, 16)
    with torch.no_grad():
        y = ssa.norm_act(ssa.reduction(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
        q = ssa.q(x).view(1, 24, 2, 10).transpose(1, 2)
        k = ssa.k(y).view(1, 6, 2, 10).transpose(1, 2)
        v = ssa.v(y).view(1, 6, 2, 8).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) * (8 * 1.25) ** -0.5).softmax(-1)
        ref = ssa.proj((a @ v).transpose(1, 2).reshape(1, 4, 6, 16))
        torch.testing.assert_close(ssa(x), ref)
        assert ssa(torch.randn(1, 3, 5, 16)).shape == (1, 3, 5, 16)  # padded reduction


def test_norm_eval_switches_only_batchnorm():
    model = _small(norm_eval=True)
    model.stages[0][0].bn = nn.BatchNorm2d(4)  # ScalableViT has no BN of its own
    model.train()
    assert not model.stages[0][0].bn.training and model.stages[0][0].attn.training


@pytest.mark.parametrize('bad,exc,match', [
    (torch.randn(3, 32, 32), ValueError, '4-D'),
    (torch.randn(1, 4, 32, 32), ValueError, 'in_channels=3 but got an input with 4 channels'),
    ('img', TypeError, 'torch.Tensor'),
])
def test_bad_inputs(bad, exc, match):
    with pytest.raises(exc, match=match):
        _small()(bad)


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(arch='xl'), ValueError,
     r"unknown ScalableViT arch 'xl'; valid archs are \['b', 'base', 'l', 'large', 's', 'small'\]"),
    (dict(arch=[1]), TypeError, 'arch must be a str or a dict'),
    (dict(arch=dict(embed_dims=16, depths=[1], num_heads=[1])), ValueError, 'missing keys'),
    (dict(arch=dict(TINY, num_heads=[3, 2, 2, 4])), ValueError, 'not divisible'),
    (dict(arch=dict(TINY, c_ratios=[1.25, 1.1, 1.25, 1])), ValueError, 'scaled width'),
    (dict(arch=dict(TINY, window_sizes=1)), ValueError, 'window size'),
    (dict(arch=dict(TINY, sr_ratios=[8, 4, 2])), ValueError, 'one entry per stage'),
    (dict(out_indices=(5, )), ValueError, 'out_indices'),
    (dict(frozen_stages=-2), ValueError, 'frozen_stages'),
    (dict(in_channels=1.5), ValueError, 'in_channels'),
    (dict(pretrained=1), TypeError, 'pretrained must be a str'),
    (dict(arch=dict(TINY, c_ratios=[1.25, 1.25, 1.25, 0])), ValueError,
     r'ScalableViT: arch c_ratios\[3\] must be a finite number > 0, got 0'),
    # int(16 * 0.05) = 0 keys/queries: 0 % num_heads == 0 used to let it through
    (dict(arch=dict(TINY, c_ratios=[0.05, 1.25, 1.25, 1])), ValueError,
     r'stage 0: scaled width int\(16 \* 0\.05\) = 0 is not a positive multiple of '
     r'num_heads 1'),
    (dict(arch=dict(TINY, num_heads=[1, 2, 2, 4.0])), ValueError,
     r'ScalableViT arch num_heads .*: stage 3 has 4\.0'),
])
def test_bad_construction(kwargs, exc, match):
    kwargs.setdefault('arch', TINY)
    with pytest.raises(exc, match=match):
        ScalableViT(**kwargs)


# --------------------------------------------------- official key layout
def official_shapes(dims, depths, heads, c_ratios, sr=(8, 4, 2, 1), classes=1000,
                    hidden=4096):
    """Key -> shape of an official ScalableViT classification checkpoint."""
    s = {'norm.weight': (dims[-1], ), 'norm.bias': (dims[-1], ),
         'head.0.weight': (hidden, dims[-1]), 'head.0.bias': (hidden, ),
         'head.1.weight': (hidden, ), 'head.1.bias': (hidden, ),
         'head.3.weight': (classes, hidden), 'head.3.bias': (classes, )}
    prev = 3
    for k, c in enumerate(dims):
        ks = 7 if k == 0 else 3
        s.update({f'patch_embeds.{k}.proj.weight': (c, prev, ks, ks),
                  f'patch_embeds.{k}.proj.bias': (c, ),
                  f'patch_embeds.{k}.norm.weight': (c, ), f'patch_embeds.{k}.norm.bias': (c, ),
                  f'pos_block.{k}.proj.0.weight': (c, 1, 3, 3),
                  f'pos_block.{k}.proj.0.bias': (c, )})
        cn = int(c * c_ratios[k])
        for i in range(depths[k]):
            p = f'stages.{k}.{i}'
            for n in ('norm1', 'norm2'):
                s.update({f'{p}.{n}.weight': (c, ), f'{p}.{n}.bias': (c, )})
            s.update({f'{p}.mlp.fc1.weight': (4 * c, c), f'{p}.mlp.fc1.bias': (4 * c, ),
                      f'{p}.mlp.fc2.weight': (c, 4 * c), f'{p}.mlp.fc2.bias': (c, ),
                      f'{p}.attn.proj.weight': (c, c), f'{p}.attn.proj.bias': (c, )})
            if i % 2 == 0:  # IWSA
                s.update({f'{p}.attn.qkv.weight': (3 * c, c), f'{p}.attn.qkv.bias': (3 * c, ),
                          f'{p}.attn.lim_func.weight': (c, 1, 3, 3),
                          f'{p}.attn.lim_func.bias': (c, )})
            elif sr[k] > 1:
                r = sr[k]
                s.update({f'{p}.attn.q.weight': (cn, c), f'{p}.attn.q.bias': (cn, ),
                          f'{p}.attn.reduction.0.weight': (c, 1, r, r),
                          f'{p}.attn.reduction.0.bias': (c, ),
                          f'{p}.attn.reduction.1.weight': (cn, c, 1, 1),
                          f'{p}.attn.reduction.1.bias': (cn, ),
                          f'{p}.attn.norm_act.0.weight': (cn, ),
                          f'{p}.attn.norm_act.0.bias': (cn, ),
                          f'{p}.attn.k.weight': (cn, cn), f'{p}.attn.k.bias': (cn, ),
                          f'{p}.attn.v.weight': (c, cn), f'{p}.attn.v.bias': (c, )})
            else:
                s.update({f'{p}.attn.q.weight': (c, c), f'{p}.attn.q.bias': (c, ),
                          f'{p}.attn.kv.weight': (2 * c, c), f'{p}.attn.kv.bias': (2 * c, )})
        prev = c
    return s


@pytest.mark.parametrize('arch', ['s', 'b', 'l'])
def test_official_layout_matches_classifier_exactly(arch):
    """Same keys and shapes as the official ``scalable_vit_small/base/large`` (Yangr116/
    ScalableViT image_classification/models/scalablevit.py), hence the same parameter
    count (the basis of the params notes in configs/scalablevit/README.md)."""
    shapes = official_shapes(*{
        's': ([64, 128, 256, 512], [2, 2, 20, 2], [2, 4, 8, 16], [1.25, 1.25, 1.25, 1]),
        'b': ([96, 192, 384, 768], [2, 2, 14, 6], [3, 6, 12, 24], [2, 1.25, 1.25, 1]),
        'l': ([128, 256, 512, 1024], [2, 6, 12, 4], [4, 8, 16, 32], [0.25, 0.5, 1, 1]),
    }[arch])
    model = ScalableViTClassifier(arch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_official_checkpoint_with_namespace_loads_through_init_cfg(tmp_path):
    shapes = official_shapes([16, 32, 64, 128], TINY['depths'], TINY['num_heads'],
                             TINY['c_ratios'])
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    path = tmp_path / 'checkpoint_best.pth'
    args = argparse.Namespace(model='scalable_vit_small', drop_path=0.2, lr=5e-4,
                              input_size=224, data_path='/data/imagenet', dist_eval=True)
    torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                'args': args}, path)
    allow_namespace_in_checkpoints()
    loaded = torch.load(path, weights_only=True)  # the Namespace is allow-listed
    assert loaded['args'].model == 'scalable_vit_small'
    model = _small(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    for k, v in state.items():
        if k in own:
            assert torch.equal(own[k], v), k
    assert set(own) - set(state) == {f'norm{i}.{p}' for i in range(4)
                                     for p in ('weight', 'bias')}
    with torch.no_grad():
        assert len(model.eval()(torch.randn(1, 3, 50, 70))) == 4


def test_namespace_checkpoint_after_timm_load(tmp_path):
    """timm's checkpoint loader allow-lists argparse.Namespace in a safe_globals
    context whose exit removes it again; official checkpoints must still load after."""
    shapes = official_shapes([16, 32, 64, 128], TINY['depths'], TINY['num_heads'],
                             TINY['c_ratios'])
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    official = tmp_path / 'scalablevit.pth'
    torch.save({'model': state, 'args': argparse.Namespace(model='scalable_vit_small')},
               official)
    cfg = dict(type='Pretrained', checkpoint=str(official))
    _small(init_cfg=cfg).init_weights()  # allow-lists the Namespace
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    # a real timm load of a timm-style training checkpoint (args in a Namespace)
    classifier = ScalableViTClassifier(TINY)
    saved = tmp_path / 'timm_checkpoint.pth.tar'
    torch.save({'state_dict': classifier.state_dict(), 'epoch': 1,
                'args': argparse.Namespace(model='scalablevit_s')}, saved)
    timm.models.load_checkpoint(classifier, str(saved))
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    model = _small(init_cfg=cfg)
    model.init_weights()
    assert torch.equal(model.state_dict()['stages.2.0.attn.qkv.weight'],
                       state['stages.2.0.attn.qkv.weight'])


@pytest.mark.parametrize('alias,name', [('small', 's'), ('base', 'b'), ('L', 'l')])
def test_arch_aliases(alias, name):
    assert ScalableViT.parse_arch(alias) == ScalableViT.parse_arch(name)


def test_prefix_and_module_wrapping(tmp_path):
    from pale_mm.models.checkpoint import unwrap_state_dict
    sd = {'module.backbone.a': torch.zeros(1), 'module.head.b': torch.zeros(1)}
    assert list(unwrap_state_dict({'state_dict': sd}, prefix='backbone')) == ['a']
    with pytest.raises(ValueError, match='non-tensor'):
        unwrap_state_dict({'epoch': 3, 'w': torch.zeros(1)})


# ------------------------------------------------------------------- timm
def test_timm_create_and_features_only():
    for name in ('scalablevit_s', 'scalablevit_b', 'scalablevit_l'):
        assert name in timm.list_models('scalablevit_*')
    model = timm.create_model('scalablevit_s', num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 80)).shape == (2, 10)
        pre = model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)),
                                 pre_logits=True)
    assert pre.shape == (1, 4096)
    model.reset_classifier(3)
    assert model.head[3].out_features == 3
    feat = timm.create_model('scalablevit_s', features_only=True).eval()
    assert feat.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        out = feat(torch.randn(1, 3, 112, 137))
    assert [tuple(f.shape) for f in out] == [
        (1, 64, 28, 35), (1, 128, 14, 18), (1, 256, 7, 9), (1, 512, 4, 5)]


def test_registered_in_openmmlab():
    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS
    model = MODELS.build(dict(type='ScalableViT', arch=TINY, frozen_stages=1))
    assert isinstance(model, ScalableViT) and model.frozen_stages == 1
