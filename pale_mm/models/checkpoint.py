"""Reading checkpoints and loading them into the backbones (``init_cfg``).

``torch.load`` runs with ``weights_only=True`` (the default of torch >= 2.6; for
``http(s)://`` URLs too, which mmengine would read with ``weights_only=False``); only
plain-data types are allow-listed: numpy values and mmengine's ``HistoryBuffer``
(``pale_mm.compat``, for Runner checkpoints) and ``argparse.Namespace``
(ScalableViT and DeiT-style checkpoints keep their training ``args`` in one).

``load_pretrained`` accepts a timm classification checkpoint (raw, ``{'model': ...}``,
``{'state_dict': ...}``, ``module.`` prefixes) or a full mmdet / mmseg checkpoint with
``prefix='backbone.'``. Every backbone tensor must come from the checkpoint except the
per-stage output norms ``norm{i}``; the classifier's final ``norm`` (a LayerNorm over
the last stage, the same place as the last output norm) is loaded into
``norm{last}`` when that output is used, and ``head.*`` is dropped. Shape mismatches
raise an error naming the key and both shapes.

``check_backbone_state`` is the other direction: a whole detector / segmentor
checkpoint (``load_from``, ``tools/test.py CONFIG CHECKPOINT``, an Inferencer's
weights) loaded into a model with one of these backbones. mmengine loads those with
``strict=False`` and only logs a warning for missing, unexpected or mismatched
tensors, which would leave a backbone tensor at its initial value and every output
wrong. The backbones' ``_load_from_state_dict`` calls it, so such a load stops with
an error that names the tensors instead; the backbone's own
``load_state_dict(..., strict=False)`` still loads a part on purpose.
"""
import argparse
import os
import pickle
import re
import urllib.error
from typing import Optional

import torch

__all__ = ['allow_namespace_in_checkpoints', 'unwrap_state_dict',
           'load_state_dict_from_checkpoint', 'load_pretrained', 'check_backbone_state',
           'CheckpointError']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def allow_namespace_in_checkpoints() -> bool:
    """Allow-list ``argparse.Namespace`` for ``torch.load(weights_only=True)``.

    A Namespace is a plain attribute bag; unpickling one runs no code beyond setting
    its ``__dict__``. Checked against torch's current allow-list on every call (not
    cached: a ``torch.serialization.safe_globals`` context, as timm's loader uses,
    can remove the entry when it exits). Returns False on torch without
    ``torch.serialization.add_safe_globals`` (torch < 2.4, where loading is not
    restricted anyway)."""
    from pale_mm.compat import ensure_safe_globals
    return ensure_safe_globals([argparse.Namespace])


def unwrap_state_dict(checkpoint, prefix: Optional[str] = None) -> dict:
    """The state dict inside a checkpoint: ``checkpoint['state_dict']``,
    ``checkpoint['model']`` (official LIT / ScalableViT releases), or the dict itself;
    a leading ``module.`` (DDP) is stripped and, with ``prefix``, only keys under it are
    kept, without it."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    state = checkpoint
    for key in ('state_dict', 'model', 'module'):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f'no keys start with prefix {prefix!r} in the checkpoint')
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))[:5]
        raise ValueError(f'checkpoint does not look like a state dict: non-tensor entries '
                         f'{bad}')
    return state


def weights_only_refusal(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its ``UnpicklingError``
    (its line ``Unsupported global: GLOBAL module.Name ...``, up to the name); ``''``
    when the error is not a ``weights_only`` refusal."""
    text = str(error)
    if 'weights_only' not in text and 'Weights only' not in text:
        return ''
    for line in text.splitlines():
        if 'Unsupported global' in line:
            return line.strip().split(' was not ')[0].replace('WeightsUnpickler error: ', '')
    return text.splitlines()[0]


def load_from_url(url: str, map_location='cpu'):
    """An ``http(s)://`` checkpoint through torch.hub's cache (``<hub dir>/checkpoints``,
    where timm keeps its downloads too), read with ``weights_only=True``: mmengine's
    own URL loader reads downloads with ``weights_only=False``. As mmengine's, rank 0
    downloads first while the other ranks wait, then they read the cached file."""
    from mmengine.dist import barrier, get_dist_info
    from torch.hub import load_state_dict_from_url
    rank, world_size = get_dist_info()
    checkpoint = None
    if rank == 0:
        checkpoint = load_state_dict_from_url(url, map_location=map_location,
                                              weights_only=True)
    if world_size > 1:
        barrier()
        if rank > 0:
            checkpoint = load_state_dict_from_url(url, map_location=map_location,
                                                  weights_only=True)
    return checkpoint


def load_state_dict_from_checkpoint(filename: str, map_location='cpu',
                                    prefix: Optional[str] = None) -> dict:
    """Read ``filename`` (a path, an ``http(s)://`` URL: :func:`load_from_url`, or
    another of mmengine's schemes) safely and return the unwrapped state dict.
    Unreadable files raise a clear error."""
    from mmengine.runner.checkpoint import _load_checkpoint

    from pale_mm.compat import allow_numpy_in_checkpoints
    allow_namespace_in_checkpoints()
    allow_numpy_in_checkpoints()
    if not isinstance(filename, str):
        raise TypeError(f'checkpoint must be a path or URL string, got '
                        f'{type(filename).__name__}')
    is_url = '://' in filename
    if not is_url and not os.path.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    try:
        if filename.startswith(('http://', 'https://')):
            checkpoint = load_from_url(filename, map_location)
        else:
            checkpoint = _load_checkpoint(filename, map_location=map_location)
    except pickle.UnpicklingError as e:
        msg = weights_only_refusal(e)
        if msg:
            raise CheckpointError(
                f'checkpoint {filename} holds Python objects that are not allowed under '
                f'torch.load(weights_only=True) ({msg}). pale_mm allows plain data only '
                f'(tensors, numpy values, argparse.Namespace); re-save the state dict, or '
                f'load it yourself with weights_only=False if you trust its source.') from None
        raise CheckpointError(f'cannot read checkpoint {filename}: not a PyTorch checkpoint '
                              f'({str(e).splitlines()[0]})') from None
    except FileNotFoundError:
        raise
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = f'HTTP {e.code} {e.reason}' if isinstance(e, urllib.error.HTTPError) else \
            getattr(e, 'reason', None) or e
        raise CheckpointError(f'cannot download checkpoint {filename} ({reason}); download '
                              f'it yourself and set checkpoint to the local file') from None
    except Exception as e:  # torch raises many types for a bad file (even IndexError)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'cannot read checkpoint {filename}: the file is truncated, '
                              f'corrupt or not a PyTorch checkpoint ({msg})') from None
    try:
        return unwrap_state_dict(checkpoint, prefix)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'checkpoint {filename}: {e}') from None


def load_pretrained(model, cfg: dict, logger='current') -> dict:
    """Load ``cfg['checkpoint']`` into ``model`` (a pale_mm backbone) as described in
    the module docstring; log a short summary and return it."""
    from mmengine.logging import print_log
    name = type(model).__name__
    filename = cfg['checkpoint']
    state = load_state_dict_from_checkpoint(filename, cfg.get('map_location', 'cpu'),
                                            cfg.get('prefix'))
    state = model._adapt_state_dict(state)
    own = model.state_dict()
    last = model.num_stages - 1
    out_norms = {f'norm{i}' for i in range(model.num_stages)}
    dropped = sorted(k for k in state if k.startswith('head.') or k == 'head')
    state = {k: v for k, v in state.items() if k not in dropped}
    if f'norm{last}.weight' in own and f'norm{last}.weight' not in state:
        for p in ('weight', 'bias'):
            if f'norm.{p}' in state and state[f'norm.{p}'].shape == own[f'norm{last}.{p}'].shape:
                state[f'norm{last}.{p}'] = state.pop(f'norm.{p}')
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in state if k in own and state[k].shape != own[k].shape]
    shared = len(state) - len(unexpected)
    if not shared:
        prefixes = sorted({k.split('.')[0] + '.' for k in unexpected})[:6]
        hint = " (it looks like a full detector/segmentor checkpoint: set prefix='backbone.')" \
            if 'backbone.' in prefixes else ''
        raise CheckpointError(f'{name}: no tensor of checkpoint {filename} matches the model; '
                              f'its keys start with {prefixes}{hint}')
    if len(mismatched) > 1:
        k, a, b = mismatched[0]
        raise CheckpointError(
            f'{name}: checkpoint {filename} is for a different architecture: '
            f'{len(mismatched)} of {shared} tensors differ in shape, e.g. {k}: checkpoint '
            f'{a} vs model {b}')
    if mismatched:
        k, a, b = mismatched[0]
        raise CheckpointError(f'{name}: size mismatch for {k}: checkpoint {a} vs model {b} '
                              f'(checkpoint {filename})')
    required = [k for k in missing if k.split('.')[0] not in out_norms
                and not k.endswith('num_batches_tracked')]
    if required:
        raise CheckpointError(
            f'{name}: checkpoint {filename} lacks {len(required)} backbone tensors, e.g. '
            f'{required[:5]}; only the output norms norm0..norm{last} may be missing')
    # not strict (so not check_backbone_state): the output norms may stay at their
    # initial values
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    summary = dict(loaded=shared, missing=missing, unexpected=unexpected + dropped)
    print_log(f'{name}: loaded {shared} tensors from {filename}'
              f'{" (prefix " + repr(cfg.get("prefix")) + ")" if cfg.get("prefix") else ""}; '
              f'missing, kept at init: {missing or "none"}; '
              f'unexpected, ignored: {summary["unexpected"] or "none"}', logger=logger)
    return summary


def _list(keys, n=8) -> str:
    keys = sorted(keys)
    return f'{keys[:n]}' + (f' and {len(keys) - n} more' if len(keys) > n else '')


def check_backbone_state(model, state_dict: dict, prefix: str = ''):
    """Check that the tensors of ``state_dict`` under ``prefix`` (e.g. ``'backbone.'``
    in a detector's checkpoint) are exactly ``model``'s, with its shapes: no tensor
    missing (BatchNorm's ``num_batches_tracked`` excepted), none unexpected (except
    what ``model._checkpoint_only_keys`` names, such as LIT's official
    ``relative_position_index`` buffers), no shape different. Otherwise raise a
    :class:`CheckpointError` that names them and, where it can tell, the setting that
    makes the model fit (``out_norm_indices``, ``pretrain_img_size``)."""
    name = type(model).__name__
    own = model.state_dict()
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not given:
        tops = sorted({k.split('.')[0] + '.' for k in state_dict})[:8]
        raise CheckpointError(
            f'{name}: the checkpoint holds none of the backbone\'s {len(own)} tensors '
            f'(expected keys starting with {prefix!r}; its keys start with {tops}), so '
            f'the backbone would keep its initial weights')
    extra = model._checkpoint_only_keys(given, own)
    missing = [k for k in own if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in own and k not in extra]
    mismatched = [f'{prefix}{k}: checkpoint {tuple(given[k].shape)} vs model '
                  f'{tuple(own[k].shape)}' for k in given
                  if k in own and given[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f'missing from the checkpoint (they would keep their initial '
                        f'values): {_list(prefix + k for k in missing)}')
    if unexpected:
        problems.append(f'in the checkpoint but not in the model: '
                        f'{_list(prefix + k for k in unexpected)}')
    if mismatched:
        problems.append(f'shapes differ: {_list(mismatched, 4)}')
    hints = []
    norms = sorted({int(m.group(1)) for m in map(re.compile(r'norm(\d+)\.').match, given)
                    if m})
    if 'head.weight' in given or 'norm.weight' in given:
        hints.append("it looks like a classifier's state dict: load it with the backbone's "
                     "init_cfg=dict(type='Pretrained', checkpoint=...), which starts the "
                     "output norms at their initial values")
    elif norms != list(model.out_norm_indices):
        hints.append(f'the checkpoint has output norms on stages {tuple(norms)}, the model '
                     f'on {tuple(model.out_norm_indices)}: set out_norm_indices='
                     f'{tuple(norms)} in the backbone (the official LIT detection code has '
                     f'no norm0, LIT-Ti no output norms: configs/lit/README.md)')
    if any(k.split(':')[0].endswith(('relative_position_bias_table', 'pos_embed1'))
           for k in mismatched) and hasattr(model, 'pretrain_img_size'):
        hints.append(f'position tables differ in size: the model sizes them for '
                     f'pretrain_img_size={model.pretrain_img_size}; set the size the '
                     f'checkpoint was trained with (official LIT: 800 for detection, '
                     f'512 for segmentation)')
    raise CheckpointError(
        f'{name}: the checkpoint does not fit the backbone, whose outputs would be '
        f'wrong: ' + '; '.join(problems) + ''.join(f'. Hint: {h}' for h in hints))
