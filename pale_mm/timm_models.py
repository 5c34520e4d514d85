"""Register the classifiers with timm: ``timm.create_model('pale_tiny')`` etc.

Thin glue only: the models are ``pale_mm.models.*Classifier``.

Weights (``docs/weights.md``):

- LIT (``lit_ti``, ``lit_s``, ``lit_m``, ``lit_b``; tag ``in1k``): ``pretrained=True``
  downloads the official ImageNet-1K checkpoint, a release asset of github.com/ziplab/LIT
  (``releases/download/v1.0/lit_*.pth``), through timm's own loader (torch.hub's cache)
  and loads it strictly. The data config is the official evaluation's: 224x224, resize
  to 256 (``crop_pct`` 0.875) with bicubic interpolation, centre crop, ImageNet mean and
  std, 1000 classes.
- ScalableViT (``scalablevit_s/b/l``; tag ``in1k``): the official checkpoints are on
  Google Drive only, which timm cannot download; ``pretrained=True`` needs the file:
  ``pretrained_cfg_overlay=dict(file=PATH)``. Data config as the official evaluation.
- Pale: no weights were ever published; ``pretrained=True`` needs a file of your own.

Official checkpoints load as they are: the filter below unwraps them (``model`` /
``state_dict`` wrappers) and lets the model fit them (LIT's ``relative_position_index``
buffers are checked and dropped).
``lit_ti`` is a class-token model (``forward_features`` returns a token sequence),
a "non-standard" model in the terms of timm's tests, like ViT.
"""
import pickle
import warnings

with warnings.catch_warnings():
    # huggingface_hub, as resolved for timm, may warn about optional http backends.
    warnings.simplefilter('ignore')
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model,
                             resolve_pretrained_cfg)

from .models import LITClassifier, PaleClassifier, ScalableViTClassifier
from .models.checkpoint import (CheckpointError, allow_namespace_in_checkpoints,
                                unwrap_state_dict, weights_only_refusal)

# Official LIT ImageNet-1K weights: release v1.0 of github.com/ziplab/LIT (README
# "Image Classification on ImageNet"; the repository was MonashAI/LIT before).
LIT_RELEASE = 'https://github.com/ziplab/LIT/releases/download/v1.0/'
# Official ScalableViT ImageNet-1K weights (Yangr116/ScalableViT,
# image_classification/README.md): Google Drive file ids, not downloadable by timm.
SCALABLEVIT_DRIVE = {
    'scalablevit_s': '1gCWsATBJmW3xwJaoCcxGO1Wbg51cPtzk',
    'scalablevit_b': '16MVmK4BGQpRH3Wz2VCOVzhTh2PFUFozH',
    'scalablevit_l': '17LLK5PSssMpepxeAt6-uKSd4aaV99u5X',
}


def drive_url(file_id: str) -> str:
    return f'https://drive.google.com/file/d/{file_id}/view?usp=sharing'


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embeds.0.proj', 'classifier': 'head', 'license': 'apache-2.0',
        **kwargs,
    }


def _official_cfg(**kwargs):
    """The evaluation of the official LIT and ScalableViT code (both built on DeiT /
    Swin's ``build_transform``): resize the short side to ``int(256 / 224 * 224)`` =
    256 with bicubic interpolation, centre crop 224, ImageNet mean / std."""
    return _cfg(crop_pct=0.875, interpolation='bicubic', **kwargs)


def _lit_cfg(name: str, **kwargs):
    return _official_cfg(url=LIT_RELEASE + f'{name}.pth', paper_ids='arXiv:2105.14217',
                         origin_url='https://github.com/ziplab/LIT', **kwargs)


def _scalablevit_cfg(variant: str):
    # no license file in the official repository: the weights' license is unknown
    return _official_cfg(classifier='head.3', license=None, paper_ids='arXiv:2203.10790',
                         origin_url='https://github.com/Yangr116/ScalableViT',
                         notes=(f'official weights: {drive_url(SCALABLEVIT_DRIVE[variant])}; '
                                f'load with pretrained_cfg_overlay=dict(file=PATH)',))


default_cfgs = generate_default_cfgs({
    'pale_tiny': _cfg(),
    'pale_small': _cfg(),
    'pale_base': _cfg(),
    'lit_ti.in1k': _lit_cfg('lit_ti', first_conv='patch_embed1.proj'),
    'lit_s.in1k': _lit_cfg('lit_s', first_conv='patch_embed.proj'),
    'lit_m.in1k': _lit_cfg('lit_m', first_conv='patch_embed.proj'),
    'lit_b.in1k': _lit_cfg('lit_b', first_conv='patch_embed.proj'),
    'scalablevit_s.in1k': _scalablevit_cfg('scalablevit_s'),
    'scalablevit_b.in1k': _scalablevit_cfg('scalablevit_b'),
    'scalablevit_l.in1k': _scalablevit_cfg('scalablevit_l'),
})


def checkpoint_filter_fn(state_dict: dict, model) -> dict:
    """timm's ``pretrained_filter_fn``: the state dict inside an official or
    mmengine checkpoint (``model`` / ``state_dict`` wrappers, ``module.`` prefixes),
    adapted by the model (resized LIT tables, checked and dropped index buffers)."""
    return model._adapt_state_dict(unwrap_state_dict(state_dict))


def _check_weights_source(variant: str, kwargs: dict):
    """``pretrained=True`` for a model without downloadable weights: a ``RuntimeError``
    (the type timm raises) that says where the weights are and how to pass the file,
    before anything is built."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.has_weights or cfg.state_dict is not None:
        return
    how = "pretrained_cfg_overlay=dict(file='PATH')"
    if variant in SCALABLEVIT_DRIVE:
        where = (f'the official weights are on Google Drive only '
                 f'({drive_url(SCALABLEVIT_DRIVE[variant])}); download the file and pass '
                 f'it with {how}')
    else:
        where = (f'no Pale Transformer weights were ever published; pass a checkpoint of '
                 f'your own with {how}')
    raise RuntimeError(f'{variant}: pretrained=True, but there are no weights to download: '
                       f'{where}')


def _create(cls, variant: str, arch: str, pretrained: bool = False, **kwargs):
    if pretrained:
        _check_weights_source(variant, kwargs)
        # timm reads downloads with torch.load(weights_only=True); DeiT-style official
        # checkpoints (LIT-Ti, ScalableViT) keep their training args in a Namespace
        allow_namespace_in_checkpoints()
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    try:
        return build_model_with_cfg(
            cls, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)
    except pickle.UnpicklingError as e:
        refused = weights_only_refusal(e)
        if not pretrained or not refused:
            raise
        raise CheckpointError(
            f'{variant}: the pretrained checkpoint holds Python objects that '
            f'torch.load(weights_only=True) does not allow ({refused}). If you trust its '
            f'source, load it once with torch.load(path, weights_only=False) (a download is '
            f'in torch.hub.get_dir()/checkpoints), save its state dict (checkpoint["model"]) '
            f"and pass that file with pretrained_cfg_overlay=dict(file='PATH')") from None


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
