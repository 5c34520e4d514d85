"""Pale attention as written into ONNX files: fewer, larger ops than the reference.

While ``torch.onnx.export`` runs (either exporter) with the fast paths on,
:func:`pale_mm.models.pale_attention.pale_attention_nhwc` hands over to
:func:`pale_attention_onnx` (:func:`pale_mm.ops.export_path`). It computes the same
function for every input size, as the reference does when it builds a graph for all
sizes (:func:`pale_mm.ops.graph_for_all_sizes`: every axis padded to its groups,
padded keys masked), with four differences in how the graph is written:

- **the mask is an additive bias** of ``0`` (real key) or ``-inf`` (padded key),
  ``(G, 1, 1, s*W)``, broadcast over batch and heads where the scores are formed.
  The reference's boolean mask goes through ``scaled_dot_product_attention``, which
  the exporters write as a ``Where`` over every score plus a NaN guard (``IsNaN``,
  ``Where``) for fully masked rows; no row is fully masked here (group ``g`` holds
  line ``g < G <= L``), so the bias gives the same softmax and needs neither;
- **q, k and v are grouped together**: one pad, one reshape and one transpose per
  branch for the three, instead of one of each per tensor, and the channel split
  is a reshape instead of slices;
- **the scale is applied to q** (``s*W x d`` values) instead of the scores
  (``s*W x s*W``);
- **the attention is rank 4**, ``(B*G, heads, s*W, d)``, where OpenVINO's CPU plugin
  fuses ``MatMul``, ``Add``, ``Softmax``, ``MatMul`` into one attention kernel (it
  does not at rank 5): 0.89 / 0.81 of the time in OpenVINO at 512x512 / 800x1216,
  0.95 / 1.00 in onnxruntime, for Pale-T.

The attention itself is written as ``MatMul``, ``Add``, ``Softmax``, ``MatMul``, which
every ONNX runtime runs. Inside :func:`export_runtime` ``('onnxruntime')`` it is
written as onnxruntime's ``com.microsoft.MultiHeadAttention`` instead
(:func:`_pale_attention_mha`): onnxruntime's CPU kernel runs it as flash attention, without
the ``(s*W) x (s*W)`` scores in memory, but only without a mask or bias, so the
groups with a padding line and those without attend in two calls, each over its
real keys only. That file is for onnxruntime only (OpenVINO 2026.4 reads the op but
crashed compiling this form, so ``tools/deploy/infer.py`` refuses it there).

:class:`~pale_mm.models.pale_attention.PSAttention` has an export form too
(:func:`ps_attention_onnx`, registered with :func:`pale_mm.ops.register_fast_path` for
the device type ``'onnx'``): q, k and v each from its own slice of the fused depthwise
conv, BatchNorm and projection, instead of one conv over ``[x, x, x]`` and a split.

All forms are proven equal to the reference in ``tests/ops/test_export.py``.
"""
import contextlib
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import BlockDiagonalLinear
from ..models.pale_attention import PSAttention, check_tokens, pale_attention_nhwc, pale_groups
from . import register_export_path, register_fast_path

__all__ = ['pale_attention_onnx', 'ps_attention_onnx', 'pale_key_bias', 'RUNTIMES',
           'export_runtime', 'multi_head_attention']

# 'any': standard ONNX ops only; 'onnxruntime': onnxruntime's MultiHeadAttention
RUNTIMES = ('any', 'onnxruntime')
_runtime = ['any']


@contextlib.contextmanager
def export_runtime(runtime: str):
    """Within the block, exported pale attention is written for ``runtime`` (one of
    :data:`RUNTIMES`): ``'any'`` (the default) in standard ONNX ops, ``'onnxruntime'``
    with onnxruntime's ``com.microsoft.MultiHeadAttention`` (:func:`_pale_attention_mha`; by
    the TorchScript exporter: ``torch.export`` traces the op's PyTorch forward)."""
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
    previous, _runtime[0] = _runtime[0], runtime
    try:
        yield
    finally:
        _runtime[0] = previous


class _MultiHeadAttention(torch.autograd.Function):
    """``softmax(scale * q k^T) v`` per head of ``(B, S, heads * d)`` tensors:
    ``scaled_dot_product_attention`` in PyTorch, onnxruntime's
    ``com.microsoft.MultiHeadAttention`` in TorchScript-exported graphs."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float):
        B, S, C = q.shape
        q, k, v = (t.reshape(B, S, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(B, S, C)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op('com.microsoft::MultiHeadAttention', q, k, v, num_heads_i=heads,
                   scale_f=scale)
        out.setType(q.type())
        return out


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         heads: int, scale: float) -> torch.Tensor:
    """Unmasked multi-head attention of ``(B, S, heads * d)`` q, k, v, scores scaled by
    ``scale``; returns ``(B, S, heads * d)``."""
    return _MultiHeadAttention.apply(q, k, v, heads, scale)


def pale_key_bias(length, size: int, width, like: torch.Tensor) -> torch.Tensor:
    """``(G, 1, 1, s*W)`` additive key bias of the interlaced groups along an axis of
    ``length`` lines (line ``i`` of group ``g`` is line ``i*G + g``): ``0`` for real
    keys, ``-inf`` for the padding lines ``>= length``."""
    groups, lines = pale_groups(length, size)
    line = (torch.arange(lines, device=like.device) * groups
            + torch.arange(groups, device=like.device)[:, None])  # (G, s)
    padding = line >= length
    bias = torch.zeros(padding.shape, dtype=like.dtype, device=like.device).masked_fill(
        padding, float('-inf'))  # (G, s)
    return bias[:, :, None].expand(groups, lines, width).reshape(groups, 1, 1, lines * width)


def _branch(qkv: torch.Tensor, size: int) -> torch.Tensor:
    """Attention within the interlaced groups along dim 1 of ``qkv``,
    ``(B, L, W, 3, heads, d)`` (q already scaled); returns ``(B, L, W, heads * d)``."""
    B, L, W, _, heads, d = qkv.shape
    groups, lines = pale_groups(L, size)
    qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, 0, 0, groups * lines - L))
    # (B, s, G, W, 3, heads, d) -> (3, B, G, heads, s, W, d) -> (3, B*G, heads, s*W, d):
    # rank 4, where OpenVINO fuses MatMul, Add, Softmax, MatMul into one attention
    qkv = qkv.reshape(B, lines, groups, W, 3, heads, d).permute(4, 0, 2, 5, 1, 3, 6)
    q, k, v = qkv.reshape(3, B * groups, heads, lines * W, d).unbind(0)
    bias = pale_key_bias(L, size, W, q).repeat(B, 1, 1, 1)  # (B*G, 1, 1, s*W)
    out = (q @ k.transpose(-1, -2) + bias).softmax(dim=-1) @ v  # (B*G, heads, s*W, d)
    out = out.reshape(B, groups, heads, lines, W, d).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(B, lines * groups, W, heads * d)[:, :L]


def _group_rows(length, size: int, positions, line_step, position_step, offset,
                device) -> List[Tuple[torch.Tensor, object]]:
    """Where the interlaced groups of one branch are in a map's rows ``line * line_step
    + position * position_step + offset`` (``length`` lines of ``positions`` tokens):
    ``[(rows, S), (rows, S)]`` for the first ``f = L - (s-1)*G`` groups (``s`` real
    lines each) and for the others (``s - 1``: their last line would be padding),
    each group's ``S`` tokens in a row. Where ``s = 1`` there are no
    short groups; their length is then taken as 1, so no size written into a
    ``Reshape`` is 0 (ONNX reads a 0 there as "keep the input's size")."""
    groups, lines = pale_groups(length, size)
    full = length - (lines - 1) * groups  # 1 <= f <= G
    short = lines - 1 + 1 // lines
    group = torch.arange(groups, device=device)
    position = torch.arange(positions, device=device) * position_step + offset
    out = []
    for n, g in ((lines, group[:full]), (short, group[full:])):
        line = torch.arange(n, device=device) * groups + g[:, None]  # (groups, n)
        out.append(((line[:, :, None] * line_step + position).reshape(-1), n * positions))
    return out


def _attend_mha(qkv, rows: torch.Tensor, seq, heads: int, scale: float) -> torch.Tensor:
    """Unmasked attention of the groups of ``seq`` tokens at ``rows`` of the
    ``(B, R, c)`` maps ``qkv``, by :func:`multi_head_attention`; returns
    ``(B, len(rows), c)``. (``heads`` is passed as a Python int: read from a traced
    shape it would be a traced value.)"""
    B, _, c = qkv[0].shape
    q, k, v = (t.index_select(1, rows).reshape(-1, seq, c) for t in qkv)
    return multi_head_attention(q, k, v, heads, scale).reshape(B, -1, c)


def _group_order(length, size: int, device) -> torch.Tensor:
    """``(L,)``: for each of ``length`` lines, how many lines come before it when the
    groups of :func:`_group_rows` (full groups first, then the short ones) are laid
    out one after another: ``g*(s-1) + min(g, f) + i`` for line ``i`` of group
    ``g``."""
    groups, lines = pale_groups(length, size)
    full = length - (lines - 1) * groups
    line = torch.arange(length, device=device)
    group, index = line % groups, torch.div(line, groups, rounding_mode='floor')
    return group * (lines - 1) + group - (group - full).clamp(min=0) + index


def _pale_attention_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pale_size: Tuple[int, int], heads: int) -> torch.Tensor:
    """:func:`pale_attention_onnx` without a mask, in onnxruntime's fused (flash)
    attention, which takes none: each branch's groups with a padding line and those
    without attend in two calls, each over its real keys only. The maps, viewed as
    ``(B, H*W*2, c)`` rows (token, branch), are gathered into group order by one
    ``Gather`` per group set and tensor, and the outputs put back by one."""
    B, H, W, C = q.shape
    c = C // 2
    qkv = [t.reshape(B, H * W * 2, c) for t in (q, k, v)]
    # rows: line h, position w (branch 0); columns: line w, position h (branch 1)
    sets = (_group_rows(H, pale_size[0], W, 2 * W, 2, 0, q.device)
            + _group_rows(W, pale_size[1], H, 2, 2 * W, 1, q.device))
    scale = float(c // heads) ** -0.5  # a constant: the channels are the model's
    out = torch.cat([_attend_mha(qkv, rows, seq, heads, scale) for rows, seq in sets],
                    dim=1)  # (B, H*W*2, c), group order: rows' groups, then columns'
    # where each (token, branch) row is in ``out``: the inverse of the gathers
    rows = (_group_order(H, pale_size[0], q.device)[:, None] * W
            + torch.arange(W, device=q.device))
    cols = (_group_order(W, pale_size[1], q.device) * H
            + torch.arange(H, device=q.device)[:, None] + H * W)
    back = torch.stack([rows, cols], dim=-1).reshape(-1)  # (H*W*2,)
    return out.index_select(1, back).reshape(B, H, W, C)


@register_export_path('pale_attention_nhwc')
def pale_attention_onnx(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pale_size: Tuple[int, int], num_heads: int,
                        attn_drop: float = 0.) -> torch.Tensor:
    """:func:`~pale_mm.models.pale_attention.pale_attention_nhwc` for ONNX export (see
    the module docstring); ``attn_drop`` must be 0 (an exported model is in eval
    mode)."""
    if attn_drop:
        raise ValueError(f'the exported pale attention has no dropout, got attn_drop='
                         f'{attn_drop} (export the model in eval mode)')
    if _runtime[0] == 'onnxruntime':
        return _pale_attention_mha(q, k, v, pale_size, num_heads // 2)
    B, H, W, C = q.shape
    heads, d = num_heads // 2, C // num_heads
    # (B, H, W, 3, 2, heads, d): q scaled, k, v; branch 0 rows, branch 1 columns
    qkv = torch.stack([q * d ** -0.5, k, v], dim=3).reshape(B, H, W, 3, 2, heads, d)
    rows = _branch(qkv[:, :, :, :, 0], pale_size[0])
    cols = _branch(qkv[:, :, :, :, 1].transpose(1, 2), pale_size[1]).transpose(1, 2)
    return torch.cat([rows, cols], dim=-1)


def _folds(attn: PSAttention) -> bool:
    """The export form's settings: eval mode (BatchNorm with its running statistics) and
    the depthwise conv as PSAttention builds it."""
    dw, bn = attn.qkv_dw, attn.qkv_bn
    return (not attn.training and not bn.training and bn.running_mean is not None
            and dw.padding_mode == 'zeros' and dw.groups == dw.in_channels == 3 * attn.embed_dims)


@register_fast_path(PSAttention, dict(qkv_dw=nn.Conv2d, qkv_bn=nn.BatchNorm2d,
                                      qkv=BlockDiagonalLinear, proj=nn.Linear,
                                      proj_drop=nn.Dropout),
                    applies=_folds, device='onnx')
def ps_attention_onnx(attn: PSAttention, x: torch.Tensor, hw_shape) -> torch.Tensor:
    """:class:`~pale_mm.models.pale_attention.PSAttention`'s forward as written into ONNX
    files: q, k and v each from its own ``C``-channel depthwise conv, BatchNorm and
    projection (the three slices of the fused ``3C`` weights), where the reference
    convolves ``[x, x, x]`` (``3C`` channels) and splits the projection's output. The
    same values per channel, without the ``Concat`` of the input three times and the
    projection's ``Concat`` and ``Slice`` ops. Each BatchNorm follows its conv, which
    runtimes fold together when they load the file (the exporter folds the
    reference's). The pale attention then takes its own export form."""
    check_tokens(attn, x, hw_shape)
    B, N, C = x.shape
    H, W = hw_shape
    x = x.transpose(1, 2).reshape(B, C, H, W)
    dw, bn, qkv = attn.qkv_dw, attn.qkv_bn, attn.qkv

    def part(p, t):  # branch t's channels [t*C, (t+1)*C) of a fused parameter
        return None if p is None else p[t * C:(t + 1) * C]
    q_k_v = []
    for t in range(3):
        y = F.conv2d(x, part(dw.weight, t), part(dw.bias, t), dw.stride, dw.padding,
                     dw.dilation, C)
        y = F.batch_norm(y, part(bn.running_mean, t), part(bn.running_var, t),
                         part(bn.weight, t), part(bn.bias, t), False, 0., bn.eps)
        q_k_v.append(F.linear(y.permute(0, 2, 3, 1), part(qkv.weight, t), part(qkv.bias, t)))
    out = pale_attention_nhwc(*q_k_v, attn.pale_size, attn.num_heads, 0.)
    return attn.proj_drop(attn.proj(out.reshape(B, N, C)))
