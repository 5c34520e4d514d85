"""Register the classifiers with timm: ``timm.create_model('pale_tiny')`` etc.

Thin glue only: the models are ``pale_mm.models.*Classifier``. No weights ship
with this project, so ``pretrained_cfg`` carries no URL; point timm at a local
file with ``pretrained_cfg_overlay=dict(file=PATH)``.
"""
import warnings

with warnings.catch_warnings():
    # huggingface_hub, as resolved for timm, may warn about optional http backends.
    warnings.simplefilter('ignore')
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .models import PaleClassifier


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
})


def _create(cls, variant: str, arch: str, pretrained: bool = False, **kwargs):
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        cls, variant, pretrained, arch=arch,
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
