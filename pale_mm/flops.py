"""Multiply-add counting with ``mmengine.analysis``, attention included.

mmengine's FlopAnalyzer has no handle for ``aten::scaled_dot_product_attention``
(nor ``aten::baddbmm``, ``torchvision::deform_conv2d``) and would silently count
them as zero. Importing this module (``import pale_mm`` does) adds the handles of
:data:`FLOP_HANDLES` to mmengine's default table, so every ``FlopAnalyzer`` built
afterwards counts them, including the one inside
``mmengine.analysis.get_model_complexity_info`` that mmdet's and mmseg's own
``tools/analysis_tools/get_flops.py`` call (their configs import pale_mm through
``custom_imports``). "FLOPs" here means multiply-adds, as fvcore and mmengine count
them.
"""
from math import prod
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ['FLOP_HANDLES', 'register_flop_handles', 'flop_analyzer', 'count_flops',
           'count_params']


def sdpa_flop_jit(inputs, outputs) -> int:
    """q@k^T and attn@v: ``batch * L * S * (E + Ev)`` multiply-adds (a mask, the
    softmax and dropout are not counted, as mmengine counts no elementwise op)."""
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


#: The ops pale_mm's models use that mmengine's FlopAnalyzer does not count.
FLOP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    'aten::baddbmm': baddbmm_flop_jit,
    'torchvision::deform_conv2d': deform_conv2d_flop_jit,
}


def register_flop_handles() -> bool:
    """Add :data:`FLOP_HANDLES` to mmengine's default FLOP handles (the module-level
    table that every ``FlopAnalyzer`` copies when it is built), and an activation
    handle for attention (its output elements, as mmengine counts a matmul's) to the
    ``ActivationAnalyzer``'s, keeping any handle mmengine already has for an op.
    Returns False where this mmengine has no such tables (nothing is changed;
    :func:`flop_analyzer` still counts these ops)."""
    try:
        from mmengine.analysis import complexity_analysis
        from mmengine.analysis.jit_handles import generic_activation_jit
    except ImportError:
        return False
    flops = getattr(complexity_analysis, '_DEFAULT_SUPPORTED_FLOP_OPS', None)
    acts = getattr(complexity_analysis, '_DEFAULT_SUPPORTED_ACT_OPS', None)
    if not (isinstance(flops, dict) and isinstance(acts, dict)):
        return False
    for name, handle in FLOP_HANDLES.items():
        flops.setdefault(name, handle)
    acts.setdefault('aten::scaled_dot_product_attention', generic_activation_jit())
    return True


register_flop_handles()


def flop_analyzer(model: nn.Module, inputs):
    """An ``mmengine.analysis.FlopAnalyzer`` that also counts attention, with its
    warnings about unsupported ops and uncalled modules off."""
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**FLOP_HANDLES)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analyzer


def count_flops(model: nn.Module, shape: Sequence[int] = (3, 224, 224)) -> int:
    """Multiply-adds of one forward pass of ``model`` in eval mode on a ``(1, *shape)``
    input."""
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
