"""Train a pale_mm config (mmdet or mmseg) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                 [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

The library (mmdet or mmseg) comes from the config's ``default_scope``. Beyond the
upstream tools this one moves every dataset path with ``--cfg-options data_root=X``,
turns SyncBN into BN when not distributed, uses gloo when distributed without CUDA,
and checks the data before building anything.
"""
import argparse
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing pale_mm
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train a detector or segmentor '
                                                 '(pale_mm, mmdet / mmseg configs)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint, or without a value from '
                             'the latest checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true', help='mixed-precision training')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings, key=value (data_root=PATH moves every '
                             'dataset and evaluator path)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_runner(args):
    from pale_mm.utils import check_data, load_tool_config

    cfg, _ = load_tool_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'OptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        elif wrapper != 'AmpOptimWrapper':
            raise SystemExit(f'error: --amp needs optim_wrapper type OptimWrapper, the '
                             f'config has {wrapper}')

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    check_data(cfg, splits=('train', 'val') if cfg.get('val_cfg') else ('train', ))

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def main(argv=None):
    args = parse_args(argv)
    from pale_mm.utils import DataCheckError
    try:
        runner = build_runner(args)
    except DataCheckError as e:
        sys.exit(f'error: {e}')
    runner.train()


if __name__ == '__main__':
    main()
