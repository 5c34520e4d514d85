#!/usr/bin/env python
"""Run timm's standard ``train.py`` with the pale_mm models registered.

timm's training script lives in its source repository, not in the pip package, and
it does not import pale_mm; this wrapper imports pale_mm (which registers
``pale_tiny``, ``pale_small``, ``pale_base``, ``lit_*`` and ``scalablevit_*``) and then
runs that script with the remaining arguments, unchanged:

    python tools/timm_train.py --timm-train /path/to/pytorch-image-models/train.py \\
        /data/imagenet --model pale_tiny ...   (see docs/pretraining.md)

``--timm-train`` may also come from the ``TIMM_TRAIN`` environment variable.
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.environ.get('TIMM_TRAIN')
    if '--timm-train' in argv:
        i = argv.index('--timm-train')
        if i + 1 >= len(argv):
            raise SystemExit('error: --timm-train needs the path of timm\'s train.py')
        script = argv[i + 1]
        del argv[i:i + 2]
    if not script:
        raise SystemExit('error: give the path of timm\'s train.py (from a checkout of '
                         'pytorch-image-models) with --timm-train PATH or TIMM_TRAIN=PATH')
    if not os.path.isfile(script):
        raise SystemExit(f'error: timm train script not found: {script}')
    import pale_mm  # noqa: F401  (registers the models with timm)
    sys.argv = [script] + argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
