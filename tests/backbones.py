"""Checks every backbone family's tests share."""
import inspect
import warnings

import pytest
import torch


def assert_output_pyramid(model, size, expected, batch=2, width=16):
    """``model`` in eval mode on a ``(batch, 3, *size)`` input returns a tuple of four
    maps; map ``i`` has ``width * 2**i`` channels and the spatial size
    ``expected[i]``, is contiguous and finite."""
    model = model.eval()
    with torch.no_grad():
        outs = model(torch.randn(batch, 3, *size))
    assert isinstance(outs, tuple) and len(outs) == 4
    for i, (o, hw) in enumerate(zip(outs, expected)):
        assert o.shape == (batch, width * 2 ** i) + tuple(hw), (i, o.shape, hw)
        assert o.is_contiguous() and torch.isfinite(o).all(), i


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` relative to ``max |b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def randomize_bn(model, seed=1):
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1, which
    would hide an eval-mode BatchNorm that is skipped)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def onnx_exporter_kwargs(exporter: str) -> dict:
    """``torch.onnx.export`` arguments for ``'torchscript'`` (``dynamo=False``, opset 17:
    what mmdeploy uses) or ``'dynamo'`` (the default exporter since torch 2.9, built on
    ``torch.export``; opset 19, the first with ``DeformConv``); skips the test where
    this torch or environment lacks the exporter."""
    has_switch = 'dynamo' in inspect.signature(torch.onnx.export).parameters
    if exporter == 'torchscript':
        return dict(opset_version=17, dynamo=False) if has_switch else dict(opset_version=17)
    if not has_switch:
        pytest.skip('this torch has only the TorchScript exporter')
    pytest.importorskip('onnxscript', reason='the default exporter needs onnxscript '
                                             '(a test dependency: tools/setup_env.sh)')
    return dict(opset_version=19, dynamo=True)


def assert_onnx_matches(model, path, sizes, export_size=(224, 224), **export_kwargs):
    """Export ``model`` (eval mode) with ``torch.onnx.export`` at ``export_size`` with H
    and W declared dynamic (``dynamic_axes``, as users and mmdeploy write it), run the
    file in onnxruntime at each of ``sizes`` and check that every output has PyTorch's
    shape and matches it within 1e-4 of its largest magnitude (fp32 agreement is
    about 1e-6)."""
    pytest.importorskip('onnx', reason='onnx is a test dependency (tools/setup_env.sh)')
    ort = pytest.importorskip('onnxruntime',
                              reason='onnxruntime is a test dependency (tools/setup_env.sh)')
    model = model.eval()
    x = torch.randn(1, 3, *export_size)
    with torch.no_grad():
        n = len(model(x))
    outputs = [f'out{i}' for i in range(n)]
    dynamic = {'img': {2: 'H', 3: 'W'}}
    dynamic.update({o: {2: f'h{i}', 3: f'w{i}'} for i, o in enumerate(outputs)})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # each exporter's advice and deprecation warnings
        torch.onnx.export(model, (x, ), str(path), input_names=['img'], output_names=outputs,
                          dynamic_axes=dynamic, **export_kwargs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = model(x)
        got = session.run(outputs, {'img': x.numpy()})
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == tuple(e.shape), (h, w, i, g.shape, e.shape)
            err = max_rel_err(torch.from_numpy(g), e)
            assert err < 1e-4, f'{h}x{w} output {i}: error {err:.2e} of its largest magnitude'
