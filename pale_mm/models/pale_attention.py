"""Pale-shaped self-attention (PS-Attention), arXiv 2112.14000.

The channels are split in two halves. The first half attends inside *row groups*:
with ``G = ceil(H / sr)`` groups, row ``r`` belongs to group ``r % G``, so a group
holds ``sr`` rows interlaced over the whole height, each at full width. The second
half does the same with columns. Together a token sees its *pale*: ``sr`` interlaced
rows plus ``sc`` interlaced columns.

Sizes that are not multiples of the pale size follow the design's padded grouping
(pad at the bottom / right, mask padded keys; ``shared/design/pale.md``). It is
computed without materialising the padding: groups whose last line would be padding
attend within their real lines, which is the same result without the masked work
(:func:`_group_parts`).
"""
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def _group_parts(H: int, size: int) -> List[Tuple[int, int, int]]:
    """How the interlaced row groups of an ``H``-row map split into attention calls.

    Row ``r = i*G + g`` is line ``i`` of group ``g``. The first ``body = (s-1)*G``
    rows fill lines ``0..s-2`` of every group; the last line exists only in groups
    ``g < full = H - body``. Those groups have ``s`` real lines, the others ``s-1``.
    Padding the others to ``s`` lines and masking the padded keys (the design's
    definition) gives exactly the same result for real tokens as attending within
    their ``s-1`` real lines, which is what is computed here: no padded token is
    stored, attended or masked. Returns ``[(g0, g1, lines)]``.
    """
    groups, lines = pale_groups(H, size)
    full = H - (lines - 1) * groups
    parts = [(0, full, lines)]
    if full < groups:
        parts.append((full, groups, lines - 1))
    return parts


def _branch_attention(qkv: Sequence[torch.Tensor], out: torch.Tensor, size: int,
                      num_heads: int, attn_drop: float):
    """Attention inside interlaced row groups, written into ``out`` (inference).

    Args:
        qkv: q, k and v, each ``(B, H, W, c)`` (any strides, e.g. a channel
            slice or a transposed view). The groups run along H.
        out: ``(B, H, W, c)`` view that receives the result.
        size: lines per group (``sr``).

    Each element is copied once into the grouped layout ``(3, B, groups, heads,
    lines, W, d)`` of its part (see :func:`_group_parts`) and once back.
    """
    B, H, W, c = qkv[0].shape
    groups, lines = pale_groups(H, size)
    d = c // num_heads
    body = (lines - 1) * groups
    src_body = [t[:, :body].unflatten(1, (lines - 1, groups)).unflatten(-1, (num_heads, d))
                for t in qkv]
    dst_body = out[:, :body].unflatten(1, (lines - 1, groups)).unflatten(-1, (num_heads, d))
    for g0, g1, n in _group_parts(H, size):
        ng, nb = g1 - g0, min(n, lines - 1)
        buf = qkv[0].new_empty(3, B, ng, num_heads, n, W, d)
        for t, src in enumerate(qkv):
            if nb:
                buf[t, :, :, :, :nb] = src_body[t][:, :, g0:g1].permute(0, 2, 4, 1, 3, 5)
            if n == lines:
                buf[t, :, :, :, lines - 1] = src[:, body + g0:body + g1] \
                    .unflatten(-1, (num_heads, d)).permute(0, 1, 3, 2, 4)
        q, k, v = buf.view(3, B * ng, num_heads, n * W, d).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop, scale=d ** -0.5)
        o = o.view(B, ng, num_heads, n, W, d)
        if nb:
            dst_body[:, :, g0:g1].copy_(o[:, :, :, :nb].permute(0, 3, 1, 4, 2, 5))
        if n == lines:
            out[:, body + g0:body + g1].unflatten(-1, (num_heads, d)).copy_(
                o[:, :, :, lines - 1].permute(0, 1, 3, 2, 4))


def _branch_attention_autograd(qkv: Sequence[torch.Tensor], size: int, num_heads: int,
                               attn_drop: float) -> torch.Tensor:
    """Same as :func:`_branch_attention`, built from out-of-place ops for training:
    slice assignments into a shared buffer would make autograd clone the whole
    buffer's gradient once per assignment. Returns ``(B, H, W, c)``."""
    B, H, W, c = qkv[0].shape
    groups, lines = pale_groups(H, size)
    d = c // num_heads
    body = (lines - 1) * groups
    outs = []
    for g0, g1, n in _group_parts(H, size):
        ng, nb = g1 - g0, min(n, lines - 1)

        def group(t):  # -> (B*ng, heads, n*W, d)
            pieces = [t[:, :body].unflatten(1, (lines - 1, groups))[:, :, g0:g1]] if nb else []
            if n == lines:
                pieces.append(t[:, body + g0:body + g1].unsqueeze(1))
            x = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
            return x.unflatten(-1, (num_heads, d)).permute(0, 2, 4, 1, 3, 5) \
                .reshape(B * ng, num_heads, n * W, d)

        q, k, v = (group(t) for t in qkv)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop, scale=d ** -0.5)
        outs.append(o.view(B, ng, num_heads, n, W, d).permute(0, 3, 1, 4, 2, 5)
                    .reshape(B, n, ng, W, c))
    if len(outs) == 1:  # every group has all its lines: H = lines * groups
        return outs[0].reshape(B, H, W, c)
    full, rest = outs  # (B, lines, full, W, c), (B, lines-1, groups-full, W, c)
    rows = torch.cat([full[:, :lines - 1], rest], 2).reshape(B, body, W, c)
    return torch.cat([rows, full[:, lines - 1]], 1)


class _BatchStats(torch.autograd.Function):
    """Per-channel ``(var, mean)`` (biased) of an ``(n, C)`` matrix, at least in float32.

    Two passes (the mean, then the centred sum of squares), so it is as accurate
    as ``torch.var_mean`` but an order of magnitude faster on CPU for these
    column reductions. The backward, ``dy = (2 gv (y - mean) + gm) / n``, needs only
    ``y`` (which the following projection keeps anyway) and the mean, where
    autograd through the two passes would keep the centred copy as well."""

    @staticmethod
    def forward(ctx, y):
        yf = y.to(torch.promote_types(y.dtype, torch.float32))
        n = yf.shape[0]
        mean = yf.sum(0).div_(n)
        var = (yf - mean).square_().sum(0).div_(n)
        ctx.save_for_backward(y, mean)
        return var, mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_var, grad_mean):
        y, mean = ctx.saved_tensors
        n = y.shape[0]
        g = torch.zeros_like(y, dtype=mean.dtype) if grad_var is None \
            else (y.to(mean.dtype) - mean).mul_(grad_var * (2. / n))
        if grad_mean is not None:
            g.add_(grad_mean / n)
        return g.to(y.dtype)


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
    q, k, v = (t.reshape(B, H, W, C) for t in (q, k, v))  # any strides accepted
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
        var, mean = _BatchStats.apply(y.reshape(n, y.shape[-1]))
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
