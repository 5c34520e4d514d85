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
import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_attention import _offsets_ok, can_fuse, gathered_attention
from .cpu_dwconv import can_fuse_dwconv, fused_dwconv3x3
from .layers import check_pale_size, linear

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


def _copy_groups(t: torch.Tensor, parts: Sequence[torch.Tensor], size: int, heads: int,
                 to_groups: bool):
    """Copy between a ``(B, H, W, c)`` branch view ``t`` (any strides; groups along
    H) and its grouped layout: one ``(B*ng, heads, n*W, d)`` tensor per part of
    :func:`_group_parts`. ``to_groups`` copies ``t`` into ``parts``, otherwise
    ``parts`` into ``t``. Each element is copied exactly once."""
    B, H, W, c = t.shape
    groups, lines = pale_groups(H, size)
    d = c // heads
    body = (lines - 1) * groups
    t_body = t[:, :body].unflatten(1, (lines - 1, groups)).unflatten(-1, (heads, d))
    for (g0, g1, n), part in zip(_group_parts(H, size), parts):
        ng, nb = g1 - g0, min(n, lines - 1)
        grouped = part.view(B, ng, heads, n, W, d)
        pairs = []
        if nb:  # lines 0..nb-1 of these groups come from the body rows
            pairs.append((grouped[:, :, :, :nb], t_body[:, :, g0:g1].permute(0, 2, 4, 1, 3, 5)))
        if n == lines:  # the last line of groups g0..g1-1
            pairs.append((grouped[:, :, :, lines - 1], t[:, body + g0:body + g1]
                          .unflatten(-1, (heads, d)).permute(0, 1, 3, 2, 4)))
        for dst, src in pairs:
            dst.copy_(src) if to_groups else src.copy_(dst)


def _part_shapes(shape, sizes: Tuple[int, int], heads: int):
    """Shapes of the grouped tensors of both branches of a ``(B, H, W, C)`` map."""
    B, H, W, C = shape
    d = C // 2 // heads
    return [(B * (g1 - g0), heads, n * other, d)
            for length, other, size in ((H, W, sizes[0]), (W, H, sizes[1]))
            for g0, g1, n in _group_parts(length, size)]


def _layout(shape, sizes: Tuple[int, int], heads: int):
    """The SDPA buffers of a ``(B, H, W, C)`` map and where each part of
    :func:`_part_shapes` lies in them, as ``(buffer_shapes, [(buffer, start, stop)])``
    (a slice along the batch dim). When both branches have parts of the same shapes
    (a square map and pale), each row part shares a buffer with its column part, so
    one SDPA call serves both branches; otherwise every part has its own buffer."""
    parts = _part_shapes(shape, sizes, heads)
    n_row = len(_group_parts(shape[1], sizes[0]))
    row, col = parts[:n_row], parts[n_row:]
    if row == col:
        return ([(2 * s[0],) + s[1:] for s in row],
                [(i, 0, s[0]) for i, s in enumerate(row)]
                + [(i, s[0], 2 * s[0]) for i, s in enumerate(row)])
    return parts, [(i, 0, s[0]) for i, s in enumerate(parts)]


@functools.lru_cache(maxsize=64)
def _token_offsets(shape, sizes: Tuple[int, int], heads: int) -> Tuple[torch.Tensor, ...]:
    """Where the rows of every attention sequence of a contiguous ``(B, H, W, C)``
    map lie: one ``(S, N)`` int64 tensor of element offsets per distinct group
    length ``N``, for :func:`~pale_mm.models.cpu_attention.gathered_attention`.

    A sequence is (batch, group part of :func:`_group_parts`, head) of one branch; its
    rows are the head's ``d`` channels of the group's tokens, line by line. Row
    branch: token ``(i*G + g, w)``, channels ``[e*d, (e+1)*d)``; column branch: token
    ``(h, i*G + g)``, channels ``C/2 + [e*d, (e+1)*d)``. Computed once per shape."""
    B, H, W, C = shape
    d = C // 2 // heads
    b = torch.arange(B).view(B, 1, 1, 1, 1)
    by_length = {}
    for branch, (length, other, size) in enumerate(((H, W, sizes[0]), (W, H, sizes[1]))):
        groups = pale_groups(length, size)[0]
        along = torch.arange(other).view(1, 1, 1, 1, other)
        chans = (torch.arange(heads) * d + branch * (C // 2)).view(1, 1, heads, 1, 1)
        for g0, g1, n in _group_parts(length, size):
            line = (torch.arange(n).view(1, n) * groups
                    + torch.arange(g0, g1).view(-1, 1)).view(1, g1 - g0, 1, n, 1)
            token = (b * H + line) * W + along if branch == 0 else (b * H + along) * W + line
            by_length.setdefault(n * other, []).append((token * C + chans).view(-1, n * other))
    offsets = tuple(torch.cat(parts) for parts in by_length.values())
    if not _offsets_ok(B * H * W * C, offsets, d):
        raise RuntimeError(f'pale_mm: internal error: the pale groups of a map of shape '
                           f'{shape} do not cover every token once')
    return offsets


def _part_views(buffers: Sequence[torch.Tensor], where) -> List[torch.Tensor]:
    return [buffers[i][a:b] for i, a, b in where]


def _copy_map(x: torch.Tensor, parts: Sequence[torch.Tensor], sizes: Tuple[int, int],
              heads: int, to_groups: bool):
    """Copy between a ``(B, H, W, C)`` map and the grouped tensors of both branches
    (flat, row-branch parts first, as :func:`_part_shapes` lists them): channels
    ``[:C/2]`` grouped along H, channels ``[C/2:]`` along W. ``to_groups`` copies
    the map into ``parts``, otherwise ``parts`` into the map."""
    c = x.shape[-1] // 2
    n_row = len(_group_parts(x.shape[1], sizes[0]))
    _copy_groups(x[..., :c], parts[:n_row], sizes[0], heads, to_groups)
    _copy_groups(x[..., c:].transpose(1, 2), parts[n_row:], sizes[1], heads, to_groups)


def _group(shape, sizes, heads, q, k, v) -> Tuple[torch.Tensor, ...]:
    """``q, k, v`` of ``shape`` ``(B, H, W, C)`` -> their SDPA buffers (:func:`_layout`),
    flat as ``[q, k, v]`` per buffer (no autograd; see :class:`_PaleGroup`)."""
    shapes, where = _layout(shape, sizes, heads)
    out = [[t.new_empty(s) for t in (q, k, v)] for s in shapes]
    for i, t in enumerate((q, k, v)):
        _copy_map(t, _part_views([b[i] for b in out], where), sizes, heads, True)
    return tuple(x for b in out for x in b)


def _ungroup(shape, sizes, heads, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """SDPA output buffers -> the ``(B, H, W, C)`` map (no autograd; see
    :class:`_PaleUngroup`)."""
    out = buffers[0].new_empty(shape)
    _copy_map(out, _part_views(buffers, _layout(shape, sizes, heads)[1]), sizes, heads, False)
    return out


class _PaleGroup(torch.autograd.Function):
    """``q, k, v`` ``(B, H, W, C)`` -> their SDPA buffers (:func:`_layout`), flat as
    ``[q, k, v]`` per buffer. Forward and backward each copy every element
    once (autograd over slices and ``cat`` would copy several times and, for slice
    assignment, clone whole gradient buffers)."""

    @staticmethod
    def forward(ctx, shape, sizes, heads, q, k, v):
        ctx.meta = (shape, sizes, heads)
        return _group(shape, sizes, heads, q, k, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        shape, sizes, heads = ctx.meta
        shapes, where = _layout(shape, sizes, heads)
        result = []
        for i in range(3):
            if not ctx.needs_input_grad[3 + i]:
                result.append(None)
                continue
            bufs = grads[i::3]
            ref = next(g for g in bufs if g is not None)
            grad = ref.new_empty(shape)
            bufs = [ref.new_zeros(s) if g is None else g.contiguous()
                    for g, s in zip(bufs, shapes)]
            _copy_map(grad, _part_views(bufs, where), sizes, heads, False)
            result.append(grad)
        return (None, None, None, *result)


class _PaleUngroup(torch.autograd.Function):
    """SDPA output buffers (as :class:`_PaleGroup` orders them) -> the ``(B, H, W, C)``
    map, each element copied once either way."""

    @staticmethod
    def forward(ctx, shape, sizes, heads, *parts):
        ctx.meta = (shape, sizes, heads)
        return _ungroup(shape, sizes, heads, parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        shape, sizes, heads = ctx.meta
        shapes, where = _layout(shape, sizes, heads)
        bufs = [grad.new_empty(s) for s in shapes]
        _copy_map(grad, _part_views(bufs, where), sizes, heads, True)
        return (None, None, None, *bufs)


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
    rest the column branch, each with ``num_heads // 2`` heads. No validation.

    Every element of q, k and v is copied once into the grouped layout of its part
    (:func:`_group_parts`), each SDPA buffer (one part, or a row part and its equal
    column part: :func:`_layout`) is one SDPA call, and each output element is copied
    once back; the backward mirrors this. On fp32 CPU tensors at head dim 24 or 32,
    :mod:`.cpu_attention`'s fused kernel computes the same function instead: it
    gathers each group's rows from the maps and scatters the output back itself
    (:func:`_token_offsets`), so there are no grouped copies at all."""
    heads = num_heads // 2
    sizes = tuple(pale_size)
    shape = tuple(int(s) for s in q.shape)  # plain ints, also under jit tracing
    head_dim = shape[-1] // num_heads
    scale = head_dim ** -0.5
    if can_fuse(q, head_dim, attn_drop):  # fp32 CPU, head dim 24 or 32
        return gathered_attention(q, k, v, _token_offsets(shape, sizes, heads), scale,
                                  check=False, head_dim=head_dim)  # checked once per shape
    autograd = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    grouped = _PaleGroup.apply(shape, sizes, heads, q, k, v) if autograd \
        else _group(shape, sizes, heads, q, k, v)
    outs = [F.scaled_dot_product_attention(*grouped[i:i + 3], dropout_p=attn_drop, scale=scale)
            for i in range(0, len(grouped), 3)]
    if autograd:
        return _PaleUngroup.apply(shape, sizes, heads, *outs)
    return _ungroup(shape, sizes, heads, outs)


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
        step (not during a gradient-checkpoint recompute).

        The fused parameters are split into their q/k/v thirds with ``chunk``, whose
        backward concatenates the three gradients into one parameter-sized tensor;
        indexing each third (``w[t*C:(t+1)*C]``) would instead zero-fill a full
        parameter-sized gradient per third and sum the three."""
        B, H, W, C = x.shape
        bn = self.qkv_bn
        xc = x.permute(0, 3, 1, 2)
        dw = self.qkv_dw.weight
        fold = not bn.training
        fused = None
        if fold:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            shifts = shift.chunk(3)
            dw = dw * scale.view(-1, 1, 1, 1)
            if can_fuse_dwconv(x, dw, shift, self.qkv.weight, self.qkv.bias):
                # fp32 CPU inference: the three convs in one pass over x
                fused = fused_dwconv3x3(x, dw, shift, sets=3)
        else:
            momentum = 0.  # 0: leave the running statistics alone
            if self.update_bn_stats:
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None \
                    else 1.0 / float(bn.num_batches_tracked)
            gammas, betas = bn.weight.chunk(3), bn.bias.chunk(3)
        dws, pws = dw.chunk(3), self.qkv.weight.chunk(3)
        pbs = (None,) * 3 if self.qkv.bias is None else self.qkv.bias.chunk(3)
        out = []
        for t in range(3):
            w, b = pws[t], pbs[t]
            if fused is not None:
                y = fused[t]
            elif fold:
                y = F.conv2d(xc, dws[t], shifts[t], 1, 1, 1, C).permute(0, 2, 3, 1)
            else:
                y = F.conv2d(xc, dws[t], None, 1, 1, 1, C).permute(0, 2, 3, 1)
                w, b = self._fold_batch_norm(y, slice(t * C, (t + 1) * C), momentum,
                                             gammas[t], betas[t], w, b)
            out.append(linear(y, w, b))
        return out

    def _fold_batch_norm(self, y: torch.Tensor, sl: slice, momentum: float, gamma, beta,
                         weight, bias):
        """Training-mode BatchNorm of channels ``sl`` of the ``(B, H, W, C)`` map ``y``
        (affine ``gamma``, ``beta``: those channels' BN weight and bias), folded into
        the following pointwise projection: ``W (s*y + t) + b = (W*s) y + (W t + b)``
        with the batch statistics' ``s`` and ``t``. Autograd differentiates through
        the statistics, so gradients are exactly BatchNorm's, and no normalised copy
        of ``y`` is stored. Updates the running statistics like ``nn.BatchNorm2d``
        (unbiased variance) when ``momentum > 0``."""
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
        scale = gamma * torch.rsqrt(var + bn.eps)
        shift = beta - mean * scale
        folded_bias = weight @ shift if bias is None else torch.addmv(bias, weight, shift)
        return weight * scale, folded_bias

    def forward(self, x: torch.Tensor, hw_shape: Sequence[int],
                identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B, H*W, C)`` -> ``(B, H*W, C)``. With ``identity`` (``(B, H*W, C)``),
        returns ``identity + attn(x)``; at fp32 CPU inference the add is fused into
        the output projection."""
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
        if self.training and self.proj_drop.p > 0:
            out = self.proj_drop(linear(out.view(B, N, C), self.proj.weight, self.proj.bias))
            return out if identity is None else identity + out
        return linear(out.view(B, N, C), self.proj.weight, self.proj.bias, residual=identity)
