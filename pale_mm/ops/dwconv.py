"""Fused depthwise 3x3 convs of the Pale block for fp32 CPU tensors (AVX-512 or
AVX2), forward and backward.

Each Pale block runs four depthwise 3x3 convs over channels-last maps: the CPE
(``x + cpe(x)``) and PS-Attention's q, k and v convs, all three over the same
normed map. PyTorch's oneDNN depthwise conv takes each as a separate pass, slowly
at these sizes (about 0.18 ms per call on a 32x32x256 map here), and in training
computes each conv's input gradient apart, which autograd then sums. The kernels of
``csrc/dwconv_cpu.cpp`` keep a channel block's weights in registers and compute
all the outputs of one input in a single pass: the three q/k/v convs together, and
the CPE with its residual add. Their backward is one pass too: the input gradient
of all three convs (a conv of the output gradients with the kernels flipped, summed
in registers), and the weight and bias gradients (summed per row in registers, then
per thread). Same function and gradients as ``F.conv2d`` to fp32 rounding
(``tests/ops/test_dwconv.py``).

It is part of the CPU kernels' extension (:mod:`.kernels`: built on first use, for
AVX-512 or AVX2 as the CPU has, not at all on CPUs with neither;
``PALE_MM_FAST_PATHS=0`` turns it off with every other fast path) and serves CPU
float32 tensors outside autocast, tracing and ``torch.compile``, with or without
gradients. Everything else uses ``F.conv2d``. :func:`set_fused_dwconv` switches it
at run time.
"""
from typing import List, Optional

import torch

from torch.autograd.function import once_differentiable

from . import fast_paths_enabled, is_tracing, kernels
from .linear import autocast_on, needs_grad

__all__ = ['can_fuse_dwconv', 'set_fused_dwconv', 'fused_dwconv3x3']

_enabled = [True]


def set_fused_dwconv(enabled: bool) -> bool:
    """Turn the fused depthwise convs on or off; returns the previous setting."""
    previous = _enabled[0]
    _enabled[0] = bool(enabled)
    return previous


def can_fuse_dwconv(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether :func:`fused_dwconv3x3` serves the map ``x`` with these parameters:
    fp32 CPU tensors, outside autocast, tracing and compile."""
    if is_tracing():
        return False
    tensors = (x,) + tuple(p for p in params if p is not None)
    return bool(_enabled[0] and fast_paths_enabled() and x.device.type == 'cpu'
                and x.dim() == 4 and all(t.dtype == torch.float32 for t in tensors)
                and not autocast_on() and kernels.load() is not None)


def fused_dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    sets: int = 1, residual: bool = False) -> List[torch.Tensor]:
    """Depthwise 3x3 convs, stride 1, padding 1, of the ``(B, H, W, C)`` map ``x``.

    ``weight``: ``(sets * C, 1, 3, 3)``, ``bias``: ``(sets * C,)`` or ``None``, in
    ``F.conv2d``'s layout; set ``t`` owns channels ``[t*C, (t+1)*C)``. Returns
    ``sets`` new contiguous ``(B, H, W, C)`` maps, set ``t`` being
    ``F.conv2d(x_nchw, weight[t*C:(t+1)*C], bias[t*C:(t+1)*C], padding=1, groups=C)``
    in channels-last layout, plus ``x`` itself with ``residual`` (``sets == 1``).
    Differentiable in ``x``, ``weight`` and ``bias`` (:class:`_DwConv3x3`). Call only
    where :func:`can_fuse_dwconv` holds."""
    B, H, W, C = x.shape
    if sets not in (1, 3) or (residual and sets != 1):
        raise ValueError(f'fused_dwconv3x3: sets must be 1 or 3 (residual only with 1), got '
                         f'sets={sets}, residual={residual}')
    if tuple(weight.shape) != (sets * C, 1, 3, 3):
        raise ValueError(f'fused_dwconv3x3: weight of shape {tuple(weight.shape)} does not fit '
                         f'{sets} depthwise 3x3 convs of a {C}-channel map: expected '
                         f'{(sets * C, 1, 3, 3)}')
    if bias is not None and tuple(bias.shape) != (sets * C,):
        raise ValueError(f'fused_dwconv3x3: bias of shape {tuple(bias.shape)}, expected '
                         f'{(sets * C,)}')
    x = x.contiguous()
    if needs_grad(x, weight, bias):
        return list(_DwConv3x3.apply(x, weight, bias, sets, residual))
    return _forward(x, weight, bias, sets, residual)[0]


def _forward(x, weight, bias, sets, residual):
    """The kernel's outputs and its ``(sets, 3, 3, C)`` weight layout."""
    C = x.shape[-1]
    w = weight.detach().reshape(sets, C, 3, 3).permute(0, 2, 3, 1).contiguous()
    b = x.new_zeros(sets, C) if bias is None else bias.detach().reshape(sets, C).contiguous()
    outs = [torch.empty_like(x) for _ in range(sets)]
    kernels.load().dwconv3x3(x.detach(), w, b, outs, residual)
    return outs, w


class _DwConv3x3(torch.autograd.Function):
    """:func:`fused_dwconv3x3` with gradients: the backward kernel computes the input,
    weight and bias gradients of all ``sets`` convs in one pass over the map. Saves
    ``x`` (which ``F.conv2d`` would save too) and the kernel's copy of the weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, sets, residual):
        outs, w = _forward(x, weight, bias, sets, residual)
        ctx.save_for_backward(x, w)
        ctx.sets, ctx.residual, ctx.has_bias = sets, residual, bias is not None
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, w = ctx.saved_tensors
        sets, C = ctx.sets, x.shape[-1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(x) if g is None else g.contiguous() for g in grads]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(w) if need_w or need_b else None
        gb = x.new_empty(sets, C) if need_w or need_b else None
        kernels.load().dwconv3x3_backward(x, w, grads, ctx.residual, gx, gw, gb)
        grad_w = gw.permute(0, 3, 1, 2).reshape(sets * C, 1, 3, 3) if need_w else None
        grad_b = gb.view(sets * C) if need_b and ctx.has_bias else None
        return gx, grad_w, grad_b, None, None
