"""One per-stage architecture parser for the backbones (Pale, LIT, ScalableViT).

``parse_arch`` turns ``arch`` (a zoo name, an alias of one, or a dict) into a dict of
per-stage lists: an int ``embed_dims`` doubles per stage (``64`` -> 64, 128, 256,
...), any other scalar is repeated per stage, a list must have one entry per stage
(``len(depths)``). Zoo names are looked up as mmpretrain does: exact, then through
``aliases`` (``'t'`` / ``'tiny'``, ``'s'`` / ``'small'``, ...), case-insensitively.
The per-stage sizes (``embed_dims``, ``depths``, ``num_heads`` by default) must be
ints >= 1. Model-specific checks (head divisibility, ...) stay with the model.

The checks of the constructor arguments the backbones and classifiers share are here
too, one of each, so every family names a bad value the same way:
:func:`check_rate` (dropout and drop path rates, in ``[0, 1)``), :func:`check_ratio`
(a number > 0), :func:`check_positive_int`, :func:`check_flag` (a real bool) and
:func:`check_mlp_ratios` (an MLP ratio that leaves every stage hidden units). Each
error names the model, the argument and the value.
"""
import copy
import numbers
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

__all__ = ['parse_arch', 'drop_path_rates', 'SIZE_ALIASES', 'check_rate', 'check_ratio',
           'check_positive_int', 'check_flag', 'check_mlp_ratios']

# mmpretrain-style short and long names of the usual sizes.
SIZE_ALIASES = {
    't': 'tiny', 'ti': 'tiny', 'tiny': 'tiny', 's': 'small', 'small': 'small',
    'm': 'medium', 'medium': 'medium', 'b': 'base', 'base': 'base',
    'l': 'large', 'large': 'large',
}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rate(value, name: str, owner: str) -> float:
    """``value`` as a float in ``[0, 1)`` (a dropout or drop path rate: 1 would drop
    everything); ``TypeError`` for a non-number, ``ValueError`` outside the range."""
    if not _is_real(value):
        raise TypeError(f'{owner}: {name} must be a number in [0, 1), got {value!r}')
    if not 0 <= value < 1:  # NaN fails too
        raise ValueError(f'{owner}: {name} must be in [0, 1), got {value!r}')
    return float(value)


def check_ratio(value, name: str, owner: str) -> float:
    """``value`` as a float > 0 (a width ratio, an epsilon)."""
    if not _is_real(value):
        raise TypeError(f'{owner}: {name} must be a number > 0, got {value!r}')
    if not 0 < value < float('inf'):  # NaN fails too
        raise ValueError(f'{owner}: {name} must be a finite number > 0, got {value!r}')
    return float(value)


def check_positive_int(value, name: str, owner: str) -> int:
    """``value``, an int >= 1 (not a bool, not a float)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{owner}: {name} must be an int >= 1, got {value!r}')
    return int(value)


def check_flag(value, name: str, owner: str) -> bool:
    """``value``, a bool (``'False'`` or ``0`` are not taken for one)."""
    if not isinstance(value, bool):
        raise TypeError(f'{owner}: {name} must be True or False, got {value!r}')
    return value


def check_mlp_ratios(embed_dims: Sequence[int], ratios, name: str, owner: str):
    """An MLP ratio, one number for every stage or a list with one per stage: each a
    number > 0 that gives its stage's MLP at least one hidden unit
    (``int(embed_dims[i] * ratio) >= 1``). ``name`` is the argument as the user wrote
    it (``'mlp_ratio'``, ``'arch mlp_ratios'``); list entries are named ``name[i]``."""
    per_stage = isinstance(ratios, (list, tuple))
    if per_stage and len(ratios) != len(embed_dims):
        raise ValueError(f'{owner}: {name} {list(ratios)} must have one entry per stage '
                         f'({len(embed_dims)})')
    for i, dims in enumerate(embed_dims):
        ratio, where = (ratios[i], f'{name}[{i}]') if per_stage else (ratios, name)
        check_ratio(ratio, where, owner)
        if int(dims * ratio) < 1:
            raise ValueError(f'{owner}: {where}={ratio!r} gives stage {i} ({dims} channels) '
                             f'an MLP with int({dims} * {ratio!r}) = 0 hidden units')


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
               stages_key: str = 'depths',
               positive_int_keys: Iterable[str] = ('embed_dims', 'depths', 'num_heads')
               ) -> Dict[str, object]:
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
        positive_int_keys: per-stage keys whose entries must be ints >= 1.

    Raises:
        TypeError: ``arch`` is neither a str nor a dict.
        ValueError: unknown name, missing or unknown keys, a list whose length is
            not the number of stages, or a size that is not an int >= 1; the message
            names the arch and the valid names or the stage and the value.
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
    for key in positive_int_keys:
        for i, v in enumerate(out.get(key, ())):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f'{owner} arch {key} {out[key]}: stage {i} has {v!r}; '
                                 f'each entry must be an int >= 1')
    return out


def drop_path_rates(drop_path_rate: float, depths) -> list:
    """Stochastic depth per block, rising linearly from 0 to ``drop_path_rate`` over
    all ``sum(depths)`` blocks (computed on the CPU, so it also works while a model is
    built under ``torch.device('meta')``). ``drop_path_rate`` is checked by the
    backbone (:func:`check_rate`)."""
    import torch
    return torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
