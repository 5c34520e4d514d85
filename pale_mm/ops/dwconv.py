"""Fused depthwise 3x3 convs of the Pale block for fp32 CPU inference (AVX-512 or
AVX2).

Each Pale block runs four depthwise 3x3 convs over channels-last maps: the CPE
(``x + cpe(x)``) and PS-Attention's q, k and v convs, all three over the same
normed map. PyTorch's oneDNN depthwise conv takes each as a separate pass, slowly
at these sizes (about 0.18 ms per call on a 32x32x256 map here). The kernel of
``csrc/dwconv_cpu.cpp`` keeps a channel block's weights in registers and
computes all the outputs of one input in a single pass: the three q/k/v convs
together, and the CPE with its residual add. Same function as ``F.conv2d`` to fp32
rounding (``tests/ops/test_dwconv.py``).

It is part of the CPU kernels' extension (:mod:`.kernels`: built on first use, for
AVX-512 or AVX2 as the CPU has, not at all on CPUs with neither;
``PALE_MM_FAST_PATHS=0`` turns it off with every other fast path) and serves
only where no gradient is needed: CPU float32 tensors outside autocast, tracing and
``torch.compile``. Everything else uses ``F.conv2d``. :func:`set_fused_dwconv`
switches it at run time.
"""
from typing import List, Optional

import torch

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
    inference (no gradient needed), fp32 CPU, outside autocast, tracing and compile."""
    if is_tracing() or needs_grad(x, *params):
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
    Call only where :func:`can_fuse_dwconv` holds."""
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
    w = weight.view(sets, C, 3, 3).permute(0, 2, 3, 1).contiguous()
    b = x.new_zeros(sets, C) if bias is None else bias.reshape(sets, C).contiguous()
    outs = [torch.empty_like(x) for _ in range(sets)]
    kernels.load().dwconv3x3(x, w, b, outs, residual)
    return outs
