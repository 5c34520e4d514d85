"""The pale attention written into ONNX files (:mod:`pale_mm.ops.export`) is the
reference's function, in fewer ops.

Its values are checked against the reference eagerly, at sizes that pad either axis,
that divide evenly and at a 1x1 map, in both forms (standard ops, and onnxruntime's
``MultiHeadAttention``); the exported files, with the fast paths on and off and in
the onnxruntime form, in onnxruntime at several sizes from one export (the backbones' ONNX tests in
tests/test_standard_tools.py, tests/models/ run the whole Pale backbone exported with
the fast paths on, both exporters).
"""
import collections
import warnings

import pytest
import torch

from pale_mm.models.pale_attention import PSAttention, pale_attention_nhwc
from pale_mm.ops import export_path, fast_path, set_fast_paths
from pale_mm.ops.export import export_runtime, pale_attention_onnx, ps_attention_onnx
from tests.backbones import onnx_exporter_kwargs, randomize_bn
from tests.tolerances import assert_close_fp


@pytest.mark.parametrize('runtime', ['any', 'onnxruntime'])
@pytest.mark.parametrize('hw', [(14, 21), (15, 9), (7, 7), (1, 1), (3, 16)])
@pytest.mark.parametrize('pale_size', [(7, 7), (3, 5)])
def test_export_form_equals_reference(hw, pale_size, runtime):
    """Both forms; the onnxruntime form's two sets of groups (``s`` and ``s - 1`` real
    lines) are both present (15 rows in groups of 5: 3 groups of 5 lines, 21 in
    groups of 7: 3 of 7) or the second empty (14 in groups of 7: 2 of 7)."""
    q, k, v = (torch.randn(2, *hw, 32) for _ in range(3))
    expected = pale_attention_nhwc(q, k, v, pale_size, num_heads=4)
    with export_runtime(runtime):
        got = pale_attention_onnx(q, k, v, pale_size, num_heads=4)
    # the longest reductions: the softmax sum and the weighted sum over a group's keys
    keys = max(pale_size) * max(hw)
    assert_close_fp(got, expected, max(keys, 8), depth=2)


def test_export_path_only_while_onnx_exports():
    assert export_path('pale_attention_nhwc') is None  # eager: the reference runs
    with pytest.raises(ValueError, match='attn_drop=0.1'):
        pale_attention_onnx(*(torch.randn(1, 4, 4, 8) for _ in range(3)), (2, 2), 2, 0.1)
    with pytest.raises(ValueError, match="runtime must be one of .*'tensorrt'"):
        with export_runtime('tensorrt'):
            pass


def _export(module, path, exporter, runtime='any'):
    x = torch.randn(2, 15 * 16, 32)
    dyn = {'x': {0: 'B', 1: 'N'}, 'y': {0: 'B', 1: 'N'}}

    class Wrap(torch.nn.Module):  # hw_shape from the input: (15, N / 15)
        def __init__(self):
            super().__init__()
            self.attn = module

        def forward(self, x):
            return self.attn(x, (15, x.shape[1] // 15))

    with torch.no_grad(), warnings.catch_warnings(), export_runtime(runtime):
        warnings.simplefilter('ignore')
        torch.onnx.export(Wrap().eval(), (x, ), str(path), input_names=['x'],
                          output_names=['y'], dynamic_axes=dyn,
                          **onnx_exporter_kwargs(exporter))
    return Wrap().eval()


def _assert_file_matches(ort, path, wrap, what: str):
    """The exported file at ``path`` equals ``wrap`` (its PyTorch module) in onnxruntime
    at widths 16 (no padding), 13 and 1 (padded columns), 30 (two column groups)."""
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for width in (16, 13, 1, 30):
        x = torch.randn(1, 15 * width, 32)
        with torch.no_grad():
            expected = wrap(x)
        got = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        # the longest reductions: the 3x3 conv, a projection, a group's keys
        assert_close_fp(got, expected, 32 * 9 + 15 * 7, depth=4, msg=f'{what}, width {width}')


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
        _assert_file_matches(ort, path, wrap, f'fast={fast}')
    assert counts[False]['IsNaN'] > 0 and counts[True]['IsNaN'] == 0
    # fewer nodes (691 against 983 here; the rank-4 attention, which OpenVINO fuses,
    # costs the key bias a Tile and its shape arithmetic: 661 before it)
    assert sum(counts[True].values()) < 0.75 * sum(counts[False].values()), counts
    # PSAttention's export form: q, k, v each by its own conv, BatchNorm and
    # projection (the reference: one conv over [x, x, x], its BatchNorm folded in by
    # the exporter)
    assert (counts[False]['Conv'], counts[False]['BatchNormalization']) == (1, 0), counts
    assert (counts[True]['Conv'], counts[True]['BatchNormalization']) == (3, 3), counts


def test_exported_onnxruntime_form_same_values(tmp_path, fast_paths_on):
    """One PSAttention exported for onnxruntime (``export_runtime('onnxruntime')``):
    the attention is ``com.microsoft.MultiHeadAttention`` (no ``Softmax``, no key
    bias), one call per branch and set of groups, and equals PyTorch in onnxruntime at
    widths 16 and 13 (columns in groups of ``s`` and ``s - 1`` real lines), 1 and 30
    (no short groups; nor have the rows, 15 in groups of 5)."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    attn = randomize_bn(PSAttention(32, 4, pale_size=(7, 7))).eval()
    path = tmp_path / 'attn_ort.onnx'
    wrap = _export(attn, path, 'torchscript', runtime='onnxruntime')
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops['MultiHeadAttention'] == 4 and ops['Softmax'] == 0, ops
    _assert_file_matches(ort, path, wrap, 'onnxruntime form')


@pytest.mark.parametrize('hw', [(15, 13), (7, 7), (1, 1)])
def test_ps_attention_export_form_equals_reference(hw):
    """PSAttention's export form (q, k and v each from its slice of the fused depthwise
    conv, BatchNorm and projection) against the reference forward, eval mode."""
    attn = randomize_bn(PSAttention(32, 4, pale_size=(7, 7))).eval()
    x = torch.randn(2, hw[0] * hw[1], 32)
    previous = set_fast_paths(False)
    try:
        with torch.no_grad():
            expected = attn(x, hw)
    finally:
        set_fast_paths(previous)
    with torch.no_grad():
        got = ps_attention_onnx(attn, x, hw)
    # the longest reductions: the 3x3 conv, a projection, a group's keys, the output
    assert_close_fp(got, expected, max(9, 32, 7 * max(hw)), depth=4)


def test_ps_attention_export_form_only_where_it_applies(monkeypatch, fast_paths_on):
    """While ONNX export runs (faked here), the dispatch hands an eval-mode PSAttention
    as built to its export form, and leaves the reference where the form would not
    compute the same: training mode, a converted BatchNorm, a hook, fast paths off."""
    attn = PSAttention(32, 4, pale_size=(7, 7)).eval()
    x = torch.randn(1, 49, 32)
    assert fast_path(attn, x) is None or fast_path(attn, x).func is not ps_attention_onnx
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    assert fast_path(attn, x).func is ps_attention_onnx
    assert fast_path(attn.train(), x) is None
    attn.eval()
    handle = attn.qkv_bn.register_forward_hook(lambda *a: None)
    assert fast_path(attn, x) is None
    handle.remove()
    previous = set_fast_paths(False)
    try:
        assert fast_path(attn, x) is None
    finally:
        set_fast_paths(previous)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(attn)
    assert fast_path(synced, x) is None
