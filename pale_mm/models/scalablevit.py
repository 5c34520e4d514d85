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

The forward is traceable with ``torch.fx``: the size-dependent padding and key mask
are functions wrapped with ``torch.fx.wrap``.
"""
import math
from typing import Iterator, List, Optional, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import graph_for_all_sizes
from .arch import (check_flag, check_mlp_ratios, check_positive_int, check_ratio,
                   drop_path_rates, parse_arch)
from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp
from .pyramid import PyramidBackbone, pad_to_multiple

torch.fx.wrap('pad_to_multiple')

__all__ = ['IWSA', 'SSA', 'ScalableViTBlock', 'PosCNN', 'ScalableViT',
           'ScalableViTClassifier', 'window_key_mask']


def window_key_mask(H: int, W: int, ws: int, device=None) -> torch.Tensor:
    """``(nW, ws*ws)`` bool, True for real (unpadded) tokens of the padded map's
    windows, in ``img2win`` order (windows row-major, tokens row-major)."""
    # ceil as (n + ws - 1) // ws: torch.onnx's default exporter (onnxscript 0.7.2) turns
    # -(-n // ws) into a division that truncates, which floors it
    Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
    valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
    valid[:H, :W] = True
    return valid.view(Hp // ws, ws, Wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)


@torch.fx.wrap
def pad_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right to multiples of ``ws``
    (``x`` itself when it already is one, except in a traced or exported graph:
    :func:`~pale_mm.ops.graph_for_all_sizes`; an FX leaf)."""
    H, W = x.shape[1], x.shape[2]
    if graph_for_all_sizes() or H % ws or W % ws:
        x = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))
    return x


@torch.fx.wrap
def padded_key_mask(x: torch.Tensor, ws: int) -> Optional[torch.Tensor]:
    """``(nW, 1, 1, ws*ws)`` mask of the real keys of the ``(B, H, W, C)`` map ``x``
    padded to window multiples, or None when no padding is needed (always the mask
    in a traced or exported graph: :func:`~pale_mm.ops.graph_for_all_sizes`; an FX
    leaf)."""
    H, W = x.shape[1], x.shape[2]
    if graph_for_all_sizes() or H % ws or W % ws:
        return window_key_mask(H, W, ws, x.device)[:, None, None, :]
    return None


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
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        ws, nh = self.ws, self.num_heads
        qkv = self.qkv(x)
        lim = self.lim_func(qkv[..., 2 * C:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        mask = padded_key_mask(x, ws)  # (windows, 1, 1, ws*ws) or None
        qkv = pad_windows(qkv, ws)
        Hp, Wp = qkv.shape[1], qkv.shape[2]
        hg, wg = Hp // ws, Wp // ws
        qkv = qkv.view(B, hg, ws, wg, ws, 3, nh, C // nh)
        # (B * windows, heads, ws*ws, head dim): 4-D, as ONNX's attention takes it
        q, k, v = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * hg * wg, nh, ws * ws,
                                                              C // nh)
        if mask is not None:
            mask = mask.repeat(B, 1, 1, 1)
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
        B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        nh, N = self.num_heads, H * W
        if self.sr_ratio > 1:
            y = pad_to_multiple(x.permute(0, 3, 1, 2), self.sr_ratio)
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
            per stage, or a list), ``depths``, ``num_heads``, ``c_ratios`` (> 0) and
            optionally ``sr_ratios`` (default 8, 4, 2, 1), ``window_sizes`` (default 7)
            and ``mlp_ratios`` (> 0, default 4).
        in_channels (int): image channels. Default 3.
        qkv_bias (bool): bias in the q/k/v projections. Default True.
        drop_rate, attn_drop_rate (float): dropout rates, in ``[0, 1)``. Default 0.
        drop_path_rate (float): stochastic depth over all blocks, in ``[0, 1)``.
            Default 0.2.
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
        arch = self.parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        self.c_ratios: List[float] = arch['c_ratios']
        self.sr_ratios: List[int] = arch['sr_ratios']
        self.window_sizes: List[int] = arch['window_sizes']
        self.mlp_ratios: List[float] = arch['mlp_ratios']
        super().__init__(in_channels, len(self.depths), out_indices, frozen_stages, norm_eval,
                         with_cp, pretrained, init_cfg, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                         qkv_bias=qkv_bias)
        dpr = drop_path_rates(drop_path_rate, self.depths)
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

    arch_aliases = {'small': 's', 'base': 'b', 'large': 'l'}
    _stage_lists = ('patch_embeds', 'pos_block', 'pos_drops', 'stages')

    @classmethod
    def parse_arch(cls, arch) -> dict:
        """``arch`` (a name, an alias such as ``'small'``, or a dict) as per-stage lists
        (see :func:`pale_mm.models.arch.parse_arch`)."""
        arch = parse_arch(
            arch, cls.arch_zoo, ('embed_dims', 'depths', 'num_heads', 'c_ratios'),
            cls.arch_aliases, owner=cls.__name__,
            defaults=dict(sr_ratios=lambda n: [2 ** (n - 1 - i) for i in range(n)],
                          window_sizes=7, mlp_ratios=4.))
        owner = cls.__name__
        dims, heads, c_ratios = arch['embed_dims'], arch['num_heads'], arch['c_ratios']
        sr, ws = arch['sr_ratios'], arch['window_sizes']
        check_mlp_ratios(dims, arch['mlp_ratios'], 'arch mlp_ratios', owner)
        for i in range(len(dims)):
            d, h = dims[i], heads[i]
            if d % h:
                raise ValueError(f'stage {i}: embed dims {d} not divisible by num_heads {h}')
            check_ratio(c_ratios[i], f'arch c_ratios[{i}]', owner)
            if isinstance(ws[i], bool) or not isinstance(ws[i], int) or ws[i] < 2:
                raise ValueError(f'stage {i}: window size must be an int >= 2, got {ws[i]!r}')
            if isinstance(sr[i], bool) or not isinstance(sr[i], int) or sr[i] < 1:
                raise ValueError(f'stage {i}: sr_ratio must be an int >= 1, got {sr[i]!r}')
            c_new = int(d * c_ratios[i])
            if sr[i] > 1 and (c_new < h or c_new % h):
                raise ValueError(f'stage {i}: scaled width int({d} * {c_ratios[i]}) = '
                                 f'{c_new} is not a positive multiple of num_heads {h}')
        return arch

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
    average pooling and the official MLP head (``plain_head=True``: one Linear).
    ``head_hidden_size`` is the MLP's width (4096; pre-logits features); pruning the
    head (``prune_intermediate_layers``) removes the whole MLP."""
    default_arch = 's'
    default_drop_path_rate = 0.2
    head_defaults = dict(plain_head=False, head_hidden=4096)

    def _make_head(self, num_classes: int) -> nn.Module:
        owner = type(self).__name__
        check_flag(self.head_cfg['plain_head'], 'plain_head', owner)
        check_positive_int(self.head_cfg['head_hidden'], 'head_hidden', owner)
        if self.head_cfg['plain_head']:
            return super()._make_head(num_classes)
        dd, hidden = dict(device=self.norm.weight.device, dtype=self.norm.weight.dtype), \
            self.head_cfg['head_hidden']
        self.head_hidden_size = hidden
        return nn.Sequential(
            nn.Linear(self.num_features, hidden, **dd),
            nn.LayerNorm(hidden, eps=self.norm_eps, **dd), nn.GELU(),
            nn.Linear(hidden, num_classes, **dd) if num_classes > 0 else nn.Identity())

    def reset_classifier(self, num_classes: int, global_pool=None):
        """A new last Linear of the MLP head (``head.3``), or a new plain head."""
        if self.head_cfg['plain_head']:
            return super().reset_classifier(num_classes, global_pool)
        self._check_num_classes(num_classes)
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = dict(device=self.head[0].weight.device, dtype=self.head[0].weight.dtype)
        self.head[3] = (nn.Linear(self.head_hidden_size, num_classes, **dd)
                        if num_classes > 0 else nn.Identity()).train(self.training)

    def _prune_head(self):
        self.head_cfg = dict(self.head_cfg, plain_head=True)
        self.head_hidden_size = self.num_features
        super()._prune_head()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_cfg['plain_head'] or not pre_logits:
            return super().forward_head(x, pre_logits)
        return self.head[:3](self.head_drop(self._pool(x)))

    def no_weight_decay(self) -> set:
        """The CPEs' depthwise convs (``pos_block``), as timm's Twins, whose PEG
        ScalableViT uses."""
        return {n for n, _ in self.named_parameters() if n.startswith('pos_block.')}
