#!/usr/bin/env python
"""What a GPU user runs, end to end, on one CUDA device (run by
``tools/analysis/gpu_check.sh ... build ops demo detector``, whose ``build`` part
builds mmcv's CUDA ops there first):

    python tools/analysis/gpu_e2e.py ops demo detector --out DIR
    python tools/analysis/gpu_e2e.py table --out DIR      # DIR/table-e2e.md
    python tools/analysis/gpu_e2e.py demo detector --smoke --out DIR   # CPU dry run

Parts (each writes ``DIR/<part>.json``):

- ``ops``: mmcv's compiled ops on CUDA tensors against mmcv's CPU ops on the same
  inputs: ``roi_align`` forward and backward, ``nms`` and ``batched_nms`` (1,000
  random boxes, four classes).
- ``demo``: the README's demo configs (narrowed Pale-T, Mask R-CNN for 200 and UperNet
  for 600 iterations on the bundled shapes data) trained with ``tools/train.py --amp``
  as a user would (mmengine's AmpOptimWrapper: float16 autocast, dynamic loss scale),
  evaluated at the end with CocoMetric / IoUMetric: the metrics against the demo's
  floors (``pale_mm.demo.DEMO_FLOORS``, the CPU tests' bar), whether the loss fell,
  the median time per iteration and the peak GPU memory.
- ``detector``: whole Mask R-CNN training steps (the COCO recipe's heads, batch 2 at
  800x1216, bf16 AMP) with the full Pale-T (``configs/pale/mask-rcnn_pale-t_fpn_1x_coco.py``)
  and with mmdet's Swin-T (``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``), each
  through ``tools/train.py`` on the shapes data resized to 800x1216: the median time
  per iteration after warm-up, the Pale-T/Swin-T throughput ratio and the peak memory.

The times come from mmengine's own log (``vis_data/scalars.json``: ``time`` is the
mean over the logger's window, ``memory`` the peak since the previous log line).
"""
import argparse
import glob
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEMO_DATA = osp.join(ROOT, 'data', 'demo', 'shapes') + '/'
DETECTORS = {
    'pale-t': osp.join(ROOT, 'configs', 'pale', 'mask-rcnn_pale-t_fpn_1x_coco.py'),
    'swin-t': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
}
SMOKE = {'on': False}


# ------------------------------------------------------------------------------- ops
def ops(args):
    """mmcv's CUDA ops against its CPU ops on the same inputs."""
    import torch
    from mmcv.ops import batched_nms, nms, roi_align
    dev = torch.device('cpu' if SMOKE['on'] else 'cuda')
    g = torch.Generator().manual_seed(0)
    n = 1000
    xy = torch.rand(n, 2, generator=g) * 600
    wh = torch.rand(n, 2, generator=g) * 120 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 4, (n, ), generator=g)
    out = {}
    _, keep_c = nms(boxes, scores, 0.5)
    _, keep_g = nms(boxes.to(dev), scores.to(dev), 0.5)
    out['nms'] = dict(kept=len(keep_c), equal=keep_g.cpu().tolist() == keep_c.tolist())
    cfg = dict(type='nms', iou_threshold=0.5)
    det_c, keep_c = batched_nms(boxes, scores, labels, cfg)
    det_g, keep_g = batched_nms(boxes.to(dev), scores.to(dev), labels.to(dev), cfg)
    out['batched_nms'] = dict(kept=len(keep_c), equal=keep_g.cpu().tolist() == keep_c.tolist(),
                              max_abs_diff=float((det_g.cpu() - det_c).abs().max()))
    feats = torch.randn(2, 16, 64, 80, generator=g)
    rois = torch.cat([torch.randint(0, 2, (64, 1), generator=g).float(),
                      boxes[:64] / 8], 1)
    res = {}
    for name, d in (('cpu', torch.device('cpu')), ('cuda', dev)):
        x = feats.to(d).requires_grad_()
        y = roi_align(x, rois.to(d), (7, 7), 1.0, 2, 'avg', True)
        y.backward(torch.ones_like(y))
        res[name] = (y.detach().cpu(), x.grad.cpu())
    (yc, gc), (yg, gg) = res['cpu'], res['cuda']
    out['roi_align'] = dict(forward_max_abs_diff=float((yg - yc).abs().max()),
                            backward_max_abs_diff=float((gg - gc).abs().max()),
                            forward_scale=float(yc.abs().max()),
                            backward_scale=float(gc.abs().max()))
    # float32 sums of a few bilinear samples; the backward's atomic adds reorder them
    out['ok'] = bool(out['nms']['equal'] and out['batched_nms']['equal']
                     and out['roi_align']['forward_max_abs_diff'] <= 1e-5 * max(
                         1., out['roi_align']['forward_scale'])
                     and out['roi_align']['backward_max_abs_diff'] <= 1e-4 * max(
                         1., out['roi_align']['backward_scale']))
    print(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------- train runs
def _demo_data():
    """The demo's shapes dataset (generated as tools/run_demo.py does, once)."""
    from pale_mm.demo import ensure_dataset
    ensure_dataset(DEMO_DATA)
    return DEMO_DATA


def _train(config, work_dir, options, amp=True):
    """``tools/train.py CONFIG --work-dir W [--amp] --cfg-options ...`` in a new
    process, as a user runs it; returns the process' exit status and seconds."""
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', work_dir]
    if amp:
        cmd.append('--amp')
    if options:
        cmd += ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]
    t0 = time.time()
    with open(work_dir + '.log', 'w') as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def _scalars(work_dir):
    """mmengine's json log of the newest run in ``work_dir``: (train lines, val lines)."""
    logs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not logs:
        return [], []
    train, val = [], []
    with open(logs[-1]) as f:
        for line in f:
            rec = json.loads(line)
            (train if 'loss' in rec else val).append(rec)
    return train, val


def _summary(train, skip):
    """Median seconds per iteration over the log lines after the first ``skip``
    (warm-up, cudnn autotuning), peak memory (MB), first and last loss."""
    lines = train[skip:] or train
    out = dict(iters=train[-1]['iter'] if train else 0,
               sec_per_iter=statistics.median(r['time'] for r in lines) if lines else None,
               loss_first=train[0]['loss'] if train else None,
               loss_last=train[-1]['loss'] if train else None)
    mem = [r['memory'] for r in train if 'memory' in r]
    out['peak_mem_mb'] = max(mem) if mem else None
    return out


DEMO_RUNS = {
    'det': 'mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py',
    'seg': 'upernet_pale-t-demo_600i_shapes-128.py',
}


def demo(args):
    """The demo configs through ``tools/train.py --amp`` on the GPU, evaluated."""
    from pale_mm.demo import DEMO_FLOORS
    data_root = _demo_data()
    results = {}
    for task, name in DEMO_RUNS.items():
        work = osp.join(osp.abspath(args.out), f'demo-{task}')
        options = {'data_root': data_root}
        if SMOKE['on']:
            options.update({'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4,
                            'default_hooks.logger.interval': 1,
                            'default_hooks.checkpoint.interval': 4})
        rc, secs = _train(osp.join(ROOT, 'configs', 'demo', name), work, options,
                          amp=not SMOKE['on'])
        train, val = _scalars(work)
        res = dict(exit=rc, seconds=secs, **_summary(train, skip=2))
        key, floor, _gain = DEMO_FLOORS[task]
        metrics = {k: v for k, v in (val[-1] if val else {}).items()
                   if k not in ('step', 'data_time', 'time')}
        res.update(metrics=metrics, headline=key, floor=floor,
                   clears_floor=metrics.get(key, 0.) >= floor,
                   loss_fell=bool(train) and train[-1]['loss'] < train[0]['loss'])
        results[task] = res
        print(task, json.dumps(res), flush=True)
    return results


def _detector_config(out_dir, name, base, data_root, res, batch, iters, amp):
    """A config that inherits ``base`` and trains it on the shapes data in
    ``data_root`` resized to ``res`` (H, W), without validation or checkpoints."""
    from pale_mm.demo import DET_CLASSES
    h, w = res
    text = f'''_base_ = [{base!r}]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes={len(DET_CLASSES)}),
                  mask_head=dict(num_classes={len(DET_CLASSES)})))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=({w}, {h}), keep_ratio=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(
    batch_size={batch}, num_workers=2, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None,
    dataset=dict(
        data_root={data_root!r},
        metainfo=dict(classes={DET_CLASSES!r}),
        ann_file='annotations/instances_training.json',
        data_prefix=dict(img='images/training/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters})
val_cfg = None
val_dataloader = None
val_evaluator = None
test_cfg = None
test_dataloader = None
test_evaluator = None
param_scheduler = []
default_hooks = dict(logger=dict(type='LoggerHook', interval=5),
                     checkpoint=dict(type='CheckpointHook', interval=-1),
                     visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(by_epoch=False, window_size=5)
'''
    if amp:
        text += ("optim_wrapper = dict(type='AmpOptimWrapper', dtype='bfloat16', "
                 "loss_scale='dynamic')\n")
    path = osp.join(out_dir, f'detector_{name}.py')
    with open(path, 'w') as f:
        f.write(text)
    return path


def detector(args):
    """Whole Mask R-CNN training with Pale-T and with Swin-T, one after the other."""
    data_root = _demo_data()
    out_dir = osp.abspath(args.out)
    res, batch, iters = ((800, 1216), 2, args.iters) if not SMOKE['on'] else ((96, 128), 1, 10)
    results = dict(res=res, batch=batch, amp='bf16' if not SMOKE['on'] else None)
    for name, base in DETECTORS.items():
        cfg = _detector_config(out_dir, name, base, data_root, res, batch, iters,
                               amp=not SMOKE['on'])
        work = osp.join(out_dir, f'detector-{name}')
        rc, secs = _train(cfg, work, {}, amp=False)  # AMP (bf16) is in the config
        train, _ = _scalars(work)
        results[name] = dict(exit=rc, seconds=secs, **_summary(train, skip=2))
        print(name, json.dumps(results[name]), flush=True)
    p, s = results['pale-t'].get('sec_per_iter'), results['swin-t'].get('sec_per_iter')
    results['pale_over_swin_throughput'] = s / p if p and s else None
    return results


# ----------------------------------------------------------------------------- table
def _f(v, digits=3):
    return 'n/a' if v is None else f'{v:.{digits}g}' if isinstance(v, float) else str(v)


def table(out):
    def load(name):
        path = osp.join(out, f'{name}.json')
        if not osp.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)
    lines = [f"# pale_mm end to end on {(load('device') or {}).get('name', '?')}", '']
    build = load('build')
    if build:
        lines += [f"mmcv build: exit {build.get('exit')}, {build.get('seconds')} s, "
                  f"{build.get('wheel', '')}", '']
    o = load('ops')
    if o:
        lines += [f"mmcv CUDA ops vs CPU ops: {'OK' if o['ok'] else 'DIFFERENT'}; nms "
                  f"{o['nms']}, batched_nms {o['batched_nms']}, roi_align {o['roi_align']}", '']
    d = load('demo')
    if d:
        lines += ['| demo (tools/train.py --amp) | exit | iters | s/iter | peak MB '
                  '| loss first -> last | headline | floor | metrics |',
                  '|---|---|---|---|---|---|---|---|---|']
        for task, r in d.items():
            m = r['metrics']
            shown = {k: v for k, v in m.items() if k in (
                'coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50', 'mIoU', 'mAcc', 'aAcc')}
            lines.append(f"| {task} | {r['exit']} | {r['iters']} | {_f(r['sec_per_iter'])} | "
                         f"{_f(r['peak_mem_mb'])} | {_f(r['loss_first'])} -> "
                         f"{_f(r['loss_last'])} | {r['headline']} {_f(m.get(r['headline']))} "
                         f"| {r['floor']} | {json.dumps(shown)} |")
        lines.append('')
    t = load('detector')
    if t:
        lines += [f"Mask R-CNN training step, batch {t['batch']} at {t['res'][0]}x{t['res'][1]}, "
                  f"AMP {t['amp']}: Pale-T/Swin-T throughput "
                  f"{_f(t['pale_over_swin_throughput'])}x",
                  '', '| backbone | exit | iters | s/iter | peak MB |', '|---|---|---|---|---|']
        for name in DETECTORS:
            r = t[name]
            lines.append(f"| {name} | {r['exit']} | {r['iters']} | {_f(r['sec_per_iter'])} | "
                         f"{_f(r['peak_mem_mb'])} |")
    text = '\n'.join(lines)
    with open(osp.join(out, 'table-e2e.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


PARTS = {'ops': ops, 'demo': demo, 'detector': detector}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('parts', nargs='+', choices=sorted(PARTS) + ['table'])
    ap.add_argument('--out', default='work_dirs/gpu_e2e')
    ap.add_argument('--iters', type=int, default=40,
                    help='detector part: training iterations per backbone (default: %(default)s)')
    ap.add_argument('--smoke', action='store_true',
                    help='run on the CPU at tiny sizes without AMP: checks this script, '
                         'measures nothing')
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.parts == ['table']:
        return table(args.out)
    import torch
    SMOKE['on'] = args.smoke
    if not args.smoke and not torch.cuda.is_available():
        ap.error('no CUDA device')
    with open(osp.join(args.out, 'device.json'), 'w') as f:
        json.dump(dict(name=torch.cuda.get_device_name() if not args.smoke else 'CPU (smoke run)',
                       torch=torch.__version__), f)
    for part in args.parts:
        t = time.perf_counter()
        result = PARTS[part](args)
        print(f'{part}: {time.perf_counter() - t:.1f} s', flush=True)
        with open(osp.join(args.out, f'{part}.json'), 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
