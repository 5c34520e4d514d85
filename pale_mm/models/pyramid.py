"""Shared plumbing of the LIT and ScalableViT backbones, and checkpoint loading.

``PyramidBackbone`` holds what the dense-prediction backbones share with
``PaleTransformer``'s interface: the ``pretrained`` -> ``init_cfg`` shim, the checks
of the constructor arguments every family takes (``in_channels``, ``out_indices``,
``frozen_stages``, ``norm_eval``, ``with_cp``, ``init_cfg``, the dropout and drop path
rates, ``qkv_bias``; each error names the argument and the value), per-stage output
norms ``norm{i}`` (on every output, or on the stages ``out_norm_indices`` names),
``train()`` with frozen stages and ``norm_eval``, ``forward`` returning NCHW maps,
``init_weights`` that loads official checkpoints through ``init_cfg``, and the check
that a whole detector / segmentor checkpoint holds exactly the backbone's tensors
(:func:`~pale_mm.models.checkpoint.check_backbone_state`, run from
``_load_from_state_dict`` whenever mmengine or torch loads a state dict into it, except
the backbone's own ``load_state_dict(..., strict=False)``).

A subclass builds its modules, then calls ``self._finish_init()``; it provides
``_forward_stages(x)`` yielding ``(B, H, W, C)`` maps, ``_stem_modules()`` and
``_stage_modules(i)`` (the modules frozen with stage ``i``: its merge and blocks).

Checkpoint reading and loading live in ``checkpoint.py``.
"""
import numbers
import warnings
from typing import Iterator, List, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import graph_for_all_sizes
from .arch import check_flag, check_positive_int, check_rate
from .checkpoint import (allow_namespace_in_checkpoints, check_backbone_state,
                         load_pretrained, load_state_dict_from_checkpoint)
from .layers import check_image, checkpoint_block

__all__ = ['PyramidBackbone', 'allow_namespace_in_checkpoints',
           'load_state_dict_from_checkpoint', 'pad_to_multiple']


@torch.fx.wrap
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW map at the bottom and right to a multiple of ``multiple``
    (``x`` itself when it already is one, except in a traced or exported graph,
    which serves other sizes: :func:`~pale_mm.ops.graph_for_all_sizes`). A
    ``torch.fx`` leaf: the branch depends on the input size; a module calling it by
    name registers it with ``torch.fx.wrap`` too."""
    H, W = x.shape[-2:]
    if graph_for_all_sizes() or H % multiple or W % multiple:
        x = F.pad(x, (0, -W % multiple, 0, -H % multiple))
    return x


def _check_out_indices(out_indices, num_stages: int, owner: str,
                       name: str = 'out_indices') -> tuple:
    """``out_indices`` (an int or a sequence of ints, negative ones counted from the
    end) as a tuple of stage indices, increasing and without repeats: the outputs
    come in stage order, so any other order would not be the one asked for. ``name``
    is the argument's name in the errors."""
    given = out_indices

    def is_int(i):
        return isinstance(i, numbers.Integral) and not isinstance(i, bool)
    if is_int(out_indices):
        out_indices = [out_indices]
    if isinstance(out_indices, str) or not isinstance(out_indices, Sequence) or \
            not all(is_int(i) for i in out_indices):
        raise ValueError(f'{owner}: {name} must be an int or a sequence of ints, '
                         f'got {given!r}')
    out_indices = [int(i) + num_stages if i < 0 else int(i) for i in out_indices]
    for i in out_indices:
        if not 0 <= i < num_stages:
            raise ValueError(f'{name} {tuple(out_indices)} out of range for '
                             f'{num_stages} stages')
    if any(a >= b for a, b in zip(out_indices, out_indices[1:])):
        raise ValueError(f'{owner}: {name} must be increasing, without repeats (the '
                         f'outputs come in stage order), got {given!r}')
    return tuple(out_indices)


def _check_out_norm_indices(out_norm_indices, out_indices: tuple, num_stages: int,
                            owner: str) -> tuple:
    """The stages whose output gets a LayerNorm ``norm{i}``: all outputs (``None``), or
    a subset of ``out_indices`` (possibly empty), as :func:`_check_out_indices` reads
    it. A norm on a stage that is not an output would be a parameter without use."""
    if out_norm_indices is None:
        return out_indices
    norms = _check_out_indices(out_norm_indices, num_stages, owner, 'out_norm_indices')
    extra = [i for i in norms if i not in out_indices]
    if extra:
        raise ValueError(f'{owner}: out_norm_indices {out_norm_indices!r} names stages '
                         f'{extra} that are not outputs (out_indices {out_indices})')
    return norms


# the keys of a Pretrained init_cfg (what load_pretrained reads)
_PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location')


def _check_init_cfg(init_cfg, owner: str):
    """A ``dict(type='Pretrained', ...)`` init_cfg names a checkpoint (a path or URL
    string) and no key ``load_pretrained`` would ignore (a misspelt ``prefix``
    would otherwise load the wrong tensors, or none, at ``init_weights``)."""
    if not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained':
        return
    unknown = sorted(set(init_cfg) - set(_PRETRAINED_KEYS))
    if unknown:
        raise ValueError(f'{owner}: init_cfg {init_cfg!r} has unknown keys {unknown}; a '
                         f'Pretrained init_cfg takes {list(_PRETRAINED_KEYS)}')
    if not isinstance(init_cfg.get('checkpoint'), str) or not init_cfg['checkpoint']:
        raise ValueError(f"{owner}: init_cfg {init_cfg!r} needs checkpoint='path or URL'")


class PyramidBackbone(BaseModule):
    """Base of the LIT / ScalableViT dense-prediction backbones (see module doc)."""

    def __init__(self, in_channels: int, num_stages: int, out_indices: Sequence[int],
                 frozen_stages: int, norm_eval: bool, with_cp: bool, pretrained=None,
                 init_cfg=None, *, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., qkv_bias: bool = True, out_norm_indices=None):
        name = type(self).__name__
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a str (a checkpoint path or URL) or '
                                f'None, got {type(pretrained).__name__}')
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot be set at the same time')
            warnings.warn(f'{name}: pretrained is deprecated, use '
                          f'init_cfg=dict(type="Pretrained", checkpoint=...) instead',
                          DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        _check_init_cfg(init_cfg, name)
        super().__init__(init_cfg=init_cfg)
        self.in_channels = check_positive_int(in_channels, 'in_channels', name)
        self.num_stages = num_stages
        self.out_indices = _check_out_indices(out_indices, num_stages, name)
        self.out_norm_indices = _check_out_norm_indices(out_norm_indices, self.out_indices,
                                                        num_stages, name)
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or \
                not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be an int in [-1, {num_stages}], '
                             f'got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = check_flag(norm_eval, 'norm_eval', name)
        self.with_cp = check_flag(with_cp, 'with_cp', name)
        check_flag(qkv_bias, 'qkv_bias', name)
        for key, rate in (('drop_rate', drop_rate), ('attn_drop_rate', attn_drop_rate),
                          ('drop_path_rate', drop_path_rate)):
            check_rate(rate, key, name)

    # Stage-indexed ModuleLists, cut by ``_truncate_stages``.
    _stage_lists = ('patch_embeds', 'stages')

    def _truncate_stages(self, n: int):
        """Keep stages ``0..n-1`` only (``prune_intermediate_layers``): later stages,
        their merges and output norms are removed."""
        for name in self._stage_lists:
            setattr(self, name, getattr(self, name)[:n])
        self._keep_stage_attrs(n)

    def _keep_stage_attrs(self, n: int):
        for i in range(n, self.num_stages):
            if hasattr(self, f'norm{i}'):
                delattr(self, f'norm{i}')
        for name in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'has_msa', 'c_ratios',
                     'sr_ratios', 'window_sizes', 'pale_sizes'):
            if isinstance(getattr(self, name, None), list):
                setattr(self, name, getattr(self, name)[:n])
        self.num_stages = n
        self.out_indices = tuple(i for i in self.out_indices if i < n)
        self.out_norm_indices = tuple(i for i in self.out_norm_indices if i < n)
        self.frozen_stages = min(self.frozen_stages, n)

    def _finish_init(self, norm_eps: float = 1e-5):
        for i in self.out_norm_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.embed_dims[i], eps=norm_eps))
        self._freeze_stages()

    # ------------------------------------------------------------ to override
    def _stem_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def _stage_modules(self, i: int) -> List[nn.Module]:
        raise NotImplementedError

    def _forward_stages(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _adapt_state_dict(self, state: dict) -> dict:
        """Hook to fit an official state dict to this model (e.g. resize tables)."""
        return state

    def _checkpoint_only_keys(self, state: dict, own: dict) -> set:
        """Keys of ``state`` (a checkpoint's, without the backbone's prefix) that a
        submodule checks and drops on loading instead of loading them (``own``: the
        model's state dict)."""
        return set()

    # Loading a state dict into a backbone checks that it holds exactly the backbone's
    # tensors (check_backbone_state); a classifier's (timm) loading is torch's.
    _check_loaded_state = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, but ``strict=False`` here (on the backbone itself) loads a part on
        purpose, without :func:`check_backbone_state` (as ``load_pretrained`` does).
        A load through a parent (mmengine's ``load_checkpoint``, a detector's
        ``load_state_dict``) is always checked: both ask every module to load
        strictly and only then decide whether to warn."""
        self._partial_load = not strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._partial_load

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._check_loaded_state and not getattr(self, '_partial_load', False):
            check_backbone_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- forward
    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint_block(blk, x)
        return blk(x)

    def forward(self, x: torch.Tensor):
        check_image(x, self.in_channels, type(self).__name__)
        outs = []
        for i, feat in enumerate(self._forward_stages(x)):
            if i in self.out_norm_indices:
                feat = getattr(self, f'norm{i}')(feat)
            if i in self.out_indices:
                outs.append(feat.permute(0, 3, 1, 2).contiguous())
        return tuple(outs)

    # ------------------------------------------------------- train / freeze
    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = list(self._stem_modules())
        for i in range(self.frozen_stages):
            frozen += self._stage_modules(i)
            if i in self.out_norm_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for m in frozen:
            if isinstance(m, nn.Parameter):
                m.requires_grad = False
                continue
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------- init
    @staticmethod
    def _init_module(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0)

    def _default_init(self):
        self.apply(self._init_module)

    def init_weights(self):
        cfg = self.init_cfg
        if cfg is None:
            self._default_init()
            return
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self._default_init()
            load_pretrained(self, cfg)
            self._is_init = True
            return
        super().init_weights()
