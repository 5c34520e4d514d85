#!/usr/bin/env python
"""Where a backbone's CPU time goes, against the machine's fp32 GEMM rate.

For each (resolution, mode) it times ``--reps`` steps of our model as it runs (every
fast path on; fp32, batch 1), then ``--reps`` more under ``torch.profiler`` for the
GEMMs' time (the profiler's own cost per op would otherwise land in ``rest_s``), and
splits the mean step into:

- ``gemm_s``: the GEMMs (``aten::addmm``, ``aten::mm``, ``aten::bmm`` and oneDNN's
  ``mkldnn::_linear_pointwise``, self time);
- ``attention_s``: the fused CPU attention kernel, forward and backward (timed
  around the extension's calls; not an aten op, so the profiler does not list it);
- ``other_kernels_s``: the other fused CPU kernels (depthwise convs, GELU);
- ``rest_s``: everything else (norms, patch-embedding convs, copies, Python).

With the model's multiply-adds (``pale_mm.flops``, counted on the reference model:
the attention's count includes padded keys) it reports the GEMMs' and the attention's
GFLOP/s and their fractions of the best 2048^3 GEMM measured at the start
(``benchmark.gemm_rate``). A training step counts three GEMMs per linear layer, and
the attention's backward 5/2 of its forward's products. This shows how much of a
step is left outside the GEMM-bound parts, which bounds what any exact speed-up
can still gain.

    python tools/analysis/time_budget.py --model pale:tiny --res 512 800x1216 \\
        --modes infer train --reps 3 --out work_dirs/time_budget.json

Run it on a quiet machine (nothing else running): it times.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402

GEMM_OPS = ('aten::addmm', 'aten::mm', 'aten::bmm', 'mkldnn::_linear_pointwise')
ATTENTION_FNS = ('forward', 'backward')
OTHER_FNS = ('dwconv3x3', 'dwconv3x3_backward', 'gelu', 'gelu_backward')


class KernelTimer:
    """Wall time spent in the fused CPU extension's functions, by name, while active
    (the functions are wrapped on entry and restored on exit)."""

    def __init__(self, ext):
        self.ext, self.seconds, self._saved = ext, collections.defaultdict(float), {}

    def __enter__(self):
        if self.ext is None:
            return self
        for name in ATTENTION_FNS + OTHER_FNS:
            fn = getattr(self.ext, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(self.ext, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
        return timed

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.ext, name, fn)
        self._saved.clear()


def multiply_adds(spec, hw):
    """``(linear, attention)`` multiply-adds of one image, from ``pale_mm.flops`` on
    the reference model."""
    import pale_mm.ops
    from pale_mm.flops import flop_analyzer
    previous = pale_mm.ops.set_fast_paths(False)
    try:
        model = bm.build_ours(spec).eval()
        by_op = flop_analyzer(model, (torch.randn(1, 3, *hw),)).by_operator()
    finally:
        pale_mm.ops.set_fast_paths(previous)
    return by_op.get('linear', 0), by_op.get('scaled_dot_product_attention', 0)


def budget(spec, hw, mode, reps, gemm_flops):
    """One case: mean seconds per step by part, and the GEMMs' and attention's rates."""
    from pale_mm.ops import kernels
    step = bm.make_step(bm.build_ours(spec), torch.randn(1, 3, *hw), mode, None)
    for _ in range(2):
        step()
    times = []
    with KernelTimer(kernels.load()) as kt:  # the steps and the kernels, unprofiled
        for _ in range(reps):
            times.append(bm.timed(step, torch.device('cpu')))
    with torch.profiler.profile() as prof:  # the GEMMs (the profiler slows the rest)
        for _ in range(reps):
            step()
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in GEMM_OPS) / 1e6 / reps
    fwd, bwd = (kt.seconds[n] / reps for n in ATTENTION_FNS)
    other = sum(kt.seconds[n] for n in OTHER_FNS) / reps
    step_s = sum(times) / reps
    lin, att = multiply_adds(spec, hw)
    gemm_f = 2 * lin * (3 if mode == 'train' else 1)
    att_f = 2 * att * ((1 + 2.5) if mode == 'train' else 1)
    row = dict(step_s=step_s, step_median_s=statistics.median(times), gemm_s=gemm,
               attention_s=fwd + bwd, attention_forward_s=fwd, attention_backward_s=bwd,
               other_kernels_s=other, rest_s=step_s - gemm - fwd - bwd - other,
               linear_gmacs=lin / 1e9, attention_gmacs=att / 1e9)
    row['gemm_gflops'] = gemm_f / gemm / 1e9 if gemm else float('nan')
    row['attention_gflops'] = att_f / (fwd + bwd) / 1e9 if fwd + bwd else float('nan')
    row['gemm_fraction'] = row['gemm_gflops'] * 1e9 / gemm_flops
    row['attention_fraction'] = row['attention_gflops'] * 1e9 / gemm_flops
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='pale:tiny', choices=sorted(bm.SWIN_PEER))
    ap.add_argument('--res', nargs='+', type=bm.parse_hw, default=[(512, 512), (800, 1216)])
    ap.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=None, help='JSON file for the results')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pale_mm.ops import kernels
    gemm_flops = bm.gemm_rate(torch.device('cpu'))
    result = dict(model=args.model, threads=args.threads, kernel_build=kernels.cpu_isa(),
                  capability=torch.backends.cpu.get_cpu_capability(),
                  gemm_gflops=gemm_flops / 1e9, cases={})
    print(f'{args.model}: fp32 GEMM 2048^3 {gemm_flops / 1e9:.0f} GFLOP/s, '
          f'kernel build {result["kernel_build"]}', flush=True)
    for hw in args.res:
        for mode in args.modes:
            r = budget(args.model, hw, mode, args.reps, gemm_flops)
            result['cases'][f'{hw[0]}x{hw[1]} {mode}'] = r
            print(f'{hw[0]}x{hw[1]} {mode}: step {r["step_s"]:.3f} s = GEMMs {r["gemm_s"]:.3f} '
                  f'({r["gemm_gflops"]:.0f} GFLOP/s, {100 * r["gemm_fraction"]:.0f}%) + '
                  f'attention {r["attention_s"]:.3f} ({r["attention_gflops"]:.0f} GFLOP/s, '
                  f'{100 * r["attention_fraction"]:.0f}%) + other kernels '
                  f'{r["other_kernels_s"]:.3f} + rest {r["rest_s"]:.3f}', flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
