"""Classification head shared by the backbones, in timm's model interface.

A classifier is ``class XClassifier(ClassifierMixin, XBackbone)``: it inherits the
body (and so its parameter names) from the dense-prediction backbone, built with
``out_indices=()``, and adds the final ``norm`` and ``head``. The backbone must
provide ``embed_dims`` (per stage), ``num_stages``, ``in_channels`` and
``_forward_stages(x)`` yielding ``(B, H, W, C)`` maps.
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers import check_image

__all__ = ['ClassifierMixin']


class ClassifierMixin:

    def _build_head(self, num_classes: int, global_pool: str = 'avg', drop_rate: float = 0.):
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 \
            else nn.Identity()
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2 ** i, module=f'stages.{i}')
            for i, c in enumerate(self.embed_dims)]

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 \
            else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> final normed map ``(B, H/32, W/32, C)``."""
        check_image(x, self.in_channels, type(self).__name__)
        for feat in self._forward_stages(x):
            pass
        return self.norm(feat)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
            intermediates_only: bool = False
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: stage outputs as NCHW maps (``norm`` applies the
        final norm to the last stage, as timm's Swin does)."""
        from timm.models._features import feature_take_indices
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image(x, self.in_channels, type(self).__name__)
        take, max_index = feature_take_indices(self.num_stages, indices)
        intermediates = []
        for i, feat in enumerate(self._forward_stages(x)):
            if i in take:
                inter = self.norm(feat) if norm and i == self.num_stages - 1 else feat
                intermediates.append(inter.permute(0, 3, 1, 2).contiguous())
            if stop_early and i >= max_index:
                break
        if intermediates_only:
            return intermediates
        return self.norm(feat), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True):
        from timm.models._features import feature_take_indices
        take, _ = feature_take_indices(self.num_stages, indices)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take
