"""Pale-shaped self-attention (PS-Attention), arXiv 2112.14000.

The channels are split in two halves. The first half attends inside *row groups*:
with ``G = ceil(H / sr)`` groups, row ``r`` belongs to group ``r % G``, so a group
holds ``sr`` rows interlaced over the whole height, each at full width. The second
half does the same with columns. Together a token sees its *pale*: ``sr`` interlaced
rows plus ``sc`` interlaced columns.

Sizes that are not multiples of the pale size are padded at the bottom / right and
the padded tokens are masked out as keys, so results for real tokens never depend on
what the padding holds (see ``shared/design/pale.md``).
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import check_pale_size

__all__ = ['pale_attention', 'PSAttention', 'pale_groups']


def pale_groups(length: int, size: int) -> Tuple[int, int]:
    """Return ``(G, s)`` for one axis: the number of groups ``G = ceil(length /
    size)`` and the number of interlaced lines per group ``s = ceil(length / G)``.

    Row ``r`` belongs to group ``r % G``. ``s <= size``; using ``s`` rather than
    ``size`` as the padded extent changes nothing for real tokens (the groups are
    the same) but pads less, e.g. 16 rows with size 7 pad to 18, not 21.
    """
    groups = -(-length // size)
    return groups, -(-length // groups)


_MASK_CACHE: Dict[tuple, torch.Tensor] = {}
# What padded key/value slots hold. It cannot matter (they are masked); the tests
# set it to garbage to prove that.
_PAD_VALUE = 0.


def _key_mask(length: int, other: int, size: int, batch: int, dtype,
              device) -> Union[torch.Tensor, None]:
    """Additive key mask ``(batch*G, 1, 1, s*other)`` (0 or -inf) for one branch, or
    ``None`` when nothing is padded. Key ``(i, j)`` of group ``g`` is line
    ``i*G + g``; only the last line ``i = s-1`` of groups ``g >= length - (s-1)*G``
    is padding. Cached per shape, dtype and device."""
    groups, lines = pale_groups(length, size)
    full = length - (lines - 1) * groups
    if full == groups:
        return None
    key = (length, other, size, batch, dtype, str(device))
    mask = _MASK_CACHE.get(key)
    if mask is None:
        mask = torch.zeros(groups, lines * other, dtype=dtype, device=device)
        mask[full:, (lines - 1) * other:] = float('-inf')
        mask = mask.repeat(batch, 1).view(batch * groups, 1, 1, lines * other)
        if len(_MASK_CACHE) > 256:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = mask
    return mask


def _branch_attention(qkv: Sequence[torch.Tensor], out: torch.Tensor, size: int,
                      num_heads: int, attn_drop: float):
    """Attention inside interlaced row groups, written into ``out``.

    Args:
        qkv: q, k and v, each ``(B, H, W, c)`` (any strides, e.g. a channel
            slice or a transposed view). The groups run along H.
        out: ``(B, H, W, c)`` view that receives the result.
        size: lines per group (``sr``).

    Row ``r = i*G + g`` goes to group ``g``, line ``i``. Each element is copied
    once into the grouped layout ``(3, B, G, heads, lines, W, d)``; the padded
    tail of the last line is zero-filled and masked as keys, and its query outputs
    are never copied back.
    """
    B, H, W, c = qkv[0].shape
    groups, lines = pale_groups(H, size)
    d = c // num_heads
    body = (lines - 1) * groups  # rows in full lines
    full = H - body              # groups with a real last line
    buf = qkv[0].new_empty(3, B, groups, num_heads, lines, W, d)
    for t, src in enumerate(qkv):
        if body:
            buf[t, :, :, :, :lines - 1] = src[:, :body].unflatten(1, (lines - 1, groups)) \
                .unflatten(-1, (num_heads, d)).permute(0, 2, 4, 1, 3, 5)
        buf[t, :, :full, :, lines - 1] = src[:, body:].unflatten(-1, (num_heads, d)) \
            .permute(0, 1, 3, 2, 4)
    if full < groups:
        buf[:, :, full:, :, lines - 1] = _PAD_VALUE
    q, k, v = buf.view(3, B * groups, num_heads, lines * W, d).unbind(0)
    mask = _key_mask(H, W, size, B, q.dtype, q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop,
                                       scale=d ** -0.5)
    o = o.view(B, groups, num_heads, lines, W, d)
    if body:
        out[:, :body].unflatten(1, (lines - 1, groups)).unflatten(-1, (num_heads, d)) \
            .copy_(o[:, :, :, :lines - 1].permute(0, 3, 1, 4, 2, 5))
    out[:, body:].unflatten(-1, (num_heads, d)).copy_(
        o[:, :full, :, lines - 1].permute(0, 1, 3, 2, 4))


def _branch_attention_autograd(qkv: Sequence[torch.Tensor], size: int, num_heads: int,
                               attn_drop: float) -> torch.Tensor:
    """Same as :func:`_branch_attention`, built from out-of-place ops for training:
    slice assignments into a shared buffer would make autograd clone the whole
    buffer's gradient once per assignment. Returns ``(B, H, W, c)``."""
    B, H, W, c = qkv[0].shape
    groups, lines = pale_groups(H, size)
    d = c // num_heads
    pad = groups * lines - H

    def group(t):
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad), value=_PAD_VALUE)
        return t.reshape(B, lines, groups, W, num_heads, d).permute(0, 2, 4, 1, 3, 5) \
            .reshape(B * groups, num_heads, lines * W, d)

    q, k, v = (group(t) for t in qkv)
    mask = _key_mask(H, W, size, B, q.dtype, q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop,
                                       scale=d ** -0.5)
    o = o.view(B, groups, num_heads, lines, W, d).permute(0, 3, 1, 4, 2, 5) \
        .reshape(B, lines * groups, W, c)
    return o[:, :H] if pad else o


def _check_heads(channels: int, num_heads: int):
    if num_heads < 2 or num_heads % 2:
        raise ValueError(f'PS-Attention splits the heads between a row and a column branch, '
                         f'so num_heads must be even and >= 2, got {num_heads}')
    if channels % num_heads:
        raise ValueError(f'embed dims {channels} cannot be split into two branches of '
                         f'{num_heads // 2} heads each: {channels} is not divisible by '
                         f'num_heads={num_heads}')


def pale_attention_nhwc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pale_size: Tuple[int, int], num_heads: int,
                        attn_drop: float = 0.) -> torch.Tensor:
    """PS-Attention on ``(B, H, W, C)`` maps (any strides); returns a new
    ``(B, H, W, C)`` tensor. The first ``C/2`` channels form the row branch, the
    rest the column branch, each with ``num_heads // 2`` heads. No validation."""
    B, H, W, C = q.shape
    c = C // 2
    sr, sc = pale_size
    heads = num_heads // 2
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        row = _branch_attention_autograd([t[..., :c] for t in (q, k, v)], sr, heads, attn_drop)
        col = _branch_attention_autograd([t[..., c:].transpose(1, 2) for t in (q, k, v)], sc,
                                         heads, attn_drop)
        return torch.cat([row, col.transpose(1, 2)], -1)
    out = q.new_empty(B, H, W, C)
    _branch_attention([t[..., :c] for t in (q, k, v)], out[..., :c], sr, heads, attn_drop)
    _branch_attention([t[..., c:].transpose(1, 2) for t in (q, k, v)],
                      out[..., c:].transpose(1, 2), sc, heads, attn_drop)
    return out


def pale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   hw_shape: Sequence[int], pale_size: Union[int, Sequence[int]],
                   num_heads: int) -> torch.Tensor:
    """Pale-shaped attention of already-projected tokens.

    Args:
        q, k, v: ``(B, H*W, C)``.
        hw_shape: ``(H, W)``.
        pale_size: ``sr`` (= ``sc``) or ``(sr, sc)``.
        num_heads: total heads; ``num_heads // 2`` per branch.
    Returns:
        ``(B, H*W, C)`` before the output projection. Scale is ``head_dim ** -0.5``
        with ``head_dim = (C/2) / (num_heads/2)``.
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
    _check_heads(C, num_heads)
    q, k, v = (t.view(B, H, W, C) for t in (q, k, v))
    return pale_attention_nhwc(q, k, v, pale_size, num_heads).view(B, N, C)


class PSAttention(nn.Module):
    """Pale-shaped self-attention with CvT-style separable-conv Q/K/V.

    Q, K and V each come from a depthwise 3x3 conv, BatchNorm and a pointwise
    C->C projection, run on the full map before the channel split. The three are
    stored fused, in blocked order (branch ``t`` = q, k, v owns channels
    ``[t*C, (t+1)*C)``):

    - ``qkv_dw``: depthwise 3x3 conv over ``[x, x, x]`` (``3C`` channels, no bias),
    - ``qkv_bn``: BatchNorm over those ``3C`` channels,
    - ``qkv``: Linear ``C -> 3C`` applied block-diagonally (rows ``[t*C, (t+1)*C)``
      project branch ``t`` only).

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
        _check_heads(embed_dims, num_heads)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.pale_size = check_pale_size(pale_size)
        self.head_dim = embed_dims // num_heads
        self.attn_drop_rate = attn_drop_rate
        self.qkv_dw = nn.Conv2d(3 * embed_dims, 3 * embed_dims, 3, padding=1,
                                groups=3 * embed_dims, bias=False)
        self.qkv_bn = nn.BatchNorm2d(3 * embed_dims)
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        # Cleared while gradient checkpointing recomputes a block, so that
        # BatchNorm running statistics are updated once per step, not twice.
        self.update_bn_stats = True

    def extra_repr(self) -> str:
        return f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, ' \
               f'pale_size={self.pale_size}'

    def _qkv(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(B, H, W, C)`` -> ``[q, k, v]``, each ``(B, H, W, C)``.

        Each branch's depthwise conv output (channels-last) feeds its pointwise
        GEMM directly. In eval mode BatchNorm is folded into the conv; in training
        it runs on batch statistics and updates its running statistics once per
        step (not during a gradient-checkpoint recompute)."""
        B, H, W, C = x.shape
        bn = self.qkv_bn
        xc = x.permute(0, 3, 1, 2)
        dw = self.qkv_dw.weight
        pw = self.qkv.weight
        pb = self.qkv.bias
        fold = not bn.training
        if fold:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            dw = dw * scale.view(-1, 1, 1, 1)
        else:
            momentum = 0.  # 0: leave the running statistics alone
            if self.update_bn_stats:
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None \
                    else 1.0 / float(bn.num_batches_tracked)
        out = []
        for t in range(3):
            sl = slice(t * C, (t + 1) * C)
            w, b = pw[sl], None if pb is None else pb[sl]
            if fold:
                y = F.conv2d(xc, dw[sl], shift[sl], 1, 1, 1, C).permute(0, 2, 3, 1)
            else:
                y = F.conv2d(xc, dw[sl], None, 1, 1, 1, C).permute(0, 2, 3, 1)
                w, b = self._fold_batch_norm(y, sl, momentum, w, b)
            out.append(F.linear(y, w, b))
        return out

    def _fold_batch_norm(self, y: torch.Tensor, sl: slice, momentum: float, weight, bias):
        """Training-mode BatchNorm of channels ``sl`` of the ``(B, H, W, C)`` map ``y``,
        folded into the following pointwise projection: ``W (s*y + t) + b =
        (W*s) y + (W t + b)`` with the batch statistics' ``s`` and ``t``. Autograd
        differentiates through the statistics, so gradients are exactly BatchNorm's,
        and no normalised copy of ``y`` is stored. Updates the running statistics
        like ``nn.BatchNorm2d`` (unbiased variance) when ``momentum > 0``."""
        bn = self.qkv_bn
        n = y.numel() // y.shape[-1]
        if n < 2:
            raise ValueError(f'PSAttention: BatchNorm in training needs more than one value '
                             f'per channel, got a map of shape {tuple(y.shape)} (B, H, W, C); '
                             f'use a larger input or batch, or norm_eval=True')
        var, mean = torch.var_mean(y, dim=(0, 1, 2), unbiased=False)
        if momentum:
            with torch.no_grad():
                bn.running_mean[sl].lerp_(mean, momentum)
                bn.running_var[sl].lerp_(var * (n / (n - 1)), momentum)
        scale = bn.weight[sl] * torch.rsqrt(var + bn.eps)
        shift = bn.bias[sl] - mean * scale
        folded_bias = weight @ shift if bias is None else torch.addmv(bias, weight, shift)
        return weight * scale, folded_bias

    def forward(self, x: torch.Tensor, hw_shape: Sequence[int]) -> torch.Tensor:
        """x: ``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        if x.dim() != 3:
            raise ValueError(f'PSAttention expects (B, H*W, C) tokens, got a {x.dim()}-D '
                             f'tensor of shape {tuple(x.shape)}')
        B, N, C = x.shape
        H, W = hw_shape
        if N != H * W or C != self.embed_dims:
            raise ValueError(f'PSAttention({self.embed_dims}) got tokens of shape '
                             f'{tuple(x.shape)} for hw_shape {tuple(hw_shape)}')
        q, k, v = self._qkv(x.reshape(B, H, W, C))
        out = pale_attention_nhwc(q, k, v, self.pale_size, self.num_heads,
                                  self.attn_drop_rate if self.training else 0.)
        return self.proj_drop(self.proj(out.view(B, N, C)))
