"""LIT, "Less is More: Pay Less Attention in Vision Transformers" (arXiv 2105.14217).

Stages 1-2 are MLP-only blocks (no token mixing), stages 3-4 global multi-head
self-attention. Between stages, deformable token merging (DTM): a 2x2/s2 DCNv1
(``torchvision.ops.deform_conv2d``; offsets from a zero-initialised conv) + BatchNorm
+ GELU. Odd maps are zero-padded to even size before a merge (so stage ``i`` has
``ceil(H / 2^(i+2))`` rows; identical to the official code on even sizes).

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
"""
import math
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_

from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp, check_image
from .pyramid import PyramidBackbone

__all__ = ['DeformConv2dPack', 'DeformableTokenMerging', 'LITAttention', 'LITBlock',
           'LITMLPBlock', 'LIT', 'LITClassifier']


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
        from torchvision.ops import deform_conv2d
        # torchvision's CPU kernel crashes (segfault) on NaN sampling positions: a NaN
        # input must give NaN outputs, not kill the process, so NaN offsets become 0.
        offset = torch.nan_to_num(self.conv_offset(x), nan=0.).to(x.dtype)
        return deform_conv2d(x, offset, self.weight, self.bias,
                             stride=self.stride, padding=self.padding)


class DeformableTokenMerging(nn.Module):
    """DTM: ``(B, H, W, C_in)`` -> 2x2/s2 deformable conv -> BN -> GELU ->
    ``(B, ceil(H/2), ceil(W/2), C_out)`` (odd sizes are zero-padded at the bottom and
    right first)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.dconv = DeformConv2dPack(in_channels, out_channels, 2, 2, 0)
        self.norm_layer = nn.BatchNorm2d(out_channels)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = x.permute(0, 3, 1, 2)
        if H % 2 or W % 2:
            x = F.pad(x, (0, W % 2, 0, H % 2))
        x = self.act_layer(self.norm_layer(self.dconv(x)))
        return x.permute(0, 2, 3, 1)


def relative_position_index(H: int, W: int, device=None) -> torch.Tensor:
    """``(H*W, H*W)`` index into a ``(2H-1) x (2W-1)`` table (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(H, device=device),
                                        torch.arange(W, device=device), indexing='ij'))
    coords = coords.flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + H - 1) * (2 * W - 1) + (rel[1] + W - 1)


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
        h, w = self.rel_pos_size
        table = self.relative_position_bias_table.t().reshape(1, self.num_heads,
                                                              2 * h - 1, 2 * w - 1)
        if (h, w) != (H, W):
            table = F.interpolate(table, size=(2 * H - 1, 2 * W - 1), mode='bicubic',
                                  align_corners=False)
        table = table.reshape(self.num_heads, -1)
        index = relative_position_index(H, W, table.device)
        return table[:, index.view(-1)].view(self.num_heads, H * W, H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        B, C = shape[0], shape[-1]
        x = x.reshape(B, -1, C)
        N = x.shape[1]
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = None
        if self.rel_pos_size is not None:
            if len(shape) != 4:
                raise ValueError('relative position bias needs a (B, H, W, C) map')
            bias = self.position_bias(shape[1], shape[2]).unsqueeze(0).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return x.view(shape)


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
            ``mlp_ratios`` (default 4), ``has_msa`` (per stage, default: the last two
            stages), ``pos_embed`` (PVT layout with absolute position embeddings,
            default False) and ``norm_eps``.
        in_channels (int): image channels. Default 3.
        pretrain_img_size (int): image size the position embeddings / relative
            position tables are sized for (and interpolated from). Default 224.
        qkv_bias (bool): bias in the QKV projection. Default True.
        drop_rate, attn_drop_rate (float): dropout rates. Default 0.
        drop_path_rate (float): stochastic depth over all blocks. Default 0.1.
        out_indices, frozen_stages, norm_eval, with_cp, pretrained, init_cfg: as for
            ``PaleTransformer``. ``frozen_stages=k`` freezes the stem and stages
            ``0..k-1`` with the merges (and position embeddings) in front of them.
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
                 pretrained=None, init_cfg=None):
        arch = self._parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        self.mlp_ratios: List[float] = arch['mlp_ratios']
        self.has_msa: List[bool] = arch['has_msa']
        super().__init__(in_channels, len(self.depths), out_indices, frozen_stages, norm_eval,
                         with_cp, pretrained, init_cfg)
        self.abs_pos_embed: bool = arch['pos_embed']
        self.norm_eps: float = arch['norm_eps']
        if isinstance(pretrain_img_size, bool) or not isinstance(pretrain_img_size, int) or \
                pretrain_img_size < 4:
            raise ValueError(f'pretrain_img_size must be an int >= 4, got {pretrain_img_size!r}')
        self.pretrain_img_size = pretrain_img_size
        grid = -(-pretrain_img_size // 4)
        self.pretrain_grids = []
        for i in range(self.num_stages):
            self.pretrain_grids.append(grid)
            grid = -(-grid // 2)

        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
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
        if self.abs_pos_embed:  # LIT-Ti, PVT layout
            for k in range(1, S + 1):
                dim = self.embed_dims[k - 1]
                if k == 1:
                    embed = ConvPatchEmbed(in_channels, dim, 4, 4, 0)
                else:
                    embed = DeformableTokenMerging(self.embed_dims[k - 2], dim)
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
                                                           self.embed_dims[i + 1])
                         if i < S - 1 else None) for i in range(S)])
        self._finish_init(self.norm_eps)

    # ------------------------------------------------------------------ config
    @classmethod
    def _parse_arch(cls, arch) -> dict:
        arch = cls._lookup_arch(arch, ('embed_dims', 'depths', 'num_heads'))
        unknown = set(arch) - {'embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'has_msa',
                               'pos_embed', 'norm_eps'}
        if unknown:
            raise ValueError(f'unknown arch keys {sorted(unknown)}')
        depths = list(arch['depths'])
        n = len(depths)

        def per_stage(value, name):
            value = [value] * n if not isinstance(value, (list, tuple)) else list(value)
            if len(value) != n:
                raise ValueError(f'arch {name} {value} must have one entry per stage ({n})')
            return value

        dims = arch['embed_dims']
        dims = [dims * 2 ** i for i in range(n)] if isinstance(dims, int) else list(dims)
        if not n or len(dims) != n:
            raise ValueError(f'arch embed_dims {dims}, depths {depths} and num_heads '
                             f'must have one entry per stage')
        heads = per_stage(arch['num_heads'], 'num_heads')
        mlp = per_stage(arch.get('mlp_ratios', 4.), 'mlp_ratios')
        msa = per_stage(arch.get('has_msa', [i >= n - 2 for i in range(n)]), 'has_msa')
        for i, (d, h) in enumerate(zip(dims, heads)):
            if msa[i] and (h < 1 or d % h):
                raise ValueError(f'stage {i}: embed dims {d} not divisible by num_heads {h}')
        return dict(embed_dims=dims, depths=depths, num_heads=heads, mlp_ratios=mlp,
                    has_msa=[bool(m) for m in msa], pos_embed=bool(arch.get('pos_embed', False)),
                    norm_eps=float(arch.get('norm_eps', 1e-5)))

    # ----------------------------------------------------------------- forward
    def _pos_embed(self, k: int, H: int, W: int) -> torch.Tensor:
        """``(1, H, W, C)`` absolute position embedding of stage ``k`` (1-based)."""
        pos = getattr(self, f'pos_embed{k}')
        if k == self.num_stages:
            pos = pos[:, 1:]
        g = self.pretrain_grids[k - 1]
        pos = pos.reshape(1, g, g, -1)
        if (g, g) != (H, W):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(H, W), mode='bilinear',
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        if H % 4 or W % 4:
            x = F.pad(x, (0, -W % 4, 0, -H % 4))
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
        S = self.num_stages
        for k in range(1, S + 1):
            x = self._stem(x) if k == 1 else getattr(self, f'patch_embed{k}')(x)
            B, H, W, C = x.shape
            x = x + self._pos_embed(k, H, W)
            if k == S and cls_token is not None:
                pos_cls = getattr(self, f'pos_embed{S}')[:, :1]
                x = torch.cat([cls_token.expand(B, -1, -1) + pos_cls, x.reshape(B, -1, C)], 1)
            x = getattr(self, f'pos_drop{k}')(x)
            for blk in getattr(self, f'block{k}'):
                x = self._run_block(blk, x)
            yield x

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
    def _adapt_state_dict(self, state: dict) -> dict:
        """Resize position embeddings / relative position tables trained for another
        ``pretrain_img_size``."""
        own = self.state_dict()
        state = dict(state)
        for key, value in state.items():
            if key not in own or own[key].shape == value.shape:
                continue
            target = own[key].shape
            if key.endswith('relative_position_bias_table') and value.dim() == 2 and \
                    value.shape[1] == target[1]:
                s, t = int(math.isqrt(value.shape[0])), int(math.isqrt(target[0]))
                table = value.t().reshape(1, -1, s, s)
                table = F.interpolate(table, size=(t, t), mode='bicubic', align_corners=False)
                state[key] = table.reshape(target[1], -1).t()
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
    LIT body plus ``norm`` and ``head`` (average-pooled for S/M/B; LIT-Ti classifies a
    class token that joins the last stage, as in the official code)."""

    def __init__(self, arch='s', num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0.1,
                 **kwargs):
        super().__init__(arch=arch, in_channels=in_chans, drop_path_rate=drop_path_rate,
                         out_indices=(), **kwargs)
        self._build_head(num_classes, global_pool, drop_rate)
        self.norm.eps = self.norm_eps
        if self.abs_pos_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims[-1]))
            trunc_normal_(self.cls_token, std=.02)
            if global_pool == 'avg':
                self.global_pool = 'token'
        self.apply(self._init_module)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> final normed map ``(B, H/32, W/32, C)``, or for LIT-Ti the normed
        ``(B, 1 + H*W/1024, C)`` sequence, class token first."""
        check_image(x, self.in_channels, type(self).__name__)
        cls = self.cls_token if self.global_pool == 'token' else None
        for feat in self._forward_stages(x, cls_token=cls):
            pass
        return self.norm(feat)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0] if x.dim() == 3 else x.mean(dim=(1, 2))
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits)
