"""Every config in configs/ parses, follows the recipe in docs/pale_transformer.md and
builds its model; one loss-mode forward per task on a small input."""
import glob
import os.path as osp

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402

from pale_mm.utils import config_scope, register_scope, sync_bn_to_bn  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PALE = sorted(glob.glob(osp.join(ROOT, 'configs', 'pale', '*.py')))
DEMO = sorted(glob.glob(osp.join(ROOT, 'configs', 'demo', '*pale*.py')))
DIMS = {'tiny': [64, 128, 256, 512], 'small': [96, 192, 384, 768],
        'base': [128, 256, 512, 1024]}
ARCH = {'t': 'tiny', 's': 'small', 'b': 'base'}
SEG_DROP_PATH = {'tiny': 0.3, 'small': 0.4, 'base': 0.6}
DET_DROP_PATH = {'tiny': 0.2, 'small': 0.3, 'base': 0.5}


def _load(path):
    return Config.fromfile(path)


def _registry(scope):
    register_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def test_expected_configs_exist():
    names = {osp.basename(p) for p in PALE}
    for s in 'tsb':
        assert f'upernet_pale-{s}_8xb2-160k_ade20k-512x512.py' in names
        assert f'mask-rcnn_pale-{s}_fpn_1x_coco.py' in names
        assert f'mask-rcnn_pale-{s}_fpn_ms-crop-3x_coco.py' in names
    assert len(DEMO) == 2


@pytest.mark.parametrize('path', PALE + DEMO, ids=osp.basename)
def test_config_common(path):
    cfg = _load(path)
    assert cfg.custom_imports == dict(imports=['pale_mm'], allow_failed_imports=False)
    assert config_scope(cfg) in ('mmdet', 'mmseg')
    assert cfg.model.backbone.type == 'PaleTransformer'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.


@pytest.mark.parametrize('path', [p for p in PALE if 'upernet' in p], ids=osp.basename)
def test_upernet_recipe(path):
    cfg = _load(path)
    arch = ARCH[osp.basename(path).split('_')[1].split('-')[1]]
    bb = cfg.model.backbone
    assert bb.arch == arch and bb.out_indices == (0, 1, 2, 3)
    assert bb.drop_path_rate == SEG_DROP_PATH[arch]
    assert cfg.model.decode_head.in_channels == DIMS[arch]
    assert cfg.model.decode_head.num_classes == 150
    aux = cfg.model.auxiliary_head
    assert aux.in_index == 2 and aux.in_channels == DIMS[arch][2]
    assert aux.loss_decode.loss_weight == 0.4
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'  # kept for multi-GPU
    opt = cfg.optim_wrapper.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (6e-5, (0.9, 0.999), 0.01)
    warm, poly = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 1500
    assert poly.type == 'PolyLR' and poly.power == 1.0 and poly.end == 160000
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.crop_size == (512, 512)
    assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'


@pytest.mark.parametrize('path', [p for p in PALE if 'mask-rcnn' in p], ids=osp.basename)
def test_mask_rcnn_recipe(path):
    cfg = _load(path)
    arch = ARCH[osp.basename(path).split('_')[1].split('-')[1]]
    bb = cfg.model.backbone
    assert bb.arch == arch and bb.out_indices == (0, 1, 2, 3)
    assert bb.drop_path_rate == DET_DROP_PATH[arch]
    assert cfg.model.neck.in_channels == DIMS[arch]
    opt = cfg.optim_wrapper.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (1e-4, (0.9, 0.999), 0.05)
    assert 'momentum' not in opt
    warm, step = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 1000 and not warm.by_epoch
    three_x = 'ms-crop-3x' in path
    assert cfg.train_cfg.max_epochs == (36 if three_x else 12)
    assert step.milestones == ([27, 33] if three_x else [8, 11])
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.data_root == 'data/coco/'
    types = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert ('RandomChoice' in types) == three_x


def _build(path, scope=None):
    cfg = _load(path)
    sync_bn_to_bn(cfg)
    models = _registry(scope or config_scope(cfg))
    return cfg, models.build(cfg.model)


@pytest.mark.parametrize('path', PALE + DEMO, ids=osp.basename)
def test_config_builds_model(path):
    cfg, model = _build(path)
    bb = model.backbone
    assert type(bb).__name__ == 'PaleTransformer'
    if config_scope(cfg) == 'mmdet':
        assert list(model.neck.in_channels) == bb.embed_dims
    else:
        assert list(model.decode_head.in_channels) == bb.embed_dims
        assert model.auxiliary_head.in_channels == bb.embed_dims[2]
    if 'pale-t_' in path:
        assert bb.embed_dims == DIMS['tiny'] and bb.depths == [2, 2, 16, 2]


def _det_sample(size):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                         pad_shape=(size, size), batch_input_shape=(size, size),
                                         scale_factor=(1., 1.)))
    inst = InstanceData()
    inst.bboxes = torch.tensor([[10., 12., 60., 70.], [70., 20., 120., 90.]])
    inst.labels = torch.tensor([0, 1])
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 12:70, 10:60] = 1
    masks[1, 20:90, 70:120] = 1
    inst.masks = BitmapMasks(masks.numpy(), size, size)
    sample.gt_instances = inst
    return sample


def test_mask_rcnn_pale_t_loss_forward():
    _, model = _build(osp.join(ROOT, 'configs', 'pale', 'mask-rcnn_pale-t_fpn_1x_coco.py'))
    model.train()
    size = 128
    inputs = torch.randn(1, 3, size, size)
    losses = model(inputs, [_det_sample(size)], mode='loss')
    for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert key in losses
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
                for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.patch_embeds[0].proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_upernet_pale_t_loss_forward():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    path = osp.join(ROOT, 'configs', 'pale', 'upernet_pale-t_8xb2-160k_ade20k-512x512.py')
    _, model = _build(path)
    model.train()
    size = 96  # not a multiple of 32 after the stem: exercises pale padding
    samples = []
    for _ in range(2):  # BN in the heads needs more than one value per channel
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                        pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size)))
        samples.append(s)
    losses = model(torch.randn(2, 3, size, size), samples, mode='loss')
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    total = losses['decode.loss_ce'] + losses['aux.loss_ce']
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embeds[0].proj.weight.grad.abs().sum() > 0
