"""Register the classifiers with timm: ``timm.create_model('pale_tiny')`` etc.

Thin glue only: the models are ``pale_mm.models.*Classifier``. No weights ship
with this project, so ``pretrained_cfg`` carries no URL; point timm at a local
file with ``pretrained_cfg_overlay=dict(file=PATH)`` (official LIT / ScalableViT
checkpoints load as they are: the filter below unwraps them and lets the model fit
them, e.g. LIT's ``relative_position_index`` buffers are checked and dropped).
``lit_ti`` is a class-token model (``forward_features`` returns a token sequence),
a "non-standard" model in the terms of timm's tests, like ViT.
"""
import warnings

with warnings.catch_warnings():
    # huggingface_hub, as resolved for timm, may warn about optional http backends.
    warnings.simplefilter('ignore')
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .models import LITClassifier, PaleClassifier, ScalableViTClassifier
from .models.checkpoint import unwrap_state_dict


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embeds.0.proj', 'classifier': 'head', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'pale_tiny': _cfg(),
    'pale_small': _cfg(),
    'pale_base': _cfg(),
    'lit_ti': _cfg(first_conv='patch_embed1.proj'),
    'lit_s': _cfg(first_conv='patch_embed.proj'),
    'lit_m': _cfg(first_conv='patch_embed.proj'),
    'lit_b': _cfg(first_conv='patch_embed.proj'),
    'scalablevit_s': _cfg(classifier='head.3'),
    'scalablevit_b': _cfg(classifier='head.3'),
    'scalablevit_l': _cfg(classifier='head.3'),
})


def checkpoint_filter_fn(state_dict: dict, model) -> dict:
    """timm's ``pretrained_filter_fn``: the state dict inside an official or
    mmengine checkpoint (``model`` / ``state_dict`` wrappers, ``module.`` prefixes),
    adapted by the model (resized LIT tables, checked and dropped index buffers)."""
    return model._adapt_state_dict(unwrap_state_dict(state_dict))


def _create(cls, variant: str, arch: str, pretrained: bool = False, **kwargs):
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        cls, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)


@register_model
def pale_tiny(pretrained: bool = False, **kwargs):
    """Pale-T: 22M params, 4.2G multiply-adds at 224."""
    return _create(PaleClassifier, 'pale_tiny', 'tiny', pretrained, **kwargs)


@register_model
def pale_small(pretrained: bool = False, **kwargs):
    """Pale-S: 48M params, 9.0G multiply-adds at 224."""
    return _create(PaleClassifier, 'pale_small', 'small', pretrained, **kwargs)


@register_model
def pale_base(pretrained: bool = False, **kwargs):
    """Pale-B: 85M params, 15.6G multiply-adds at 224."""
    return _create(PaleClassifier, 'pale_base', 'base', pretrained, **kwargs)


@register_model
def lit_ti(pretrained: bool = False, **kwargs):
    """LIT-Ti: 19M params, 3.6G multiply-adds at 224 (paper)."""
    return _create(LITClassifier, 'lit_ti', 'ti', pretrained, **kwargs)


@register_model
def lit_s(pretrained: bool = False, **kwargs):
    """LIT-S: 27M params, 4.1G multiply-adds at 224 (paper)."""
    return _create(LITClassifier, 'lit_s', 's', pretrained, **kwargs)


@register_model
def lit_m(pretrained: bool = False, **kwargs):
    """LIT-M: 48M params, 8.6G multiply-adds at 224 (paper)."""
    return _create(LITClassifier, 'lit_m', 'm', pretrained, **kwargs)


@register_model
def lit_b(pretrained: bool = False, **kwargs):
    """LIT-B: 86M params, 15.0G multiply-adds at 224 (paper)."""
    return _create(LITClassifier, 'lit_b', 'b', pretrained, **kwargs)


@register_model
def scalablevit_s(pretrained: bool = False, **kwargs):
    """ScalableViT-S: 32.4M params, 4.2G multiply-adds at 224 (paper)."""
    return _create(ScalableViTClassifier, 'scalablevit_s', 's', pretrained, **kwargs)


@register_model
def scalablevit_b(pretrained: bool = False, **kwargs):
    """ScalableViT-B: 81.9M params, 8.6G multiply-adds at 224 (paper)."""
    return _create(ScalableViTClassifier, 'scalablevit_b', 'b', pretrained, **kwargs)


@register_model
def scalablevit_l(pretrained: bool = False, **kwargs):
    """ScalableViT-L: 104.9M params, 14.7G multiply-adds at 224 (paper)."""
    return _create(ScalableViTClassifier, 'scalablevit_l', 'l', pretrained, **kwargs)
