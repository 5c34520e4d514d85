"""Layers shared by the Pale, LIT and ScalableViT backbones.

Token maps travel between blocks channels-last, as ``(B, H, W, C)`` tensors; a
conv sees them through the free ``permute(0, 3, 1, 2)`` view (channels-last memory).
"""
import warnings
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..ops import fast_path, fx_tracing

try:  # stochastic depth: timm's (Bernoulli masks, as pale_mm's models always drew them)
    with warnings.catch_warnings():
        # huggingface_hub, as resolved for timm, may warn about optional http backends
        warnings.simplefilter('ignore')
        from timm.layers import DropPath
except ImportError:  # timm is optional for mmdet/mmseg users: mmcv's (uniform draws)
    from mmcv.cnn.bricks.drop import DropPath

__all__ = ['to_pair', 'check_pale_size', 'check_heads', 'DropPath', 'BlockDiagonalLinear',
           'Mlp', 'ConvPatchEmbed', 'check_image', 'checkpoint_block']


def to_pair(value) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f'expected an int or a pair, got {value!r}')
        return tuple(value)
    return value, value


def check_pale_size(pale_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Validate a pale size ``sr`` or ``(sr, sc)``; returns ``(sr, sc)``."""
    pair = to_pair(pale_size)
    for s in pair:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f'pale_size must be an int or a pair of ints, got {pale_size!r}')
        if s < 1:
            raise ValueError(f'pale_size must be >= 1, got {pale_size!r}')
    return pair


def check_heads(channels: int, num_heads: int, where: str = ''):
    """PS-Attention splits the heads between a row and a column branch: ``num_heads``
    must be even and divide ``channels``. ``where`` prefixes the error (e.g. a stage)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 2 \
            or num_heads % 2:
        raise ValueError(f'{where}PS-Attention splits the heads between a row and a column '
                         f'branch, so num_heads must be an even int >= 2, got {num_heads!r}')
    if channels % num_heads:
        raise ValueError(f'{where}embed dims {channels} cannot be split into two branches of '
                         f'{num_heads // 2} heads each: {channels} is not divisible by '
                         f'num_heads={num_heads}')


class BlockDiagonalLinear(nn.Linear):
    """``blocks`` independent ``in_features -> in_features`` projections stored as one
    ``nn.Linear(in_features, blocks * in_features)`` (``weight`` rows ``[t*C, (t+1)*C)``
    project block ``t``), applied to an input of ``blocks * in_features`` channels:
    channels ``[t*C, (t+1)*C)`` of the output are block ``t`` of the input projected
    by block ``t`` of the weight. PS-Attention's q/k/v projections."""

    def __init__(self, in_features: int, blocks: int, bias: bool = True):
        super().__init__(in_features, blocks * in_features, bias=bias)
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, ws = x.chunk(self.blocks, dim=-1), self.weight.chunk(self.blocks)
        bs = (None,) * self.blocks if self.bias is None else self.bias.chunk(self.blocks)
        return torch.cat([F.linear(xs[t], ws[t], bs[t]) for t in range(self.blocks)], dim=-1)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, blocks={self.blocks}'


class Mlp(nn.Module):
    """Linear C -> hidden, GELU, Linear hidden -> C (on the last dim), with dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fast_path(self, x)
        if fast is not None:
            return fast(x)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvPatchEmbed(nn.Module):
    """Strided conv then LayerNorm: ``(B, C_in, H, W)`` -> ``(B, H', W', C_out)``
    with ``H' = floor((H + 2p - k) / s) + 1`` (ceil(H/s) for the Pale stem and
    merges).

    With ``channels_last``, the conv weight is stored channels-last (same values and
    state dict): patch merges get channels-last views of ``(B, H, W, C)`` maps,
    and PyTorch's CPU (oneDNN) conv would otherwise copy the weight to that layout
    on every call; the stem then also writes its output channels-last, which the
    LayerNorm reads without a copy. ``load_state_dict`` and ``.to()`` keep the
    layout. The conv's default init runs before the conversion, so its values are
    those of a plain conv; a later in-place random init (``trunc_normal_`` etc.) fills
    the weight in memory order, so the same seed then gives other (equally
    distributed) values than a contiguous weight would get. ScalableViT re-initialises
    its convs that way, so it keeps plain weights: its results stay as they were."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 padding: int, channels_last: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding)
        if channels_last:
            self.proj.to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def check_image(x, in_channels: int, owner: str):
    """Raise a clear error unless ``x`` is a floating-point ``(B, in_channels, H, W)``
    tensor (nothing to check on a ``torch.fx`` proxy while the model is traced).
    An image straight from a decoder (uint8) is a ``TypeError`` that says how to
    normalise it."""
    if fx_tracing():
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{owner} expects a torch.Tensor, got {type(x).__name__}')
    if not x.is_floating_point():
        raise TypeError(
            f'{owner} expects a floating-point image tensor, got dtype {x.dtype}. '
            f'Convert and normalise it first, e.g. x = (x.float() - mean) / std with '
            f'the ImageNet mean and std (mmdet/mmseg data preprocessors and timm '
            f'transforms do this)')
    if x.dim() != 4:
        raise ValueError(f'{owner} expects a 4-D (B, C, H, W) image tensor, got a '
                         f'{x.dim()}-D tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_channels:
        raise ValueError(f'{owner} was built with in_channels={in_channels} but got an '
                         f'input with {x.shape[1]} channels (shape {tuple(x.shape)})')
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f'{owner} got an empty image of shape {tuple(x.shape)}')


def checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``block(x)`` under non-reentrant activation checkpointing.

    Non-reentrant checkpointing keeps gradients of parameters whose inputs do not
    require grad (frozen earlier stages) and restores the RNG state, so dropout and
    drop path replay exactly. While the backward recomputes the block, its BatchNorm
    layers (of any class, SyncBatchNorm included) run with momentum 0 and their
    ``num_batches_tracked`` is restored afterwards, so the running statistics move
    once per step, as without checkpointing.
    """
    calls = [0]

    def run(inp):
        calls[0] += 1
        if calls[0] == 1:
            return block(inp)
        norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.training
                 and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.momentum = 0.
        try:
            return block(inp)
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

    return checkpoint(run, x, use_reentrant=False)
