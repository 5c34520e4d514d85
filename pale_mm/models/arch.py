"""One per-stage architecture parser for the backbones (Pale, LIT, ScalableViT).

``parse_arch`` turns ``arch`` (a zoo name, an alias of one, or a dict) into a dict of
per-stage lists: an int ``embed_dims`` doubles per stage (``64`` -> 64, 128, 256,
...), any other scalar is repeated per stage, a list must have one entry per stage
(``len(depths)``). Zoo names are looked up as mmpretrain does: exact, then through
``aliases`` (``'t'`` / ``'tiny'``, ``'s'`` / ``'small'``, ...), case-insensitively.
Model-specific checks (head divisibility, ...) stay with the model.
"""
import copy
from typing import Dict, Iterable, Mapping, Optional, Union

__all__ = ['parse_arch', 'drop_path_rates', 'SIZE_ALIASES']

# mmpretrain-style short and long names of the usual sizes.
SIZE_ALIASES = {
    't': 'tiny', 'ti': 'tiny', 'tiny': 'tiny', 's': 'small', 'small': 'small',
    'm': 'medium', 'medium': 'medium', 'b': 'base', 'base': 'base',
    'l': 'large', 'large': 'large',
}


def _lookup(name: str, zoo: Mapping, aliases: Mapping, owner: str) -> dict:
    names = {k.lower(): k for k in zoo}
    key = name.lower()
    if key in names:
        return zoo[names[key]]
    target = aliases.get(key)
    if target is not None and target.lower() in names:
        return zoo[names[target.lower()]]
    valid = sorted(set(zoo) | {a for a, t in aliases.items() if t.lower() in names})
    raise ValueError(f'unknown {owner} arch {name!r}; valid archs are {valid} or a dict')


def parse_arch(arch: Union[str, dict], zoo: Mapping[str, dict], required_keys: Iterable[str],
               aliases: Optional[Mapping[str, str]] = None, owner: str = 'model',
               defaults: Optional[Mapping[str, object]] = None,
               scalar_keys: Iterable[str] = (), doubling_keys: Iterable[str] = ('embed_dims',),
               stages_key: str = 'depths') -> Dict[str, object]:
    """``arch`` as a fresh dict of per-stage lists.

    Args:
        arch: a name in ``zoo`` (or an alias of one) or a dict.
        zoo: canonical name -> arch dict.
        required_keys: keys a dict arch must have.
        aliases: alias -> canonical zoo name (e.g. ``{'t': 'tiny'}``); an alias whose
            target is not in ``zoo`` is ignored.
        owner: the model's name, for error messages.
        defaults: optional keys and their defaults: a value (scalar or per-stage list)
            or a callable ``f(num_stages)`` returning one.
        scalar_keys: keys kept as they are (not per stage), e.g. ``norm_eps``.
        doubling_keys: keys whose int value doubles per stage (``embed_dims``).
        stages_key: the per-stage list that fixes the number of stages.

    Raises:
        TypeError: ``arch`` is neither a str nor a dict.
        ValueError: unknown name, missing or unknown keys, or a list whose length is
            not the number of stages; the message names the arch and the valid names.
    """
    required = list(required_keys)
    defaults = dict(defaults or {})
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}
    if isinstance(arch, str):
        arch = _lookup(arch, zoo, aliases, owner)
    elif not isinstance(arch, Mapping):
        raise TypeError(f'{owner} arch must be a str or a dict, got {type(arch).__name__}')
    arch = copy.deepcopy(dict(arch))
    keys = ', '.join(required)
    missing = [k for k in required if k not in arch]
    if missing:
        raise ValueError(f'{owner} arch dict is missing keys {missing}; it needs {keys}')
    unknown = sorted(set(arch) - set(required) - set(defaults))
    if unknown:
        raise ValueError(f'{owner}: unknown arch keys {unknown}; valid keys are '
                         f'{required + sorted(defaults)}')
    stages = arch[stages_key]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f'{owner} arch {stages_key} must be a non-empty list (one entry '
                         f'per stage), got {stages!r}')
    n = len(stages)
    scalar_keys, doubling_keys = set(scalar_keys), set(doubling_keys)
    out = {}
    for key in required + sorted(defaults):
        if key in arch:
            value = arch[key]
        else:
            value = defaults[key]
            value = value(n) if callable(value) else value
        if key in scalar_keys:
            out[key] = value
            continue
        if isinstance(value, (list, tuple)):
            value = list(value)
            if len(value) != n:
                raise ValueError(f'{owner} arch {key} {value} must have one entry per stage '
                                 f'({n}, as {stages_key} {list(stages)})')
        elif key in doubling_keys and isinstance(value, int) and not isinstance(value, bool):
            value = [value * 2 ** i for i in range(n)]
        else:
            value = [value] * n
        out[key] = value
    return out


def drop_path_rates(drop_path_rate: float, depths) -> list:
    """Stochastic depth per block, rising linearly from 0 to ``drop_path_rate`` over
    all ``sum(depths)`` blocks (computed on the CPU, so it also works while a model is
    built under ``torch.device('meta')``)."""
    import torch
    return torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
