"""``tools/deploy/export.py`` on segmentors: one export serves every input size.

Each test exports a tiny segmentor of the project's configs (narrowed backbones,
random weights saved as a checkpoint) with the tool's command line, runs the file in
onnxruntime at several sizes (odd ones, and a batch of two) and compares it with
mmseg's own data preprocessor and ``EncoderDecoder.encode_decode`` in PyTorch, within
the fp32 tolerance of the model's reductions (``tests/tolerances.py``).
"""
import pytest
import torch

from tests.deploy.models import onnxruntime, reductions, segmentor
from tests.tolerances import assert_close_fp
from tests.tools import load_tool

# (batch, H, W): the export size, a size every stage pads, odd and tiny sizes
SIZES = ((1, 128, 128), (1, 97, 130), (2, 45, 71), (1, 33, 17), (1, 1, 1))


def mmseg_logits(model, img: torch.Tensor) -> torch.Tensor:
    """mmseg's test-time computation: its data preprocessor on the uint8-valued image,
    then ``encode_decode``."""
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=list(img)), False)
        x = data['inputs']
        return model.encode_decode(x, [dict(img_shape=x.shape[2:])] * len(x))


def assert_export_matches(tmp_path, head, family, exporter, sizes=SIZES):
    ort = onnxruntime()
    export = load_tool('deploy/export.py', 'deploy_export')
    config, checkpoint, model = segmentor(tmp_path, head, family)
    out = str(tmp_path / 'model.onnx')
    export.main([config, checkpoint, '--out', out, '--exporter', exporter,
                 '--sample-size', '128', '128'])
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


def test_upernet_pale_one_export_every_size(tmp_path):
    """The demo's UperNet with the narrowed Pale-T, TorchScript exporter (the tool's
    default): equal to PyTorch at the export size, where every stage pads its pale
    groups, at odd sizes, a batch of two and a 1x1 image. mmseg's pyramid pooling
    (adaptive average pools to 1, 2, 3, 6) would be exported for the traced size
    only; the tool exports it as averaging matrices built from the size."""
    assert_export_matches(tmp_path, 'upernet', 'pale', 'torchscript')


def test_semantic_fpn_scalablevit_one_export_every_size(tmp_path):
    """mmseg's Semantic FPN with a narrowed ScalableViT, TorchScript exporter."""
    assert_export_matches(tmp_path, 'fpn', 'scalablevit', 'torchscript')


@pytest.mark.slow
def test_semantic_fpn_lit_default_exporter(tmp_path):
    """Semantic FPN with a narrowed LIT: its deformable convs export with the default
    (``torch.export``-based) exporter only (opset 19 ``DeformConv``)."""
    assert_export_matches(tmp_path, 'fpn', 'lit', 'dynamo', SIZES[:-1])
