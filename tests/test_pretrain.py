"""The pretraining chain: timm classification steps on an ImageFolder made from the
demo images -> a timm-style checkpoint -> the Mask R-CNN config via init_cfg."""
import argparse
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import timm
import torch

import pale_mm  # noqa: F401
from pale_mm.demo.shapes import DET_CLASSES, generate

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _image_folder(tmp_path):
    """One class folder per shape; an image goes to the class of its largest shape."""
    data = tmp_path / 'shapes'
    generate(str(data), num_train=12, num_val=2, size=64, seed=3)
    coco = json.loads((data / 'annotations' / 'instances_training.json').read_text())
    largest = {}
    for a in coco['annotations']:
        if a['area'] > largest.get(a['image_id'], (0, 0))[0]:
            largest[a['image_id']] = (a['area'], a['category_id'])
    folder = tmp_path / 'imagefolder'
    for img in coco['images']:
        cls = DET_CLASSES[largest[img['id']][1] - 1]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / 'images' / 'training' / img['file_name'], folder / cls)
    return folder


def test_timm_steps_then_mask_rcnn_init_cfg(tmp_path):
    from timm.data import Mixup, create_dataset, create_loader
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    folder = _image_folder(tmp_path)
    dataset = create_dataset('', root=str(folder), is_training=True)
    num_classes = len(dataset.reader.class_to_idx)
    assert num_classes >= 2
    model = timm.create_model('pale_tiny', num_classes=num_classes, drop_path_rate=0.1)
    data_cfg = timm.data.resolve_data_config({'input_size': (3, 64, 64)}, model=model)
    loader = create_loader(dataset, input_size=data_cfg['input_size'], batch_size=4,
                           is_training=True, mean=data_cfg['mean'], std=data_cfg['std'],
                           interpolation='bicubic', auto_augment='rand-m9-mstd0.5-inc1',
                           re_prob=0.25, num_workers=0, use_prefetcher=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                  num_classes=num_classes)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=5e-4, weight_decay=0.05)
    criterion = SoftTargetCrossEntropy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    steps = 0
    for x, y in loader:
        x, y = mixup(x, y)
        loss = criterion(model(x), y)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == 2:
            break
    assert steps == 2
    state = model.state_dict()
    assert not torch.equal(state['stages.2.0.attn.qkv.weight'],
                           before['stages.2.0.attn.qkv.weight'])
    ckpt = tmp_path / 'model_best.pth.tar'
    # the layout timm's CheckpointSaver writes
    torch.save({'epoch': 0, 'arch': 'pale_tiny', 'state_dict': state,
                'optimizer': optimizer.state_dict(), 'version': 2,
                'args': argparse.Namespace(model='pale_tiny', lr=5e-4)}, ckpt)

    from mmengine.config import Config
    from pale_mm.utils import register_scope
    register_scope('mmdet')
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'pale', 'mask-rcnn_pale-t_fpn_1x_coco.py'))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(ckpt))
    detector = MODELS.build(cfg.model)
    detector.init_weights()
    loaded = detector.backbone.state_dict()
    for k, v in state.items():
        if k.startswith('head.'):
            continue
        target = 'norm3.' + k[5:] if k.startswith('norm.') else k
        torch.testing.assert_close(loaded[target], v, rtol=0, atol=0, msg=k)


def test_timm_train_wrapper_errors(tmp_path):
    run = [sys.executable, osp.join(ROOT, 'tools', 'timm_train.py')]
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_TRAIN'}
    out = subprocess.run(run + ['/data', '--model', 'pale_tiny'], capture_output=True,
                         text=True, env=env)
    assert out.returncode != 0 and '--timm-train PATH' in out.stderr
    out = subprocess.run(run + ['--timm-train', str(tmp_path / 'nope.py')],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and 'not found' in out.stderr


def test_timm_train_wrapper_runs_script_with_models_registered(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text('import sys, timm\n'
                      'print(sys.argv[1:], "pale_tiny" in timm.list_models("pale_*"))\n')
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'timm_train.py'),
                          '--timm-train', str(script), '/data', '--model', 'pale_tiny'],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['/data', '--model', 'pale_tiny'] True"
