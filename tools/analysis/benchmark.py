#!/usr/bin/env python
"""pale_mm backbones next to mmdet's Swin Transformer, measured in one run.

    python tools/analysis/benchmark.py                      # full run (CPU: ~30 min)
    python tools/analysis/benchmark.py --models pale:tiny --res 512 --reps 5
    python tools/analysis/benchmark.py --device cuda --amp bf16
    python tools/analysis/benchmark.py --compile --models pale:tiny --res 512  # inductor

For every (model, resolution, mode) our backbone (Pale, LIT or ScalableViT) and
the Swin of matching size run interleaved in the same process, after warm-up, and
the median time is reported with images/s, the ours/Swin throughput ratio, peak
memory (CPU: RSS above the pre-step level, sampled every ms; CUDA: max
allocated), multiply-adds (``pale_mm.flops``, attention included) and the achieved
GFLOP/s as a fraction of this machine's fp32 GEMM rate (the best 2048^3 GEMM, BLAS
or oneDNN, measured at the start and at the end of the run). On the CPU, inference
rows also time our model with its oneDNN linear turned off (``F.linear``, as Swin
uses), and Pale rows (inference and training) with its fused CPU kernels turned off
(``F.scaled_dot_product_attention``, ``F.conv2d``, ``F.gelu``: what a CPU without AVX2
runs).
Every row also times the reference model, all fast paths off (``PALE_MM_FAST_PATHS=0``).
All variants run interleaved with the others, to show what each adds. An
attention-level sweep times PS-Attention (its fast path), Swin window attention and global
attention at equal width over growing token grids and fits time ~ tokens^p.
Memory at scale: peak training memory of Pale-T and Swin-T with and without
``with_cp``, and the largest square input that fits a memory budget. Results go
to JSON and a PNG plot. ``--compile`` puts both backbones through ``torch.compile``
(inductor) and marks their rows ``*``; the first, compiling call is kept apart
(``first_call_s``), and the memory probe compiles too.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

SWIN = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def build_ours(spec, **kw):
    """``family:arch`` (pale:tiny, lit:s, scalablevit:b) -> backbone."""
    from pale_mm.models import LIT, PaleTransformer, ScalableViT
    family, arch = spec.split(':')
    cls = dict(pale=PaleTransformer, lit=LIT, scalablevit=ScalableViT)[family]
    m = cls(arch, drop_path_rate=0., **kw)
    m.init_weights()
    return m


# the Swin of matching size for each of our models
SWIN_PEER = {'pale:tiny': 'tiny', 'pale:small': 'small', 'pale:base': 'base',
             'lit:ti': 'tiny', 'lit:s': 'tiny', 'lit:m': 'small', 'lit:b': 'base',
             'scalablevit:s': 'tiny', 'scalablevit:b': 'small', 'scalablevit:l': 'base'}


def build_swin(arch, with_cp=False):
    from mmdet.models.backbones import SwinTransformer
    m = SwinTransformer(**SWIN[arch], window_size=7, drop_path_rate=0., with_cp=with_cp)
    m.init_weights()
    return m


# ----------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory above the level at entry: CUDA max allocated, or process RSS
    sampled by a background thread (torch ops release the GIL)."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _rss():
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        gc.collect()
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
            self.bytes = self.peak - self.base


def _build_named(name, with_cp=False):
    """'swin:tiny' -> mmdet Swin; 'pale:tiny' / 'lit:s' / ... -> ours."""
    family, arch = name.split(':')
    if family == 'swin':
        return build_swin(arch, with_cp=with_cp)
    return build_ours(name, with_cp=with_cp)


def measure_peak(name, hw, mode, device, amp=None, with_cp=False, batch=1, compile=False):
    """Peak memory of one step, in bytes above the level before it.

    CUDA: max allocated, in process. CPU: in a fresh subprocess with glibc's mmap
    threshold pinned, so freed buffers go back to the OS and the sampled RSS shows
    this step's own peak (in a long-running process the heap keeps earlier peaks)."""
    if device.type == 'cuda':
        return _one_step_peak(name, hw, mode, device, amp, with_cp, batch, compile)
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    spec = json.dumps(dict(name=name, hw=list(hw), mode=mode, with_cp=with_cp, batch=batch,
                           threads=torch.get_num_threads(), compile=compile,
                           amp=None if amp is None else str(amp).replace('torch.', '')))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--_memory-case', spec],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'memory probe {spec} failed:\n{out.stderr[-2000:]}')
    return int(out.stdout.strip().splitlines()[-1])


def _memory_case(spec):
    spec = json.loads(spec)
    torch.set_num_threads(spec['threads'])
    import pale_mm  # noqa: F401
    amp = spec['amp'] and getattr(torch, spec['amp'])  # autocast dtype, as the timed steps
    print(_one_step_peak(spec['name'], spec['hw'], spec['mode'], torch.device('cpu'), amp,
                         spec['with_cp'], spec['batch'], spec['compile']))


def _one_step_peak(name, hw, mode, device, amp, with_cp, batch, compile):
    m = _maybe_compile(_build_named(name, with_cp).to(device), compile)
    x = torch.randn(batch, 3, *hw, device=device)
    step = make_step(m, x, mode, amp)
    if compile:
        step()  # compile outside the measured step (in a probe process, from inductor's cache)
    with PeakMemory(device) as pm:
        step()
    return pm.bytes


def _maybe_compile(model, compile):
    """``torch.compile`` (inductor, static shapes: each case has one input size) when
    asked; the model is compiled lazily by its first call."""
    return torch.compile(model, dynamic=False) if compile else model


def make_step(model, x, mode, amp):
    device = x.device
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else None

    def run():
        if ctx:
            with ctx():
                return model(x)
        return model(x)

    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad():
                run()
    else:
        model.train()

        def step():
            outs = run()
            sum(o.float().mean() for o in outs).backward()
            for p in model.parameters():
                p.grad = None
    return step


def timed(step, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(steps, device, warmup, reps):
    """Warm each of ``steps`` (name -> step) up ``warmup`` times, timing the first call
    (which compiles under ``--compile``), then time them ``reps`` times, interleaved.
    Returns ``(first_call_s, times_s)``, both keyed by name."""
    first = {}
    for k, step in steps.items():
        first[k] = timed(step, device)
        for _ in range(warmup - 1):
            step()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            times[k].append(timed(step, device))
    return first, times


def gemm_rate(device, n=2048, reps=5):
    """Best fp32 rate of an ``n^3`` GEMM: ``a @ b`` and, on the CPU, oneDNN's linear
    (which our inference path uses, and which can beat the BLAS behind ``@``)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    fns = [lambda: a @ b]
    if device.type == 'cpu':
        from pale_mm.ops.linear import _ONEDNN_LINEAR
        if _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available():
            fns.append(lambda: _ONEDNN_LINEAR(a, b, None, 'none', [], 'none'))
    best = min(timed(fn, device) for fn in fns for _ in range(reps + 1))
    return 2 * n ** 3 / best


def fit_exponent(tokens, times):
    xs = [math.log(t) for t in tokens]
    ys = [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ----------------------------------------------------------------------------- sections
def bench_backbones(args, device, gemm, bar):
    from pale_mm.flops import count_flops
    from pale_mm.ops import set_fast_paths
    from pale_mm.ops.attention import cpu_attention_available, set_cpu_attention
    from pale_mm.ops.dwconv import set_fused_dwconv
    from pale_mm.ops.linear import set_fast_cpu_linear, set_fused_gelu
    rows = []
    for spec in args.models:
        for res in args.res:
            h, w = res
            x = torch.randn(args.batch, 3, h, w, device=device)
            models = {'ours': build_ours(spec).to(device),
                      'swin': build_swin(SWIN_PEER[spec]).to(device)}
            madds = {k: float('nan') if args.no_madds else
                     count_flops(m.cpu(), (3, h, w)) * args.batch for k, m in models.items()}
            models = {k: _maybe_compile(m.to(device), args.compile) for k, m in models.items()}
            for mode in args.modes:
                steps = {k: make_step(m, x, mode, args.amp) for k, m in models.items()}
                if not args.compile:
                    # the reference model: every fast path off (PALE_MM_FAST_PATHS=0)
                    steps['ours_reference'] = _switched_off(steps['ours'], set_fast_paths)
                if device.type == 'cpu' and not (args.amp or args.compile):
                    if mode == 'infer':
                        # the same model with the oneDNN inference linear off (F.linear)
                        steps['ours_plain_linear'] = _switched_off(steps['ours'],
                                                                   set_fast_cpu_linear)
                    if spec.startswith('pale:') and cpu_attention_available():
                        # ... and with the fused CPU kernels off (SDPA, F.conv2d), as on a
                        # CPU without AVX2
                        steps['ours_no_kernels'] = _switched_off(
                            steps['ours'], set_cpu_attention, set_fused_dwconv, set_fused_gelu)
                mem = {k: measure_peak(n, (h, w), mode, device, args.amp, batch=args.batch,
                                       compile=args.compile)
                       for k, n in (('ours', spec), ('swin', 'swin:' + SWIN_PEER[spec]))}
                if args.compile:
                    # each case's first call compiles from scratch: dynamo would reuse a
                    # graph compiled for another instance of the class at the same size
                    # (the memory probe's, which runs in this process on CUDA), and after
                    # recompile_limit (8) sizes and modes it would run the model eagerly
                    torch._dynamo.reset()
                first, times = interleaved(steps, device, args.warmup, args.reps)
                med = {k: statistics.median(v) for k, v in times.items()}
                row = dict(model=spec, arch=spec.split(':')[1], swin=SWIN_PEER[spec],
                           res=f'{h}x{w}', mode=mode, batch=args.batch, compiled=args.compile)
                for k in ('ours', 'swin'):
                    factor = 3 if mode == 'train' else 1  # backward ~ 2x forward
                    row[k] = dict(
                        median_s=med[k], times_s=times[k], img_per_s=args.batch / med[k],
                        peak_mem_mb=mem[k] / 2 ** 20, gmadds=madds[k] / 1e9,
                        gemm_fraction=2 * madds[k] * factor / med[k] / gemm,
                        first_call_s=first[k])
                row['ratio_ours_over_swin'] = med['swin'] / med['ours']
                for variant in ('reference', 'plain_linear', 'no_kernels'):
                    if f'ours_{variant}' in med:
                        row[f'ratio_{variant}_over_swin'] = med['swin'] / med[f'ours_{variant}']
                        row[f'ours_{variant}_median_s'] = med[f'ours_{variant}']
                rows.append(row)
                bar.update(1)
                bar.write(fmt_row(row))
            del models
            gc.collect()
    return rows


def _switched_off(step, *switches):
    """``step`` with some of our fast paths off (each switch as ``set_fast_paths``:
    takes a bool, returns the previous setting)."""
    def run():
        previous = [switch(False) for switch in switches]
        try:
            step()
        finally:
            for switch, p in zip(switches, previous):
                switch(p)
    return run


def fmt_row(r):
    p, s = r['ours'], r['swin']
    plain = r.get('ratio_plain_linear_over_swin')
    plain = f' ({plain:.2f}x with F.linear)' if plain else ''
    if r.get('ratio_no_kernels_over_swin'):
        plain += f" ({r['ratio_no_kernels_over_swin']:.2f}x without the CPU kernels)"
    if r.get('ratio_reference_over_swin'):
        plain += f" ({r['ratio_reference_over_swin']:.2f}x reference)"
    mode = r['mode'] + ('*' if r.get('compiled') else '')
    return (f"{r['model']:>13} {r['res']:>9} {mode:>6} | ours {p['img_per_s']:7.2f} img/s "
            f"{p['peak_mem_mb']:7.0f} MB {p['gmadds']:6.1f} GMACs {100 * p['gemm_fraction']:4.0f}% "
            f"| Swin {s['img_per_s']:7.2f} img/s {s['peak_mem_mb']:7.0f} MB {s['gmadds']:6.1f} "
            f"GMACs {100 * s['gemm_fraction']:4.0f}% | ours/Swin {r['ratio_ours_over_swin']:.2f}x"
            f"{plain}")


class _GlobalAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, hw):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class _WindowAttention(torch.nn.Module):
    """mmdet's ShiftWindowMSA (Swin's attention, with its padding), non-shifted."""

    def __init__(self, dim, heads):
        super().__init__()
        from mmdet.models.backbones.swin import ShiftWindowMSA
        self.attn = ShiftWindowMSA(dim, heads, window_size=7, shift_size=0)

    def forward(self, x, hw):
        return self.attn(x, hw)


def bench_attention(args, device, bar):
    from pale_mm.models import PSAttention
    from pale_mm.ops.pale import ps_attention
    dim, heads = args.sweep_dim, args.sweep_heads
    pale = PSAttention(dim, heads, 7)
    mods = {'pale': pale, 'window': _WindowAttention(dim, heads),
            'global': _GlobalAttention(dim, heads)}
    calls = {'pale': lambda x, hw: ps_attention(pale, x, hw)}
    out = {k: [] for k in mods}
    for h, w in args.sweep:
        x = torch.randn(1, h * w, dim, device=device)
        for k, m in mods.items():
            m.to(device).eval()
            if k == 'global' and (h * w) ** 2 * dim > args.global_limit:
                continue  # quadratic: skip grids that would take minutes
            call = calls.get(k, m)
            with torch.no_grad():
                call(x, (h, w))
                ts = [timed(lambda: call(x, (h, w)), device) for _ in range(args.sweep_reps)]
            out[k].append(dict(hw=[h, w], tokens=h * w, median_s=statistics.median(ts)))
        bar.update(1)
    fits = {k: fit_exponent([r['tokens'] for r in v], [r['median_s'] for r in v])
            for k, v in out.items() if len(v) >= 2}
    return dict(dim=dim, heads=heads, results=out, exponent=fits)


def bench_memory(args, device, bar):
    """with_cp on/off peak training memory, and the largest square forward input that
    fits ``--mem-budget-gb`` (CPU: extrapolated from a linear fit of measured peaks)."""
    res = dict(with_cp=[], max_square={})
    for h, w in args.cp_res:
        row = dict(res=f'{h}x{w}')
        for name, full in (('pale', 'pale:tiny'), ('swin', 'swin:tiny')):
            for cp in (False, True):
                peak = measure_peak(full, (h, w), 'train', device, args.amp, with_cp=cp)
                row[f'{name}{"_cp" if cp else ""}_mb'] = peak / 2 ** 20
            row[f'{name}_cp_saving'] = 1 - row[f'{name}_cp_mb'] / row[f'{name}_mb']
        res['with_cp'].append(row)
        bar.update(1)
    budget = args.mem_budget_gb * 2 ** 30
    for name, full in (('pale', 'pale:tiny'), ('swin', 'swin:tiny')):
        pts = [(s * s, measure_peak(full, (s, s), 'infer', device, args.amp))
               for s in args.mem_probe]
        xs, ys = zip(*pts)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
        icpt = my - slope * mx
        probes = [dict(side=int(math.sqrt(a)), peak_mb=b / 2 ** 20) for a, b in pts]
        if slope > 0:
            side = int(math.sqrt(max(budget - icpt, 0) / slope))
            method = 'linear fit of measured forward peaks (extrapolated)'
        else:  # small inputs: a fresh process's fixed ~30 MB hides the activations
            side = None
            method = 'no fit: the forward peaks did not grow with the input ' + \
                ', '.join(f"({p['side']} px: {p['peak_mb']:.1f} MB)" for p in probes) + \
                '; probe larger --mem-probe sizes'
        res['max_square'][name] = dict(probes=probes, bytes_per_pixel=slope,
                                       budget_gb=args.mem_budget_gb, max_side=side,
                                       method=method)
        bar.update(1)
    return res


def plot(result, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = [r for r in result['backbones'] if r['mode'] == 'infer']
    labels = [f"{r['model']} {r['res']}" for r in rows]
    xs = range(len(rows))
    axes[0].bar([i - 0.2 for i in xs], [r['ours']['img_per_s'] for r in rows], 0.4,
                label='ours (pale_mm)')
    axes[0].bar([i + 0.2 for i in xs], [r['swin']['img_per_s'] for r in rows], 0.4,
                label='Swin (mmdet)')
    for i, r in enumerate(rows):
        axes[0].text(i, max(r['ours']['img_per_s'], r['swin']['img_per_s']),
                     f"{r['ratio_ours_over_swin']:.2f}x", ha='center', va='bottom', fontsize=8)
    axes[0].set_xticks(list(xs), labels, rotation=30, ha='right')
    axes[0].set_yscale('log')
    axes[0].set_ylabel('images / s (forward, log)')
    axes[0].set_title(f"Backbone inference throughput ({result['device']})")
    axes[0].legend()
    sweep = result.get('attention')
    if sweep:
        for k, v in sweep['results'].items():
            if v:
                p = sweep['exponent'].get(k)
                axes[1].loglog([r['tokens'] for r in v], [r['median_s'] for r in v], 'o-',
                               label=f'{k} (p={p:.2f})' if p else k)
        axes[1].set_xlabel('tokens (H*W)')
        axes[1].set_ylabel('seconds (median)')
        axes[1].set_title(f"Attention at width {sweep['dim']}: time ~ tokens^p")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_hw(s):
    h, _, w = s.partition('x')
    return int(h), int(w or h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', choices=sorted(SWIN_PEER),
                    default=['pale:tiny', 'pale:small', 'pale:base', 'lit:s', 'scalablevit:s'],
                    help='our backbones (family:arch); each is compared with the Swin of '
                         'matching size')
    ap.add_argument('--res', nargs='+', type=parse_hw, default=[(224, 224), (512, 512),
                                                                (800, 1216)])
    ap.add_argument('--modes', nargs='+', default=['infer', 'train'],
                    choices=['infer', 'train'])
    ap.add_argument('--batch', type=int, default=1)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--amp', choices=['bf16', 'fp16'], default=None)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (CPU)')
    ap.add_argument('--no-madds', action='store_true',
                    help='do not count multiply-adds (a CPU trace of each model: slow for '
                         'large inputs; GMACs and GEMM fractions are then nan)')
    ap.add_argument('--compile', action='store_true',
                    help='torch.compile (inductor) both models; rows are marked * and '
                         'record the first (compiling) call as first_call_s')
    ap.add_argument('--sections', nargs='+', default=['backbones', 'attention', 'memory'],
                    choices=['backbones', 'attention', 'memory'])
    ap.add_argument('--sweep', nargs='+', type=parse_hw,
                    default=[(56, 56), (64, 64), (100, 100), (128, 128), (160, 160),
                             (200, 200), (200, 334)])
    ap.add_argument('--sweep-dim', type=int, default=128)
    ap.add_argument('--sweep-heads', type=int, default=4)
    ap.add_argument('--sweep-reps', type=int, default=3)
    ap.add_argument('--global-limit', type=float, default=2e11,
                    help='skip global attention above tokens^2*dim')
    ap.add_argument('--cp-res', nargs='+', type=parse_hw, default=[(800, 1216), (1024, 1024)])
    ap.add_argument('--mem-probe', nargs='+', type=int, default=[256, 512, 768, 1024],
                    help='square input sides whose forward peaks are fitted (at least two '
                         'distinct; below ~256 px a fresh process\'s fixed overhead dominates)')
    ap.add_argument('--mem-budget-gb', type=float, default=16)
    ap.add_argument('--out', default='work_dirs/benchmark')
    ap.add_argument('--_memory-case', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_case:
        return _memory_case(args._memory_case)
    if 'memory' in args.sections and len(set(args.mem_probe)) < 2:
        ap.error(f'--mem-probe needs at least two distinct sizes to fit, got {args.mem_probe}')
    args.amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        ap.error('--device cuda but no CUDA device is available')
    import pale_mm  # noqa: F401
    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)
    gemm = gemm_rate(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads'
    print(f'device: {dev_name}; fp32 GEMM 2048^3 (start): {gemm / 1e9:.0f} GFLOP/s; '
          f'amp: {args.amp}; torch {torch.__version__}')
    total = 0
    if 'backbones' in args.sections:
        total += len(args.models) * len(args.res) * len(args.modes)
    if 'attention' in args.sections:
        total += len(args.sweep)
    if 'memory' in args.sections:
        total += len(args.cp_res) + 2
    result = dict(device=dev_name, gemm_gflops=gemm / 1e9, torch=torch.__version__,
                  amp=str(args.amp), batch=args.batch, reps=args.reps, statistic='median',
                  compile=args.compile)
    with tqdm(total=total, desc='benchmark', file=sys.stdout, dynamic_ncols=True) as bar:
        if 'backbones' in args.sections:
            result['backbones'] = bench_backbones(args, device, gemm, bar)
        if 'attention' in args.sections:
            result['attention'] = bench_attention(args, device, bar)
            bar.write('attention exponents: ' + ', '.join(
                f'{k} {v:.2f}' for k, v in result['attention']['exponent'].items()))
        if 'memory' in args.sections:
            result['memory'] = bench_memory(args, device, bar)
            for r in result['memory']['with_cp']:
                bar.write(f"with_cp at {r['res']}: Pale {r['pale_mb']:.0f} -> "
                          f"{r['pale_cp_mb']:.0f} MB ({100 * r['pale_cp_saving']:.0f}% less), "
                          f"Swin {r['swin_mb']:.0f} -> {r['swin_cp_mb']:.0f} MB")
            for k, v in result['memory']['max_square'].items():
                bar.write(f"largest square forward in {v['budget_gb']:.0f} GB, {k}: "
                          f"{v['max_side']} px ({v['method']})")
    if 'backbones' in result:
        # the ceiling: the best GEMM rate seen at the start or at the end of the run
        # (shared machines drift); fractions are restated against it
        end = gemm_rate(device)
        if end > gemm:
            result['gemm_gflops'] = end / 1e9
            for row in result['backbones']:
                for k in ('ours', 'swin'):
                    row[k]['gemm_fraction'] *= gemm / end
        print(f'fp32 GEMM ceiling (best of start and end): {result["gemm_gflops"]:.0f} '
              f'GFLOP/s; GEMM fractions against it:')
        for row in result['backbones']:
            print(fmt_row(row))
    path = os.path.join(args.out, 'benchmark.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
    if 'backbones' in result:
        plot(result, os.path.join(args.out, 'benchmark.png'))
    print(f'wrote {path}' + (' and benchmark.png' if 'backbones' in result else ''))
    return result


if __name__ == '__main__':
    main()
