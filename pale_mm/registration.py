"""Register the backbones in mmdet's and mmseg's MODELS registries.

Each registration is guarded: ``pale_mm`` imports with either library alone (or
neither). A library that is installed but fails to import is reported with a
warning naming the error, not silently skipped.
"""
import importlib
import warnings

from .models import LIT, PaleTransformer, ScalableViT

BACKBONES = (PaleTransformer, LIT, ScalableViT)
REGISTERED = {}


def _register(scope: str):
    try:
        registry = importlib.import_module(f'{scope}.registry')
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split('.')[0] == scope:
            return  # library not installed: nothing to register
        warnings.warn(f'pale_mm: {scope} is installed but could not be imported ({e}); '
                      f'backbones are not registered in {scope}')
        return
    except Exception as e:  # e.g. mmdet's assertion on the mmcv version
        warnings.warn(f'pale_mm: {scope} is installed but could not be imported '
                      f'({type(e).__name__}: {e}); backbones are not registered in {scope}')
        return
    for cls in BACKBONES:
        registry.MODELS.register_module(name=cls.__name__, module=cls, force=True)
    REGISTERED[scope] = registry.MODELS


for _scope in ('mmdet', 'mmseg'):
    _register(_scope)
