"""tools/setup_env.sh's pieces, tested without a build: the build progress line
(tools/build_progress.py)."""
import importlib.util
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_progress = _load('build_progress')


# ---------------------------------------------------------------- progress line
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _step(k, n, name):
    cc = 'nvcc' if name.endswith('.cu') else 'c++'
    return f'[{k}/{n}] /usr/bin/{cc} -c /s/mmcv/ops/csrc/pytorch/{name} -o /b/{name}.o\n'


def test_progress_cpu_build_as_before():
    clock = Clock()
    p = build_progress.Progress(jobs=2, cuda_files=0, clock=clock)
    clock.t = 10
    # the old formula: elapsed * (n - k) / (k + (jobs - 1) / 2) = 10 * 5 / 5.5
    assert p.line(_step(5, 10, 'nms.cpp')) == \
        f'  mmcv build [5/10] {"nms.cpp":<32} 0m10s elapsed, about 0m09s left'
    clock.t = 20
    assert p.line(_step(10, 10, 'roi_align.cpp')).endswith('0m20s elapsed, linking')
    assert p.line('a.cpp:3:1: error: expected ;\n') == 'a.cpp:3:1: error: expected ;'
    assert p.line('copying mmcv/ops/nms.py\n') is None


def test_progress_cuda_build_estimates_each_kind():
    clock = Clock()
    p = build_progress.Progress(jobs=2, cuda_files=2, clock=clock)
    clock.t = 4
    assert p.line(_step(1, 5, 'a.cpp')).endswith(
        'C++ files about 0m08s, then 2 .cu files (time not known until one is done)')
    clock.t = 8
    p.line(_step(2, 5, 'b.cpp'))
    clock.t = 12
    assert p.line(_step(3, 5, 'c.cpp')).endswith(
        '0m12s elapsed, 2 .cu files (time not known until one is done)')
    clock.t = 42
    # one .cu file took 30 s, one C++ file 4 s: one .cu file to go
    assert p.line(_step(4, 5, 'roi_align_cuda.cu')).endswith('0m42s elapsed, about 0m30s left')
    clock.t = 70
    assert p.line(_step(5, 5, 'nms_cuda.cu')).endswith('1m10s elapsed, linking')


def test_setup_env_sh_parses():
    r = subprocess.run(['bash', '-n', os.path.join(ROOT, 'tools', 'setup_env.sh')],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
