"""One-call inference (DetInferencer / MMSegInferencer) with the checkpoint of the
demo's training, writing a visualisation."""
import glob
import json
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from pale_mm.apis import inference
from pale_mm.demo.run import DEMO_CONFIGS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.serial  # shares the demo's trainings (trained_demo) with tests/demo
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_inference_writes_visualisation(task, trained_demo, demo_data, tmp_path):
    """Inference with the checkpoint of the demo's own training (shared with
    tests/demo, see ``trained_demo`` in conftest) on a validation image: the picture is
    drawn, and the trained model finds the shapes there."""
    res = trained_demo(task)
    config, ckpt = DEMO_CONFIGS[task], res['checkpoint']
    image = sorted(glob.glob(osp.join(demo_data, 'images', 'validation', '*.jpg')))[0]
    out = inference(config, ckpt, image, out_dir=str(tmp_path / 'out'), score_thr=0.0)
    assert out['vis_path'] and osp.isfile(out['vis_path'])
    vis = np.asarray(Image.open(out['vis_path']))
    src = np.asarray(Image.open(image))
    assert vis.shape[:2] == src.shape[:2] and not np.array_equal(vis, src)  # drawn on
    pred = out['predictions'][0]
    if task == 'det':
        assert {'labels', 'scores', 'bboxes'} <= set(pred)
        # one of the three best detections is a shape of the picture: the right class,
        # its box overlapping the true one by IoU >= 0.5 (an untrained model's are not)
        import torch
        from mmdet.structures.bbox import bbox_overlaps
        with open(osp.join(demo_data, 'annotations', 'instances_validation.json')) as f:
            coco = json.load(f)
        img_id = next(i['id'] for i in coco['images'] if i['file_name'] == osp.basename(image))
        truth = [a for a in coco['annotations'] if a['image_id'] == img_id]
        true_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                   (a['bbox'] for a in truth)])
        true_labels = torch.tensor([a['category_id'] - 1 for a in truth])
        top = torch.tensor(pred['scores']).argsort(descending=True)[:3]
        iou = bbox_overlaps(torch.tensor(pred['bboxes'])[top], true_boxes)
        hits = (iou >= 0.5) & (torch.tensor(pred['labels'])[top, None] == true_labels)
        assert hits.any(), (iou, top, pred['labels'], true_labels)
    else:
        assert pred.shape == src.shape[:2]
        label = np.asarray(Image.open(osp.join(demo_data, 'annotations', 'validation',
                                               osp.basename(image)[:-4] + '.png')))
        # label map: 0 unlabelled (the shapes' outlines), 1 background, 2.. shapes;
        # model classes are one less (reduce_zero_label). The demo's UperNet tells
        # shapes from background (it does not yet tell squares from triangles): the
        # pixels it calls a shape overlap the true shapes by IoU >= 0.5 (0 for a model
        # that calls everything background).
        valid = label != 0
        said, true = (pred >= 1) & valid, (label >= 2) & valid
        assert true.any(), image
        iou = (said & true).sum() / (said | true).sum()
        assert iou >= 0.5, (iou, np.unique(pred))


def test_inference_errors(tmp_path):
    cfg = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py')
    with pytest.raises(FileNotFoundError, match='image not found'):
        inference(cfg, None, str(tmp_path / 'x.jpg'))
    Image.new('RGB', (32, 32)).save(tmp_path / 'x.jpg')
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        inference(cfg, str(tmp_path / 'none.pth'), str(tmp_path / 'x.jpg'))
    with pytest.raises(FileNotFoundError, match='config file not found'):
        inference(str(tmp_path / 'c.py'), None, str(tmp_path / 'x.jpg'))
