"""The fast forwards of the Pale block and of the MLP (all three backbones).

Each computes the same function as the reference forward in :mod:`pale_mm.models`
(``tests/ops/test_pale.py`` proves it, values and gradients, in float64 and
float32), and is reached only through :func:`pale_mm.ops.fast_path`, so it never runs
where a module was converted, replaced or hooked, or while the model is traced or
exported. What makes it faster:

- **Pale grouping without padding or masks.** Groups whose last line would be
  padding attend within their real lines, which is the padded, key-masked grouping's
  result without the masked work (:func:`_group_parts`). Each element of q, k and v is
  copied once into its group's layout and each output element once back, in forward
  and backward (:class:`_PaleGroup`, :class:`_PaleUngroup`); autograd over slices and
  ``cat`` would copy several times. On fp32 CPU tensors at head dim 24 or 32 the fused
  kernel (:mod:`.attention`) reads the groups' rows straight from the maps instead
  (:func:`_token_offsets`).
- **BatchNorm folded into the q/k/v projections.** In eval mode into the depthwise
  conv; in training, the batch statistics' scale and shift go into the pointwise
  projection (:func:`_fold_batch_norm`), so no normalised copy of the map is stored.
- **Fused elementwise work.** The residual adds go into the output GEMMs and the
  MLP's GELU into fc1 at fp32 CPU inference (:func:`.linear.linear`, oneDNN; where
  PyTorch runs at AVX2, layers 256 wide or wider keep the BLAS's GEMM, with the GELU
  kernel and the residual add in place after it); on fp32
  CPU tensors the CPE and the q/k/v depthwise convs run in the fused kernels of
  :mod:`.dwconv` (forward and backward); in
  training the GELU output is recomputed in the backward instead of kept
  (:class:`.linear.GeluLinear`).
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..models.layers import BlockDiagonalLinear, DropPath, Mlp
from ..models.pale_attention import PSAttention, check_tokens, pale_groups
from ..models.pale_transformer import PaleBlock
from . import register_fast_path
from .attention import _offsets_ok, can_fuse, gathered_attention
from .dwconv import can_fuse_dwconv, fused_dwconv3x3
from .linear import GeluLinear, linear, needs_grad

__all__ = ['pale_block', 'ps_attention', 'mlp', 'pale_attention_fast']


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
    length ``N``, for :func:`.attention.gathered_attention`.

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


def pale_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pale_size: Tuple[int, int], num_heads: int,
                        attn_drop: float = 0.) -> torch.Tensor:
    """:func:`pale_mm.models.pale_attention.pale_attention_nhwc` without padding,
    masks or grouped copies made by autograd.

    Every element of q, k and v is copied once into the grouped layout of its part
    (:func:`_group_parts`), each SDPA buffer (one part, or a row part and its equal
    column part: :func:`_layout`) is one SDPA call, and each output element is copied
    once back; the backward mirrors this. On fp32 CPU tensors at head dim 24 or 32,
    :mod:`.attention`'s fused kernel computes the same function instead: it
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


def _qkv(attn, x: torch.Tensor) -> List[torch.Tensor]:
    """``(B, H, W, C)`` -> ``[q, k, v]``, each ``(B, H, W, C)``.

    Each branch's depthwise conv output (channels-last) feeds its pointwise
    GEMM directly. In eval mode BatchNorm is folded into the conv; in training
    it runs on batch statistics folded into the pointwise projection and updates
    the running statistics as ``nn.BatchNorm2d`` does (momentum 0 leaves them: see
    :func:`pale_mm.models.layers.checkpoint_block`).

    The fused parameters are split into their q/k/v thirds with ``chunk``, whose
    backward concatenates the three gradients into one parameter-sized tensor;
    indexing each third (``w[t*C:(t+1)*C]``) would instead zero-fill a full
    parameter-sized gradient per third and sum the three."""
    B, H, W, C = x.shape
    bn = attn.qkv_bn
    dw = attn.qkv_dw.weight
    fold = not bn.training
    if fold:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        dw = dw * scale.view(-1, 1, 1, 1)
    else:
        shift = None  # training: the conv has no bias, and BatchNorm comes after
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None \
            else 1.0 / float(bn.num_batches_tracked)
        gammas, betas = bn.weight.chunk(3), bn.bias.chunk(3)
    if can_fuse_dwconv(x, dw, shift):  # fp32 CPU: the three convs in one pass over x
        convs = fused_dwconv3x3(x, dw, shift, sets=3)
    else:
        xc = x.permute(0, 3, 1, 2)
        shifts = (None,) * 3 if shift is None else shift.chunk(3)
        convs = [F.conv2d(xc, w, b, 1, 1, 1, C).permute(0, 2, 3, 1)
                 for w, b in zip(dw.chunk(3), shifts)]
    pws = attn.qkv.weight.chunk(3)
    pbs = (None,) * 3 if attn.qkv.bias is None else attn.qkv.bias.chunk(3)
    out = []
    for t in range(3):
        y, w, b = convs[t], pws[t], pbs[t]
        if not fold:
            w, b = _fold_batch_norm(bn, y, slice(t * C, (t + 1) * C), momentum,
                                    gammas[t], betas[t], w, b)
        out.append(linear(y, w, b))
    return out


def _fold_batch_norm(bn, y: torch.Tensor, sl: slice, momentum: float, gamma, beta,
                     weight, bias):
    """Training-mode BatchNorm of channels ``sl`` of the ``(B, H, W, C)`` map ``y``
    (affine ``gamma``, ``beta``: those channels' BN weight and bias), folded into
    the following pointwise projection: ``W (s*y + t) + b = (W*s) y + (W t + b)``
    with the batch statistics' ``s`` and ``t``. Autograd differentiates through
    the statistics, so gradients are exactly BatchNorm's, and no normalised copy
    of ``y`` is stored. Updates the running statistics like ``nn.BatchNorm2d``
    (unbiased variance) when ``momentum > 0``."""
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


def ps_attention(attn: PSAttention, x: torch.Tensor, hw_shape: Sequence[int],
                 identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:class:`PSAttention`'s forward, ``(B, H*W, C)`` -> ``(B, H*W, C)``; with
    ``identity`` (``(B, H*W, C)``) it returns ``identity + attn(x)``, the add fused
    into the output projection at fp32 CPU inference."""
    check_tokens(attn, x, hw_shape)
    B, N, C = x.shape
    H, W = hw_shape
    q, k, v = _qkv(attn, x.reshape(B, H, W, C))
    out = pale_attention_fast(q, k, v, attn.pale_size, attn.num_heads,
                              attn.attn_drop_rate if attn.training else 0.)
    if attn.training and attn.proj_drop.p > 0:
        out = attn.proj_drop(linear(out.view(B, N, C), attn.proj.weight, attn.proj.bias))
        return out if identity is None else identity + out
    return linear(out.view(B, N, C), attn.proj.weight, attn.proj.bias, residual=identity)


def _mlp_applies(m: Mlp) -> bool:
    return m.act.approximate == 'none' and (m.drop.p == 0 or not m.training)


_MLP = dict(fc1=nn.Linear, act=nn.GELU, fc2=nn.Linear, drop=nn.Dropout)


@register_fast_path(Mlp, _MLP, applies=_mlp_applies)
def mlp(m: Mlp, x: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:class:`Mlp`'s forward (exact GELU, no active dropout); with ``identity``
    (shaped like the output), ``identity + mlp(x)``, the add fused into fc2 at fp32
    CPU inference. In training the GELU output is not kept for the backward."""
    fc1, fc2 = m.fc1, m.fc2
    if not needs_grad(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        return linear(linear(x, fc1.weight, fc1.bias, gelu=True), fc2.weight, fc2.bias,
                      residual=identity)
    out = GeluLinear.apply(fc1(x), fc2.weight, fc2.bias)
    return out if identity is None else identity + out


def _block_applies(blk: PaleBlock) -> bool:
    bn = blk.attn.qkv_bn
    return bn.affine and bn.track_running_stats and _mlp_applies(blk.mlp)


_ATTN = dict(qkv_dw=nn.Conv2d, qkv_bn=nn.BatchNorm2d, qkv=BlockDiagonalLinear, proj=nn.Linear,
             proj_drop=nn.Dropout)


@register_fast_path(PaleBlock, dict(
    cpe=nn.Conv2d, norm1=nn.LayerNorm, attn=PSAttention, drop_path=DropPath, norm2=nn.LayerNorm,
    mlp=Mlp, **{f'attn.{k}': v for k, v in _ATTN.items()},
    **{f'mlp.{k}': v for k, v in _MLP.items()}), applies=_block_applies)
def pale_block(blk: PaleBlock, x: torch.Tensor) -> torch.Tensor:
    """:class:`PaleBlock`'s forward on a ``(B, H, W, C)`` map."""
    if x.dim() != 4:
        raise ValueError(f'PaleBlock expects a (B, H, W, C) map, got a {x.dim()}-D tensor '
                         f'of shape {tuple(x.shape)}')
    B, H, W, C = x.shape
    if can_fuse_dwconv(x, blk.cpe.weight, blk.cpe.bias):
        # fp32 CPU inference: x + CPE(x) in one pass (csrc/dwconv_cpu.cpp)
        x = fused_dwconv3x3(x, blk.cpe.weight, blk.cpe.bias, residual=True)[0]
    else:
        cpe = blk.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if torch.is_grad_enabled() or not cpe.is_contiguous() or cpe.dtype != x.dtype:
            x = x + cpe  # (under autocast the conv output is bf16/fp16: the sum promotes)
        else:  # inference: add in place into the fresh conv output (x + cpe, the same sum)
            x = cpe.add_(x)
    if blk.training and blk.drop_path.drop_prob > 0:
        attn = ps_attention(blk.attn, blk.norm1(x).view(B, H * W, C), (H, W))
        x = x + blk.drop_path(attn.view(B, H, W, C))
        return x + blk.drop_path(mlp(blk.mlp, blk.norm2(x)))
    # no drop path: the residual adds go into the attention's output projection
    # and the MLP's fc2 (fused into the GEMM at fp32 CPU inference)
    x = ps_attention(blk.attn, blk.norm1(x).view(B, H * W, C), (H, W),
                     identity=x.reshape(B, H * W, C))
    x = x.view(B, H, W, C)
    return mlp(blk.mlp, blk.norm2(x), identity=x)
