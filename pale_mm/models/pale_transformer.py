"""Pale Transformer backbone (arXiv 2112.14000), defined in ``docs/pale_transformer.md``.

One implementation serves mmdet/mmseg (``PaleTransformer``, a tuple of NCHW maps
at strides 4/8/16/32) and timm (``PaleClassifier``, final norm + pool + Linear).
Both share the modules and the parameter names of the body:

- ``patch_embeds.0``: stem, Conv 7x7/s4/p3 + LayerNorm.
- ``patch_embeds.{i}`` (i >= 1): merge, Conv 3x3/s2/p1 C -> 2C + LayerNorm.
- ``stages.{i}.{j}``: Pale blocks.
- ``norm{i}``: per-stage output LayerNorm of the dense-prediction backbone.
- ``norm``, ``head``: the classifier's final LayerNorm and Linear.
"""
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..ops import fast_path
from .arch import (SIZE_ALIASES, check_mlp_ratios, check_ratio, drop_path_rates,
                   parse_arch)
from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp, check_heads, check_pale_size
from .pale_attention import PSAttention
from .pyramid import PyramidBackbone

__all__ = ['PaleBlock', 'PaleTransformer', 'PaleClassifier']


class PaleBlock(nn.Module):
    """``x + CPE(x)``, then pre-norm PS-Attention and MLP with drop path.
    Input and output are ``(B, H, W, C)``."""

    def __init__(self, embed_dims: int, num_heads: int, pale_size=7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        self.cpe = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = PSAttention(embed_dims, num_heads, pale_size, qkv_bias=qkv_bias,
                                attn_drop_rate=attn_drop_rate, proj_drop_rate=drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fast_path(self, x)
        if fast is not None:
            return fast(x)
        B, H, W, C = x.shape
        x = x + self.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        attn = self.attn(self.norm1(x).reshape(B, H * W, C), (H, W))
        x = x + self.drop_path(attn.reshape(B, H, W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PaleTransformer(PyramidBackbone):
    """Pale Transformer backbone for mmdet / mmseg.

    Args:
        arch (str | dict): 'tiny', 'small' or 'base', or a dict with keys
            ``embed_dims`` (int, doubled per stage, or a list), ``depths`` and
            ``num_heads`` (lists, one entry per stage).
        pale_size (int | Sequence): pale size ``sr = sc``, one for all stages or one
            per stage (each an int or an ``(sr, sc)`` pair). Default 7.
        in_channels (int): image channels. Default 3.
        mlp_ratio (float): MLP hidden ratio, > 0. Default 4.
        qkv_bias (bool): bias in the Q/K/V pointwise projections. Default True.
        drop_rate, attn_drop_rate (float): dropout rates, in ``[0, 1)``. Default 0.
        drop_path_rate (float): stochastic depth, linearly increasing over all
            blocks to this rate, in ``[0, 1)``. Default 0.1.
        out_indices (Sequence[int]): stages whose normed output is returned.
        frozen_stages (int): -1 freezes nothing; 0 freezes the stem; ``k >= 1``
            also freezes stages ``0..k-1`` with their patch merges and output norms.
            Applied at construction and on every ``train()``.
        norm_eval (bool): keep BatchNorm layers in eval mode during training.
        with_cp (bool): gradient checkpointing per block.
        pretrained (str, deprecated): use ``init_cfg`` instead.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=...)``.
    """
    arch_zoo = {
        'tiny': dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 16, 2],
                     num_heads=[2, 4, 8, 16]),
        'small': dict(embed_dims=[96, 192, 384, 768], depths=[2, 2, 16, 2],
                      num_heads=[4, 8, 16, 32]),
        'base': dict(embed_dims=[128, 256, 512, 1024], depths=[2, 2, 16, 2],
                     num_heads=[4, 8, 16, 32]),
    }

    def __init__(self, arch='tiny', pale_size=7, in_channels: int = 3, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 pretrained=None, init_cfg=None):
        arch = self._parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        super().__init__(in_channels, len(self.depths), out_indices, frozen_stages, norm_eval,
                         with_cp, pretrained, init_cfg, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                         qkv_bias=qkv_bias)
        check_ratio(mlp_ratio, 'mlp_ratio', type(self).__name__)  # one for all stages
        check_mlp_ratios(self.embed_dims, mlp_ratio, 'mlp_ratio', type(self).__name__)
        self.pale_sizes = self._parse_pale_size(pale_size, self.num_stages)

        dpr = drop_path_rates(drop_path_rate, self.depths)
        self.patch_embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev, cursor = in_channels, 0
        for i, (dim, depth, heads) in enumerate(zip(self.embed_dims, self.depths,
                                                    self.num_heads)):
            if i == 0:
                self.patch_embeds.append(ConvPatchEmbed(prev, dim, 7, 4, 3, channels_last=True))
            else:
                self.patch_embeds.append(ConvPatchEmbed(prev, dim, 3, 2, 1, channels_last=True))
            self.stages.append(nn.ModuleList([
                PaleBlock(dim, heads, self.pale_sizes[i], mlp_ratio, qkv_bias, drop_rate,
                          attn_drop_rate, dpr[cursor + j]) for j in range(depth)]))
            prev, cursor = dim, cursor + depth
        self._finish_init()

    # ------------------------------------------------------------------ config
    @classmethod
    def _parse_arch(cls, arch) -> dict:
        """``arch`` (``'tiny'``/``'t'``, ``'small'``/``'s'``, ``'base'``/``'b'`` or a dict)
        as per-stage lists (:func:`~.arch.parse_arch`), heads checked per stage."""
        arch = parse_arch(arch, cls.arch_zoo, ('embed_dims', 'depths', 'num_heads'),
                          SIZE_ALIASES, owner=cls.__name__)
        for i, (d, h) in enumerate(zip(arch['embed_dims'], arch['num_heads'])):
            check_heads(d, h, where=f'stage {i}: ')
        return arch

    @staticmethod
    def _parse_pale_size(pale_size, num_stages: int) -> List[Tuple[int, int]]:
        if isinstance(pale_size, (list, tuple)) and len(pale_size) == num_stages and \
                not (num_stages == 2 and all(isinstance(p, int) for p in pale_size)):
            return [check_pale_size(p) for p in pale_size]
        if isinstance(pale_size, (list, tuple)) and len(pale_size) != 2:
            raise ValueError(f'pale_size must be an int, an (sr, sc) pair or one entry per '
                             f'stage ({num_stages}), got {pale_size!r}')
        return [check_pale_size(pale_size)] * num_stages

    # ----------------------------------------------------------------- forward
    def _forward_stages(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield each stage's output as ``(B, H, W, C)`` (before output norms)."""
        for i, (embed, blocks) in enumerate(zip(self.patch_embeds, self.stages)):
            x = embed(x if i == 0 else x.permute(0, 3, 1, 2))
            for blk in blocks:
                x = self._run_block(blk, x)
            yield x

    def _stem_modules(self) -> List[nn.Module]:
        return [self.patch_embeds[0]]

    def _stage_modules(self, i: int) -> List[nn.Module]:
        return [self.patch_embeds[i], self.stages[i]]


class PaleClassifier(ClassifierMixin, PaleTransformer):
    """ImageNet classifier (timm ``pale_tiny`` / ``pale_small`` / ``pale_base``): the
    backbone body plus final LayerNorm ``norm``, global average pool and ``head``
    (built by :class:`~.classifier.ClassifierMixin`)."""
    default_arch = 'tiny'
    default_drop_path_rate = 0.1
