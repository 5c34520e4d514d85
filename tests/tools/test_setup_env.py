"""tools/setup_env.sh's decisions, tested on a CPU with the GPU queries faked: CUDA
detection (tools/cuda_env.py detect), the wheel cache key and the arch list, the
message on a GPU machine without nvcc, cached wheels under old and new keys, the nvcc
flags check, and the build progress line (tools/build_progress.py). No real builds.

The fakes: a stand-in ``torch`` package first on PYTHONPATH (version, CUDA version,
the GPUs it sees), ``nvidia-smi`` and ``nvcc`` shell scripts, and a CUDA_HOME folder
with the files a toolkit must have. PATH holds only the fakes, so a real nvcc or
nvidia-smi on the machine running the tests is never seen."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.tools import ROOT, load_tool

CUDA_ENV = os.path.join(ROOT, 'tools', 'cuda_env.py')
H200 = ('NVIDIA H200', (9, 0))
A100 = ('NVIDIA A100-SXM4-80GB', (8, 0))
ARCHS_130 = (75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121)  # nvcc 13.0 --list-gpu-arch
TORCH_HEADERS = ('cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h')

cuda_env = load_tool('cuda_env.py')
build_progress = load_tool('build_progress.py')


def _script(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('#!/bin/sh\n' + body)
    os.chmod(path, 0o755)
    return path


def _touch(*parts):
    path = os.path.join(*parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'w').close()


class Machine:
    """A fake machine: torch's view, nvidia-smi, toolkits; run() runs detect on it."""

    def __init__(self, root):
        self.root = str(root)
        self.site = os.path.join(self.root, 'site')
        self.bin = os.path.join(self.root, 'bin')
        os.makedirs(self.bin)
        self.env = {}
        self.torch()

    def torch(self, version='2.14.1+cu130', cuda='13.0', devices=(), warning=None,
              nvidia_headers=True):
        pkg = os.path.join(self.site, 'torch')
        os.makedirs(pkg, exist_ok=True)
        with open(os.path.join(pkg, '__init__.py'), 'w') as f:
            f.write(f'''import types, warnings
__version__ = {version!r}
version = types.SimpleNamespace(cuda={cuda!r})
_devices = {list(devices)!r}
def _available():
    if {warning!r}:
        warnings.warn({warning!r})
    return bool(_devices)
cuda = types.SimpleNamespace(
    is_available=_available, device_count=lambda: len(_devices),
    get_device_name=lambda i: _devices[i][0],
    get_device_capability=lambda i: _devices[i][1])
''')
        inc = os.path.join(self.site, 'nvidia', 'cu13', 'include')
        shutil.rmtree(inc, ignore_errors=True)
        if nvidia_headers:
            for h in TORCH_HEADERS + ('cuda_runtime.h',):
                _touch(inc, h)
        return self

    def smi(self, *gpus, rc=0, message='', compute_cap_field=True):
        """gpus: (name, 'M.m', driver) as nvidia-smi --query-gpu prints them."""
        rows = ''.join(f'{n}, {c}, {d}\\n' for n, c, d in gpus)
        old = ''.join(f'{n}, {d}\\n' for n, c, d in gpus)
        cap_check = '' if compute_cap_field else (
            'case "$1" in *compute_cap*) printf \'Field "compute_cap" is not a valid '
            'field to query.\\n\'; exit 2;; esac\n')
        _script(os.path.join(self.bin, 'nvidia-smi'), cap_check + (
            f'printf \'{message}\\n\'; exit {rc}\n' if rc else
            f'case "$1" in *compute_cap*) printf \'{rows}\';; *) printf \'{old}\';; esac\n'))
        return self

    def toolkit(self, name='cuda-13.0', release='13.0', archs=ARCHS_130, headers=False,
                runtime=True, libcudart=True):
        home = os.path.join(self.root, name)
        arch_out = ' '.join(f'compute_{a}' for a in archs)
        _script(os.path.join(home, 'bin', 'nvcc'), f'''case "$1" in
--version) printf 'nvcc: NVIDIA (R) Cuda compiler driver\\n';
  printf 'Cuda compilation tools, release {release}, V{release}.88\\n';;
--list-gpu-arch) printf '{arch_out}\\n';;
*) exit 1;;
esac
''')
        if runtime:
            _touch(home, 'include', 'cuda_runtime.h')
        if libcudart:
            _touch(home, 'lib64', 'libcudart.so')
        for h in TORCH_HEADERS if headers else ():
            _touch(home, 'include', h)
        return home

    def run(self, *args, default_home=None):
        env = {'PATH': self.bin, 'PYTHONPATH': self.site, 'HOME': self.root, **self.env}
        default_home = default_home or os.path.join(self.root, 'no-usr-local-cuda')
        r = subprocess.run([sys.executable, CUDA_ENV, 'detect', '--default-cuda-home',
                            default_home, *args], env=env, capture_output=True, text=True,
                           timeout=120)
        plan = dict(line.split('=', 1) for line in r.stdout.splitlines())
        plan = {k: v.strip("'") for k, v in plan.items()}
        return r.returncode, plan, r.stderr


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


# ---------------------------------------------------------------- CUDA detection
def test_cpu_machine_builds_cpu_ops(machine):
    machine.toolkit()  # a toolkit without a GPU changes nothing
    machine.env['CUDA_HOME'] = os.path.join(machine.root, 'cuda-13.0')
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_BUILD'] == 'cpu' and plan['MMCV_KEY'] == 'cpu'
    assert plan['MMCV_CUDA_HOME'] == '' and plan['MMCV_ARCH_LIST'] == ''
    assert 'no GPU visible (nvidia-smi not found' in err


def test_nvidia_smi_without_devices_is_a_cpu_machine(machine):
    machine.smi(rc=6, message='No devices were found')
    rc, plan, err = machine.run()
    assert rc == 0 and plan['MMCV_BUILD'] == 'cpu'
    assert 'No devices were found' in err


def test_h200_with_toolkit(machine):
    machine.torch(devices=[H200]).smi(('NVIDIA H200', '9.0', '580.82.07'))
    home = machine.toolkit(headers=True)
    machine.env['CUDA_HOME'] = home
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_BUILD'] == 'cuda'
    assert plan['MMCV_KEY'] == 'cu130-sm90'
    assert plan['MMCV_ARCH_LIST'] == '9.0'
    assert plan['MMCV_CUDA_HOME'] == home
    assert plan['MMCV_CPATH'] == ''  # the toolkit has the library headers
    assert int(plan['MMCV_MAX_JOBS']) >= 1
    assert '1 x NVIDIA H200 (compute capability 9.0), driver 580.82.07' in err


def test_library_headers_from_torchs_nvidia_packages(machine):
    """A toolkit with only nvcc and the runtime (no cuSPARSE/cuBLAS/cuSOLVER headers,
    which torch's CUDA headers include): the headers of torch's nvidia packages."""
    machine.torch(devices=[H200])
    machine.env['CUDA_HOME'] = machine.toolkit(headers=False)
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_CPATH'] == os.path.join(machine.site, 'nvidia', 'cu13', 'include')

    machine.torch(devices=[H200], nvidia_headers=False)
    rc, plan, err = machine.run()
    assert rc == 3 and plan == {}
    assert 'cusparse.h, cublas_v2.h, cublasLt.h, cusolverDn.h' in err


def test_two_kinds_of_gpu(machine):
    machine.torch(devices=[H200, A100, H200])
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_ARCH_LIST'] == '8.0;9.0'
    assert plan['MMCV_KEY'] == 'cu130-sm80_sm90'


def test_arch_list_of_the_gpus_torch_sees(machine):
    """nvidia-smi lists every GPU; CUDA_VISIBLE_DEVICES leaves torch one: built for that one."""
    machine.torch(devices=[H200]).smi(('NVIDIA H200', '9.0', '580'), ('NVIDIA A100', '8.0', '580'))
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_ARCH_LIST'] == '9.0'


def test_old_driver_without_compute_cap_field(machine):
    machine.torch(devices=[A100]).smi(('NVIDIA A100', '8.0', '470.1'), compute_cap_field=False)
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_ARCH_LIST'] == '8.0'
    assert 'compute capability unknown), driver 470.1' in err


def test_user_arch_list_overrides(machine):
    machine.torch(devices=[H200])
    machine.env.update(CUDA_HOME=machine.toolkit(headers=True),
                       TORCH_CUDA_ARCH_LIST='8.6 9.0+PTX')
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_ARCH_LIST'] == '8.6 9.0+PTX'
    assert plan['MMCV_KEY'] == 'cu130-sm86_sm90ptx'
    assert 'from the environment' in err


def test_user_arch_list_without_the_gpu_here_warns(machine):
    machine.torch(devices=[H200])
    machine.env.update(CUDA_HOME=machine.toolkit(headers=True), TORCH_CUDA_ARCH_LIST='8.0')
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_KEY'] == 'cu130-sm80'
    assert 'has no code for compute capability 9.0' in err


def test_runs_on():
    assert cuda_env.runs_on('9.0', (9, 0))
    assert not cuda_env.runs_on('8.0', (9, 0))
    assert cuda_env.runs_on('8.0', (8, 6))  # a cubin runs on later minor versions
    assert not cuda_env.runs_on('8.6', (8, 0))
    assert cuda_env.runs_on('8.0+PTX', (9, 0))  # PTX on any later GPU
    assert not cuda_env.runs_on('9.0a', (9, 1))  # arch-specific code: that GPU only
    assert cuda_env.runs_on('7.5;8.0 9.0', (9, 0))


def test_gpu_without_nvcc_says_what_to_install(machine):
    machine.torch(devices=[H200]).smi(('NVIDIA H200', '9.0', '580.82.07'))
    rc, plan, err = machine.run()
    assert rc == 3
    assert plan == {}  # nothing for setup_env.sh to eval: it stops
    assert 'no CUDA toolkit (nvcc)' in err
    assert 'CUDA_HOME and CUDA_PATH are not set' in err and 'nvcc is not on PATH' in err
    assert 'install the CUDA 13.x toolkit' in err and 'CUDA_HOME' in err
    assert '1 x NVIDIA H200' in err
    assert 'Nothing of mmcv was built or installed' in err
    assert 'PALE_MM_MMCV_CPU_ONLY=1' in err


def test_opt_out_builds_cpu_ops_with_a_loud_warning(machine):
    machine.torch(devices=[H200])
    machine.env['PALE_MM_MMCV_CPU_ONLY'] = '1'
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_BUILD'] == 'cpu' and plan['MMCV_KEY'] == 'cpu'
    assert 'WARNING' in err and 'FAIL on CUDA tensors' in err and 'NVIDIA H200' in err


def test_cuda_major_mismatch(machine):
    machine.torch(devices=[H200])
    machine.env['CUDA_HOME'] = machine.toolkit(name='cuda-12.8', release='12.8', headers=True)
    rc, plan, err = machine.run()
    assert rc == 3
    assert "nvcc 12.8" in err and "does not match torch's CUDA 13.0" in err


def test_cuda_minor_mismatch_is_a_note(machine):
    machine.torch(devices=[H200])
    machine.env['CUDA_HOME'] = machine.toolkit(name='cuda-13.1', release='13.1', headers=True)
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_KEY'] == 'cu130-sm90'  # torch's CUDA: what the wheel links against
    assert 'differ in the minor version' in err


def test_cpu_only_torch_on_a_gpu_machine(machine):
    machine.torch(version='2.14.1+cpu', cuda=None).smi(('NVIDIA H200', '9.0', '580'))
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    rc, plan, err = machine.run()
    assert rc == 3
    assert 'is a CPU-only build' in err


def test_driver_too_old_for_torch(machine):
    warning = 'CUDA initialization: The NVIDIA driver on your system is too old'
    machine.torch(devices=[], warning=warning).smi(('NVIDIA H200', '9.0', '525.60'))
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    rc, plan, err = machine.run()
    assert rc == 3
    assert 'cannot use them' in err and 'driver on your system is too old' in err
    assert 'install an NVIDIA driver that supports CUDA 13.0' in err

    machine.torch(devices=[])
    machine.env['CUDA_VISIBLE_DEVICES'] = ''
    rc, plan, err = machine.run()
    assert rc == 3 and "CUDA_VISIBLE_DEVICES='' hides them" in err


def test_nvcc_wrapper_on_path_is_not_taken_for_a_toolkit(machine):
    """/usr/local/bin/nvcc as a script calling the real one: torch would take /usr/local
    as CUDA_HOME; detect takes the whole toolkit at the default place instead."""
    home = machine.toolkit(headers=True)
    _script(os.path.join(machine.bin, 'nvcc'), f'exec {home}/bin/nvcc "$@"\n')
    machine.torch(devices=[H200])
    rc, plan, err = machine.run(default_home=home)
    assert rc == 0, err
    assert plan['MMCV_CUDA_HOME'] == home

    rc, plan, err = machine.run()  # and no toolkit at the default place
    assert rc == 3
    assert f'nvcc on PATH ({machine.bin}/nvcc) is not in a whole toolkit' in err


def test_nvcc_on_path_inside_a_toolkit(machine):
    home = machine.toolkit(headers=True)
    machine.env['PATH'] = os.path.join(home, 'bin')
    machine.torch(devices=[H200])
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_CUDA_HOME'] == home


@pytest.mark.parametrize('broken, says', [
    (dict(runtime=False), 'has no include/cuda_runtime.h'),
    (dict(libcudart=False), 'has no lib64/libcudart.so'),
])
def test_incomplete_cuda_home(machine, broken, says):
    machine.torch(devices=[H200])
    home = machine.toolkit(headers=True, **broken)
    machine.env['CUDA_HOME'] = home
    rc, plan, err = machine.run(default_home=machine.toolkit(name='other', headers=True))
    assert rc == 3  # the user's CUDA_HOME is never silently replaced
    assert f'CUDA_HOME={home} {says}' in err


def test_gpu_newer_than_nvcc(machine):
    machine.torch(devices=[('NVIDIA B200', (10, 0))])
    machine.env['CUDA_HOME'] = machine.toolkit(release='13.0', archs=(75, 80, 90), headers=True)
    rc, plan, err = machine.run()
    assert rc == 3
    assert 'cannot compile for compute capability 10.0' in err


def test_force_cuda_without_gpu(machine):
    machine.env.update(FORCE_CUDA='1', CUDA_HOME=machine.toolkit(headers=True))
    rc, plan, err = machine.run()
    assert rc == 3 and 'TORCH_CUDA_ARCH_LIST is not set' in err
    machine.env['TORCH_CUDA_ARCH_LIST'] = '9.0'
    rc, plan, err = machine.run()
    assert rc == 0, err
    assert plan['MMCV_BUILD'] == 'cuda' and plan['MMCV_KEY'] == 'cu130-sm90'


def test_debug_flags_for_nvcc_refused(machine):
    machine.torch(devices=[H200])
    machine.env.update(CUDA_HOME=machine.toolkit(headers=True), NVCC_APPEND_FLAGS='-lineinfo -G')
    rc, plan, err = machine.run()
    assert rc == 3 and 'NVCC_APPEND_FLAGS adds debug info' in err and '-G' in err


def test_plan_evals_in_bash(machine):
    """setup_env.sh evals detect's output: the arch list's ';' must stay quoted."""
    machine.torch(devices=[H200, A100])
    machine.env['CUDA_HOME'] = machine.toolkit(headers=True)
    env = {'PATH': machine.bin, 'PYTHONPATH': machine.site, **machine.env}
    cmd = (f'set -euo pipefail; PLAN="$({sys.executable} {CUDA_ENV} detect '
           f'--default-cuda-home /nonexistent 2>/dev/null)"; eval "$PLAN"; '
           'echo "$MMCV_BUILD|$MMCV_KEY|$MMCV_ARCH_LIST"')
    out = subprocess.run([shutil.which('bash'), '-c', cmd], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'cuda|cu130-sm80_sm90|8.0;9.0'


# ---------------------------------------------------------------- key and arch list
def test_cache_key():
    assert cuda_env.cache_key('cpu') == 'cpu'
    assert cuda_env.cache_key('cuda', '13.0', '9.0') == 'cu130-sm90'
    assert cuda_env.cache_key('cuda', '12.8', '9.0;8.0') == \
        cuda_env.cache_key('cuda', '12.8', '8.0 9.0')
    assert cuda_env.cache_key('cuda', '12.8', '8.0;9.0') == 'cu128-sm80_sm90'
    assert cuda_env.cache_key('cuda', '13.0', '9.0a') == 'cu130-sm90a'
    assert cuda_env.cache_key('cuda', '13.0', 'Hopper') == 'cu130-hopper'
    assert cuda_env.cache_key('cuda', '13.0', '9.0') != cuda_env.cache_key('cuda', '13.0', '8.0')


def test_arch_list():
    assert cuda_env.arch_list({}, [H200], []) == ('9.0', 'the GPUs torch sees')
    assert cuda_env.arch_list({}, [H200, A100, H200], [])[0] == '8.0;9.0'
    assert cuda_env.arch_list({}, [], [('NVIDIA H200', (9, 0), '580')]) == \
        ('9.0', 'the GPUs nvidia-smi lists')
    assert cuda_env.arch_list({'TORCH_CUDA_ARCH_LIST': '8.6'}, [H200], [])[0] == '8.6'
    assert cuda_env.arch_list({}, [], [('GPU', None, '470')])[0] == ''


# ---------------------------------------------------------------- cached wheels
def _wheel(path, cuda):
    """A wheel whose mmcv/_ext*.so names the libraries it needs, as an ELF .dynstr does."""
    libs = b'\0libc10.so\0libtorch_cpu.so\0libtorch_python.so\0'
    if cuda:
        libs += b'libc10_cuda.so\0libtorch_cuda.so\0libcudart.so.13\0'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('mmcv/__init__.py', '')
        if cuda is not None:
            z.writestr('mmcv/_ext.cpython-311-x86_64-linux-gnu.so', b'\x7fELF' + libs)
    return path


WHL = 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl'


def test_wheel_kind(tmp_path):
    assert cuda_env.kind(_wheel(str(tmp_path / 'a' / WHL), cuda=False)) == 'cpu'
    assert cuda_env.kind(_wheel(str(tmp_path / 'b' / WHL), cuda=True)) == 'cuda'
    assert cuda_env.kind(_wheel(str(tmp_path / 'c' / WHL), cuda=None)) == 'none'


def test_installed_mmcv_kind_agrees_with_readelf():
    """The kind of the mmcv installed here, against the ELF's NEEDED entries."""
    spec = importlib.util.find_spec('mmcv')
    if spec is None or not shutil.which('readelf'):
        pytest.skip('needs mmcv and readelf')
    import glob
    so = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], '_ext*.so'))
    if not so:
        pytest.skip('mmcv without compiled ops')
    needed = subprocess.run(['readelf', '-d', so[0]], capture_output=True, text=True).stdout
    expect = 'cuda' if 'libc10_cuda.so' in needed else 'cpu'
    assert 'libc10.so' in needed  # the check reads the right section
    assert cuda_env.kind('installed') == cuda_env.kind(so[0]) == expect


def test_pick_wheel_new_key(tmp_path, capsys):
    new = str(tmp_path / 'mmcv-2.1.0-torch2.14.1-cp311-cpu')
    whl = _wheel(os.path.join(new, WHL), cuda=False)
    assert cuda_env.pick_wheel(new, '', 'cpu') == whl


def test_pick_wheel_adopts_old_key_cpu_wheel_for_cpu_build(tmp_path, capsys):
    base = str(tmp_path / 'mmcv-2.1.0-torch2.14.1-cp311')
    old = _wheel(os.path.join(base, WHL), cuda=False)
    got = cuda_env.pick_wheel(base + '-cpu', base, 'cpu')
    assert got == os.path.join(base + '-cpu', WHL)
    assert os.path.isfile(got) and os.path.isfile(old)  # the old key keeps its wheel
    assert 'old key' in capsys.readouterr().err
    assert cuda_env.pick_wheel(base + '-cpu', base, 'cpu') == got  # next time: the new key


def test_pick_wheel_never_reuses_old_key_on_gpu(tmp_path, capsys):
    base = str(tmp_path / 'mmcv-2.1.0-torch2.14.1-cp311')
    _wheel(os.path.join(base, WHL), cuda=False)
    assert cuda_env.pick_wheel(base + '-cu130-sm90', base, 'cuda') is None
    assert 'not used for this cuda build' in capsys.readouterr().err
    assert not os.path.exists(base + '-cu130-sm90')


def test_pick_wheel_old_key_cuda_wheel_not_taken_for_cpu(tmp_path, capsys):
    base = str(tmp_path / 'mmcv-2.1.0-torch2.14.1-cp311')
    _wheel(os.path.join(base, WHL), cuda=True)
    assert cuda_env.pick_wheel(base + '-cpu', base, 'cpu') is None
    assert 'CUDA version and GPU architectures are unknown' in capsys.readouterr().err


def test_pick_wheel_refuses_mislabelled_wheel(tmp_path, capsys):
    new = str(tmp_path / 'mmcv-2.1.0-torch2.14.1-cp311-cu130-sm90')
    _wheel(os.path.join(new, WHL), cuda=False)
    assert cuda_env.pick_wheel(new, '', 'cuda') is None
    assert 'although its key says cuda' in capsys.readouterr().err


# ---------------------------------------------------------------- nvcc flags in the log
NVCC_LINE = ('[60/136] /usr/local/cuda/bin/nvcc -MD -MF /b/roi_align_cuda.o.d -DMMCV_WITH_CUDA '
             '-I/s/mmcv/ops/csrc/pytorch -c -c /s/mmcv/ops/csrc/pytorch/cuda/roi_align_cuda.cu '
             '-o /b/roi_align_cuda.o -D__CUDA_NO_HALF_OPERATORS__ --expt-relaxed-constexpr '
             "--compiler-options ''\"'\"'-fPIC'\"'\"'' -std=c++20 "
             '-DTORCH_EXTENSION_NAME=_ext -gencode=arch=compute_90,code=sm_90{extra}\n')


@pytest.mark.parametrize('extra, debug', [
    ('', []),
    (' -G', ['-G']),
    (' -g', ['-g']),
    (' -Xcompiler -g', ['-g']),
    (' --compiler-options=-O2,-ggdb', ['--compiler-options=-O2,-ggdb']),
    (' -lineinfo -Xcompiler -g0', []),
])
def test_nvcc_flags(tmp_path, extra, debug):
    log = tmp_path / 'build.log'
    log.write_text('[1/136] c++ -MMD -c /s/a.cpp -o /b/a.o -g -g0\n'
                   + NVCC_LINE.format(extra=extra))
    first, found = cuda_env.nvcc_flags(str(log))
    assert first[:4] == ['--expt-relaxed-constexpr', '--compiler-options', "'-fPIC'", '-std=c++20']
    assert '-gencode=arch=compute_90,code=sm_90' in first
    assert found == debug


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


def test_setup_env_refuses_a_full_disk_before_writing(tmp_path):
    """CI once died with pip's "[Errno 28] No space left on device" while installing
    torch; the script now says so first, naming the disk and the room it needs."""
    _script(str(tmp_path / 'bin' / 'df'),
            'echo "Filesystem 1048576-blocks Used Available Capacity Mounted on"\n'
            'echo "/dev/vdx 100000 99700 300 100% /"\n')
    venv = tmp_path / 'no' / 'venv'
    env = {**os.environ, 'PATH': f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           'PALE_MM_VENV': str(venv), 'PALE_MM_CACHE': str(tmp_path / 'cache')}
    r = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'setup_env.sh')], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert 'not enough disk space' in r.stderr and 'which has 300 MB' in r.stderr
    assert str(venv) in r.stderr and 'about 7000 MB' in r.stderr
    assert not (tmp_path / 'no').exists()  # nothing written, no venv begun


# ---------------------------------------------------------------- the import check
def _check_ops(machine):
    env = {'PATH': machine.bin, 'PYTHONPATH': machine.site, 'HOME': machine.root, **machine.env}
    return subprocess.run([sys.executable, CUDA_ENV, 'check-ops'], env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_ops_silent_without_gpu(machine):
    r = _check_ops(machine)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == ''


def test_check_ops_warns_on_gpu_with_cpu_only_mmcv(machine):
    machine.torch(devices=[H200])
    machine.env['PALE_MM_MMCV_CPU_ONLY'] = '1'
    r = _check_ops(machine)
    assert r.returncode == 0
    assert 'WARNING' in r.stdout and 'fail on CUDA tensors' in r.stdout
