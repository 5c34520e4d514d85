"""Pale attention as written into ONNX files: fewer, larger ops than the reference.

While ``torch.onnx.export`` runs (either exporter) with the fast paths on,
:func:`pale_mm.models.pale_attention.pale_attention_nhwc` hands over to
:func:`pale_attention_onnx` (:func:`pale_mm.ops.export_path`). It computes the same
function for every input size, as the reference does when it builds a graph for all
sizes (:func:`pale_mm.ops.graph_for_all_sizes`: every axis padded to its groups,
padded keys masked), with three differences in how the graph is written:

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
  (``s*W x s*W``).

The attention itself is written as ``MatMul``, ``Add``, ``Softmax``, ``MatMul``, which
every ONNX runtime runs. Proven equal to the reference in
``tests/ops/test_export.py``.
"""
from typing import Tuple

import torch

from . import register_export_path

__all__ = ['pale_attention_onnx', 'pale_key_bias']


def pale_key_bias(length, size: int, width, like: torch.Tensor) -> torch.Tensor:
    """``(G, 1, 1, s*W)`` additive key bias of the interlaced groups along an axis of
    ``length`` lines (line ``i`` of group ``g`` is line ``i*G + g``): ``0`` for real
    keys, ``-inf`` for the padding lines ``>= length``."""
    from ..models.pale_attention import pale_groups
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
    from ..models.pale_attention import pale_groups
    B, L, W, _, heads, d = qkv.shape
    groups, lines = pale_groups(L, size)
    qkv = torch.nn.functional.pad(qkv, (0, 0, 0, 0, 0, 0, 0, 0, 0, groups * lines - L))
    # (B, s, G, W, 3, heads, d) -> (3, B, G, heads, s, W, d) -> (3, B, G, heads, s*W, d)
    qkv = qkv.reshape(B, lines, groups, W, 3, heads, d).permute(4, 0, 2, 5, 1, 3, 6)
    q, k, v = qkv.reshape(3, B, groups, heads, lines * W, d).unbind(0)
    scores = q @ k.transpose(-1, -2) + pale_key_bias(L, size, W, q)
    out = scores.softmax(dim=-1) @ v  # (B, G, heads, s*W, d)
    out = out.reshape(B, groups, heads, lines, W, d).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(B, lines * groups, W, heads * d)[:, :L]


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
    B, H, W, C = q.shape
    heads, d = num_heads // 2, C // num_heads
    # (B, H, W, 3, 2, heads, d): q scaled, k, v; branch 0 rows, branch 1 columns
    qkv = torch.stack([q * d ** -0.5, k, v], dim=3).reshape(B, H, W, 3, 2, heads, d)
    rows = _branch(qkv[:, :, :, :, 0], pale_size[0])
    cols = _branch(qkv[:, :, :, :, 1].transpose(1, 2), pale_size[1]).transpose(1, 2)
    return torch.cat([rows, cols], dim=-1)
