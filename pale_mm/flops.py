"""Multiply-add counting with ``mmengine.analysis``, attention included.

mmengine's FlopAnalyzer has no handle for ``aten::scaled_dot_product_attention``
(nor ``aten::baddbmm``) and would silently count them as zero. "FLOPs" here means
multiply-adds, as fvcore and mmengine count them.
"""
from math import prod
from typing import Sequence

import torch
import torch.nn as nn


def sdpa_flop_jit(inputs, outputs) -> int:
    """q@k^T and attn@v: ``batch * L * S * (E + Ev)`` multiply-adds."""
    from mmengine.analysis.jit_handles import get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def baddbmm_flop_jit(inputs, outputs) -> int:
    from mmengine.analysis.jit_handles import get_shape
    n, c, t = get_shape(inputs[1])
    return n * c * t * get_shape(inputs[2])[-1]


def deform_conv2d_flop_jit(inputs, outputs) -> int:
    """``torchvision::deform_conv2d`` (DCN, used by LIT's token merging): counted as
    the equivalent conv, ``prod(output) * C_in / groups * kh * kw`` multiply-adds
    (the bilinear sampling is not counted, as fvcore/mmcv do not count it either)."""
    from mmengine.analysis.jit_handles import get_shape
    w = get_shape(inputs[1])
    return prod(get_shape(outputs[0])) * w[1] * w[2] * w[3]


def flop_analyzer(model: nn.Module, inputs):
    """An ``mmengine.analysis.FlopAnalyzer`` that also counts attention."""
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit,
                           'aten::baddbmm', baddbmm_flop_jit,
                           'torchvision::deform_conv2d', deform_conv2d_flop_jit)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analyzer


def count_flops(model: nn.Module, shape: Sequence[int] = (3, 224, 224)) -> int:
    """Multiply-adds of one forward pass of ``model`` on a ``(1, *shape)`` input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *shape)
            return int(flop_analyzer(model, (x, )).total())
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
