"""LIT, "Less is More: Pay Less Attention in Vision Transformers" (arXiv 2105.14217).

Stages 1-2 are MLP-only blocks (no token mixing), stages 3-4 global multi-head
self-attention. Between stages, deformable token merging (DTM): a 2x2/s2 DCNv1
(``torchvision.ops.deform_conv2d``; offsets from a zero-initialised conv) + BatchNorm
+ GELU. Odd maps are zero-padded to even size before a merge (so stage ``i`` has
``ceil(H / 2^(i+2))`` rows; identical to the official code on even sizes), or, with
``size_rounding='floor'``, lose their last row or column as in the official
detection and segmentation code (its merges are unpadded stride-2 convs).

Two layouts, both with the official parameter names (official checkpoints load by
``init_cfg=dict(type='Pretrained', checkpoint=...)``):

- LIT-S/M/B (Swin-style code): ``patch_embed.{proj,norm}``,
  ``layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,
  norm2,mlp.fc1,mlp.fc2}``, ``layers.{i}.downsample.{dconv,norm_layer}`` (the DTM at the
  end of layer ``i``), then ``norm`` and ``head`` in the classifier. The attention of
  stages 3-4 has a relative position bias table sized for ``pretrain_img_size``,
  bicubically interpolated to ``(2H-1, 2W-1)`` at run time (as the official
  detection code does).
- LIT-Ti (PVT-style code): ``patch_embed{1-4}``, ``pos_embed{1-4}`` (absolute position
  embeddings, bilinearly interpolated to the run-time size; ``pos_embed4`` has one
  extra slot for the classifier's class token), ``block{1-4}.{j}``; the classifier
  adds ``cls_token``, ``norm`` and ``head`` and classifies the class token.

Official LIT-S/M/B classification checkpoints also hold each attention's
``relative_position_index`` buffer. This code computes the index instead: loading
(``load_state_dict``, ``init_cfg``, timm) checks that a checkpoint's index equals the
computed one and drops it (a ``ValueError`` names the key and the shapes otherwise).

The official downstream backbones differ from the classifiers in their output norms
(detection LIT-S: ``norm1``-``norm3`` and none on stage 0; segmentation LIT-S:
``norm0``-``norm3``; LIT-Ti: none), chosen here by ``out_norm_indices``, and in the
size their relative position tables are built for (``pretrain_img_size``, below).

Relative position tables at other sizes, as the official detection code does it:
the tables are sized for ``pretrain_img_size`` (the official detection backbone sizes
them for 800 px, its segmentation backbone for 512 px); loading a checkpoint with
other tables (27x27 from 224-px classification) resizes them bicubically to that size,
and each forward resizes them again, bicubically, to ``(2H-1, 2W-1)`` for the
run-time ``H x W`` grid. The configs set ``pretrain_img_size`` as the official code
does (800 for Mask R-CNN, 512 for UperNet), so the two resizes match it.
``pretrain_img_size=224`` keeps the checkpoint's tables and resizes once, from the
224-px tables straight to the run-time grid (same result at 224 input, different at
other sizes).

The forward is traceable with ``torch.fx`` (timm's feature extraction): the few
shape-dependent steps are functions wrapped with ``torch.fx.wrap``.
"""
import contextlib
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_

from .arch import check_flag, check_mlp_ratios, check_ratio, drop_path_rates, parse_arch
from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp, check_image
from .pyramid import PyramidBackbone, pad_to_multiple

torch.fx.wrap('pad_to_multiple')

__all__ = ['DeformConv2dPack', 'DeformableTokenMerging', 'LITAttention', 'LITBlock',
           'LITMLPBlock', 'LIT', 'LITClassifier']


@torch.fx.wrap
def deform_conv(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias,
                stride: int, padding: int) -> torch.Tensor:
    """torchvision's DCNv1 (``torchvision.ops.deform_conv2d``), an FX leaf: its
    argument checks branch on the input's shape.

    bfloat16 inputs are computed in float32 and the result rounded to bfloat16:
    torchvision has no bfloat16 kernel on any device, and under CUDA autocast it
    computes in float32 itself. So a bf16 model, or one under CPU autocast, gives
    what CUDA autocast gives, instead of failing in torchvision."""
    from torchvision.ops import deform_conv2d
    if x.dtype != torch.bfloat16:
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding)
    # autocast off where the device has one (not on 'meta', where timm's tests build)
    off = torch.autocast(x.device.type, enabled=False) \
        if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext()
    with off:
        out = deform_conv2d(x.float(), offset.float(), weight.float(),
                            None if bias is None else bias.float(), stride=stride,
                            padding=padding)
    return out.to(x.dtype)


class DeformConv2dPack(nn.Module):
    """DCNv1 whose offsets come from a conv over the same input (``conv_offset``,
    zero-initialised, so it starts as a plain conv). Parameter names follow the
    official / mmcv ``DeformConv2dPack``: ``weight``, ``bias``, ``conv_offset.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 stride: int = 2, padding: int = 0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size,
                                               kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size,
                                     kernel_size, stride, padding, bias=True)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's CPU kernel crashes (segfault) on NaN sampling positions: a NaN
        # input must give NaN outputs, not kill the process, so NaN offsets become 0.
        offset = torch.nan_to_num(self.conv_offset(x), nan=0.).to(x.dtype)
        return deform_conv(x, offset, self.weight, self.bias, self.stride, self.padding)


class DeformableTokenMerging(nn.Module):
    """DTM: ``(B, H, W, C_in)`` -> 2x2/s2 deformable conv -> BN -> GELU ->
    ``(B, ceil(H/2), ceil(W/2), C_out)`` (odd sizes are zero-padded at the bottom and
    right first), or ``(B, floor(H/2), floor(W/2), C_out)`` with ``pad=False`` (the
    official downstream code: an odd last row or column is dropped)."""

    def __init__(self, in_channels: int, out_channels: int, pad: bool = True):
        super().__init__()
        self.pad = pad
        self.dconv = DeformConv2dPack(in_channels, out_channels, 2, 2, 0)
        self.norm_layer = nn.BatchNorm2d(out_channels)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.pad:
            x = pad_to_multiple(x, 2)
        x = self.act_layer(self.norm_layer(self.dconv(x)))
        return x.permute(0, 2, 3, 1)


def relative_position_index(H: int, W: int, device=None) -> torch.Tensor:
    """``(H*W, H*W)`` index into a ``(2H-1) x (2W-1)`` table (Swin's layout): query
    ``(i1, j1)`` and key ``(i2, j2)`` (row-major tokens) look up row ``i1 - i2 + H - 1``,
    column ``j1 - j2 + W - 1``. Built from its ``H x H`` row and ``W x W`` column parts
    in one pass over the result."""
    r, c = torch.arange(H, device=device), torch.arange(W, device=device)
    rows = (r[:, None] - r[None, :] + H - 1) * (2 * W - 1)  # [i1, i2]
    cols = c[:, None] - c[None, :] + W - 1  # [j1, j2]
    return (rows[:, None, :, None] + cols[None, :, None, :]).reshape(H * W, H * W)


def resize_rel_pos_table(table: torch.Tensor, src: Tuple[int, int],
                         dst: Tuple[int, int]) -> torch.Tensor:
    """A ``((2h-1)(2w-1), nH)`` relative position table for an ``h x w`` grid
    (``src``), bicubically resized for a ``dst`` grid (``align_corners=False``, as
    the official code); returned unchanged when the grids are equal."""
    if tuple(src) == tuple(dst):
        return table
    (h, w), (H, W) = src, dst
    grid = table.t().reshape(1, -1, 2 * h - 1, 2 * w - 1)
    grid = F.interpolate(grid, size=(2 * H - 1, 2 * W - 1), mode='bicubic',
                         align_corners=False)
    return grid.reshape(table.shape[1], -1).t()


@torch.fx.wrap
def rel_pos_bias(table: torch.Tensor, rel_pos_size: Tuple[int, int],
                 x: torch.Tensor) -> torch.Tensor:
    """``(num_heads, H*W, H*W)`` bias for the ``(B, H, W, C)`` map ``x`` from a table
    sized for ``rel_pos_size``, resized to the run-time grid (FX leaf: the sizes are
    data)."""
    if x.dim() != 4:
        raise ValueError(f'relative position bias needs a (B, H, W, C) map, got shape '
                         f'{tuple(x.shape)}')
    H, W = x.shape[1], x.shape[2]
    table = resize_rel_pos_table(table, rel_pos_size, (H, W))
    index = relative_position_index(H, W, table.device).view(1, -1)
    # one gather per head into a contiguous (heads, N, N) bias: the values of
    # ``table[index].t()``, whose strided view scaled_dot_product_attention copied in
    # every block; gather's backward (a scatter-add) also takes a twentieth of the time
    # of indexing's (index_put) on the CPU at a 32x32 grid
    return table.t().gather(1, index.expand(table.shape[1], -1)).view(-1, H * W, H * W)


@torch.fx.wrap
def abs_pos_embed(pos: torch.Tensor, grid: int, x: torch.Tensor) -> torch.Tensor:
    """``(1, H, W, C)`` absolute position embedding for the ``(B, H, W, C)`` map ``x``
    from a ``(1, grid*grid, C)`` one, bilinearly resized when the grids differ."""
    H, W = x.shape[1], x.shape[2]
    pos = pos.reshape(1, grid, grid, -1)
    if (grid, grid) != (H, W):
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(H, W), mode='bilinear',
                            align_corners=False).permute(0, 2, 3, 1)
    return pos


@torch.fx.wrap
def check_floor_size(x: torch.Tensor, stem_floors: bool, num_stages: int) -> torch.Tensor:
    """``x`` (an NCHW image) when every stage of an unpadded (``size_rounding='floor'``)
    LIT keeps at least one row and column: the stem's ``H // 4`` (``stem_floors``,
    LIT-Ti) or ``ceil(H / 4)`` rows, halved and floored by each merge; a ``ValueError``
    naming the size otherwise (FX leaf: the sizes are data)."""
    for side in x.shape[-2:]:
        rows = side // 4 if stem_floors else -(-side // 4)
        if rows >> (num_stages - 1) < 1:
            least = 4 << (num_stages - 1) if stem_floors else 4 * ((1 << (num_stages - 1)) - 1) + 1
            raise ValueError(f'LIT with size_rounding=\'floor\' needs images of at least '
                             f'{least}x{least} (each merge drops an odd last row), got '
                             f'{tuple(x.shape[-2:])}')
    return x


def check_rel_pos_index(key: str, index: torch.Tensor, table: Optional[torch.Tensor]):
    """Check an official checkpoint's ``relative_position_index`` buffer ``key``
    against the index this code computes for its grid (the grid of the table stored
    next to it, or the square grid of its size); ``ValueError`` naming the key and the
    shapes if they differ."""
    n = index.shape[0] if index.dim() == 2 else -1
    grids = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    if table is not None:
        grids = [(h, w) for h, w in grids if (2 * h - 1) * (2 * w - 1) == table.shape[0]]
    else:
        grids = [(h, w) for h, w in grids if h == w]
    expected = relative_position_index(*grids[0]) if grids else None
    if expected is None or index.shape != expected.shape or \
            not torch.equal(index.to('cpu', torch.long), expected):
        want = tuple(expected.shape) if expected is not None else \
            f'(h*w, h*w) for a table of {tuple(table.shape) if table is not None else "?"}'
        what = 'shape' if expected is None or index.shape != expected.shape else 'values'
        raise ValueError(f'checkpoint key {key}: relative_position_index of shape '
                         f'{tuple(index.shape)} differs in {what} from the index this model '
                         f'computes (shape {want}); it is not an official LIT checkpoint '
                         f'or was saved by other code')


class LITAttention(nn.Module):
    """Global MSA on ``(B, H, W, C)`` maps (or ``(B, N, C)`` sequences when there is no
    position bias), with an optional relative position bias table for a
    ``rel_pos_size = (h, w)`` grid, interpolated to the run-time grid."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., rel_pos_size=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dims {dim} not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos_size = rel_pos_size
        if rel_pos_size is not None:
            h, w = rel_pos_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table, std=.02)

    def position_bias(self, H: int, W: int) -> torch.Tensor:
        """``(num_heads, H*W, H*W)`` bias for an ``H x W`` map."""
        table = self.relative_position_bias_table
        return rel_pos_bias(table, self.rel_pos_size, table.new_empty(0, H, W, 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'relative_position_index'
        if key in state_dict:  # official checkpoints: check, then drop
            check_rel_pos_index(key, state_dict[key],
                                state_dict.get(prefix + 'relative_position_bias_table'))
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        B, C = shape[0], shape[-1]
        x2 = x.reshape(B, -1, C)
        N = x2.shape[1]
        q, k, v = self.qkv(x2).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = None
        if self.rel_pos_size is not None:
            bias = rel_pos_bias(self.relative_position_bias_table, self.rel_pos_size,
                                x).unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out.view(shape)


class LITMLPBlock(nn.Module):
    """Stages 1-2: ``x + MLP(LN(x))``, no token mixing (parameter names ``norm2``,
    ``mlp``)."""

    def __init__(self, dim: int, mlp_ratio: float = 4., drop: float = 0.,
                 drop_path: float = 0., norm_eps: float = 1e-5):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LITBlock(nn.Module):
    """Stages 3-4: pre-norm global MSA and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_eps: float = 1e-5, rel_pos_size=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LITAttention(dim, num_heads, qkv_bias, attn_drop, drop, rel_pos_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LITLayer(nn.Module):
    """Official ``layers.{i}``: ``blocks`` and the DTM ``downsample`` that follows."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class LIT(PyramidBackbone):
    """LIT backbone for mmdet / mmseg: a tuple of NCHW maps at strides 4/8/16/32.

    Args:
        arch (str | dict): 'ti', 's', 'm' or 'b', or a dict with ``embed_dims`` (int,
            doubled per stage, or a list), ``depths``, ``num_heads`` and optionally
            ``mlp_ratios`` (> 0, default 4), ``has_msa`` (bools per stage, default: the
            last two stages), ``pos_embed`` (bool: PVT layout with absolute position
            embeddings, default False) and ``norm_eps`` (> 0).
        in_channels (int): image channels. Default 3.
        pretrain_img_size (int): image size the position embeddings / relative
            position tables are sized for (and interpolated from), at least 32: stage
            ``i``'s grid is ``pretrain_img_size // 4 // 2**i``, floored as in the
            official code. Default 224.
        qkv_bias (bool): bias in the QKV projection. Default True.
        drop_rate, attn_drop_rate (float): dropout rates, in ``[0, 1)``. Default 0.
        drop_path_rate (float): stochastic depth over all blocks, in ``[0, 1)``.
            Default 0.1.
        out_indices, frozen_stages, norm_eval, with_cp, pretrained, init_cfg: as for
            ``PaleTransformer``. ``frozen_stages=k`` freezes the stem and stages
            ``0..k-1`` with the merges (and position embeddings) in front of them.
        out_norm_indices (Sequence[int] | None): the outputs that get a LayerNorm
            ``norm{i}``: all of ``out_indices`` (None, default), or a subset, possibly
            empty. The official downstream backbones: ``(1, 2, 3)`` for detection
            LIT-S, ``(0, 1, 2, 3)`` for segmentation LIT-S, ``()`` for LIT-Ti.
        size_rounding (str): ``'ceil'`` (default): odd maps are zero-padded before
            each merge (and images to a multiple of 4 before the stem), so stage ``i``
            has ``ceil(H / 2**(i+2))`` rows. ``'floor'``: as the official detection and
            segmentation code, each merge drops an odd last row or column, and so
            does LIT-Ti's stem (``H // 4`` rows; LIT-S/M/B's stem pads to a multiple
            of 4 there too). The same on sizes divisible by 32.
    """
    arch_zoo = {
        'ti': dict(embed_dims=[64, 128, 320, 512], depths=[3, 4, 6, 3], num_heads=[1, 2, 5, 8],
                   mlp_ratios=[8, 8, 4, 4], has_msa=[False, False, True, True],
                   pos_embed=True, norm_eps=1e-6),
        's': dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
        'm': dict(embed_dims=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
        'b': dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    }

    def __init__(self, arch='s', in_channels: int = 3, pretrain_img_size: int = 224,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 pretrained=None, init_cfg=None, out_norm_indices=None,
                 size_rounding: str = 'ceil'):
        arch = self.parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        self.mlp_ratios: List[float] = arch['mlp_ratios']
        self.has_msa: List[bool] = arch['has_msa']
        super().__init__(in_channels, len(self.depths), out_indices, frozen_stages, norm_eval,
                         with_cp, pretrained, init_cfg, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                         qkv_bias=qkv_bias, out_norm_indices=out_norm_indices)
        self.abs_pos_embed: bool = arch['pos_embed']
        self.norm_eps: float = arch['norm_eps']
        least = 4 << (self.num_stages - 1)
        if isinstance(pretrain_img_size, bool) or not isinstance(pretrain_img_size, int) or \
                pretrain_img_size < least:
            raise ValueError(f'pretrain_img_size must be an int >= {least} (one table row '
                             f'in the last of {self.num_stages} stages), got '
                             f'{pretrain_img_size!r}')
        if size_rounding not in ('ceil', 'floor'):
            raise ValueError(f"size_rounding must be 'ceil' or 'floor', got {size_rounding!r}")
        self.size_rounding = size_rounding
        self.pretrain_img_size = pretrain_img_size
        # floored per stage, as the official code sizes them
        self.pretrain_grids = [pretrain_img_size // 4 >> i for i in range(self.num_stages)]

        dpr = drop_path_rates(drop_path_rate, self.depths)
        cursor, stages = 0, []
        for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
            blocks = []
            for j in range(depth):
                if self.has_msa[i]:
                    g = self.pretrain_grids[i]
                    blocks.append(LITBlock(
                        dim, self.num_heads[i], self.mlp_ratios[i], qkv_bias, drop_rate,
                        attn_drop_rate, dpr[cursor + j], self.norm_eps,
                        rel_pos_size=None if self.abs_pos_embed else (g, g)))
                else:
                    blocks.append(LITMLPBlock(dim, self.mlp_ratios[i], drop_rate,
                                              dpr[cursor + j], self.norm_eps))
            stages.append(blocks)
            cursor += depth

        S = self.num_stages
        self.cls_stage = S  # the stage a classifier's class token joins (LIT-Ti)
        if self.abs_pos_embed:  # LIT-Ti, PVT layout
            for k in range(1, S + 1):
                dim = self.embed_dims[k - 1]
                if k == 1:
                    embed = ConvPatchEmbed(in_channels, dim, 4, 4, 0)
                else:
                    embed = DeformableTokenMerging(self.embed_dims[k - 2], dim,
                                                   pad=size_rounding == 'ceil')
                setattr(self, f'patch_embed{k}', embed)
                g = self.pretrain_grids[k - 1]
                pos = nn.Parameter(torch.zeros(1, g * g + (k == S), dim))
                trunc_normal_(pos, std=.02)
                setattr(self, f'pos_embed{k}', pos)
                setattr(self, f'pos_drop{k}', nn.Dropout(drop_rate))
                setattr(self, f'block{k}', nn.ModuleList(stages[k - 1]))
        else:  # LIT-S/M/B, Swin layout
            self.patch_embed = ConvPatchEmbed(in_channels, self.embed_dims[0], 4, 4, 0)
            self.pos_drop = nn.Dropout(drop_rate)
            self.layers = nn.ModuleList([
                LITLayer(stages[i], DeformableTokenMerging(self.embed_dims[i],
                                                           self.embed_dims[i + 1],
                                                           pad=size_rounding == 'ceil')
                         if i < S - 1 else None) for i in range(S)])
        self._finish_init(self.norm_eps)

    # ------------------------------------------------------------------ config
    arch_aliases = {'tiny': 'ti', 't': 'ti', 'small': 's', 'medium': 'm', 'base': 'b'}

    @classmethod
    def parse_arch(cls, arch) -> dict:
        """``arch`` (a name, an alias such as ``'small'``, or a dict) as per-stage lists
        (see :func:`pale_mm.models.arch.parse_arch`)."""
        arch = parse_arch(
            arch, cls.arch_zoo, ('embed_dims', 'depths', 'num_heads'), cls.arch_aliases,
            owner=cls.__name__, scalar_keys=('pos_embed', 'norm_eps'),
            defaults=dict(mlp_ratios=4., has_msa=lambda n: [i >= n - 2 for i in range(n)],
                          pos_embed=False, norm_eps=1e-5))
        owner = cls.__name__
        for i, (d, h) in enumerate(zip(arch['embed_dims'], arch['num_heads'])):
            if arch['has_msa'][i] and d % h:
                raise ValueError(f'stage {i}: embed dims {d} not divisible by num_heads {h}')
        check_mlp_ratios(arch['embed_dims'], arch['mlp_ratios'], 'arch mlp_ratios', owner)
        for i, m in enumerate(arch['has_msa']):
            check_flag(m, f'arch has_msa[{i}]', owner)
        check_flag(arch['pos_embed'], 'arch pos_embed', owner)
        arch['norm_eps'] = check_ratio(arch['norm_eps'], 'arch norm_eps', owner)
        return arch

    # ----------------------------------------------------------------- forward
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_rounding == 'floor':
            x = check_floor_size(x, self.abs_pos_embed, self.num_stages)
        if self.size_rounding == 'ceil' or not self.abs_pos_embed:
            x = pad_to_multiple(x, 4)  # LIT-Ti's official stem floors instead
        return (self.patch_embed1 if self.abs_pos_embed else self.patch_embed)(x)

    def _forward_stages(self, x: torch.Tensor,
                        cls_token: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """Yield each stage's ``(B, H, W, C)`` output. With ``cls_token`` (LIT-Ti
        classifier), the last stage attends over ``[cls, tokens]`` and yields that
        ``(B, 1 + H*W, C)`` sequence instead."""
        if not self.abs_pos_embed:
            x = self.pos_drop(self._stem(x))
            for i, layer in enumerate(self.layers):
                if i:
                    x = self.layers[i - 1].downsample(x)
                for blk in layer.blocks:
                    x = self._run_block(blk, x)
                yield x
            return
        for k in range(1, self.num_stages + 1):
            x = self._stem(x) if k == 1 else getattr(self, f'patch_embed{k}')(x)
            pos = getattr(self, f'pos_embed{k}')
            if k == self.cls_stage:
                pos_cls, pos = pos[:, :1], pos[:, 1:]
            x = x + abs_pos_embed(pos, self.pretrain_grids[k - 1], x)
            if k == self.cls_stage and cls_token is not None:
                x = torch.cat([cls_token.expand(x.shape[0], -1, -1) + pos_cls,
                               x.flatten(1, 2)], 1)
            x = getattr(self, f'pos_drop{k}')(x)
            for blk in getattr(self, f'block{k}'):
                x = self._run_block(blk, x)
            yield x

    def _truncate_stages(self, n: int):
        if self.abs_pos_embed:
            for k in range(n + 1, self.num_stages + 1):
                for name in (f'patch_embed{k}', f'pos_embed{k}', f'pos_drop{k}', f'block{k}'):
                    delattr(self, name)
        else:
            self.layers = self.layers[:n]
            self.layers[n - 1].downsample = None
        self._keep_stage_attrs(n)

    # ------------------------------------------------------------------ freeze
    def _stem_modules(self) -> list:
        if self.abs_pos_embed:
            return [self.patch_embed1, self.pos_embed1]
        return [self.patch_embed]

    def _stage_modules(self, i: int) -> list:
        if self.abs_pos_embed:
            k = i + 1
            return [getattr(self, f'patch_embed{k}'), getattr(self, f'pos_embed{k}'),
                    getattr(self, f'block{k}')]
        mods = [self.layers[i].blocks]
        if i:
            mods.append(self.layers[i - 1].downsample)
        return mods

    # ------------------------------------------------------------------- init
    def _checkpoint_only_keys(self, state: dict, own: dict) -> set:
        """Official ``relative_position_index`` buffers: each attention with a table
        checks and drops its own (``LITAttention._load_from_state_dict``)."""
        suffix = 'relative_position_index'
        return {k for k in state if k.endswith('attn.' + suffix) and
                k[:-len(suffix)] + 'relative_position_bias_table' in own}

    def _adapt_state_dict(self, state: dict) -> dict:
        """Check and drop official ``relative_position_index`` buffers, resize
        position embeddings / relative position tables trained for another
        ``pretrain_img_size`` (the load-time resize of the module docstring)."""
        own = self.state_dict()
        state = dict(state)
        for key in [k for k in state if k.endswith('attn.relative_position_index')]:
            table = state.get(key[:-len('relative_position_index')] +
                              'relative_position_bias_table')
            check_rel_pos_index(key, state.pop(key), table)
        for key, value in state.items():
            if key not in own or own[key].shape == value.shape:
                continue
            target = own[key].shape
            if key.endswith('relative_position_bias_table') and value.dim() == 2 and \
                    value.shape[1] == target[1]:
                n = value.shape[0]
                s, t = (int(math.isqrt(n)) + 1) // 2, (int(math.isqrt(target[0])) + 1) // 2
                state[key] = resize_rel_pos_table(value, (s, s), (t, t))
            elif key.startswith('pos_embed') and value.dim() == 3:
                extra = int(key == f'pos_embed{self.num_stages}')
                s = int(math.isqrt(value.shape[1] - extra))
                t = int(math.isqrt(target[1] - extra))
                grid = value[:, extra:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(t, t), mode='bilinear', align_corners=False)
                state[key] = torch.cat([value[:, :extra],
                                        grid.permute(0, 2, 3, 1).reshape(1, t * t, -1)], 1)
        return state


class LITClassifier(ClassifierMixin, LIT):
    """ImageNet classifier (timm ``lit_ti`` / ``lit_s`` / ``lit_m`` / ``lit_b``): the
    LIT body plus ``norm`` and ``head``. LIT-S/M/B average-pool the final map
    (``forward_features`` returns NHWC maps). LIT-Ti, as the official code, adds a
    class token that joins the last stage: ``forward_features`` returns the normed
    ``(B, 1 + H*W/1024, C)`` sequence, class token first (``output_fmt='NLC'``, a
    non-standard model in timm's terms, like ViT); ``global_pool`` is ``'token'``
    (default), ``'avg'`` (the patch tokens) or ``''``. Pruning the last stage
    (``prune_intermediate_layers``) removes the class token with it."""
    default_arch = 's'
    default_drop_path_rate = 0.1

    def _init_classifier(self):
        self.cls_token = None
        if self.abs_pos_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims[-1]))
            trunc_normal_(self.cls_token, std=.02)
            self.output_fmt = 'NLC'
            self.pools = ('token', 'avg', '')

    def _default_pool(self) -> str:
        return 'token' if self.cls_token is not None else 'avg'

    def _feature_module(self, i: int) -> str:
        return f'block{i + 1}' if self.abs_pos_embed else f'layers.{i}'

    def _stage_kwargs(self) -> dict:
        return dict(cls_token=self.cls_token)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> final normed map ``(B, H/32, W/32, C)``, or for LIT-Ti the normed
        ``(B, 1 + H*W/1024, C)`` sequence, class token first."""
        check_image(x, self.in_channels, type(self).__name__)
        for feat in self._forward_stages(x, cls_token=self.cls_token):
            pass
        return self.norm(feat)

    def _to_nchw(self, feat: torch.Tensor, i: int, image: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None or i != self.cls_stage - 1:
            return super()._to_nchw(feat, i, image)
        # the class-token stage: its patch tokens, on the ceil(H / 32) x ceil(W / 32) grid
        s = 2 ** (i + 2)
        # ceil as (n + s - 1) // s, as in scalablevit.window_key_mask
        h, w = (image.shape[2] + s - 1) // s, (image.shape[3] + s - 1) // s
        return feat[:, 1:].reshape(feat.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return super()._pool(x)
        if self.global_pool == 'token':
            return x[:, 0]
        return x[:, 1:].mean(dim=1) if self.global_pool == 'avg' else x

    def _truncate_stages(self, n: int):
        super()._truncate_stages(n)
        if self.cls_token is not None and n < self.cls_stage:
            self.cls_token = None  # it joins the last stage, now removed
            self.output_fmt = 'NHWC'
            self.pools = ('avg', '')
            if self.global_pool == 'token':
                self.global_pool = 'avg'

    def no_weight_decay(self) -> set:
        """Position embeddings, class token (LIT-Ti) and relative position tables
        (LIT-S/M/B), as in the official code."""
        return {n for n, _ in self.named_parameters()
                if n.startswith(('pos_embed', 'cls_token')) or
                n.endswith('relative_position_bias_table')}

    def group_matcher(self, coarse: bool = False) -> dict:
        if self.abs_pos_embed:
            return dict(
                stem=r'^(?:cls_token|patch_embed1\.|pos_embed1$)',
                blocks=r'^(?:block|patch_embed|pos_embed)(\d+)' if coarse else [
                    (r'^block(\d+)\.(\d+)\.', None),
                    (r'^(?:patch_embed|pos_embed)(\d+)', (0,)),
                    (r'^norm\.', (99999,)),
                ])
        return dict(
            stem=r'^patch_embed\.',
            blocks=r'^layers\.(\d+)\.' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)\.', None),
                (r'^layers\.(\d+)\.downsample\.', (99998,)),
                (r'^norm\.', (99999,)),
            ])
