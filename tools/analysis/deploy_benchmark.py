#!/usr/bin/env python
"""Exported Pale-T next to exported Swin-T in onnxruntime and OpenVINO, on the CPU.

    python tools/analysis/deploy_benchmark.py                       # 512 and 800x1216
    python tools/analysis/deploy_benchmark.py --res 512 --reps 11 --out deploy.json
    python tools/analysis/deploy_benchmark.py --res 64 --reps 1     # smoke run

The backbones (fp32, batch 1) are exported once each: Pale-T with H and W dynamic
(``tools/deploy/export.py``'s way: TorchScript exporter, opset 17), with the fast
paths on (the export form of the pale attention, :mod:`pale_mm.ops.export`) in
standard ops (``--runtime any``) and with onnxruntime's ``MultiHeadAttention``
(``--runtime onnxruntime``), and with the fast paths off (the reference's graph);
mmdet's Swin-T at each resolution's fixed size (the way it runs: its window padding
is exported for the traced size). Every runtime gets ``--threads`` threads. All
variants, eager PyTorch Pale-T with the fast paths off and on included, run
interleaved, one step each per round, after warm-up; the medians are reported with
Pale-T/Swin-T throughput ratios (Swin's median time over Pale's, per runtime;
OpenVINO also runs the dynamic Pale-T file reshaped to the size at load time). Peak
memory is each runtime's maximum RSS in a fresh process (session creation and one
run) above the process's RSS before it, for the exported variants. The CPU's model
name and vector flags are recorded. Results go to JSON.

Targets (issue "Deployment ..."): onnxruntime and OpenVINO Pale-T/Swin-T at least 1.0x
at 512x512 and 0.8x at 800x1216; the exported Pale-T no slower than eager PyTorch with
the fast paths off; its peak memory no higher than Swin-T's.
"""
import argparse
import json
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

ORT_FORM = 'pale-t onnxruntime form'  # exported with --runtime onnxruntime
FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile', 'amx_bf16')


def cpu_info() -> dict:
    """The CPU's model name and the vector flags that decide the runtimes' kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and model in ('', platform.machine()):
                    model = line.split(':', 1)[1].strip()
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return dict(model=model, flags=[f for f in FLAGS if f in flags], cores=os.cpu_count())


def parse_res(text: str):
    h, _, w = text.partition('x')
    return int(h), int(w or h)


def build(name: str):
    from benchmark import build_ours, build_swin  # tools/analysis/benchmark.py
    model = build_swin('tiny') if name == 'swin' else build_ours('pale:tiny')
    model.eval()  # mmdet's Swin.train() returns None: no chaining
    return model


def export(model, path: str, hw, dynamic: bool, fast_paths: bool = True,
           runtime: str = 'any'):
    """The backbone's four maps, TorchScript exporter, opset 17; H and W dynamic or
    fixed at ``hw``; the pale attention written for ``runtime``."""
    from pale_mm.ops import set_fast_paths
    from pale_mm.ops.export import export_runtime
    names = [f'out{i}' for i in range(4)]
    axes = {'img': {2: 'H', 3: 'W'}, **{n: {2: f'h{i}', 3: f'w{i}'}
                                        for i, n in enumerate(names)}} if dynamic else None
    previous = set_fast_paths(fast_paths)
    try:
        with torch.no_grad(), warnings.catch_warnings(), export_runtime(runtime):
            warnings.simplefilter('ignore')
            torch.onnx.export(model, (torch.randn(1, 3, *hw), ), path, input_names=['img'],
                              output_names=names, dynamic_axes=axes, opset_version=17,
                              dynamo=False)
    finally:
        set_fast_paths(previous)
    return path


def session(backend: str, path: str, threads: int, static_hw=None):
    """A callable running ``path`` on one image in ``backend`` with ``threads``; for
    OpenVINO with ``static_hw``, the dynamic file reshaped to that size before it is
    compiled (the same file, its shapes fixed at load time)."""
    import numpy as np
    if backend == 'onnxruntime':
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        s = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        return lambda x: s.run(None, {'img': x})
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    if static_hw is not None:
        model.reshape({'img': [1, 3, *static_hw]})
    compiled = core.compile_model(model, 'CPU', {
        'INFERENCE_NUM_THREADS': threads, 'PERFORMANCE_HINT': 'LATENCY',
        'INFERENCE_PRECISION_HINT': 'f32'})
    request = compiled.create_infer_request()
    return lambda x: request.infer({'img': np.ascontiguousarray(x)})


def backends(requested):
    out = []
    for b in requested:
        try:
            __import__(b)
            out.append(b)
        except ImportError:
            print(f'{b} is not installed: skipped (pip install -e .[deploy])')
    return out


def peak_rss_mb(backend: str, path: str, hw, threads: int) -> float:
    """Peak RSS (VmHWM) of a fresh process that creates the runtime's session for ``path``
    and runs one image, above its RSS before the session (MB)."""
    code = (
        'import sys, numpy as np\n'
        f'sys.path[:0] = [{ROOT!r}, {HERE!r}]\n'
        'from deploy_benchmark import session\n'
        f'import {backend}  # noqa\n'
        'def status(key):  # kB; VmHWM (peak RSS) starts afresh at exec, ru_maxrss does not\n'
        '    with open("/proc/self/status") as f:\n'
        '        return next(int(l.split()[1]) for l in f if l.startswith(key))\n'
        'base = status("VmRSS:")\n'
        f'run = session({backend!r}, {path!r}, {threads})\n'
        f'run(np.random.rand(1, 3, {hw[0]}, {hw[1]}).astype(np.float32))\n'
        'print((status("VmHWM:") - base) / 1024)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def run(args) -> dict:
    import numpy as np

    from pale_mm.ops import set_fast_paths
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    pale, swin = build('pale'), build('swin')
    found = backends(args.backends)
    pale_files = {
        'pale-t': export(pale, os.path.join(args.work_dir, 'pale_t.onnx'), (256, 320), True),
        ORT_FORM: export(pale, os.path.join(args.work_dir, 'pale_t_ort.onnx'), (256, 320),
                         True, runtime='onnxruntime'),
        'pale-t reference graph': export(pale, os.path.join(args.work_dir, 'pale_t_ref.onnx'),
                                         (256, 320), True, fast_paths=False)}
    result = dict(cpu=cpu_info(), threads=args.threads, reps=args.reps, torch=torch.__version__,
                  backends={b: __import__(b).__version__ for b in found}, rows=[])
    for hw in args.res:
        swin_file = export(swin, os.path.join(args.work_dir, f'swin_t_{hw[0]}x{hw[1]}.onnx'),
                           hw, False)
        files = dict(pale_files, **{'swin-t (fixed size)': swin_file})
        steps = {}
        for backend in found:
            for name, path in files.items():
                if name != ORT_FORM or backend == 'onnxruntime':  # a file for onnxruntime
                    steps[(backend, name)] = session(backend, path, args.threads)
            if backend == 'openvino':
                steps[(backend, 'pale-t reshaped at load')] = session(
                    backend, pale_files['pale-t'], args.threads, hw)

        def eager(fast):
            def step(x):
                previous = set_fast_paths(fast)
                try:
                    with torch.no_grad():
                        pale(torch.from_numpy(x))
                finally:
                    set_fast_paths(previous)
            return step
        steps[('pytorch', 'pale-t fast paths off')] = eager(False)
        steps[('pytorch', 'pale-t fast paths on')] = eager(True)
        x = np.random.rand(1, 3, *hw).astype(np.float32)
        for step in steps.values():  # warm-up
            step(x)
        times = {k: [] for k in steps}
        for _ in range(args.reps):  # interleaved: one step of each variant per round
            for k, step in steps.items():
                t = time.perf_counter()
                step(x)
                times[k].append(time.perf_counter() - t)
        median = {k: statistics.median(v) for k, v in times.items()}
        # the memory probes below run in fresh processes: free this one's sessions
        # first (at 800x1216 they held 19.5 GB, and a probe beside them ran out of 24)
        steps.clear()
        gc.collect()
        for (backend, name), t in median.items():
            row = dict(res=list(hw), backend=backend, model=name, median_ms=t * 1e3,
                       times_ms=[v * 1e3 for v in times[(backend, name)]])
            swin_t = median.get((backend, 'swin-t (fixed size)'))
            if swin_t is not None and name.startswith('pale'):
                row['pale_over_swin_throughput'] = swin_t / t
            off = median[('pytorch', 'pale-t fast paths off')]
            if name.startswith('pale-t') and backend in found:
                row['speed_vs_eager_fast_paths_off'] = off / t
            if backend in found and args.memory and name in files:
                row['peak_rss_mb'] = peak_rss_mb(backend, files[name], hw, args.threads)
            result['rows'].append(row)
            print(f'{hw[0]}x{hw[1]} {backend:12s} {name:28s} {t * 1e3:9.1f} ms'
                  + (f'  pale/swin {row["pale_over_swin_throughput"]:.2f}x'
                     if 'pale_over_swin_throughput' in row else '')
                  + (f'  peak {row["peak_rss_mb"]:.0f} MB' if 'peak_rss_mb' in row else ''))
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Exported Pale-T vs Swin-T on the CPU')
    parser.add_argument('--res', type=parse_res, nargs='+', default=[(512, 512), (800, 1216)],
                        help='resolutions, 512 or HxW')
    parser.add_argument('--reps', type=int, default=9, help='timed rounds (median)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--backends', nargs='+', default=['onnxruntime', 'openvino'])
    parser.add_argument('--no-memory', dest='memory', action='store_false',
                        help='skip the peak-memory processes')
    parser.add_argument('--work-dir', default='work_dirs/deploy_benchmark',
                        help='where the exported files go')
    parser.add_argument('--out', default='work_dirs/deploy_benchmark/deploy_benchmark.json')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        raise SystemExit(f'error: --reps and --threads must be >= 1, got {args.reps}, '
                         f'{args.threads}')
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
