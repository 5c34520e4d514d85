"""``tools/deploy/export.py`` and ``tools/deploy/infer.py`` on detectors: the exported
network plus mmdet's own post-processing give DetInferencer's detections.

Each test exports a tiny detector (narrowed Pale-T, random weights saved as a
checkpoint) once and runs mmdet's ``DetInferencer`` on the PyTorch model and the
tool's runner (onnxruntime; OpenVINO where installed) on images of two odd sizes
(after the test pipeline's resize the network sees 85x128 and 128x75, padded to
multiples of 32 inside the graph). The detections must be the same boxes with the
same labels, the scores and coordinates within the fp32 tolerance of the model's
reductions (``tests/tolerances.py``).
"""
import os.path as osp

import pytest
import torch

from tests.deploy.models import detector, onnxruntime, reductions, write_image
from tests.tolerances import assert_close_fp
from tests.tools import load_tool

IMAGES = ((100, 150), (131, 77))


def runtimes():
    """The backends to check: onnxruntime, and OpenVINO where it is installed."""
    try:
        import openvino  # noqa: F401
        return ('onnxruntime', 'openvino')
    except ImportError:
        return ('onnxruntime', )


def assert_same_detections(got, expected, model, where):
    K, depth = reductions(model)
    assert len(got) == len(expected) > 0, (where, len(got), len(expected))
    assert torch.equal(got.labels, expected.labels), where
    assert_close_fp(got.scores, expected.scores, K, depth=depth, msg=f'{where} scores')
    assert_close_fp(got.bboxes, expected.bboxes, K, depth=depth, msg=f'{where} boxes')
    if 'masks' in expected:
        # binary masks: a pixel flips only where its probability is within rounding
        # of the 0.5 threshold
        flipped = (got.masks != expected.masks).float().mean().item()
        assert flipped <= 1e-3, f'{where}: {flipped:.2e} of the mask pixels differ'


def check_detector(tmp_path, kind):
    onnxruntime()
    from mmdet.apis import DetInferencer
    export = load_tool('deploy/export.py', 'deploy_export')
    infer = load_tool('deploy/infer.py', 'deploy_infer')
    config, checkpoint, model = detector(tmp_path, kind)
    out = str(tmp_path / 'model.onnx')
    paths = export.main([config, checkpoint, '--out', out, '--sample-size', '128', '160'])
    assert len(paths) == (3 if kind == 'mask-rcnn' else 1)
    images = [write_image(tmp_path / f'{h}x{w}.png', h, w, seed=i)
              for i, (h, w) in enumerate(IMAGES)]
    reference = DetInferencer(config, checkpoint, device='cpu', show_progress=False)
    for backend in runtimes():
        runner = infer.build_inferencer(out, backend)
        for image in images:
            with torch.no_grad():
                expected = reference(image, return_datasamples=True)['predictions'][0]
                got = runner(image, return_datasamples=True)['predictions'][0]
            assert_same_detections(got.pred_instances, expected.pred_instances, model,
                                   f'{kind} {backend} {image}')
    # the command line's way: printed and drawn by DetInferencer
    infer.main([out, images[0], '--out-dir', str(tmp_path / 'out'), '--score-thr', '0.05'])
    assert (tmp_path / 'out' / 'vis' / osp.basename(images[0])).is_file()


def test_retinanet_matches_detinferencer(tmp_path):
    """RetinaNet: the bbox head's raw outputs exported, mmdet's ``predict_by_feat``
    (box decoding, NMS) in the runner."""
    check_detector(tmp_path, 'retinanet')


@pytest.mark.slow
def test_mask_rcnn_matches_detinferencer(tmp_path):
    """Mask R-CNN: backbone, neck and RPN head in one graph, the RoI bbox and mask heads
    (RoIAlign as ONNX ``RoiAlign``) in two more; mmdet's RPN, bbox and mask
    post-processing between them."""
    check_detector(tmp_path, 'mask-rcnn')
