"""Pale-shaped self-attention (PS-Attention), arXiv 2112.14000.

The channels are split in two halves. The first half attends inside *row groups*:
with ``G = ceil(H / sr)`` groups, row ``r`` belongs to group ``r % G``, so a group
holds ``sr`` rows interlaced over the whole height, each at full width. The second
half does the same with columns. Together a token sees its *pale*: ``sr`` interlaced
rows plus ``sc`` interlaced columns (``docs/pale_transformer.md``).

When ``H`` is not a multiple of ``sr``, the map is padded at the bottom so that every
group has the same number of lines, and padded tokens are masked out as keys; their
outputs are dropped. Real tokens then attend to exactly the real tokens of their
group, whatever the padding holds. Columns are treated the same way.

This file is the reference: plain views, permutes, padding and
``F.scaled_dot_product_attention``, and a :class:`PSAttention` whose forward calls its
own layers. :mod:`pale_mm.ops.pale` (CPU) and :mod:`pale_mm.ops.pale_cuda` (GPU) compute
the same function faster.
"""
from typing import Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import export_path, fast_path, graph_for_all_sizes, is_tracing
from .layers import BlockDiagonalLinear, check_heads, check_pale_size

__all__ = ['pale_groups', 'pale_partition', 'pale_reverse', 'pale_key_mask',
           'pale_attention_nhwc', 'pale_attention', 'PSAttention']


def pale_groups(length, size: int):
    """``(G, s)`` for one axis of ``length`` lines: ``G = ceil(length / size)`` groups
    of ``s = ceil(length / G)`` interlaced lines (line ``r`` is line ``r // G`` of
    group ``r % G``). ``s <= size``, and lines past ``G * s`` would be padding in every
    group, so padding to ``G * s`` rather than ``G * size`` gives the same groups.
    Works on ints and on traced sizes (ONNX export with dynamic shapes)."""
    groups = (length + size - 1) // size
    return groups, (length + groups - 1) // groups


def pale_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, L, W, C)`` -> ``(B*G, s*W, C)``: the interlaced groups along dim 1 (line
    ``i`` of group ``g`` is row ``i*G + g``), each flattened line by line, after
    padding ``L`` at the end to ``G*s`` (:func:`pale_groups`)."""
    B, L, W, C = x.shape
    groups, lines = pale_groups(L, size)
    x = F.pad(x, (0, 0, 0, 0, 0, groups * lines - L))
    x = x.view(B, lines, groups, W, C).transpose(1, 2)
    # a copy in the grouped order, then a view: ``reshape`` would decide between a view
    # and a copy from the strides, and those of F.pad's output differ between a zero
    # pad (a clone that keeps the input's strides) and a real one (a new contiguous
    # tensor); traced with symbolic sizes, the decision made for one could meet the
    # other when the graph runs (torch.compile(dynamic=True) with aot_eager)
    return x.clone(memory_format=torch.contiguous_format).view(B * groups, lines * W, C)


def pale_reverse(windows: torch.Tensor, size: int, B: int, L: int, W: int) -> torch.Tensor:
    """Inverse of :func:`pale_partition`: ``(B*G, s*W, C)`` -> ``(B, L, W, C)``, the
    padded lines dropped."""
    groups, lines = pale_groups(L, size)
    x = windows.view(B, groups, lines, W, -1).transpose(1, 2)
    return x.reshape(B, groups * lines, W, -1)[:, :L]


def pale_key_mask(B: int, L: int, W: int, size: int, device=None) -> torch.Tensor:
    """Boolean ``(B*G, 1, 1, s*W)`` SDPA mask of the groups of :func:`pale_partition`:
    ``True`` for real keys, ``False`` for padded ones (row ``i*G + g >= L``)."""
    groups, lines = pale_groups(L, size)
    row = torch.arange(lines, device=device) * groups + torch.arange(groups, device=device)[:, None]
    real = (row < L)[:, :, None].expand(groups, lines, W).reshape(groups, 1, 1, lines * W)
    return real.repeat(B, 1, 1, 1)


def _branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int,
                      heads: int, attn_drop: float) -> torch.Tensor:
    """Multi-head attention within the interlaced groups along dim 1 of ``(B, L, W, c)``
    maps; returns ``(B, L, W, c)``."""
    B, L, W, c = q.shape
    q, k, v = (pale_partition(t, size).unflatten(-1, (heads, -1)).transpose(1, 2)
               for t in (q, k, v))  # (B*G, heads, s*W, d)
    groups, lines = pale_groups(L, size)
    # traced or exported, the mask is always built: the graph serves other sizes
    padded = graph_for_all_sizes() or groups * lines != L
    mask = pale_key_mask(B, L, W, size, q.device) if padded else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop)
    return pale_reverse(out.transpose(1, 2).flatten(2), size, B, L, W)


@torch.fx.wrap
def pale_attention_nhwc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pale_size: Tuple[int, int], num_heads: int,
                        attn_drop: float = 0.) -> torch.Tensor:
    """PS-Attention of already-projected ``(B, H, W, C)`` maps; returns ``(B, H, W, C)``.
    Channels ``[:C/2]`` attend within row groups of ``pale_size[0]`` rows, channels
    ``[C/2:]`` within column groups of ``pale_size[1]`` columns, each branch with
    ``num_heads // 2`` heads of ``C / num_heads`` channels, scaled by
    ``head_dim ** -0.5``. (A leaf for ``torch.fx``: its shape arithmetic is not
    symbolic.) Exported to ONNX with the fast paths on, the file holds
    :func:`pale_mm.ops.export.pale_attention_onnx`, the same function in fewer ops."""
    exported = export_path('pale_attention_nhwc')
    if exported is not None:
        return exported(q, k, v, pale_size, num_heads, attn_drop)
    c, heads = q.shape[-1] // 2, num_heads // 2
    rows = _branch_attention(q[..., :c], k[..., :c], v[..., :c], pale_size[0], heads,
                             attn_drop)
    cols = _branch_attention(*(t[..., c:].transpose(1, 2) for t in (q, k, v)), pale_size[1],
                             heads, attn_drop).transpose(1, 2)
    return torch.cat([rows, cols], dim=-1)


def pale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   hw_shape: Sequence[int], pale_size: Union[int, Sequence[int]],
                   num_heads: int) -> torch.Tensor:
    """Pale-shaped attention of already-projected tokens, with checked arguments.

    Args:
        q, k, v: ``(B, H*W, C)``.
        hw_shape: ``(H, W)``.
        pale_size: ``sr`` (= ``sc``) or ``(sr, sc)``.
        num_heads: total heads, even; ``num_heads // 2`` per branch.
    Returns:
        ``(B, H*W, C)``, before the output projection.
    """
    for name, t in (('q', q), ('k', k), ('v', v)):
        if t.dim() != 3:
            raise ValueError(f'pale_attention expects {name} of shape (B, H*W, C), '
                             f'got a {t.dim()}-D tensor of shape {tuple(t.shape)}')
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f'q, k and v must have the same shape, got {tuple(q.shape)}, '
                         f'{tuple(k.shape)} and {tuple(v.shape)}')
    H, W = hw_shape
    B, N, C = q.shape
    if N != H * W:
        raise ValueError(f'hw_shape {tuple(hw_shape)} gives {H * W} tokens but the inputs '
                         f'have {N}')
    pale_size = check_pale_size(pale_size)
    check_heads(C, num_heads)
    q, k, v = (t.reshape(B, H, W, C) for t in (q, k, v))
    return pale_attention_nhwc(q, k, v, pale_size, num_heads).reshape(B, N, C)


def check_tokens(attn: 'PSAttention', x: torch.Tensor, hw_shape: Sequence[int]):
    """Raise a clear error unless ``x`` is ``(B, H*W, embed_dims)`` for ``hw_shape``
    (not while traced: then sizes are symbols or are recorded as constants)."""
    if is_tracing():
        return
    if x.dim() != 3:
        raise ValueError(f'PSAttention expects (B, H*W, C) tokens, got a {x.dim()}-D '
                         f'tensor of shape {tuple(x.shape)}')
    H, W = hw_shape
    if x.shape[1] != H * W or x.shape[2] != attn.embed_dims:
        raise ValueError(f'PSAttention({attn.embed_dims}) got tokens of shape '
                         f'{tuple(x.shape)} for hw_shape {tuple(hw_shape)}')


class PSAttention(nn.Module):
    """Pale-shaped self-attention with CvT-style separable-conv Q/K/V.

    Q, K and V each come from a depthwise 3x3 conv, BatchNorm and a pointwise
    C->C projection, run on the full map before the channel split. The three are
    stored fused, in blocked order (branch ``t`` = q, k, v owns channels
    ``[t*C, (t+1)*C)``):

    - ``qkv_dw``: depthwise 3x3 conv over ``[x, x, x]`` (``3C`` channels, no bias),
    - ``qkv_bn``: BatchNorm over those ``3C`` channels,
    - ``qkv``: :class:`~.layers.BlockDiagonalLinear`, ``C -> C`` for each of the three.

    Args:
        embed_dims: channels C.
        num_heads: total heads, even; each branch gets half.
        pale_size: ``sr`` (= ``sc``) or ``(sr, sc)``.
        qkv_bias: bias in the pointwise Q/K/V projections.
        attn_drop_rate, proj_drop_rate: dropout on attention weights / output.
    """

    def __init__(self, embed_dims: int, num_heads: int, pale_size=7, qkv_bias: bool = True,
                 attn_drop_rate: float = 0., proj_drop_rate: float = 0.):
        super().__init__()
        check_heads(embed_dims, num_heads)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.pale_size = check_pale_size(pale_size)
        self.head_dim = embed_dims // num_heads
        self.attn_drop_rate = attn_drop_rate
        self.qkv_dw = nn.Conv2d(3 * embed_dims, 3 * embed_dims, 3, padding=1,
                                groups=3 * embed_dims, bias=False)
        self.qkv_bn = nn.BatchNorm2d(3 * embed_dims)
        self.qkv = BlockDiagonalLinear(embed_dims, 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def extra_repr(self) -> str:
        return f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, ' \
               f'pale_size={self.pale_size}'

    def forward(self, x: torch.Tensor, hw_shape: Sequence[int]) -> torch.Tensor:
        """x: ``(B, H*W, C)`` tokens of an ``hw_shape`` map -> ``(B, H*W, C)``."""
        fast = fast_path(self, x)
        if fast is not None:  # CUDA tensors (pale_mm.ops.pale_cuda)
            return fast(x, hw_shape)
        check_tokens(self, x, hw_shape)
        B, N, C = x.shape
        H, W = hw_shape
        x = x.transpose(1, 2).reshape(B, C, H, W)
        qkv = self.qkv_bn(self.qkv_dw(torch.cat([x, x, x], dim=1)))  # (B, 3C, H, W)
        q, k, v = self.qkv(qkv.permute(0, 2, 3, 1)).chunk(3, dim=-1)  # (B, H, W, C) each
        x = pale_attention_nhwc(q, k, v, self.pale_size, self.num_heads,
                                self.attn_drop_rate if self.training else 0.)
        return self.proj_drop(self.proj(x.reshape(B, N, C)))
