#!/usr/bin/env python
"""Interleaved A/B of the fused CPU depthwise-conv and GELU kernels: Pale-T (or
``--model``) training steps, or forward passes with ``--mode infer``, with both
kernels (as is), with the GELU kernel off, with both off, and mmdet's Swin of matching
size, interleaved in one process; medians, and the peak memory of ours and Swin's
(``benchmark.measure_peak``). At inference "GELU off" is oneDNN's GELU post-op
instead of the kernel after the GEMM (which only the AVX2 build uses), and a fourth
variant, "BLAS off", runs oneDNN's GEMM for every linear layer (where PyTorch runs at
AVX2 the wide ones otherwise keep the BLAS's: ``pale_mm.ops.linear.set_blas_on_avx2``).

    python tools/analysis/ab_train_kernels.py out.json [--reps 7] [--mode infer]
        [--model lit:s] [--res 512 800x1216]

Run it on a quiet machine; prefix ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`` for the AVX2 build.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('out')
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--res', nargs='+', type=bm.parse_hw, default=[(512, 512), (800, 1216)])
    ap.add_argument('--mode', choices=('train', 'infer'), default='train')
    ap.add_argument('--model', default='pale:tiny', choices=sorted(bm.SWIN_PEER))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from pale_mm.ops import kernels
    from pale_mm.ops.dwconv import set_fused_dwconv
    from pale_mm.ops.linear import set_blas_on_avx2, set_fused_gelu
    cpu = torch.device('cpu')
    swin = bm.SWIN_PEER[args.model]
    result = dict(isa=kernels.cpu_isa(), capability=torch.backends.cpu.get_cpu_capability(),
                  mode=args.mode, model=args.model, swin=swin)
    print(result)
    for res in args.res:
        x = torch.randn(1, 3, *res)
        steps = {'now': bm.make_step(bm.build_ours(args.model), x, args.mode, None),
                 'swin': bm.make_step(bm.build_swin(swin), x, args.mode, None)}
        steps['gelu_off'] = bm._switched_off(steps['now'], set_fused_gelu)
        steps['both_off'] = bm._switched_off(steps['now'], set_fused_dwconv, set_fused_gelu)
        variants = ('now', 'gelu_off', 'both_off')
        if args.mode == 'infer':
            steps['blas_off'] = bm._switched_off(steps['now'], set_blas_on_avx2)
            variants += ('blas_off',)
        times = bm.interleaved(steps, cpu, 2, args.reps)[1]
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: bm.measure_peak(name, res, args.mode, cpu) / 2 ** 20
               for k, name in (('now', args.model), ('swin', f'swin:{swin}'))}
        row = dict(median_s=med, times_s=times, peak_mb=mem,
                   **{f'{k}_over_swin': med['swin'] / med[k] for k in variants})
        result['%dx%d' % res] = row
        print(res, ', '.join(f"{k} {row[f'{k}_over_swin']:.3f}x" for k in variants),
              '| peak MB', {k: round(v) for k, v in mem.items()}, flush=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
