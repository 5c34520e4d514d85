"""The Triton kernels of pale_mm/ops/triton_pale.py compiled for NVIDIA GPUs on any
machine with Triton, GPU or not: the forward and both backward kernels, for sm80
(A100), sm90 (H100) and sm100 (B200) where the installed Triton's ptxas knows the
target, in bfloat16, float16 and float32, at head dims 24 (Pale-S) and 32 (Pale-T,
Pale-B). A kernel that does not compile, or that spills registers, fails.

The launch settings are the dispatch's own: each case calls ``pale_attention_qkv``
forward and backward on small CPU tensors, with Triton's target set to the GPU and
every launch turned into a compile-only warmup, so the kernels are compiled with the
constants, ``num_warps``, ``num_stages`` and argument specialisations a real launch
uses. Triton specialises on ``C``, the head dim and the heads per branch (divisible by
16, or equal to 1), so each head dim is compiled at ``(C, num_heads) = (8*d, 8)``,
specialised as the third stage of Pale-T (256, 8) and of Pale-S (384, 16) are, 16 of
their 22 blocks. Spills are read from the cubin with ``cuobjdump --dump-resource-usage``
(Triton ships it): ``STACK``, the bytes of stack frame, which ptxas only needs for
spilled registers here (its ``-v`` log, checked when this test was written, gives
the same frame and "bytes spill stores" > 0 whenever it is nonzero);
``test_the_stack_frame_shows_spills`` keeps that reading honest.

The compiles run in subprocesses, one per target, concurrently: without a GPU the test
session runs the kernels in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), where they cannot be compiled. The 55 compiles take about 77 s
of CPU time (2.5 min of wall time on a shared 2-core machine), so the tests are marked
slow: the test command (tools/run_tests.sh) runs them, a plain ``pytest`` does not.
Triton caches the kernels (``~/.triton/cache``, ``TRITON_CACHE_DIR``); a second run
takes about 22 s of CPU, mostly the subprocesses importing torch. The same compiles
print a table of registers, stack and shared memory:

    .venv/bin/python -m tests.ops.test_triton_compile [--head-dims 24 32 64] [ARCH ...]
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

triton = pytest.importorskip('triton')
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ('_pale_fwd', '_pale_bwd_dq', '_pale_bwd_dkdv')
ARCHS = (80, 90, 100)
DTYPES = ('bfloat16', 'float16', 'float32')
HEAD_DIMS = (24, 32)
# a launch setting known to spill, for test_the_stack_frame_shows_spills: 64 keys per
# step in fp32, as before, spilled 512 bytes in the dq kernel at sm80 and sm90
SPILLING_ARCH = 80
SPILLING = dict(dtype='float32', head_dim=32, kernels=['_pale_bwd_dq'],
                settings=dict(BLOCK_N=64, num_warps=4))
# the launch arguments reported per kernel
SETTINGS = ('BLOCK_M', 'BLOCK_N', 'BLOCK_D', 'PRECISION', 'num_warps', 'num_stages')


@functools.lru_cache()
def unsupported(arch):
    """Why the installed Triton cannot compile for ``sm<arch>``, or ``None``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        ptxas = get_ptxas(arch).path
        from triton import knobs
        knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError) as e:  # no NVIDIA backend or tool
        return f'Triton {triton.__version__} cannot compile for NVIDIA GPUs here: {e!r}'
    target = sm_arch_from_capability(arch)
    usage = subprocess.run([ptxas, '--help'], capture_output=True, text=True).stdout
    if f"'{target}'" not in usage:
        return f"Triton {triton.__version__}'s ptxas ({ptxas}) does not know {target}"
    return None


# ------------------------------------------------------------------ in the subprocess
def resource_usage(cubin: bytes):
    """``{'REG': registers per thread, 'STACK': bytes of stack frame}`` of the one
    kernel in ``cubin``."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, '--dump-resource-usage', f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r'\b(REG|STACK):(\d+)', out))
    assert usage.keys() == {'REG', 'STACK'}, out  # a format this does not read
    return {k: int(v) for k, v in usage.items()}


def compile_for(arch, jobs):
    """Compile the kernels for ``sm<arch>``: each job (``dtype``, ``head_dim``, and
    optionally ``kernels``, the ones to compile, and ``settings``, launch arguments to
    replace) through ``pale_attention_qkv``'s forward and backward. Returns per job
    ``{kernel: {REG, STACK, shared, *SETTINGS}}`` or ``{'error': traceback}``."""
    import torch
    from triton.backends.compiler import GPUTarget

    from pale_mm.ops import triton_pale

    class Target:
        """The part of Triton's driver that compiling reads: the GPU target (and, as
        the key of the compiled-kernel cache, a device)."""

        def get_current_target(self):
            return GPUTarget('cuda', arch, 32)

        def get_current_device(self):
            return arch

        def get_current_stream(self, device):
            return None

    triton.runtime.driver.set_active(Target())
    launches = {}  # the launches of one forward and backward: {kernel: (args, kwargs)}
    for name in KERNELS:
        getattr(triton_pale, name).run = lambda *args, grid, warmup, _name=name, **kwargs: \
            launches.update({_name: (args, kwargs)})

    def compile_job(dtype, head_dim, kernels=KERNELS, settings=None):
        launches.clear()
        qkv = torch.zeros(3, 1, 7, 7, 8 * head_dim, dtype=getattr(torch, dtype),
                          requires_grad=True)
        triton_pale.pale_attention_qkv(qkv, (7, 7), 8).sum().backward()
        results = {}
        for name in kernels:
            args, kwargs = launches[name]
            kwargs.update(settings or {})
            kernel = getattr(triton_pale, name)
            binary = type(kernel).run(kernel, *args, grid=None, warmup=True, **kwargs)
            results[name] = dict(resource_usage(binary.asm['cubin']),
                                 shared=binary.metadata.shared,
                                 **{s: kwargs.get(s) for s in SETTINGS})
        return results

    results = []
    for job in jobs:
        try:
            results.append(compile_job(**job))
        except Exception:
            results.append({'error': traceback.format_exc()})
    return results


# ---------------------------------------------------------------------- in the tests
def start(arch, jobs):
    """A subprocess compiling ``jobs`` for ``sm<arch>`` (see :func:`compile_for`)
    outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    return subprocess.Popen([sys.executable, '-m', 'tests.ops.test_triton_compile', '--json',
                             str(arch), json.dumps(jobs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate()
    assert proc.returncode == 0, f'{proc.args[:5]} failed:\n{err[-4000:]}'
    return json.loads(out.splitlines()[-1])


def jobs(head_dims=HEAD_DIMS):
    return [dict(dtype=t, head_dim=d) for t in DTYPES for d in head_dims]


@pytest.fixture(scope='module')
def compiled():
    """``{arch: {(dtype, head_dim): per-kernel results}}`` for every target the
    installed Triton compiles for, the targets compiled concurrently, plus
    ``'spilling'``, the results of :data:`SPILLING`."""
    extra = {SPILLING_ARCH: [SPILLING]}
    procs = {arch: start(arch, jobs() + extra.get(arch, []))  # concurrently
             for arch in ARCHS if not unsupported(arch)}
    results = {}
    for arch, proc in procs.items():
        done = finish(proc)
        results[arch] = {(j['dtype'], j['head_dim']): r for j, r in zip(jobs(), done)}
        if arch in extra:
            results['spilling'] = done[-1]
    return results


def table(results):
    return '\n'.join(f'{name:15s} ' + ' '.join(f'{k}={v}' for k, v in r.items())
                     for name, r in results.items())


@pytest.mark.parametrize('head_dim', HEAD_DIMS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('arch', ARCHS, ids=lambda a: f'sm{a}')
def test_kernels_compile_without_spills(compiled, arch, dtype, head_dim):
    why = unsupported(arch)
    if why:
        pytest.skip(why)
    results = compiled[arch][dtype, head_dim]
    assert 'error' not in results, results.get('error')
    assert sorted(results) == sorted(KERNELS)
    spilling = [name for name, r in results.items() if r['STACK']]
    assert not spilling, f'{spilling} spill registers:\n{table(results)}'


def test_the_stack_frame_shows_spills(compiled):
    """The reading catches spills: a launch setting known to spill reports them."""
    if 'spilling' not in compiled:
        pytest.skip(unsupported(SPILLING_ARCH))
    results = compiled['spilling']
    assert 'error' not in results, results.get('error')
    assert results[SPILLING['kernels'][0]]['STACK'] > 0, table(results)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Compile the pale kernels for NVIDIA GPU '
                                     'targets and print their registers and spills.')
    parser.add_argument('archs', nargs='*', type=int, default=ARCHS)
    parser.add_argument('--head-dims', nargs='+', type=int, default=HEAD_DIMS)
    parser.add_argument('--json', nargs=2, metavar=('ARCH', 'JOBS'),
                        help='(for the tests) compile JOBS for ARCH, print the results')
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(compile_for(int(args.json[0]), json.loads(args.json[1]))))
        return
    procs = {}
    for arch in args.archs:
        why = unsupported(arch)
        if why:
            print(f'sm{arch}: skipped: {why}')
        else:
            procs[arch] = start(arch, jobs(args.head_dims))
    print(f'{"target":7s}{"dtype":10s}{"d":>4s}  {"kernel":15s}{"regs":>5s}{"stack":>7s}'
          f'{"shared":>8s}  settings')
    for arch, proc in procs.items():
        for job, results in zip(jobs(args.head_dims), finish(proc)):
            head = f'sm{arch:<5d}{job["dtype"]:10s}{job["head_dim"]:4d}  '
            if 'error' in results:
                print(head + 'ERROR ' + results['error'].splitlines()[-1])
                continue
            for name, r in results.items():
                print(head + f'{name:15s}{r["REG"]:5d}{r["STACK"]:7d}{r["shared"]:8d}  ' +
                      ' '.join(f'{s}={r[s]}' for s in SETTINGS))


if __name__ == '__main__':
    main()
