"""One-call inference (DetInferencer / MMSegInferencer) with a checkpoint produced by
the demo training, writing a visualisation."""
import glob
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from pale_mm.apis import inference

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from pale_mm.demo import generate
    root = str(tmp_path_factory.mktemp('shapes_api'))
    generate(root, num_train=8, num_val=2, size=128, seed=5)
    return root


def _short_demo_checkpoint(task, data_root, work_dir, iters=10):
    """The demo training (``pale_mm.demo.run``) for a few iterations; its checkpoint."""
    from pale_mm.demo.run import DEMO_CONFIGS, build_demo_runner
    runner = build_demo_runner(DEMO_CONFIGS[task], data_root, work_dir, cfg_options={
        'train_cfg.max_iters': iters, 'train_cfg.val_interval': 10 ** 6,
        'default_hooks.checkpoint.interval': iters, 'param_scheduler': [],
        'custom_hooks': []})
    runner.train()
    ckpt = osp.join(work_dir, f'iter_{iters}.pth')
    assert osp.isfile(ckpt), sorted(glob.glob(osp.join(work_dir, '*')))
    return DEMO_CONFIGS[task], ckpt


@pytest.mark.slow
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_inference_writes_visualisation(task, shapes, tmp_path):
    config, ckpt = _short_demo_checkpoint(task, shapes, str(tmp_path / 'train'))
    image = sorted(glob.glob(osp.join(shapes, 'images', 'validation', '*.jpg')))[0]
    out = inference(config, ckpt, image, out_dir=str(tmp_path / 'out'), score_thr=0.0)
    assert out['vis_path'] and osp.isfile(out['vis_path'])
    vis = np.asarray(Image.open(out['vis_path']))
    src = np.asarray(Image.open(image))
    assert vis.shape[:2] == src.shape[:2] and not np.array_equal(vis, src)  # drawn on
    pred = out['predictions'][0]
    if task == 'det':
        assert {'labels', 'scores', 'bboxes'} <= set(pred)
    else:
        assert pred.shape == src.shape[:2]


def test_inference_errors(tmp_path):
    cfg = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py')
    with pytest.raises(FileNotFoundError, match='image not found'):
        inference(cfg, None, str(tmp_path / 'x.jpg'))
    Image.new('RGB', (32, 32)).save(tmp_path / 'x.jpg')
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        inference(cfg, str(tmp_path / 'none.pth'), str(tmp_path / 'x.jpg'))
    with pytest.raises(FileNotFoundError, match='config file not found'):
        inference(str(tmp_path / 'c.py'), None, str(tmp_path / 'x.jpg'))
