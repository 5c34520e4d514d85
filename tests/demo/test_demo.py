"""The synthetic shapes dataset, and the bundled demo's train-then-evaluate loop."""
import json
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from pale_mm.demo import DEMO_FLOORS, DET_CLASSES, SEG_CLASSES, ensure_dataset, generate


@pytest.fixture(scope='module')
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    generate(root, num_train=6, num_val=3, size=64, seed=3)
    return root


def test_layout_and_coco(tiny_shapes):
    root = tiny_shapes
    for split, n in (('training', 6), ('validation', 3)):
        imgs = sorted(f for f in __import__('os').listdir(osp.join(root, 'images', split)))
        labs = sorted(f for f in __import__('os').listdir(osp.join(root, 'annotations', split)))
        assert len(imgs) == len(labs) == n
        assert [f[:-4] for f in imgs] == [f[:-4] for f in labs]
        with open(osp.join(root, 'annotations', f'instances_{split}.json')) as f:
            coco = json.load(f)
        assert [c['name'] for c in coco['categories']] == list(DET_CLASSES)
        assert [c['id'] for c in coco['categories']] == [1, 2, 3]
        assert len(coco['images']) == n and coco['annotations']
        ids = {a['id'] for a in coco['annotations']}
        assert len(ids) == len(coco['annotations'])
        for a in coco['annotations']:
            x, y, w, h = a['bbox']
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            assert a['iscrowd'] == 0 and len(a['segmentation'][0]) >= 6
            assert a['category_id'] in (1, 2, 3)


def test_label_maps_follow_ade_convention(tiny_shapes):
    """0 = unlabelled (ignored by reduce_zero_label), 1 = background, 2.. = shapes;
    every COCO instance's centre pixel carries its class in the label map."""
    import cv2
    root = tiny_shapes
    with open(osp.join(root, 'annotations', 'instances_training.json')) as f:
        coco = json.load(f)
    names = {im['id']: im['file_name'] for im in coco['images']}
    for a in coco['annotations']:
        label = np.array(Image.open(osp.join(root, 'annotations', 'training',
                                             names[a['image_id']][:-4] + '.png')))
        assert label.dtype == np.uint8 and set(np.unique(label)) <= set(range(len(SEG_CLASSES) + 1))
        poly = np.array(a['segmentation'][0]).reshape(-1, 2)
        mask = np.zeros_like(label)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        inside = label[mask.astype(bool)]
        # interior pixels are the instance's class (+1 for background at 1); the
        # unlabelled band (0) covers only the boundary
        assert (inside == a['category_id'] + 1).mean() > 0.3
        assert set(np.unique(inside)) <= {0, a['category_id'] + 1}


def test_generator_is_deterministic(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    generate(a, 3, 2, size=48, seed=7)
    generate(b, 3, 2, size=48, seed=7)
    for rel in ('annotations/instances_training.json', 'annotations/training/shapes_000002.png',
                'images/validation/shapes_000001.jpg'):
        with open(osp.join(a, rel), 'rb') as fa, open(osp.join(b, rel), 'rb') as fb:
            assert fa.read() == fb.read(), rel
    c = str(tmp_path / 'c')
    generate(c, 3, 2, size=48, seed=8)
    with open(osp.join(a, 'annotations/instances_training.json')) as fa, \
            open(osp.join(c, 'annotations/instances_training.json')) as fc:
        assert fa.read() != fc.read()


def test_ensure_dataset_reuses(tmp_path):
    root = str(tmp_path / 'd')
    ensure_dataset(root, 2, 1, size=40)
    stamp = osp.getmtime(osp.join(root, 'meta.json'))
    ensure_dataset(root, 2, 1, size=40)
    assert osp.getmtime(osp.join(root, 'meta.json')) == stamp
    ensure_dataset(root, 3, 1, size=40)  # different settings: regenerated
    with open(osp.join(root, 'meta.json')) as f:
        assert json.load(f)['num_train'] == 3


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='num_train'):
        generate(str(tmp_path), 0, 1)
    with pytest.raises(ValueError, match='size'):
        generate(str(tmp_path), 1, 1, size=8)


# ----------------------------------------------------------------------- the demo
# the floors (DEMO_FLOORS) live in pale_mm.demo: tools/analysis/gpu_e2e.py holds a
# GPU run to the same bar


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_demo_learns(task, demo_data, trained_demo, tmp_path):
    """The demo config trained as ``tools/run_demo.py`` does (the session's shared
    training, ``trained_demo`` in conftest); the headline metric must clear a floor well
    above an untrained model, and beat the same model before training (measured here)
    by a wide margin. Pictures of predictions and the final checkpoint are saved."""
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    from pale_mm.demo.run import DEMO_CONFIGS, build_demo_runner
    key, floor, gain = DEMO_FLOORS[task]

    untrained = build_demo_runner(DEMO_CONFIGS[task], demo_data, str(tmp_path / 'untrained'))
    # CocoMetric reports nothing when a model detects nothing at all: count that as 0
    before = float(untrained.val().get(key, 0.))
    del untrained

    res = trained_demo(task)
    after = res['metrics'].get(key, 0.)
    print(f'demo {task}: {key} untrained {before:.3f} -> trained {after:.3f} '
          f'in {res["train_seconds"]:.0f}s; all metrics {res["metrics"]}')
    assert after >= floor, (key, before, after)
    assert after >= before + gain, (key, before, after)
    assert res['vis_images'], 'no pictures of predictions were saved'
    assert res['checkpoint'] and osp.isfile(res['checkpoint']), res['work_dir']
    if task == 'det':
        assert res['metrics'].get('coco/segm_mAP', 0.) >= floor


FAMILY_DEMOS = ['mask-rcnn_lit-demo_fpn_200i_shapes-128.py',
                'mask-rcnn_scalablevit-demo_fpn_200i_shapes-128.py']


@pytest.mark.slow
@pytest.mark.parametrize('name', FAMILY_DEMOS)
def test_family_demo_learns(name, demo_data, tmp_path):
    """The LIT and ScalableViT demo configs (the Pale detection demo with the backbone
    swapped) clear the same bar as Pale's: measured here about 0.19 / 0.21 box mAP
    against 0 untrained with two threads, and 0.201 / 0.194 (mask 0.230 / 0.241) with
    one, as in tools/run_tests.sh's parallel workers (2026-12-07): unlike the
    segmentation demo, these detectors learn at either thread count, so they are
    not marked ``serial``."""
    pytest.importorskip('mmdet')
    from pale_mm.demo.run import REPO, build_demo_runner, val_metrics
    config = osp.join(REPO, 'configs', 'demo', name)
    key, floor, gain = DEMO_FLOORS['det']
    untrained = build_demo_runner(config, demo_data, str(tmp_path / 'untrained'))
    before = float(untrained.val().get(key, 0.))
    del untrained
    runner = build_demo_runner(config, demo_data, str(tmp_path / 'trained'))
    runner.train()
    metrics = val_metrics(runner)
    after = metrics.get(key, 0.)
    print(f'{name}: {key} untrained {before:.3f} -> trained {after:.3f}; {metrics}')
    assert after >= floor and after >= before + gain, (key, before, after)
    assert metrics.get('coco/segm_mAP', 0.) >= floor
