#!/usr/bin/env python
"""Write a clean backbone-only checkpoint for ``init_cfg=dict(type='Pretrained', ...)``.

    python tools/model_converters/extract_backbone.py IN.pth OUT.pth [--prefix backbone.]

IN may be a timm classification checkpoint (raw, ``{'model': ...}``, ``{'state_dict':
...}``, ``module.`` prefixes, optimizer state and training args alongside) or a full
mmdet / mmseg checkpoint (the ``backbone.`` prefix is detected). OUT holds
``{'state_dict': backbone tensors, 'meta': {...}}``: the classifier ``head`` and
everything outside the backbone are dropped; the final ``norm`` of a classifier is
kept (the loader puts it into the last output norm). Prints what it kept.
"""
import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def extract(src: str, dst: str, prefix=None) -> dict:
    import torch

    from pale_mm.models.checkpoint import CheckpointError, load_state_dict_from_checkpoint
    state = load_state_dict_from_checkpoint(src)
    if prefix is None and any(k.startswith('backbone.') for k in state):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise CheckpointError(f'no keys of {src} start with {prefix!r}')
    else:
        kept = dict(state)
    dropped = sorted(k for k in kept if k == 'head' or k.startswith('head.'))
    for k in dropped:
        kept.pop(k)
    dropped += sorted(k for k in state if prefix and not k.startswith(prefix))
    torch.save({'state_dict': kept,
                'meta': dict(source=os.path.basename(src), prefix=prefix or '',
                             converter='pale_mm extract_backbone')}, dst)
    groups = Counter(k.split('.')[0] for k in kept)
    print(f'kept {len(kept)} tensors ({sum(v.numel() for v in kept.values()) / 1e6:.2f}M '
          f'values): ' + ', '.join(f'{g} x{n}' for g, n in sorted(groups.items())))
    drop_groups = Counter(k.split('.')[0] for k in dropped)
    print(f'dropped {len(dropped)} tensors: ' +
          (', '.join(f'{g} x{n}' for g, n in sorted(drop_groups.items())) or 'none'))
    print(f'wrote {dst}')
    return kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src')
    ap.add_argument('dst')
    ap.add_argument('--prefix', default=None,
                    help="keep only keys under this prefix (default: 'backbone.' when present)")
    args = ap.parse_args(argv)
    from pale_mm.models.checkpoint import CheckpointError
    try:
        extract(args.src, args.dst, args.prefix)
    except (CheckpointError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main()
