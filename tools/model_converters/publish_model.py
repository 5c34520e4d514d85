#!/usr/bin/env python
"""Prepare a trained checkpoint for release (the OpenMMLab ``publish_model`` step).

    python tools/model_converters/publish_model.py work_dirs/x/epoch_12.pth mask-rcnn_pale-t.pth
    -> mask-rcnn_pale-t-<first 8 hex of sha256>.pth

Drops the optimizer, schedulers and message hub (training-only state), keeps
``state_dict`` and ``meta``, saves, and renames the file with its sha256 prefix.
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

TRAINING_ONLY = ('optimizer', 'param_schedulers', 'message_hub', 'scheduler', 'lr_scheduler',
                 'amp', 'scaler', 'args')


def publish(src: str, dst: str) -> str:
    import torch

    import pale_mm  # noqa: F401  (allow-lists the numpy values in Runner checkpoints)
    from pale_mm.models.checkpoint import load_state_dict_from_checkpoint
    load_state_dict_from_checkpoint(src)  # validates the file with clear errors
    ckpt = torch.load(src, map_location='cpu')
    if 'state_dict' not in ckpt:
        ckpt = {'state_dict': ckpt.get('model', ckpt)}
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY}
    removed = sorted(k for k in ckpt if k in TRAINING_ONLY)
    if isinstance(out.get('meta'), dict):
        out['meta'] = {k: v for k, v in out['meta'].items() if k != 'hook_msgs'}
    stem = dst[:-4] if dst.endswith('.pth') else dst
    tmp = stem + '.tmp.pth'
    torch.save(out, tmp)
    with open(tmp, 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    final = f'{stem}-{sha[:8]}.pth'
    os.replace(tmp, final)
    print(f'removed {removed or "nothing"}; wrote {final} (sha256 {sha})')
    return final


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src')
    ap.add_argument('dst')
    args = ap.parse_args(argv)
    from pale_mm.models.checkpoint import CheckpointError
    try:
        publish(args.src, args.dst)
    except (CheckpointError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main()
