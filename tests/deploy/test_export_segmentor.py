"""``tools/deploy/export.py`` on segmentors: one export serves every input size.

Each test exports a tiny segmentor of the project's configs (narrowed backbones,
random weights saved as a checkpoint) with the tool's command line, runs the file in
onnxruntime at several sizes (odd ones, and a batch of two) and compares it with
mmseg's own data preprocessor and ``EncoderDecoder.encode_decode`` in PyTorch, within
the fp32 tolerance of the model's reductions (``tests/tolerances.py``).
"""
import os.path as osp

import numpy as np
import pytest
import torch

from pale_mm.ops import set_fast_paths
from tests.deploy.models import onnxruntime, reductions, segmentor
from tests.tolerances import assert_close_fp
from tests.tools import load_tool

# (batch, H, W): the export size, a size every stage pads, odd and tiny sizes
SIZES = ((1, 128, 160), (1, 97, 130), (2, 45, 71), (1, 33, 17), (1, 1, 1))


def mmseg_logits(model, img: torch.Tensor) -> torch.Tensor:
    """mmseg's test-time computation: its data preprocessor on the uint8-valued image,
    then ``encode_decode``."""
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=list(img)), False)
        x = data['inputs']
        return model.encode_decode(x, [dict(img_shape=x.shape[2:])] * len(x))


def export_segmentor(tmp_path, head, family, exporter, runtime='any'):
    """``(config, checkpoint, model, onnx file)``: a tiny segmentor exported with the
    tool's command line (``--runtime runtime``)."""
    onnxruntime()
    export = load_tool('deploy/export.py', 'deploy_export')
    config, checkpoint, model = segmentor(tmp_path, head, family)
    out = str(tmp_path / 'model.onnx')
    export.main([config, checkpoint, '--out', out, '--exporter', exporter,
                 '--sample-size', '128', '160', '--runtime', runtime])
    return config, checkpoint, model, out


@pytest.fixture(scope='module')
def upernet_pale(tmp_path_factory):
    """The demo's UperNet with the narrowed Pale-T, exported once for this module."""
    return export_segmentor(tmp_path_factory.mktemp('upernet_pale'), 'upernet', 'pale',
                            'torchscript')


def assert_export_matches(exported, exporter, sizes=SIZES):
    """The file of ``exported`` (:func:`export_segmentor`) in onnxruntime equals mmseg
    in PyTorch at each ``(batch, H, W)`` of ``sizes``."""
    ort = onnxruntime()
    export = load_tool('deploy/export.py', 'deploy_export')
    config, checkpoint, model, out = exported
    head, family = osp.splitext(osp.basename(config))[0].split('_')
    meta = export.read_metadata(out)
    assert meta['task'] == 'mmseg' and meta['outputs'] == ['seg_logits']
    assert meta['dataset_meta']['classes'][1] == 'circle'
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(out, options, providers=['CPUExecutionProvider'])
    K, depth = reductions(model)
    g = torch.Generator().manual_seed(0)
    for b, h, w in sizes:
        img = torch.randint(0, 256, (b, 3, h, w), generator=g).float()
        expected = mmseg_logits(model, img)
        got = torch.from_numpy(session.run(None, {'img': img.numpy()})[0])
        assert got.shape == expected.shape == (b, 4, h, w)
        assert_close_fp(got, expected, K, depth=depth, msg=f'{head} {family} {b}x{h}x{w}')


def test_upernet_pale_one_export_every_size(upernet_pale):
    """The demo's UperNet with the narrowed Pale-T, TorchScript exporter (the tool's
    default): equal to PyTorch at the export size, where every stage pads its pale
    groups, at odd sizes, a batch of two and a 1x1 image. mmseg's pyramid pooling
    (adaptive average pools to 1, 2, 3, 6) would be exported for the traced size
    only; the tool exports it as averaging matrices built from the size."""
    assert_export_matches(upernet_pale, 'torchscript')


def test_upernet_pale_onnxruntime_runtime(tmp_path, fast_paths_on):
    """``--runtime onnxruntime``: the pale attention as onnxruntime's
    ``MultiHeadAttention`` (no ``Softmax`` left), equal to PyTorch at a size every
    stage pads, a batch of two and a 1x1 image; the default exporter cannot write it,
    nor does the runner hand the file to OpenVINO (clear errors)."""
    onnx = pytest.importorskip('onnx')
    exported = export_segmentor(tmp_path, 'upernet', 'pale', 'torchscript', 'onnxruntime')
    assert_export_matches(exported, 'torchscript', SIZES[1:3] + SIZES[-1:])
    export = load_tool('deploy/export.py', 'deploy_export')
    assert export.read_metadata(exported[-1])['runtime'] == 'onnxruntime'
    ops = {n.op_type for n in onnx.load(exported[-1]).graph.node}
    assert 'MultiHeadAttention' in ops and 'Softmax' not in ops
    with pytest.raises(ValueError, match='needs --exporter torchscript'):
        export.check_runtime('onnxruntime', 'dynamo')
    with pytest.raises(ValueError, match='runtime must be one of'):
        export.check_runtime('tensorrt', 'torchscript')
    previous = set_fast_paths(False)
    try:  # the reference's graph under an onnxruntime label: refused
        with pytest.raises(ValueError, match='needs the fast paths on .*PALE_MM_FAST_PATHS'):
            export.check_runtime('onnxruntime', 'torchscript')
    finally:
        set_fast_paths(previous)
    infer = load_tool('deploy/infer.py', 'deploy_infer')
    with pytest.raises(ValueError, match='exported for onnxruntime .* --runtime any'):
        infer.build_inferencer(exported[-1], 'openvino')


def test_semantic_fpn_scalablevit_one_export_every_size(tmp_path):
    """mmseg's Semantic FPN with a narrowed ScalableViT, TorchScript exporter."""
    assert_export_matches(export_segmentor(tmp_path, 'fpn', 'scalablevit', 'torchscript'),
                          'torchscript')


@pytest.mark.slow
def test_semantic_fpn_lit_default_exporter(tmp_path):
    """Semantic FPN with a narrowed LIT: its deformable convs export with the default
    (``torch.export``-based) exporter only (opset 19 ``DeformConv``). Its graph
    serves sides of 33 or more (every map at least 2 lines long)."""
    exported = export_segmentor(tmp_path, 'fpn', 'lit', 'dynamo')
    assert_export_matches(exported, 'dynamo', SIZES[:3])
    export = load_tool('deploy/export.py', 'deploy_export')
    infer = load_tool('deploy/infer.py', 'deploy_infer')
    min_size = export.read_metadata(exported[-1])['min_size']
    assert min_size == 33
    with pytest.raises(ValueError, match='17x40 .* at least 33'):
        infer.check_size(torch.zeros(1, 3, 17, 40), min_size)


def test_runner_matches_mmseginferencer(upernet_pale, tmp_path):
    """``tools/deploy/infer.py`` (onnxruntime, and OpenVINO where installed) gives
    mmseg's ``MMSegInferencer`` result on an image of odd size: the same logits
    within the fp32 tolerance, the same class map where the two best logits are
    apart by more than it, and the drawing. OpenVINO runs the file with dynamic and
    with static shapes (compiled for the image's size)."""
    from mmseg.apis import MMSegInferencer

    from tests.deploy.models import write_image
    from tests.deploy.test_export_detector import runtimes
    infer = load_tool('deploy/infer.py', 'deploy_infer')
    config, checkpoint, model, out = upernet_pale
    image = write_image(tmp_path / 'img.png', 75, 131)
    expected = MMSegInferencer(config, checkpoint, device='cpu')(
        image, return_datasamples=True)
    K, depth = reductions(model)
    for backend, static in [(b, False) for b in runtimes()] + [
            ('openvino', True)] * ('openvino' in runtimes()):
        got = infer.build_inferencer(out, backend, static_shapes=static)(
            image, return_datasamples=True)
        logits, ref = got.seg_logits.data, expected.seg_logits.data
        assert_close_fp(logits, ref, K, depth=depth, msg=backend)
        top2 = ref.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-3 * ref.abs().max()
        labels = got.pred_sem_seg.data[0]
        assert torch.equal(labels[clear], expected.pred_sem_seg.data[0][clear]), backend
        if static:
            continue
        result = infer.infer(out, [image], backend, str(tmp_path / backend))
        assert np.array_equal(result['predictions'], labels.numpy())
        assert osp.isfile(tmp_path / backend / 'vis' / 'img.png'), backend
        assert infer.summary(result['predictions'], 0.3)[0].startswith('image 0: class')
