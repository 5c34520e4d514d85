"""Evaluate a checkpoint of a pale_mm config (mmdet or mmseg) with mmengine's Runner.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm]
"""
import argparse
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Test (evaluate) a detector or '
                                                 'segmentor (pale_mm)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--show-dir', help='save drawn predictions under this folder '
                                           '(a relative path is taken inside the work dir)')
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

    cfg, scope = load_tool_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise SystemExit(f'error: checkpoint {args.checkpoint!r} does not exist')
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show_dir:
        hook = cfg.default_hooks.get('visualization', None)
        if hook is None:
            raise SystemExit('error: --show-dir needs default_hooks.visualization in the '
                             'config')
        hook.draw = True
        show_dir = osp.join(cfg.work_dir, args.show_dir)  # unchanged when absolute
        if scope == 'mmdet':
            hook.test_out_dir = show_dir
        else:
            hook.interval = 1
            cfg.visualizer.save_dir = show_dir
    check_data(cfg, splits=('test', ))

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
    return runner.test()


if __name__ == '__main__':
    main()
