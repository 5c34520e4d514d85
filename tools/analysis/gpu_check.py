#!/usr/bin/env python
"""Checks of pale_mm's GPU path on one CUDA device, run by ``tools/analysis/gpu_check.sh``.

    python tools/analysis/gpu_check.py correctness launches syncbn compile --out DIR
    python tools/analysis/gpu_check.py table --out DIR      # one table of every part run

Parts (each writes ``DIR/<part>.json``):

- ``correctness``: Pale-T, the GPU path against the reference model (every fast path
  off), outputs and every gradient, in float32 with TF32 off and under bf16 autocast,
  at 224x224, 97x130 and 512x512 (batch 2, training mode). float32 must agree within
  ``16 eps sqrt(K * depth)``, the bound of ``tests/tolerances.py`` (K the longest
  reduction, a weight gradient's tokens; depth the model's blocks). In bf16 two correct
  paths differ by their roundings, so each is compared with the float32 reference and
  the GPU path may not be less accurate than the reference model (x1.5). A gradient's
  error is its RMS relative to the largest gradient RMS of its module.
- ``launches``: kernels, copies and CPU ops per Pale block (forward and backward of a
  stage-3 block of Pale-T at 512x512, batch 16, bf16) and per Pale-T training step,
  GPU path and reference, from ``torch.profiler``.
- ``syncbn``: a Pale-T training step (512x512, batch 16, bf16) before and after
  ``nn.SyncBatchNorm.convert_sync_batchnorm``, one process; medians of 10.
- ``compile``: Pale-T compiled with ``torch.compile(dynamic=True)``: time of the
  first (compiling) training step, compiled against eager step time at 512x512
  (batch 16) and 800x1216 (batch 4), and recompilations over five more input sizes.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


DEV = {'device': 'cuda', 'smoke': False}


def _input(batch, h, w):
    """A random image batch; ``--smoke`` (a CPU run that only checks this script)
    shrinks it to batch 2 at a tenth of the size (64 px at least)."""
    if DEV['smoke']:
        batch, h, w = 2, max(64, h // 10), max(64, w // 10)
    return torch.randn(batch, 3, h, w, device=DEV['device'])


def _sync():
    if DEV['device'] == 'cuda':
        torch.cuda.synchronize()


def _autocast():
    return torch.autocast(DEV['device'], dtype=torch.bfloat16)


def _model(arch='tiny', seed=0):
    from pale_mm.models import PaleTransformer
    torch.manual_seed(seed)
    m = PaleTransformer(arch, drop_path_rate=0.)
    m.init_weights()
    with torch.no_grad():  # BatchNorm away from its identity init
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    return m.to(DEV['device'])


def _fast(on):
    from pale_mm.ops import set_fast_paths
    return set_fast_paths(on)


def _grad_step(model, x, amp):
    """Outputs and named gradients of one training step (the loss a fixed random
    projection of every output)."""
    model = copy.deepcopy(model).train()
    ctx = _autocast() if amp else _Null()
    with ctx:
        outs = model(x)
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=x.device)).sum()
               for o in outs)
    loss.backward()
    return ([o.detach().float() for o in outs],
            {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def correctness(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _model()
    rows = []
    for hw in ((224, 224), (97, 130), (512, 512)):
        x = _input(2, *hw)
        res = {}
        for name, on, amp in (('fast_fp32', True, False), ('ref_fp32', False, False),
                              ('fast_bf16', True, True), ('ref_bf16', False, True)):
            prev = _fast(on)
            try:
                res[name] = _grad_step(model, x, amp)
            finally:
                _fast(prev)
        outs_r, grads_r = res['ref_fp32']

        # a gradient's error relative to the size of its module's gradients: some are
        # zero in exact arithmetic (a LayerNorm weight before a train-mode BatchNorm)
        scale = {}
        for n, g in grads_r.items():
            mod = n.rsplit('.', 1)[0]
            scale[mod] = max(scale.get(mod, 0.), float(g.double().pow(2).mean().sqrt()))

        def err(key):
            outs, grads = res[key]
            return (max(_rel(a, b) for a, b in zip(outs, outs_r)),
                    max(float((grads[n].double() - g.double()).pow(2).mean().sqrt())
                        / max(scale[n.rsplit('.', 1)[0]], 1e-30) for n, g in grads_r.items()))
        depth = sum(model.depths)
        K = 2 * hw[0] * hw[1] // 16  # the longest reduction: stage-1 tokens of the batch
        fp32_tol = 16 * torch.finfo(torch.float32).eps * math.sqrt(K * depth)
        row = dict(res=f'{hw[0]}x{hw[1]}', fp32_tol=fp32_tol)
        row['fast_fp32_out'], row['fast_fp32_grad'] = err('fast_fp32')
        row['fast_bf16_out'], row['fast_bf16_grad'] = err('fast_bf16')
        row['ref_bf16_out'], row['ref_bf16_grad'] = err('ref_bf16')
        row['finite'] = all(torch.isfinite(t).all().item() for k in res
                            for t in list(res[k][0]) + list(res[k][1].values()))
        row['pass'] = bool(row['finite'] and row['fast_fp32_out'] <= fp32_tol
                           and row['fast_fp32_grad'] <= fp32_tol
                           and row['fast_bf16_out'] <= 1.5 * row['ref_bf16_out'] + 1e-3
                           and row['fast_bf16_grad'] <= 1.5 * row['ref_bf16_grad'] + 1e-3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _profile(fn, reps=1):
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == 'CUDA')
    gpu_us = sum(getattr(e, 'self_device_time_total', getattr(e, 'self_cuda_time_total', 0))
                 for e in events if e.device_type.name == 'CUDA')
    copies = sum(e.count for e in events if e.key == 'aten::copy_')
    cpu_ops = sum(e.count for e in events if e.key.startswith('aten::'))
    return dict(kernels=kernels / reps, copies=copies / reps, aten_ops=cpu_ops / reps,
                gpu_ms=gpu_us / 1e3 / reps)


def _train_fn(model, x):
    def step():
        with _autocast():
            outs = model(x)
        out = outs if torch.is_tensor(outs) else sum(o.float().mean() for o in outs)
        out.float().mean().backward()
        for p in model.parameters():
            p.grad = None
    return step


def launches(args):
    from pale_mm.models.pale_transformer import PaleBlock
    torch.manual_seed(0)
    blk = PaleBlock(256, 8, 7).to(DEV['device']).train()
    side = 8 if DEV['smoke'] else 32
    xb = torch.randn(2 if DEV['smoke'] else 16, side, side, 256, device=DEV['device'],
                     requires_grad=True)
    model = _model().train()
    x = _input(2, 800, 1216)
    rows = []
    for name, on in (('gpu_path', True), ('reference', False)):
        prev = _fast(on)
        try:
            wall = []
            step = _train_fn(model, x)
            step()
            for _ in range(5):
                _sync()
                t = time.perf_counter()
                step()
                _sync()
                wall.append(time.perf_counter() - t)
            row = dict(path=name, block=_profile(_train_fn(blk, xb), reps=3),
                       step=_profile(step), step_wall_ms=1e3 * statistics.median(wall))
        finally:
            _fast(prev)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _median_step(step, reps=10, warmup=3):
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def syncbn(args):
    model = _model().train()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    x = _input(16, 512, 512)
    steps = {'plain': _train_fn(model, x), 'syncbn': _train_fn(synced, x)}
    times = {k: [] for k in steps}
    for _ in range(3):  # interleaved
        for k, s in steps.items():
            times[k].append(_median_step(s, reps=5, warmup=2))
    med = {k: statistics.median(v) for k, v in times.items()}
    prev = _fast(False)
    try:
        med['reference'] = _median_step(steps['plain'], reps=5, warmup=2)
    finally:
        _fast(prev)
    row = dict(plain_ms=1e3 * med['plain'], syncbn_ms=1e3 * med['syncbn'],
               reference_ms=1e3 * med['reference'], ratio=med['syncbn'] / med['plain'])
    print(json.dumps(row), flush=True)
    return row


def compile_part(args):
    import torch._dynamo as dynamo
    model = _model().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True)
    counters = dynamo.utils.counters
    counters.clear()
    row = {}
    x = _input(16, 512, 512)
    t = time.perf_counter()
    _train_fn(compiled, x)()
    _sync()
    row['first_step_s'] = time.perf_counter() - t
    print(json.dumps(row), flush=True)
    for batch, hw in ((16, (512, 512)), (4, (800, 1216))):
        x = _input(batch, *hw)
        row[f'compiled_ms_{hw[0]}x{hw[1]}'] = 1e3 * _median_step(_train_fn(compiled, x))
        row[f'eager_ms_{hw[0]}x{hw[1]}'] = 1e3 * _median_step(_train_fn(eager, x))
        print(json.dumps(row), flush=True)
    frames = counters['frames']['total']
    for hw in ((480, 640), (608, 800), (736, 992), (320, 1333), (544, 544)):
        _train_fn(compiled, _input(4, *hw))()
    row['frames_before_sizes'] = frames
    row['recompiles_over_5_sizes'] = counters['frames']['total'] - frames
    print(json.dumps(row), flush=True)
    return row


PARTS = dict(correctness=correctness, launches=launches, syncbn=syncbn, compile=compile_part)


def table(out):
    """One table of every part's JSON under ``out`` (and the benchmark rows)."""
    lines = []

    def load(name):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return None
    dev = load('device.json') or {}
    lines.append(f"# pale_mm GPU check: {dev.get('name', '?')}, torch {dev.get('torch', '?')}, "
                 f"triton {dev.get('triton', '?')}")
    rows = load('correctness.json')
    if rows:
        lines.append('\n## GPU path vs reference (Pale-T, training step, rel. L2 error vs '
                     'the fp32 reference, TF32 off)')
        lines.append('| input | fp32 out | fp32 grads | fp32 tol | bf16 out (reference) | '
                     'bf16 grads (reference) | pass |')
        lines.append('|---|---|---|---|---|---|---|')
        for r in rows:
            lines.append(f"| {r['res']} | {r['fast_fp32_out']:.1e} | {r['fast_fp32_grad']:.1e} | "
                         f"{r['fp32_tol']:.1e} | {r['fast_bf16_out']:.1e} "
                         f"({r['ref_bf16_out']:.1e}) | {r['fast_bf16_grad']:.1e} "
                         f"({r['ref_bf16_grad']:.1e}) | {'yes' if r['pass'] else 'NO'} |")
    rows = load('launches.json')
    if rows:
        lines.append('\n## Launches (bf16 training step; block: stage-3 Pale-T block at 512, '
                     'batch 16; step: Pale-T at 800x1216, batch 2)')
        lines.append('| path | block kernels | block copies | block aten ops | step kernels | '
                     'step copies | step GPU ms | step wall ms |')
        lines.append('|---|---|---|---|---|---|---|---|')
        for r in rows:
            b, s = r['block'], r['step']
            lines.append(f"| {r['path']} | {b['kernels']:.0f} | {b['copies']:.0f} | "
                         f"{b['aten_ops']:.0f} | {s['kernels']:.0f} | {s['copies']:.0f} | "
                         f"{s['gpu_ms']:.1f} | {r['step_wall_ms']:.1f} |")
    r = load('syncbn.json')
    if r:
        lines.append(f"\n## SyncBN (Pale-T, 512, batch 16, bf16 step): plain "
                     f"{r['plain_ms']:.1f} ms, "
                     f"converted {r['syncbn_ms']:.1f} ms ({r['ratio']:.3f}x), reference "
                     f"{r['reference_ms']:.1f} ms")
    r = load('compile.json')
    if r:
        lines.append('\n## torch.compile (Pale-T, dynamic=True, bf16 training step)')
        lines.append('```\n' + json.dumps(r, indent=1) + '\n```')
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, 'benchmark.json')
        if name.startswith('bench') and os.path.exists(path):
            with open(path) as f:
                b = json.load(f)
            lines.append(f'\n## Benchmark {name} (ours/Swin throughput, medians of '
                         f"{b.get('reps')}; amp {b.get('amp')})")
            lines.append('| model | input | batch | mode | ours/Swin | reference/Swin | '
                         'ours ms | Swin ms | ours MB | Swin MB |')
            lines.append('|---|---|---|---|---|---|---|---|---|---|')
            for row in b.get('backbones', []):
                lines.append(
                    f"| {row['model']} | {row['res']} | {row['batch']} | {row['mode']} | "
                    f"{row['ratio_ours_over_swin']:.2f}x | "
                    f"{row.get('ratio_reference_over_swin', float('nan')):.2f}x | "
                    f"{1e3 * row['ours']['median_s']:.1f} | {1e3 * row['swin']['median_s']:.1f} | "
                    f"{row['ours']['peak_mem_mb']:.0f} | {row['swin']['peak_mem_mb']:.0f} |")
    text = '\n'.join(lines)
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('parts', nargs='+', choices=sorted(PARTS) + ['table'])
    ap.add_argument('--out', default='work_dirs/gpu_check')
    ap.add_argument('--smoke', action='store_true',
                    help='run on the CPU at tiny sizes: checks this script, measures nothing')
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.parts == ['table']:
        return table(args.out)
    DEV.update(device='cpu' if args.smoke else 'cuda', smoke=args.smoke)
    if not args.smoke and not torch.cuda.is_available():
        ap.error('no CUDA device')
    import pale_mm  # noqa: F401
    import triton
    with open(os.path.join(args.out, 'device.json'), 'w') as f:
        name = torch.cuda.get_device_name() if not args.smoke else 'CPU (smoke run)'
        json.dump(dict(name=name, torch=torch.__version__, triton=triton.__version__), f)
    for part in args.parts:
        t = time.perf_counter()
        result = PARTS[part](args)
        print(f'{part}: {time.perf_counter() - t:.1f} s', flush=True)
        with open(os.path.join(args.out, f'{part}.json'), 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
