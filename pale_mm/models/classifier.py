"""Classification head shared by the backbones, in timm's model interface.

A classifier is ``class XClassifier(ClassifierMixin, XBackbone)`` with no
``__init__`` of its own: it inherits the body (and so its parameter names) from the
dense-prediction backbone, built by :meth:`ClassifierMixin.__init__` with
``out_indices=()``, which adds the final ``norm`` and ``head``. The backbone must
provide ``embed_dims`` (per stage), ``num_stages``, ``in_channels``,
``_forward_stages(x)`` yielding ``(B, H, W, C)`` maps and ``_truncate_stages(n)``
(keep the first ``n`` stages, for ``prune_intermediate_layers``).

timm's contract (``timm/tests/test_models.py``): ``device`` / ``dtype`` construction
arguments, ``in_chans``, ``output_fmt`` (``'NHWC'``: ``forward_features`` returns
channels-last maps, as timm's Swin), ``reset_classifier`` building the new head on
the model's device and dtype, ``set_grad_checkpointing``, ``no_weight_decay``,
``group_matcher``, ``forward_intermediates`` and a ``prune_intermediate_layers``
that removes the stages, norm and head it makes unused.
"""
from contextlib import nullcontext
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from .arch import check_positive_int, check_rate
from .layers import check_image

__all__ = ['ClassifierMixin']


def _device_dtype(module: nn.Module) -> dict:
    """``device`` / ``dtype`` of the module's first floating parameter (as timm's
    ``get_device_dtype``), for modules built after construction."""
    for p in module.parameters():
        if p.is_floating_point():
            return dict(device=p.device, dtype=p.dtype)
    return dict(device=None, dtype=None)


class ClassifierMixin:
    """timm classifier over a pale_mm backbone (see the module docstring).

    Subclasses set ``default_arch`` and ``default_drop_path_rate`` and may override
    ``_make_head`` / ``_pool`` / ``_init_classifier``.
    """
    default_arch: str = ''
    default_drop_path_rate: float = 0.1
    pools = ('avg', '')
    head_defaults: Dict[str, object] = {}  # head arguments (not the backbone's) and defaults
    # loading is torch's and timm's (strict, or not where timm drops a head on purpose),
    # not the dense backbone's whole-checkpoint check
    _check_loaded_state = False

    def __init__(self, arch=None, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: Optional[str] = None, drop_rate: float = 0.,
                 drop_path_rate: Optional[float] = None, device=None, dtype=None, **kwargs):
        """Args: ``arch`` (default ``default_arch``), ``num_classes`` (0: no head,
        ``forward`` returns pooled features), ``in_chans``, ``global_pool`` (``'avg'``
        or ``''``; default ``'avg'``), ``drop_rate`` (the dropout before the head only,
        as in timm's Swin), ``drop_path_rate`` (default ``default_drop_path_rate``),
        ``device`` / ``dtype`` (where and in which dtype to build, as timm's factory
        passes them), the head arguments named in ``head_defaults``; other keyword
        arguments go to the backbone (``qkv_bias``, ``attn_drop_rate``, ...). Weights
        come through timm (``pretrained=True``, ``pretrained_cfg_overlay``), so the
        backbone's ``init_cfg`` / ``pretrained`` are refused, as are ``in_channels`` and
        ``out_indices``."""
        name = type(self).__name__
        for key, use in (('in_channels', 'use in_chans'),
                         ('out_indices', 'a classifier has no out_indices; use '
                                         'features_only=True, out_indices=...'),
                         ('init_cfg', "load weights with timm.create_model(name, "
                                      "pretrained=True, pretrained_cfg_overlay=dict("
                                      "file='PATH'))"),
                         ('pretrained', "load weights with timm.create_model(name, "
                                        "pretrained=True, pretrained_cfg_overlay=dict("
                                        "file='PATH'))")):
            if key in kwargs:
                raise TypeError(f'{name} got an unexpected keyword argument {key!r} ({use})')
        check_positive_int(in_chans, 'in_chans', name)
        check_rate(drop_rate, 'drop_rate', name)
        if drop_path_rate is None:
            drop_path_rate = self.default_drop_path_rate
        self.head_cfg = {k: kwargs.pop(k, v) for k, v in self.head_defaults.items()}
        with torch.device(device) if device is not None else nullcontext():
            super().__init__(arch=self.default_arch if arch is None else arch,
                             in_channels=in_chans, drop_path_rate=drop_path_rate,
                             out_indices=(), **kwargs)
            self._init_classifier()
            self._build_head(num_classes, global_pool, drop_rate)
            self.apply(self._init_module)
        if dtype is not None:
            self.to(dtype=dtype)

    # ------------------------------------------------------------------- head
    def _init_classifier(self):
        """Hook for parameters the classifier adds to the body (LIT-Ti's class token)."""

    def _default_pool(self) -> str:
        return 'avg'

    def _check_pool(self, global_pool: str):
        if global_pool not in self.pools:
            raise ValueError(f'{type(self).__name__}: global_pool must be one of '
                             f'{list(self.pools)}, got {global_pool!r}')

    def _make_head(self, num_classes: int) -> nn.Module:
        """The classifier after pooling: ``Linear(num_features, num_classes)``, or
        ``Identity`` for ``num_classes=0``; built on the model's device and dtype."""
        if num_classes > 0:
            return nn.Linear(self.num_features, num_classes, **_device_dtype(self))
        return nn.Identity()

    def _check_num_classes(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'{type(self).__name__}: num_classes must be an int >= 0 '
                             f'(0: no head), got {num_classes!r}')

    def _build_head(self, num_classes: int, global_pool: Optional[str] = None,
                    drop_rate: float = 0.):
        self._check_num_classes(num_classes)
        global_pool = self._default_pool() if global_pool is None else global_pool
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = self.in_channels
        if not hasattr(self, 'output_fmt'):
            self.output_fmt = 'NHWC'
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=getattr(self, 'norm_eps', 1e-5),
                                 **_device_dtype(self))  # where the body is
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2 ** i, module=self._feature_module(i))
            for i, c in enumerate(self.embed_dims)]

    def _feature_module(self, i: int) -> str:
        return f'stages.{i}'

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New ``num_classes`` head (0: none) on the model's device and dtype, in the
        model's train/eval mode; ``global_pool=None`` keeps the pooling."""
        self._check_num_classes(num_classes)
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes).train(self.training)

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> final normed map ``(B, H/32, W/32, C)`` (NHWC)."""
        check_image(x, self.in_channels, type(self).__name__)
        for feat in self._forward_stages(x):
            pass
        return self.norm(feat)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2)) if self.global_pool == 'avg' else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self._pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _to_nchw(self, feat: torch.Tensor, i: int, image: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s output as an NCHW map."""
        return feat.permute(0, 3, 1, 2).contiguous()

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
            intermediates_only: bool = False
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: stage outputs as NCHW maps (``norm`` applies the final
        norm to the last stage, as timm's Swin does). The final output equals
        ``forward_features`` unless ``stop_early`` stops before the last stage (then
        it is that stage's output, without the final norm)."""
        from timm.models._features import feature_take_indices
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image(x, self.in_channels, type(self).__name__)
        take, max_index = feature_take_indices(self.num_stages, indices)
        last = self.num_stages - 1
        intermediates = []
        feat, i = x, -1
        for i, feat in enumerate(self._forward_stages(x, **self._stage_kwargs())):
            if i in take:
                inter = self.norm(feat) if norm and i == last else feat
                intermediates.append(self._to_nchw(inter, i, x))
            if stop_early and i >= max_index:
                break
        if intermediates_only:
            return intermediates
        return (self.norm(feat) if i == last else feat), intermediates

    def _stage_kwargs(self) -> dict:
        return {}

    # ------------------------------------------------------------------ prune
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True):
        """Keep only what ``forward_intermediates(indices)`` needs: stages after the
        last index, and then the final norm and the head, are removed (so no
        parameter is left without a gradient). ``prune_norm`` also removes the final
        norm, ``prune_head`` the head (``num_classes=0``, no pooling). Returns the
        indices to pass to ``forward_intermediates``."""
        from timm.models._features import feature_take_indices
        take, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        if prune_end:
            self._truncate_stages(max_index + 1)
            self.feature_info = self.feature_info[:max_index + 1]
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self._prune_head()
        return take

    def _prune_head(self):
        self.reset_classifier(0, '')

    # --------------------------------------------------------- training hooks
    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing per block (the backbone's ``with_cp``)."""
        self.with_cp = bool(enable)

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters to train without weight decay (position tables,
        embeddings, class tokens); biases and norms are excluded by timm anyway."""
        return set()

    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for layer-wise lr decay (timm's format), for the
        ``patch_embeds.{i}`` / ``stages.{i}.{j}`` layout (Pale, ScalableViT)."""
        return dict(
            stem=r'^patch_embeds\.0\.',
            blocks=r'^(?:stages|patch_embeds|pos_block)\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(\d+)\.', None),
                (r'^(?:patch_embeds|pos_block)\.(\d+)\.', (0,)),
                (r'^norm\.', (99999,)),
            ])
