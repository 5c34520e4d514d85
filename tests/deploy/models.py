"""Tiny trained-looking models for the deploy tests: a config written next to a
checkpoint of the randomly initialised model (BatchNorm statistics randomised), as
``tools/deploy/export.py CONFIG CHECKPOINT`` takes them. Nothing is downloaded."""
import os.path as osp
import textwrap

import pytest
import torch

from tests.backbones import randomize_bn

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(ROOT, 'configs', 'demo')
CLASSES = ('background', 'circle', 'square', 'triangle')
PALETTE = [[120, 120, 120], [220, 20, 60], [0, 128, 255], [255, 200, 0]]

# narrowed backbones of each family (the demo's Pale-T; the model tests' LIT and
# ScalableViT), with their stage widths
BACKBONES = {
    'pale': (dict(type='PaleTransformer', arch=dict(embed_dims=[32, 64, 128, 256],
                                                    depths=[1, 1, 2, 1],
                                                    num_heads=[2, 2, 4, 8]),
                  pale_size=7), [32, 64, 128, 256]),
    'lit': (dict(type='LIT', arch=dict(embed_dims=16, depths=[1, 2, 1, 1],
                                       num_heads=[1, 1, 2, 2]),
                 pretrain_img_size=64), [16, 32, 64, 128]),
    'scalablevit': (dict(type='ScalableViT', arch=dict(
        embed_dims=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4],
        c_ratios=[1.25, 1.25, 1.25, 1], window_sizes=3)), [16, 32, 64, 128]),
}

SEGMENTORS = {
    # the demo's UperNet
    'upernet': "_base_ = [{demo!r}]\n"
               "model = dict(backbone=dict(_delete_=True, {backbone}, drop_path_rate=0.,\n"
               "                           out_indices=(0, 1, 2, 3), init_cfg=None),\n"
               "             decode_head=dict(in_channels={widths}),\n"
               "             auxiliary_head=dict(in_channels={widths[2]}))\n",
    # mmseg's Semantic FPN
    'fpn': "_base_ = ['mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/default_runtime.py']\n"
           "custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)\n"
           "model = dict(pretrained=None,\n"
           "             backbone=dict(_delete_=True, {backbone}, drop_path_rate=0.,\n"
           "                           out_indices=(0, 1, 2, 3), init_cfg=None),\n"
           "             neck=dict(in_channels={widths}, out_channels=32),\n"
           "             decode_head=dict(in_channels=[32] * 4, channels=32, num_classes=4))\n",
}


def _kwargs(d: dict) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in d.items())


def write_model(tmp_path, text: str, name: str, adjust=None, dataset_meta=None):
    """Write config ``text`` to ``tmp_path/<name>.py``, build its model with
    the tools' loader, randomise its BatchNorm statistics (then ``adjust(model)``)
    and save it as a checkpoint with the dataset's classes; returns
    ``(config, checkpoint, model)``."""
    from tests.tools import load_tool
    export = load_tool('deploy/export.py', 'deploy_export')
    config = str(tmp_path / f'{name}.py')
    with open(config, 'w') as f:
        f.write(textwrap.dedent(text))
    model, _, _ = export.load_model(config, None)
    randomize_bn(model)
    with torch.no_grad():  # decode heads start near zero: give the logits some spread
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == len(CLASSES):
                m.weight.normal_(0, 0.5)
        if adjust is not None:
            adjust(model)
    checkpoint = str(tmp_path / f'{name}.pth')
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dataset_meta or dict(classes=CLASSES, palette=PALETTE))),
               checkpoint)
    return config, checkpoint, model.eval()


def segmentor(tmp_path, head: str, family: str):
    """``(config, checkpoint, model)`` of a ``head`` ('upernet', 'fpn') segmentor with
    the narrowed ``family`` backbone."""
    backbone, widths = BACKBONES[family]
    text = SEGMENTORS[head].format(demo=osp.join(DEMO, 'upernet_pale-t-demo_600i_shapes-128.py'),
                                   backbone=_kwargs(backbone), widths=widths)
    return write_model(tmp_path, text, f'{head}_{family}')


def onnxruntime():
    pytest.importorskip('onnx', reason='onnx is a deploy dependency (pip install -e .[deploy])')
    return pytest.importorskip('onnxruntime', reason='onnxruntime is a deploy dependency '
                                                     '(pip install -e .[deploy])')


def reductions(model: torch.nn.Module):
    """``(K, depth)`` for :func:`tests.tolerances.assert_close_fp`: the longest
    reduction of ``model``'s convolutions and linear layers (``C_in/groups * kh * kw``
    or ``in_features``) and their number (an upper bound of the reductions in
    sequence)."""
    sizes = [m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
             if isinstance(m, torch.nn.Conv2d) else m.in_features
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return max(sizes), len(sizes)


DETECTORS = {
    # mmdet's RetinaNet, narrowed
    'retinanet': "_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py',\n"
                 "          'mmdet::_base_/datasets/coco_detection.py',\n"
                 "          'mmdet::_base_/default_runtime.py']\n"
                 "custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)\n"
                 "test_pipeline = [dict(type='LoadImageFromFile'),\n"
                 "                 dict(type='Resize', scale=(128, 128), keep_ratio=True),\n"
                 "                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path',\n"
                 "                      'ori_shape', 'img_shape', 'scale_factor'))]\n"
                 "test_dataloader = dict(dataset=dict(pipeline=test_pipeline))\n"
                 "model = dict(backbone=dict(_delete_=True, {backbone}, drop_path_rate=0.,\n"
                 "                           out_indices=(0, 1, 2, 3), init_cfg=None),\n"
                 "             neck=dict(in_channels={widths}, out_channels=32),\n"
                 "             bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32,\n"
                 "                            stacked_convs=1))\n",
    # the demo's Mask R-CNN
    'mask-rcnn': "_base_ = [{demo!r}]\n"
                 "model = dict(backbone=dict(_delete_=True, {backbone}, drop_path_rate=0.,\n"
                 "                           out_indices=(0, 1, 2, 3), init_cfg=None),\n"
                 "             neck=dict(in_channels={widths}))\n",
}
DET_CLASSES = ('circle', 'square', 'triangle')


def detector(tmp_path, kind: str, family: str = 'pale'):
    """``(config, checkpoint, model)`` of a ``kind`` ('retinanet', 'mask-rcnn')
    detector with the narrowed ``family`` backbone; RetinaNet's classifier gets a
    zero prior bias so that random weights give detections above mmdet's score
    threshold."""
    backbone, widths = BACKBONES[family]
    text = DETECTORS[kind].format(
        demo=osp.join(DEMO, 'mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py'),
        backbone=_kwargs(backbone), widths=widths)

    def adjust(model):
        if kind == 'retinanet':
            torch.nn.init.zeros_(model.bbox_head.retina_cls.bias)
    return write_model(tmp_path, text, f'{kind}_{family}', adjust,
                       dict(classes=DET_CLASSES, palette=PALETTE[1:]))


def write_image(path, h: int, w: int, seed: int = 0) -> str:
    """A PNG of a few filled shapes on noise, ``h`` x ``w``."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(4):
        color = tuple(int(c) for c in rng.integers(80, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(min(h, w) // 10 + 1, min(h, w) // 4 + 2))
        cv2.circle(img, (x, y), r, color, -1)
    cv2.imwrite(str(path), img)
    return str(path)
