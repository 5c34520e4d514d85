"""Model code: one backbone per file, plus shared layers. Framework registration
lives outside this package (``pale_mm.registration``, ``pale_mm.timm_models``)."""
from .classifier import ClassifierMixin
from .layers import ConvPatchEmbed, DropPath, Mlp
from .pale_attention import PSAttention, pale_attention
from .pale_transformer import PaleBlock, PaleClassifier, PaleTransformer
from .lit import LIT, LITClassifier
from .checkpoint import load_pretrained
from .pyramid import (PyramidBackbone, allow_namespace_in_checkpoints,
                      load_state_dict_from_checkpoint)
from .scalablevit import ScalableViT, ScalableViTClassifier

__all__ = ['pale_attention', 'PSAttention', 'PaleBlock', 'PaleTransformer', 'PaleClassifier',
           'ClassifierMixin', 'ConvPatchEmbed', 'DropPath', 'Mlp', 'LIT', 'LITClassifier',
           'ScalableViT', 'ScalableViTClassifier', 'PyramidBackbone',
           'allow_namespace_in_checkpoints', 'load_state_dict_from_checkpoint', 'load_pretrained']
