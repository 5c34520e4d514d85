"""ScalableViT (arXiv 2203.10790, ECCV 2022).

Each stage alternates IWSA (blocks 0, 2, ...: window attention in ``ws x ws`` windows
plus the local interactive module, a depthwise 3x3 conv over V added to the attention
output) and SSA (blocks 1, 3, ...: attention whose keys/values come from a spatially
reduced map, ``sr x sr`` depthwise conv + 1x1 conv to ``rc * C`` channels + LN + GELU,
with query/key width scaled by ``rc``). A CPE (depthwise 3x3, residual) follows the
first block of each stage. Patch embeddings: Conv 7x7/s4/p3 and Conv 3x3/s2/p1, each
with LayerNorm; H and W are those of the conv outputs.

Sizes that are not multiples of the window: IWSA pads q/k/v (zeros) to a window
multiple, masks the padded keys and crops; the LIM conv sees the unpadded V map.
SSA zero-pads its reduction input to a multiple of ``sr`` (no change at 224).

Parameter names are the official ones (``patch_embeds.{k}.{proj,norm}``,
``pos_block.{k}.proj.0``, ``stages.{k}.{i}.{norm1,attn.*,norm2,mlp.*}``, ``norm``,
``head``), so official checkpoints (``{'model': ..., 'args': Namespace}``) load via
``init_cfg``. The classifier's head is the official MLP head
``Linear(C, 4096) -> LayerNorm -> GELU -> Linear(4096, classes)`` (``head.0/1/3``).
"""
import math
from typing import Iterator, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp
from .pyramid import PyramidBackbone

__all__ = ['IWSA', 'SSA', 'ScalableViTBlock', 'PosCNN', 'ScalableViT',
           'ScalableViTClassifier', 'window_key_mask']


def window_key_mask(H: int, W: int, ws: int, device=None) -> torch.Tensor:
    """``(nW, ws*ws)`` bool, True for real (unpadded) tokens of the padded map's
    windows, in ``img2win`` order (windows row-major, tokens row-major)."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
    valid[:H, :W] = True
    return valid.view(Hp // ws, ws, Wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)


class IWSA(nn.Module):
    """Interactive window-based self-attention on ``(B, H, W, C)`` maps."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., ws: int = 7):
        super().__init__()
        if ws < 2:
            raise ValueError(f'IWSA window size must be >= 2, got {ws}')
        self.num_heads, self.ws = num_heads, ws
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.lim_func = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, nh = self.ws, self.num_heads
        qkv = self.qkv(x)
        lim = self.lim_func(qkv[..., 2 * C:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        mask = None
        if (Hp, Wp) != (H, W):
            qkv = F.pad(qkv, (0, 0, 0, Wp - W, 0, Hp - H))
            mask = window_key_mask(H, W, ws, x.device)[:, None, None, :]  # nW,1,1,N
        hg, wg = Hp // ws, Wp // ws
        qkv = qkv.view(B, hg, ws, wg, ws, 3, nh, C // nh)
        q, k, v = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, hg * wg, nh, ws * ws,
                                                              C // nh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.)
        out = out.view(B, hg, wg, nh, ws, ws, C // nh).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.proj_drop(self.proj(out + lim))


class SSA(nn.Module):
    """Scalable self-attention on ``(B, H, W, C)`` maps (``sr_ratio`` spatial
    reduction of keys/values, ``c_ratio`` query/key width scaling)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., sr_ratio: int = 1, c_ratio: float = 1.25):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.c_new = int(dim * c_ratio)
        self.scale = (dim // num_heads * c_ratio) ** -0.5  # as the official code
        if sr_ratio > 1:
            self.q = nn.Linear(dim, self.c_new, bias=qkv_bias)
            self.reduction = nn.Sequential(
                nn.Conv2d(dim, dim, sr_ratio, sr_ratio, groups=dim),
                nn.Conv2d(dim, self.c_new, 1))
            self.norm_act = nn.Sequential(nn.LayerNorm(self.c_new), nn.GELU())
            self.k = nn.Linear(self.c_new, self.c_new, bias=qkv_bias)
            self.v = nn.Linear(self.c_new, dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, N = self.num_heads, H * W
        if self.sr_ratio > 1:
            r = self.sr_ratio
            y = x.permute(0, 3, 1, 2)
            if H % r or W % r:
                y = F.pad(y, (0, -W % r, 0, -H % r))
            y = self.norm_act(self.reduction(y).flatten(2).transpose(1, 2))
            q = self.q(x).view(B, N, nh, -1).transpose(1, 2)
            k = self.k(y).view(B, -1, nh, self.c_new // nh).transpose(1, 2)
            v = self.v(y).view(B, -1, nh, C // nh).transpose(1, 2)
        else:
            q = self.q(x).view(B, N, nh, -1).transpose(1, 2)
            k, v = self.kv(x).view(B, N, 2, nh, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, H, W, C)))


class ScalableViTBlock(nn.Module):
    """Pre-norm IWSA (``ws > 1``) or SSA (``ws == 1``) and MLP on ``(B, H, W, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 c_ratio: float = 1.25, sr_ratio: int = 1, ws: int = 1, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if ws == 1:
            self.attn = SSA(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio, c_ratio)
        else:
            self.attn = IWSA(dim, num_heads, qkv_bias, attn_drop, drop, ws)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PosCNN(nn.Module):
    """CPE / PEG: ``x + DWConv3x3(x)`` on ``(B, H, W, C)`` (official ``proj.0``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ScalableViT(PyramidBackbone):
    """ScalableViT backbone for mmdet / mmseg: a tuple of NCHW maps at strides
    4/8/16/32.

    Args:
        arch (str | dict): 's', 'b' or 'l', or a dict with ``embed_dims`` (int, doubled
            per stage, or a list), ``depths``, ``num_heads``, ``c_ratios`` and optionally
            ``sr_ratios`` (default 8, 4, 2, 1), ``window_sizes`` (default 7) and
            ``mlp_ratios`` (default 4).
        in_channels (int): image channels. Default 3.
        qkv_bias (bool): bias in the q/k/v projections. Default True.
        drop_rate, attn_drop_rate (float): dropout rates. Default 0.
        drop_path_rate (float): stochastic depth over all blocks. Default 0.2.
        out_indices, frozen_stages, norm_eval, with_cp, pretrained, init_cfg: as for
            ``PaleTransformer``; ``frozen_stages=k`` freezes the stem and stages
            ``0..k-1`` with their patch embeddings and CPEs.
    """
    arch_zoo = {
        's': dict(embed_dims=64, depths=[2, 2, 20, 2], num_heads=[2, 4, 8, 16],
                  c_ratios=[1.25, 1.25, 1.25, 1]),
        'b': dict(embed_dims=96, depths=[2, 2, 14, 6], num_heads=[3, 6, 12, 24],
                  c_ratios=[2, 1.25, 1.25, 1]),
        'l': dict(embed_dims=128, depths=[2, 6, 12, 4], num_heads=[4, 8, 16, 32],
                  c_ratios=[0.25, 0.5, 1, 1]),
    }
    norm_eps = 1e-6

    def __init__(self, arch='s', in_channels: int = 3, qkv_bias: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.2,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, pretrained=None,
                 init_cfg=None):
        arch = self._parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        self.c_ratios: List[float] = arch['c_ratios']
        self.sr_ratios: List[int] = arch['sr_ratios']
        self.window_sizes: List[int] = arch['window_sizes']
        self.mlp_ratios: List[float] = arch['mlp_ratios']
        super().__init__(in_channels, len(self.depths), out_indices, frozen_stages, norm_eval,
                         with_cp, pretrained, init_cfg)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.patch_embeds = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        self.pos_drops = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev, cursor = in_channels, 0
        for k, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
            embed = ConvPatchEmbed(prev, dim, 7, 4, 3) if k == 0 else \
                ConvPatchEmbed(prev, dim, 3, 2, 1)
            embed.norm.eps = self.norm_eps
            self.patch_embeds.append(embed)
            self.pos_block.append(PosCNN(dim))
            self.pos_drops.append(nn.Dropout(drop_rate))
            self.stages.append(nn.ModuleList([
                ScalableViTBlock(dim, self.num_heads[k], self.mlp_ratios[k], qkv_bias,
                                 drop_rate, attn_drop_rate, dpr[cursor + i], self.c_ratios[k],
                                 self.sr_ratios[k], 1 if i % 2 else self.window_sizes[k],
                                 self.norm_eps)
                for i in range(depth)]))
            prev, cursor = dim, cursor + depth
        self._finish_init(self.norm_eps)

    @classmethod
    def _parse_arch(cls, arch) -> dict:
        arch = cls._lookup_arch(arch, ('embed_dims', 'depths', 'num_heads', 'c_ratios'))
        unknown = set(arch) - {'embed_dims', 'depths', 'num_heads', 'c_ratios', 'sr_ratios',
                               'window_sizes', 'mlp_ratios'}
        if unknown:
            raise ValueError(f'unknown arch keys {sorted(unknown)}')
        depths = list(arch['depths'])
        n = len(depths)
        if not n:
            raise ValueError('arch depths must have one entry per stage')

        def per_stage(value, name):
            value = [value] * n if not isinstance(value, (list, tuple)) else list(value)
            if len(value) != n:
                raise ValueError(f'arch {name} {value} must have one entry per stage ({n})')
            return value

        dims = arch['embed_dims']
        dims = [dims * 2 ** i for i in range(n)] if isinstance(dims, int) else \
            per_stage(dims, 'embed_dims')
        heads = per_stage(arch['num_heads'], 'num_heads')
        c_ratios = per_stage(arch['c_ratios'], 'c_ratios')
        sr = per_stage(arch.get('sr_ratios', [2 ** (n - 1 - i) for i in range(n)]),
                       'sr_ratios')
        ws = per_stage(arch.get('window_sizes', 7), 'window_sizes')
        mlp = per_stage(arch.get('mlp_ratios', 4.), 'mlp_ratios')
        for i in range(n):
            d, h = dims[i], heads[i]
            if h < 1 or d % h:
                raise ValueError(f'stage {i}: embed dims {d} not divisible by num_heads {h}')
            if sr[i] > 1 and int(d * c_ratios[i]) % h:
                raise ValueError(f'stage {i}: scaled width int({d} * {c_ratios[i]}) = '
                                 f'{int(d * c_ratios[i])} not divisible by num_heads {h}')
            if isinstance(ws[i], bool) or not isinstance(ws[i], int) or ws[i] < 2:
                raise ValueError(f'stage {i}: window size must be an int >= 2, got {ws[i]!r}')
            if isinstance(sr[i], bool) or not isinstance(sr[i], int) or sr[i] < 1:
                raise ValueError(f'stage {i}: sr_ratio must be an int >= 1, got {sr[i]!r}')
        return dict(embed_dims=dims, depths=depths, num_heads=heads, c_ratios=c_ratios,
                    sr_ratios=sr, window_sizes=ws, mlp_ratios=mlp)

    def _forward_stages(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for k, (embed, blocks) in enumerate(zip(self.patch_embeds, self.stages)):
            x = self.pos_drops[k](embed(x if k == 0 else x.permute(0, 3, 1, 2)))
            for i, blk in enumerate(blocks):
                x = self._run_block(blk, x)
                if i == 0:
                    x = self.pos_block[k](x)
            yield x

    def _stem_modules(self) -> list:
        return [self.patch_embeds[0]]

    def _stage_modules(self, i: int) -> list:
        return [self.patch_embeds[i], self.pos_block[i], self.stages[i]]

    @staticmethod
    def _init_module(m: nn.Module):
        PyramidBackbone._init_module(m)
        if isinstance(m, nn.Conv2d):  # as the official code
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()


class ScalableViTClassifier(ClassifierMixin, ScalableViT):
    """ImageNet classifier (timm ``scalablevit_s`` / ``_b`` / ``_l``): the body, ``norm``,
    average pooling and the official MLP head (``plain_head=True``: one Linear)."""

    def __init__(self, arch='s', num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0.2,
                 plain_head: bool = False, head_hidden: int = 4096, **kwargs):
        super().__init__(arch=arch, in_channels=in_chans, drop_path_rate=drop_path_rate,
                         out_indices=(), **kwargs)
        self._build_head(num_classes, global_pool, drop_rate)
        self.norm.eps = self.norm_eps
        self.plain_head = plain_head
        if not plain_head:
            self.head_hidden_size = head_hidden
            self.head = nn.Sequential(
                nn.Linear(self.num_features, head_hidden),
                nn.LayerNorm(head_hidden, eps=self.norm_eps), nn.GELU(),
                nn.Linear(head_hidden, num_classes) if num_classes > 0 else nn.Identity())
        self.apply(self._init_module)

    def reset_classifier(self, num_classes: int, global_pool=None):
        if self.plain_head:
            return super().reset_classifier(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head[3] = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 \
            else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.plain_head or not pre_logits:
            return super().forward_head(x, pre_logits)
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        return self.head[:3](self.head_drop(x))
