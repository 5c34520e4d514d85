#!/usr/bin/env python
"""What tools/setup_env.sh needs to know to build mmcv's ops for this machine.

Run with the virtual environment's Python (``detect`` imports torch):

  cuda_env.py detect                 shell assignments on stdout (for ``eval``), the
                                     report on stderr; exit 3 if mmcv's CUDA ops are
                                     needed here but cannot be built (what is missing
                                     and how to fix it is printed)
  cuda_env.py kind PATH|installed    cpu, cuda or none: whether an mmcv wheel, an
                                     mmcv/_ext*.so or the installed mmcv has CUDA ops
  cuda_env.py pick-wheel --dir D --old O --kind cpu|cuda
                                     the cached wheel to install (path on stdout, or
                                     nothing), with old-key wheels handled (see below)
  cuda_env.py nvcc-flags LOG         the flags nvcc got in an mmcv build log; exit 1 if
                                     they carry debug info (-g, -G)
  cuda_env.py check-ops              where torch sees a GPU: mmcv's nms and roi_align run
                                     on CUDA tensors and match the CPU ops (setup_env.sh's
                                     import check calls check_ops())

Decisions (docs/setup.md explains them):
- mmcv's CUDA ops are built when a GPU is present (torch sees one, or nvidia-smi lists
  one) or FORCE_CUDA=1; otherwise only its CPU ops, as before.
- A GPU without a usable toolkit (nvcc, headers, libcudart of torch's CUDA major
  version) is an error naming what is missing, unless PALE_MM_MMCV_CPU_ONLY=1, which
  builds a CPU-only mmcv with a loud warning.
- TORCH_CUDA_ARCH_LIST: the user's, else the compute capabilities of the GPUs torch
  sees (e.g. "9.0" for an H200), else those nvidia-smi lists.
- Cache key suffix: ``cpu``, or ``cu<torch's CUDA version>-sm<arch>...``, e.g.
  ``cu130-sm90``. Wheels cached under the old key (no suffix) are used only for CPU
  builds, and only after checking that they have no CUDA ops.

The GPU queries go through ``nvidia-smi`` and ``nvcc`` on PATH (or CUDA_HOME) and
torch, so tests fake them with scripts on PATH and a stand-in torch package.
"""
import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
import zipfile

OPT_OUT = 'PALE_MM_MMCV_CPU_ONLY'
DEFAULT_CUDA_HOME = '/usr/local/cuda'
# torch's ATen/cuda/CUDAContextLight.h, included by mmcv's CUDA op files, includes
# these; a toolkit with only nvcc and the runtime lacks them, torch's own pip packages
# (nvidia/cu13/include) have them.
TORCH_CUDA_HEADERS = ('cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h')
# One nvcc job compiling mmcv's roi_align_cuda.cu for sm_90 peaked at 1.3 GB (measured
# with /usr/bin/time, nvcc 13.0, torch 2.14.1); 2 GiB per job leaves room for larger files.
BYTES_PER_NVCC_JOB = 2 << 30
# Linked by torch's CUDAExtension (c10_cuda, torch_cuda, cudart), never by a CppExtension.
CUDA_LIBS = (b'\0libc10_cuda.so', b'\0libtorch_cuda.so', b'\0libcudart.so')
DEBUG_FLAGS = ('-g', '-G', '--debug', '--device-debug')


def log(msg=''):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- facts
def torch_facts():
    """What the venv's torch says: its version, CUDA version, the GPUs it sees."""
    import torch
    facts = {'version': torch.__version__, 'cuda': torch.version.cuda,
             'site': os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))),
             'devices': [], 'warning': ''}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            if torch.cuda.is_available():
                facts['devices'] = [
                    (torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                    for i in range(torch.cuda.device_count())]
        except Exception as e:  # a broken driver: torch sees no GPU
            facts['warning'] = f'{type(e).__name__}: {e}'
    if caught and not facts['warning']:
        facts['warning'] = str(caught[0].message).strip().splitlines()[0]
    return facts


def _run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return r.returncode, (r.stdout + r.stderr).strip()


def smi_gpus():
    """GPUs listed by nvidia-smi: ([(name, (major, minor) or None, driver)], note)."""
    exe = shutil.which('nvidia-smi')
    if not exe:
        return [], 'nvidia-smi not found'
    rc, out = _run([exe, '--query-gpu=name,compute_cap,driver_version',
                    '--format=csv,noheader'])
    with_cap = rc == 0
    if not with_cap:  # drivers before compute_cap was a query field
        rc, out = _run([exe, '--query-gpu=name,driver_version', '--format=csv,noheader'])
    if rc != 0:
        return [], f'nvidia-smi: {out.splitlines()[0] if out else f"exit status {rc}"}'
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.rsplit(',', 2 if with_cap else 1)]
        if len(parts) < 2 or not parts[0]:
            continue
        cap = None
        if with_cap:
            m = re.fullmatch(r'(\d+)\.(\d+)', parts[1])
            cap = (int(m.group(1)), int(m.group(2))) if m else None
        gpus.append((parts[0], cap, parts[-1]))
    return gpus, ''


def toolkit_problem(home):
    """Why ``home`` is not a CUDA toolkit torch can build with, or ''."""
    if not os.path.isdir(home):
        return 'does not exist'
    if not os.access(os.path.join(home, 'bin', 'nvcc'), os.X_OK):
        return 'has no bin/nvcc'
    if not os.path.isfile(os.path.join(home, 'include', 'cuda_runtime.h')):
        return 'has no include/cuda_runtime.h (the CUDA runtime headers)'
    if not any(os.path.exists(os.path.join(home, d, 'libcudart.so')) for d in ('lib64', 'lib')):
        return 'has no lib64/libcudart.so (the CUDA runtime library)'
    return ''


def find_toolkit(env, default_home=DEFAULT_CUDA_HOME):
    """The CUDA toolkit mmcv's CUDA ops would be compiled with: (home, [what was tried]).

    The same places torch looks (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda),
    but a place must hold a whole toolkit: torch takes the parent of bin/nvcc on PATH
    as the toolkit even when that nvcc is a wrapper script (/usr/local/bin/nvcc), and
    then fails to find the headers after compiling for minutes. The home found here is
    passed to the build as CUDA_HOME, so torch uses exactly this one."""
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        home = env.get(var)
        if home:  # the user's explicit choice: never look elsewhere
            why = toolkit_problem(home)
            return (None, [f'{var}={home} {why}']) if why else (home, [])
    tried = []
    nvcc = shutil.which('nvcc', path=env.get('PATH', os.defpath))
    if nvcc:
        homes = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
        for home in dict.fromkeys(homes):
            if not toolkit_problem(home):
                return home, []
        tried.append(f'nvcc on PATH ({nvcc}) is not in a whole toolkit '
                     f'({homes[0]} {toolkit_problem(homes[0])})')
    else:
        tried.append('nvcc is not on PATH')
    why = toolkit_problem(default_home)
    if not why:
        return default_home, []
    tried.append(f'{default_home} {why}')
    return None, ['CUDA_HOME and CUDA_PATH are not set'] + tried


def nvcc_version(home):
    """((major, minor), [compute capabilities nvcc can compile for] or None), or (None, None)."""
    nvcc = os.path.join(home, 'bin', 'nvcc')
    rc, out = _run([nvcc, '--version'])
    m = re.search(r'release (\d+)\.(\d+)', out) if rc == 0 else None
    if not m:
        return None, None
    rc, out = _run([nvcc, '--list-gpu-arch'])
    archs = None
    if rc == 0:
        archs = {(int(n) // 10, int(n) % 10) for n in re.findall(r'compute_(\d+)', out)} or None
    return (int(m.group(1)), int(m.group(2))), archs


def header_dirs(home, site, cuda_major):
    """Extra include dirs for torch's CUDA library headers the toolkit lacks:
    ([dirs], [headers found nowhere])."""
    have = [os.path.join(home, 'include'), os.path.join(home, 'targets', 'x86_64-linux', 'include')]
    missing = [h for h in TORCH_CUDA_HEADERS
               if not any(os.path.isfile(os.path.join(d, h)) for d in have)]
    extra = []
    if missing and site:
        cands = [os.path.join(site, 'nvidia', f'cu{cuda_major}', 'include')]
        cands += sorted(glob.glob(os.path.join(site, 'nvidia', '*', 'include')))
        for d in dict.fromkeys(cands):
            found = [h for h in missing if os.path.isfile(os.path.join(d, h))]
            if found:
                extra.append(d)
                missing = [h for h in missing if h not in found]
    return extra, missing


# ---------------------------------------------------------------- decisions
def fmt_cap(cap):
    return f'{cap[0]}.{cap[1]}'


def arch_list(env, torch_devices, smi):
    """TORCH_CUDA_ARCH_LIST for the build and where it came from."""
    user = env.get('TORCH_CUDA_ARCH_LIST', '').strip()
    if user:
        return user, 'TORCH_CUDA_ARCH_LIST from the environment'
    caps = {cap for _, cap in torch_devices}
    src = 'the GPUs torch sees'
    if not caps:
        caps = {cap for _, cap, _ in smi if cap}
        src = 'the GPUs nvidia-smi lists'
    return ';'.join(fmt_cap(c) for c in sorted(caps)), src


def parse_arch(token):
    """'9.0' / '9.0a' / '8.6+PTX' -> ((9, 0), suffix); named arches ('Hopper') -> None."""
    m = re.fullmatch(r'(\d+)\.(\d+)([a-z]?)(\+PTX)?', token)
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2))), m.group(3) + ('ptx' if m.group(4) else '')


def arch_tokens(archs):
    return [t for t in re.split(r'[;\s]+', archs) if t]


def runs_on(archs, cap):
    """Whether code built for ``archs`` runs on a GPU of compute capability ``cap``: a
    cubin for M.m runs on M.n with n >= m (M.ma only on M.m), PTX for M.m on any later
    GPU (compiled when loaded). Named arches ('Hopper') are taken to cover it."""
    for tok in arch_tokens(archs):
        p = parse_arch(tok)
        if p is None:
            return True
        (major, minor), suffix = p
        if 'ptx' in suffix and (major, minor) <= cap:
            return True
        if major == cap[0] and (minor == cap[1] or (minor < cap[1] and suffix == '')):
            return True
    return False


def cache_key(build, torch_cuda=None, archs=''):
    """The wheel cache key's suffix: 'cpu', or e.g. 'cu130-sm90' / 'cu130-sm86_sm90'."""
    if build == 'cpu':
        return 'cpu'
    parts = []
    for tok in arch_tokens(archs):
        p = parse_arch(tok)
        parts.append(f'sm{p[0][0]}{p[0][1]}{p[1]}' if p else re.sub(r'[^a-z0-9]', '', tok.lower()))
    return f'cu{torch_cuda.replace(".", "")}-' + '_'.join(sorted(set(parts)))


def describe_gpus(torch_f, smi):
    lines = []
    if smi:
        names = {}
        for name, cap, driver in smi:
            names.setdefault((name, cap), []).append(driver)
        for (name, cap), drivers in names.items():
            cc = f'compute capability {fmt_cap(cap)}' if cap else 'compute capability unknown'
            lines.append(f'{len(drivers)} x {name} ({cc}), driver {drivers[0]} (nvidia-smi)')
    seen = (f'sees {len(torch_f["devices"])} GPU(s): '
            + ', '.join(f'{n} ({fmt_cap(c)})' for n, c in torch_f['devices'])
            if torch_f['devices'] else 'sees no GPU')
    cuda = f'CUDA {torch_f["cuda"]}' if torch_f['cuda'] else 'a CPU-only build'
    lines.append(f'torch {torch_f["version"]} ({cuda}) {seen}'
                 + (f' [{torch_f["warning"]}]'
                    if torch_f['warning'] and not torch_f['devices'] else ''))
    return lines


def needs_cuda(torch_f, smi, env):
    """Whether mmcv's CUDA ops are to be built here: (bool, why)."""
    if torch_f['devices']:
        return True, 'torch sees a GPU'
    if smi:
        return True, 'nvidia-smi lists a GPU'
    if env.get('FORCE_CUDA') == '1':
        return True, 'FORCE_CUDA=1'
    return False, 'no GPU visible'


def cuda_problems(torch_f, smi, env, home, tried, nvcc_ver, nvcc_archs, archs, missing_headers):
    """What stands in the way of building mmcv's CUDA ops: [(problem, fix)]."""
    probs = []
    tcuda = torch_f['cuda']
    want = f'CUDA {tcuda.split(".")[0]}.x' if tcuda else 'CUDA'
    if not tcuda:
        probs.append((f'torch {torch_f["version"]} in the virtual environment is a CPU-only build',
                      'install a CUDA build of torch (e.g. pip install torch from '
                      'https://download.pytorch.org/whl/cu130), then rerun'))
    elif smi and not torch_f['devices'] and env.get('FORCE_CUDA') != '1':
        hidden = env.get('CUDA_VISIBLE_DEVICES')
        probs.append((f'nvidia-smi lists {len(smi)} GPU(s) but torch {torch_f["version"]} '
                      f'(CUDA {tcuda}) cannot use them',
                      f'CUDA_VISIBLE_DEVICES={hidden!r} hides them: unset it'
                      if hidden is not None and hidden.strip() in ('', '-1') else
                      f'install an NVIDIA driver that supports CUDA {tcuda} (nvidia-smi shows '
                      'the highest CUDA version the driver supports)'))
    if home is None:
        probs.append(('no CUDA toolkit (nvcc): ' + '; '.join(tried),
                      f'install the {want} toolkit, the version torch was built with (NVIDIA\'s '
                      'installer, or the cuda-toolkit package from NVIDIA\'s repository), and set '
                      'CUDA_HOME to it (e.g. export CUDA_HOME=/usr/local/cuda-'
                      f'{tcuda or "13.0"}) or put its bin/ on PATH'))
    elif nvcc_ver is None:
        probs.append((f'{home}/bin/nvcc --version does not run or prints no release',
                      'repair or reinstall that CUDA toolkit, or point CUDA_HOME at another'))
    else:
        if tcuda and nvcc_ver[0] != int(tcuda.split('.')[0]):
            probs.append((f'nvcc {fmt_cap(nvcc_ver)} at {home} does not match '
                          f'torch\'s CUDA {tcuda}: '
                          'the CUDA major versions must match (torch refuses to build otherwise)',
                          f'install the {want} toolkit and set CUDA_HOME to it'))
        if missing_headers:
            probs.append((f'{", ".join(missing_headers)} '
                          '(CUDA library headers torch\'s CUDA headers '
                          f'include) are neither in {home}/include nor in torch\'s nvidia packages',
                          'install the whole CUDA toolkit (with cuBLAS, cuSPARSE and cuSOLVER '
                          'development headers), or reinstall torch with its nvidia-* packages'))
    if not archs:
        probs.append(('no GPU to build for: FORCE_CUDA=1 but no GPU visible and '
                      'TORCH_CUDA_ARCH_LIST is not set',
                      'set TORCH_CUDA_ARCH_LIST to the compute capabilities to build for, '
                      'e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100/H200'))
    elif nvcc_archs:
        bad = [t for t in arch_tokens(archs)
               if parse_arch(t) and parse_arch(t)[0] not in nvcc_archs]
        if bad:
            probs.append((f'nvcc {fmt_cap(nvcc_ver)} cannot compile for compute capability '
                          f'{", ".join(bad)} (nvcc --list-gpu-arch)',
                          'install a newer CUDA toolkit of the same major version as torch, or '
                          'set TORCH_CUDA_ARCH_LIST to architectures it supports'))
    for var in ('NVCC_PREPEND_FLAGS', 'NVCC_APPEND_FLAGS'):
        dbg = [f for f in shlex.split(env.get(var, '')) if f in DEBUG_FLAGS]
        if dbg:
            probs.append((f'{var} adds debug info to every nvcc command ({" ".join(dbg)}); '
                          'the wheel would be cached with it '
                          '(and -G turns off device optimization)',
                          f'unset {var} for this run'))
    return probs


def mem_available():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def detect(env, default_home=DEFAULT_CUDA_HOME):
    """(shell assignments, exit status); the report goes to stderr."""
    torch_f = torch_facts()
    smi, smi_note = smi_gpus()
    out = {'MMCV_BUILD': 'cpu', 'MMCV_KEY': 'cpu', 'MMCV_CUDA_HOME': '',
           'MMCV_ARCH_LIST': '', 'MMCV_CPATH': '', 'MMCV_MAX_JOBS': ''}
    gpu_here = bool(torch_f['devices'] or smi)
    if env.get(OPT_OUT) == '1':
        if gpu_here:
            bar = '!' * 78
            log(bar)
            log(f'WARNING: {OPT_OUT}=1: mmcv WITHOUT CUDA ops on a machine with a GPU:')
            for line in describe_gpus(torch_f, smi):
                log(f'  {line}')
            log('  mmcv.ops (RoIAlign, NMS, deformable convs, ...) will FAIL on CUDA tensors:')
            log('  Mask R-CNN and the other mmdet detectors cannot run on the GPU with this mmcv.')
            log(f'  Unset {OPT_OUT} and rerun to build the CUDA ops.')
            log(bar)
        else:
            log(f'{OPT_OUT}=1: mmcv with its CPU ops (no GPU here anyway; cache key cpu)')
        return out, 0
    want, why = needs_cuda(torch_f, smi, env)
    if not want:
        log(f'no GPU visible ({smi_note or "nvidia-smi lists none"}; torch '
            f'{torch_f["version"]} sees none): mmcv with its CPU ops (cache key cpu)')
        return out, 0

    home, tried = find_toolkit(env, default_home)
    nvcc_ver, nvcc_archs = nvcc_version(home) if home else (None, None)
    archs, arch_src = arch_list(env, torch_f['devices'], smi)
    extra, missing = ([], [])
    if home and torch_f['cuda']:
        extra, missing = header_dirs(home, torch_f['site'], torch_f['cuda'].split('.')[0])
    probs = cuda_problems(torch_f, smi, env, home, tried, nvcc_ver, nvcc_archs, archs, missing)
    if probs:
        log(f'cannot build mmcv\'s CUDA ops here ({why}):')
        for line in describe_gpus(torch_f, smi):
            log(f'  {line}')
        for prob, fix in probs:
            log(f'  - {prob}')
            log(f'    fix: {fix}')
        log('mmcv\'s CUDA ops (RoIAlign, NMS, deformable convs: what Mask R-CNN needs on the GPU) '
            'are compiled by nvcc of the CUDA major version torch was built with. Nothing of '
            'mmcv was built or installed; rerun after the fix.')
        log(f'Or rerun with {OPT_OUT}=1 to build mmcv without CUDA ops (then RoIAlign, NMS and '
            'the other mmcv ops fail on CUDA tensors: Mask R-CNN cannot run on the GPU).')
        return None, 3

    for line in describe_gpus(torch_f, smi):
        log(line)
    if torch_f['cuda'] and nvcc_ver != tuple(int(x) for x in torch_f['cuda'].split('.')[:2]):
        log(f'note: nvcc {fmt_cap(nvcc_ver)} and torch\'s CUDA {torch_f["cuda"]} '
            'differ in the minor '
            'version (torch allows it)')
    key = cache_key('cuda', torch_f['cuda'], archs)
    log(f'mmcv with CUDA ops ({why}): nvcc {fmt_cap(nvcc_ver)} from {home}, '
        f'TORCH_CUDA_ARCH_LIST={archs} ({arch_src}); cache key {key}')
    missed = sorted({fmt_cap(c) for _, c in torch_f['devices'] if not runs_on(archs, c)})
    if missed:
        log(f'WARNING: TORCH_CUDA_ARCH_LIST={archs} has no code for compute capability '
            f'{", ".join(missed)} of the GPU(s) here: mmcv\'s CUDA ops will not run on them')
    if extra:
        log(f'torch\'s CUDA library headers are not in {home}/include: taken from '
            f'{", ".join(extra)} (CPATH)')
    mem = mem_available()
    out.update(MMCV_BUILD='cuda', MMCV_KEY=key, MMCV_CUDA_HOME=home, MMCV_ARCH_LIST=archs,
               MMCV_CPATH=os.pathsep.join(extra),
               MMCV_MAX_JOBS=str(max(1, mem // BYTES_PER_NVCC_JOB)) if mem else '')
    return out, 0


# ---------------------------------------------------------------- wheels
def so_kind(data):
    return 'cuda' if any(lib in data for lib in CUDA_LIBS) else 'cpu'


def kind(path):
    """'cuda' if mmcv's compiled ops (mmcv/_ext*.so) link CUDA, 'cpu' if not, 'none' if
    there are no compiled ops. ``path``: a wheel, an .so, or 'installed'."""
    if path == 'installed':
        import importlib.util
        spec = importlib.util.find_spec('mmcv')  # finds it without importing it
        if spec is None or not spec.submodule_search_locations:
            return 'none'
        sos = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], '_ext*.so'))
        if not sos:
            return 'none'
        path = sos[0]
    if path.endswith('.whl'):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if re.fullmatch(r'mmcv/_ext[^/]*\.so', n)]
            return so_kind(z.read(names[0])) if names else 'none'
    with open(path, 'rb') as f:
        return so_kind(f.read())


def _what(k):
    return {'cuda': 'CUDA ops', 'cpu': 'no CUDA ops', 'none': 'no compiled ops'}[k]


def pick_wheel(new_dir, old_dir, want):
    """The cached wheel for a ``want`` ('cpu' or 'cuda') build, or None.

    Wheels cached under the old key (no cpu/cuda suffix; every one was made on a CPU-only
    machine as far as we know, but the old script built CUDA ops wherever torch saw a
    GPU) are looked into rather than trusted: one without CUDA ops is taken for a CPU
    build (hard-linked, or copied, into the new key's folder); one with CUDA ops is never
    used, because its CUDA version and GPU architectures are unknown."""
    for whl in sorted(glob.glob(os.path.join(new_dir, 'mmcv-*.whl'))):
        k = kind(whl)
        if k == want:
            return whl
        log(f'cached wheel {whl} has {_what(k)} although its key says {want}: not used '
            '(it is rebuilt)')
    old = sorted(glob.glob(os.path.join(old_dir, 'mmcv-*.whl'))) if old_dir else []
    for whl in old:
        k = kind(whl)
        if want == 'cpu' and k == 'cpu':
            os.makedirs(new_dir, exist_ok=True)
            dst = os.path.join(new_dir, os.path.basename(whl))
            for src, to in ((whl, dst), (os.path.join(old_dir, 'build.log'),
                                         os.path.join(new_dir, 'build.log'))):
                if os.path.exists(src) and not os.path.exists(to):
                    try:
                        os.link(src, to)
                    except OSError:
                        shutil.copy2(src, to)
            log(f'cached wheel {whl} (old key, no cpu/CUDA suffix) has no CUDA ops: '
                f'reused for this CPU build as {dst}')
            return dst
        log(f'cached wheel {whl} (old key, no cpu/CUDA suffix) has {_what(k)}: not used for '
            f'this {want} build' + (' (its CUDA version and GPU architectures are unknown)'
                                    if k == 'cuda' else ''))
    return None


def nvcc_flags(log_path):
    """(flags of the first nvcc command in a build log without includes, defines and
    paths, debug flags seen in any nvcc command)."""
    first, debug = None, set()
    with open(log_path, errors='replace') as f:
        for line in f:
            if '/nvcc ' not in line or ' -c ' not in line:
                continue
            toks = shlex.split(line.split('/nvcc ', 1)[1], posix=True)
            flags, host = [], False
            for t in toks:
                # nvcc's own -g/-G, or -g passed on to the host compiler
                # (-Xcompiler -g, --compiler-options=-g,-O2)
                opts = t.split('=', 1)[1] if t.startswith(('-Xcompiler=', '--compiler-options=')) \
                    else t if host else ''
                if t in DEBUG_FLAGS or any(re.fullmatch(r"'?-g(gdb)?[1-3]?'?", o)
                                           for o in opts.split(',')):
                    debug.add(t)
                host = t in ('-Xcompiler', '--compiler-options')
                if not t.startswith(('-I', '/', '-D', '-MF', '-MD', '-c', '-o')):
                    flags.append(t)
            if first is None:
                first = flags
    return first, sorted(debug)


# ---------------------------------------------------------------- checks
def check_ops():
    """nms and roi_align on the GPU against the CPU ops; skipped without a GPU."""
    import torch
    if not torch.cuda.is_available():  # a CPU machine: nothing to check, nothing said
        return 0
    if os.environ.get(OPT_OUT) == '1':
        print(f'WARNING: mmcv was built without CUDA ops ({OPT_OUT}=1): RoIAlign, NMS and '
              'the other mmcv ops fail on CUDA tensors')
        return 0
    from mmcv.ops import nms, roi_align
    dev = torch.device('cuda')
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.],
                          [21., 19., 31., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    try:
        _, keep_cpu = nms(boxes, scores, 0.5)
        _, keep_gpu = nms(boxes.to(dev), scores.to(dev), 0.5)
        x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 7
        rois = torch.tensor([[0., 1., 1., 6., 6.], [1., 0.5, 0., 4., 7.5]])
        ref = roi_align(x, rois, (2, 2), 1.0, 2, 'avg', True)
        got = roi_align(x.to(dev), rois.to(dev), (2, 2), 1.0, 2, 'avg', True)
    except RuntimeError as e:
        print(f'mmcv CUDA ops FAILED on {torch.cuda.get_device_name(0)}: {e}\n'
              'mmcv was built without CUDA ops, or not for this GPU (TORCH_CUDA_ARCH_LIST): '
              'rerun tools/setup_env.sh', file=sys.stderr)
        return 1
    ok_nms = keep_gpu.device.type == 'cuda' and keep_gpu.cpu().tolist() == keep_cpu.tolist()
    ok_roi = got.device.type == 'cuda' and torch.allclose(got.cpu(), ref, atol=1e-5)
    if not (ok_nms and ok_roi):
        print(f'mmcv CUDA ops on {torch.cuda.get_device_name(0)} disagree with the CPU ops: '
              f'nms {keep_gpu.tolist()} vs {keep_cpu.tolist()}, roi_align max difference '
              f'{(got.cpu() - ref).abs().max().item():.3g}', file=sys.stderr)
        return 1
    print(f'mmcv CUDA ops: nms and roi_align run on {torch.cuda.get_device_name(0)} '
          'and match the CPU ops')
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('detect')
    d.add_argument('--default-cuda-home', default=DEFAULT_CUDA_HOME,
                   help='where to look for a toolkit when CUDA_HOME, CUDA_PATH and PATH '
                        'give none (default %(default)s)')
    k = sub.add_parser('kind')
    k.add_argument('path')
    p = sub.add_parser('pick-wheel')
    p.add_argument('--dir', required=True)
    p.add_argument('--old', default='')
    p.add_argument('--kind', required=True, choices=('cpu', 'cuda'))
    n = sub.add_parser('nvcc-flags')
    n.add_argument('log')
    sub.add_parser('check-ops')
    a = ap.parse_args(argv)
    if a.cmd == 'detect':
        out, rc = detect(dict(os.environ), a.default_cuda_home)
        if out:
            print('\n'.join(f'{k}={shlex.quote(v)}' for k, v in out.items()))
        return rc
    if a.cmd == 'kind':
        print(kind(a.path))
        return 0
    if a.cmd == 'pick-wheel':
        whl = pick_wheel(a.dir, a.old, a.kind)
        if whl:
            print(whl)
        return 0
    if a.cmd == 'nvcc-flags':
        first, debug = nvcc_flags(a.log)
        if first is None:
            print('no nvcc command in the log')
            return 1
        print('nvcc flags (besides -I, -D and paths): ' + ' '.join(first))
        if debug:
            print(f'nvcc got debug flags: {" ".join(debug)}', file=sys.stderr)
            return 1
        return 0
    return check_ops()


if __name__ == '__main__':
    sys.exit(main())
