"""The bundled demo: generate a synthetic shapes dataset, then train and evaluate
Mask R-CNN (COCO format, CocoMetric) and UperNet (ADE20K layout, IoUMetric) with a
Pale backbone on the CPU, and print the metrics.

    python tools/run_demo.py [--data-root data/demo/shapes] [--work-dir work_dirs/demo]
                             [--task det seg] [--iters N]

Logs, checkpoints and drawn predictions go under the work dir
(``<work-dir>/<task>/<timestamp>/vis_data/vis_image/*.png``).
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HEADLINE = {'det': ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'),
            'seg': ('mIoU', 'mAcc', 'aAcc')}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-root', default=osp.join('data', 'demo', 'shapes'),
                   help='where the synthetic dataset is written (default: %(default)s)')
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'),
                   help='logs, checkpoints and pictures (default: %(default)s)')
    p.add_argument('--task', nargs='+', choices=['det', 'seg'], default=['det', 'seg'])
    p.add_argument('--iters', type=int, default=None,
                   help='training iterations (default: the configs\', 200 for det, 600 for seg)')
    p.add_argument('--num-train', type=int, default=200)
    p.add_argument('--num-val', type=int, default=50)
    p.add_argument('--seed', type=int, default=0, help='dataset seed')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pale_mm.demo import ensure_dataset
    from pale_mm.demo.run import train_and_evaluate

    t0 = time.time()
    info = ensure_dataset(args.data_root, args.num_train, args.num_val, seed=args.seed)
    print(f'[demo] dataset in {args.data_root}: {info["training"]["images"]} training / '
          f'{info["validation"]["images"]} validation images ({time.time() - t0:.1f}s)',
          flush=True)
    results = {}
    for task in args.task:
        options = {}
        if args.iters is not None:
            if args.iters < 1:
                raise SystemExit('error: --iters must be >= 1')
            options = {'train_cfg.max_iters': args.iters, 'train_cfg.val_interval': args.iters,
                       'default_hooks.checkpoint.interval': args.iters}
        print(f'[demo] training {task} ...', flush=True)
        res = train_and_evaluate(task, args.data_root, osp.join(args.work_dir, task), options)
        results[task] = res
    print('\n[demo] results (validation split)')
    for task, res in results.items():
        m = res['metrics']
        shown = ', '.join(f'{k} {m[k]:.3f}' for k in HEADLINE[task] if k in m)
        print(f'  {task}: {shown}  (trained in {res["train_seconds"]:.0f}s)')
        if res['vis_images']:
            print(f'       pictures of predictions: {osp.dirname(res["vis_images"][0])}')
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, 'demo_metrics.json'), 'w') as f:
        json.dump({t: dict(metrics=r['metrics'], train_seconds=r['train_seconds'],
                           log_dir=r['log_dir']) for t, r in results.items()}, f, indent=1)
    return results


if __name__ == '__main__':
    main()
