"""The GPU path of PS-Attention: the reference's modules, with the pale grouping and
the q/k/v projections done in a few launches.

A GPU pays for every launch, so on CUDA tensors the Pale block runs its reference
forward (:class:`~pale_mm.models.pale_transformer.PaleBlock`: CPE, norms, MLP, drop
path, each a module call) and only :class:`~pale_mm.models.pale_attention.PSAttention`
takes this path, which differs from its reference forward in two places:

- **q/k/v projections**: the three ``C -> C`` projections of
  :class:`~pale_mm.models.layers.BlockDiagonalLinear` as one batched GEMM
  (``baddbmm``) that reads the BatchNorm output in place and writes q, k and v stacked
  as one ``(3, B, H, W, C)`` tensor (the reference: three GEMMs and a ``cat``);
- **pale attention**: one fused Triton kernel for both branches
  (:mod:`.triton_pale`), which reads q, k and v from that tensor by index arithmetic
  and writes the ``(B, H, W, C)`` output directly; the reference pads, partitions,
  masks, reverses and concatenates, about a dozen copies per branch and direction.

The depthwise conv, the BatchNorm (also a ``SyncBatchNorm`` after
``convert_sync_batchnorm``: the GPU path keeps it, and its cross-GPU statistics), the
output projection and the dropout are called as modules. Attention dropout is not
covered (the reference runs where it is active). The CPU fast paths
(:mod:`.pale`) are registered for CPU tensors only: on a GPU their extra copies and
launches made them slower than the reference.
"""
import os
from typing import Sequence

import torch
import torch.nn as nn

from ..models.layers import BlockDiagonalLinear
from ..models.pale_attention import PSAttention, check_tokens, pale_attention_nhwc
from . import register_fast_path

__all__ = ['ps_attention_cuda', 'triton_available', 'kernel_serves', 'qkv_projection']

_ATTN = dict(qkv_dw=nn.Conv2d, qkv_bn=(nn.BatchNorm2d, nn.SyncBatchNorm),
             qkv=BlockDiagonalLinear, proj=nn.Linear, proj_drop=nn.Dropout)


_state = {}
# a fact of the machine: torch.compile calls it once, without guarding on the cache
_constant = getattr(torch.compiler, 'assume_constant_result', lambda fn: fn)


@_constant
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of torch)."""
    if 'triton' not in _state:
        try:
            from . import triton_pale  # noqa: F401
            _state['triton'] = True
        except ImportError:
            _state['triton'] = False
    return _state['triton']


def kernel_serves(qkv: torch.Tensor) -> bool:
    """Whether the Triton kernel serves q/k/v like ``qkv``: float32, bfloat16 or
    float16 on a GPU of compute capability 8.0 or later (Ampere, Hopper, ...), or on
    the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, the tests). Call where
    :func:`triton_available` holds."""
    from .triton_pale import DTYPES
    if qkv.dtype not in DTYPES:
        return False
    if qkv.device.type == 'cuda':
        return _capability(qkv.device.index) >= (8, 0)
    return os.environ.get('TRITON_INTERPRET') == '1'


@_constant
def _capability(index) -> tuple:
    key = ('capability', index)
    if key not in _state:
        _state[key] = torch.cuda.get_device_capability(index)
    return _state[key]


def _applies(attn: PSAttention) -> bool:
    if not triton_available():
        return False
    from .triton_pale import MAX_HEAD_DIM
    return (attn.attn_drop_rate == 0 or not attn.training) and attn.head_dim <= MAX_HEAD_DIM


def qkv_projection(qkv: BlockDiagonalLinear, y: torch.Tensor) -> torch.Tensor:
    """:class:`BlockDiagonalLinear` of ``y`` (``(..., 3C)``, any strides with a unit
    last stride) as one batched GEMM: returns q, k and v stacked, ``(3, ..., C)``,
    contiguous."""
    C = qkv.in_features
    lead = y.shape[:-1]
    y = y.reshape(-1, 3, C).transpose(0, 1)  # (3, N, C), a view where y allows it
    w = qkv.weight.view(3, C, C).transpose(1, 2)
    if qkv.bias is None:
        out = torch.bmm(y, w)
    else:
        out = torch.baddbmm(qkv.bias.view(3, 1, C), y, w)
    return out.view(3, *lead, C)


@register_fast_path(PSAttention, _ATTN, applies=_applies, device='cuda', compiles=True)
def ps_attention_cuda(attn: PSAttention, x: torch.Tensor,
                      hw_shape: Sequence[int]) -> torch.Tensor:
    """:class:`PSAttention`'s forward on CUDA tensors, ``(B, H*W, C)`` -> ``(B, H*W, C)``."""
    from .triton_pale import pale_attention_qkv
    check_tokens(attn, x, hw_shape)
    B, N, C = x.shape
    H, W = hw_shape
    x = x.transpose(1, 2).reshape(B, C, H, W)
    y = attn.qkv_bn(attn.qkv_dw(torch.cat([x, x, x], dim=1)))  # (B, 3C, H, W)
    qkv = qkv_projection(attn.qkv, y.permute(0, 2, 3, 1))  # (3, B, H, W, C)
    if kernel_serves(qkv):
        out = pale_attention_qkv(qkv, attn.pale_size, attn.num_heads)
    else:  # float64, or a GPU older than Ampere: the reference attention
        out = pale_attention_nhwc(qkv[0], qkv[1], qkv[2], attn.pale_size, attn.num_heads)
    return attn.proj_drop(attn.proj(out.reshape(B, N, C)))
