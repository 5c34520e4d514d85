"""Checks every backbone family's tests share."""
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
