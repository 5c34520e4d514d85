"""The pale attention written into ONNX files (:mod:`pale_mm.ops.export`) is the
reference's function, in fewer ops.

Its values are checked against the reference eagerly, at sizes that pad either axis,
that divide evenly and at a 1x1 map; the exported files, with the fast paths on and
off, in onnxruntime at several sizes from one export (the backbones' ONNX tests in
tests/test_standard_tools.py, tests/models/ run the whole Pale backbone exported with
the fast paths on, both exporters).
"""
import collections
import warnings

import pytest
import torch

from pale_mm.models.pale_attention import PSAttention, pale_attention_nhwc
from pale_mm.ops import export_path, set_fast_paths
from pale_mm.ops.export import pale_attention_onnx
from tests.backbones import onnx_exporter_kwargs, randomize_bn
from tests.tolerances import assert_close_fp


@pytest.mark.parametrize('hw', [(14, 21), (15, 9), (7, 7), (1, 1), (3, 16)])
@pytest.mark.parametrize('pale_size', [(7, 7), (3, 5)])
def test_export_form_equals_reference(hw, pale_size):
    q, k, v = (torch.randn(2, *hw, 32) for _ in range(3))
    expected = pale_attention_nhwc(q, k, v, pale_size, num_heads=4)
    got = pale_attention_onnx(q, k, v, pale_size, num_heads=4)
    # the longest reductions: the softmax sum and the weighted sum over a group's keys
    keys = max(pale_size) * max(hw)
    assert_close_fp(got, expected, max(keys, 8), depth=2)


def test_export_path_only_while_onnx_exports():
    assert export_path('pale_attention_nhwc') is None  # eager: the reference runs
    with pytest.raises(ValueError, match='attn_drop=0.1'):
        pale_attention_onnx(*(torch.randn(1, 4, 4, 8) for _ in range(3)), (2, 2), 2, 0.1)


def _export(module, path, exporter):
    x = torch.randn(2, 15 * 16, 32)
    dyn = {'x': {0: 'B', 1: 'N'}, 'y': {0: 'B', 1: 'N'}}

    class Wrap(torch.nn.Module):  # hw_shape from the input: (15, N / 15)
        def __init__(self):
            super().__init__()
            self.attn = module

        def forward(self, x):
            return self.attn(x, (15, x.shape[1] // 15))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(Wrap().eval(), (x, ), str(path), input_names=['x'],
                          output_names=['y'], dynamic_axes=dyn,
                          **onnx_exporter_kwargs(exporter))
    return Wrap().eval()


@pytest.mark.parametrize('exporter', ['torchscript'])
def test_exported_attention_fewer_ops_same_values(exporter, tmp_path):
    """One PSAttention exported with the fast paths off (the reference's graph: the
    boolean mask as a ``Where`` over every score and a NaN guard) and on (the export
    form: no ``IsNaN``, fewer nodes); both files equal PyTorch in onnxruntime at
    widths 16 (no padding), 13 and 1 (padded columns), 30 (two column groups)."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    attn = randomize_bn(PSAttention(32, 4, pale_size=(7, 7))).eval()
    counts = {}
    for fast in (False, True):
        previous = set_fast_paths(fast)
        try:
            path = tmp_path / f'attn_{fast}.onnx'
            wrap = _export(attn, path, exporter)
        finally:
            set_fast_paths(previous)
        counts[fast] = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        for width in (16, 13, 1, 30):
            x = torch.randn(1, 15 * width, 32)
            with torch.no_grad():
                expected = wrap(x)
            got = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
            assert_close_fp(got, expected, 32 * 9 + 15 * 7, depth=4, msg=f'fast={fast} {width}')
    assert counts[False]['IsNaN'] > 0 and counts[True]['IsNaN'] == 0
    assert sum(counts[True].values()) < 0.7 * sum(counts[False].values()), counts
