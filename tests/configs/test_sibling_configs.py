"""configs/lit and configs/scalablevit: parse, inherit the smallest variant's recipe,
match channels to the backbone, build; one loss-mode forward per family."""
import glob
import os.path as osp

import pytest
import torch

from tests.configs.test_configs import _build, _det_sample, _load

from pale_mm.utils import config_scope  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'lit', '*.py')) +
                 glob.glob(osp.join(ROOT, 'configs', 'scalablevit', '*.py')))
VARIANTS = {'lit': 'ti s m b', 'scalablevit': 's b l'}


def test_expected_configs_exist():
    names = {osp.basename(p) for p in CONFIGS}
    for fam, archs in VARIANTS.items():
        for a in archs.split():
            assert f'mask-rcnn_{fam}-{a}_fpn_1x_coco.py' in names
            assert f'upernet_{fam}-{a}_8xb2-160k_ade20k-512x512.py' in names


# the configs of the six released LIT models (tests/models/test_lit_downstream.py):
# the official recipes, which differ from this project's Mask R-CNN / UperNet protocol
RELEASED_RECIPES = ('retinanet_lit-', 'fpn_lit-')


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_builds_with_matching_channels(path):
    cfg = _load(path)
    fam, arch = osp.basename(path).split('_')[1].split('-')
    assert cfg.custom_imports == dict(imports=['pale_mm'], allow_failed_imports=False)
    assert cfg.model.backbone.type == {'lit': 'LIT', 'scalablevit': 'ScalableViT'}[fam]
    assert cfg.model.backbone.arch == arch
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    official = osp.basename(path).startswith(RELEASED_RECIPES)
    if not official:
        assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.
    cfg, model = _build(path)
    dims = list(model.backbone.embed_dims)
    if config_scope(cfg) == 'mmdet':
        assert list(model.neck.in_channels) == dims
        assert cfg.train_cfg.max_epochs == 12
    elif official:  # Semantic FPN, 80k
        assert list(model.neck.in_channels) == dims
        assert cfg.train_cfg.max_iters == 80000
    else:
        assert list(model.decode_head.in_channels) == dims
        assert model.auxiliary_head.in_channels == dims[2]
        assert cfg.train_cfg.max_iters == 160000
    released = RELEASED_RECIPES + ('mask-rcnn_lit-ti', 'mask-rcnn_lit-s')
    if not osp.basename(path).startswith(released):
        # no released model to match: this project's defaults, as before the options
        assert model.backbone.out_norm_indices == model.backbone.out_indices == (0, 1, 2, 3)
        assert getattr(model.backbone, 'size_rounding', 'ceil') == 'ceil'


def test_lit_mask_rcnn_loss_forward():
    _, model = _build(osp.join(ROOT, 'configs', 'lit', 'mask-rcnn_lit-ti_fpn_1x_coco.py'))
    model.train()
    losses = model(torch.randn(1, 3, 128, 128), [_det_sample(128)], mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
                for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_scalablevit_upernet_loss_forward():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    _, model = _build(osp.join(ROOT, 'configs', 'scalablevit',
                               'upernet_scalablevit-s_8xb2-160k_ade20k-512x512.py'))
    model.train()
    size = 96
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                        pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size)))
        samples.append(s)
    losses = model(torch.randn(2, 3, size, size), samples, mode='loss')
    total = losses['decode.loss_ce'] + losses['aux.loss_ce']
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize('name,backbone', [
    ('mask-rcnn_lit-demo_fpn_200i_shapes-128.py', 'LIT'),
    ('mask-rcnn_scalablevit-demo_fpn_200i_shapes-128.py', 'ScalableViT')])
def test_family_demo_configs_build(name, backbone):
    cfg, model = _build(osp.join(ROOT, 'configs', 'demo', name))
    assert type(model.backbone).__name__ == backbone
    assert list(model.neck.in_channels) == list(model.backbone.embed_dims)
    assert cfg.train_cfg.max_iters == 200


def _base_files(path):
    """Local config files ``path`` inherits from, recursively (``mmdet::`` etc. are
    the packages' own)."""
    import ast
    tree = ast.parse(open(path).read())
    bases = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets):
            value = ast.literal_eval(node.value)
            bases += [value] if isinstance(value, str) else list(value)
    out = []
    for base in bases:
        if '::' in base:
            continue
        full = osp.normpath(osp.join(osp.dirname(path), base))
        out += [full] + _base_files(full)
    return out


DEMOS = [osp.join(ROOT, 'configs', 'demo', n) for n in (
    'mask-rcnn_lit-demo_fpn_200i_shapes-128.py',
    'mask-rcnn_scalablevit-demo_fpn_200i_shapes-128.py')]


@pytest.mark.parametrize('path', CONFIGS + DEMOS, ids=osp.basename)
def test_recipes_do_not_inherit_pale_configs(path):
    """The LIT / ScalableViT configs have bases of their own (configs/_base_/ or their
    family's smallest variant), so editing a Pale config cannot change them."""
    bases = _base_files(path)
    # a base of their own, or mmdet's / mmseg's only (the released LIT models' configs)
    assert bases or "'mmdet::" in open(path).read() or "'mmseg::" in open(path).read(), path
    pale = [b for b in bases if 'pale' in osp.basename(b) or
            osp.sep + 'pale' + osp.sep in b]
    assert not pale, f'{osp.basename(path)} inherits {pale}'
    fam = 'lit' if '_lit-' in osp.basename(path) else 'scalablevit'
    assert all(osp.basename(osp.dirname(b)) in (fam, '_base_') for b in bases), bases


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_backbone_weights_named_by_the_config(path):
    """LIT configs name the official ImageNet-1K release asset of their size, the file
    timm's pretrained_cfg downloads (tests/test_weights.py checks both against the
    official README); ScalableViT's are on Google Drive only, so its configs name none
    (a user passes the file: configs/scalablevit/README.md)."""
    import timm

    import pale_mm.timm_models  # noqa: F401
    cfg = _load(path)
    fam, arch = osp.basename(path).split('_')[1].split('-')
    init_cfg = cfg.model.backbone.get('init_cfg')
    if fam == 'lit':
        url = f'https://github.com/ziplab/LIT/releases/download/v1.0/lit_{arch}.pth'
        assert init_cfg == dict(type='Pretrained', checkpoint=url)
        assert timm.get_pretrained_cfg(f'lit_{arch}').url == url
    else:
        assert init_cfg is None
