"""Build and load pale_mm's fused fp32 CPU kernels: one C++ extension with the pale
attention kernel (``csrc/attention_cpu.cpp``, :mod:`.attention`) and the Pale block's
depthwise convs (``csrc/dwconv_cpu.cpp``, :mod:`.dwconv`).

The sources are written once against a vector layer (``csrc/simd.h``) whose width is
chosen at build time, and built in two ways, as two extensions with their own cache
entries:

- ``'avx512'`` (``pale_mm_cpu_avx512``: ``-mavx512f -mfma``, 16-float vectors);
- ``'avx2'`` (``pale_mm_cpu_avx2``: ``-mavx2 -mfma``, 8-float vectors, register tiles
  shaped for 16 registers).

A process uses the widest build that both the CPU has (its flags, from
``/proc/cpuinfo`` or else torch's cpuinfo) and PyTorch runs at
(``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY=avx2``
lowers to AVX2): the AVX-512 build on AVX-512 CPUs, the AVX2 build on AVX2-only CPUs
and under ``ATEN_CPU_CAPABILITY=avx2``; on CPUs with neither (or not x86) nothing is
built and the reference ops run. :func:`set_max_isa` narrows the choice at run time
(the tests run both builds on an AVX-512 CPU).

A build is compiled on first use with ``torch.utils.cpp_extension.load`` (about 40 s,
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). If it
cannot be built (no compiler, no ninja), one warning says why and the reference ops
run. ``PALE_MM_FAST_PATHS=0`` (:func:`pale_mm.ops.set_fast_paths`) turns the kernels
off with every other fast path.
"""
import logging
import os.path as osp
import warnings
from typing import Dict, FrozenSet, Optional, Tuple

import torch

__all__ = ['ISAS', 'load', 'cpu_isa', 'available_isas', 'cpu_supports', 'set_max_isa',
           'torch_capability']

ISAS = ('avx512', 'avx2')  # the builds, widest first
_CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
_SOURCES = [osp.join(_CSRC, f) for f in ('attention_cpu.cpp', 'dwconv_cpu.cpp', 'gelu_cpu.cpp')]
# isa -> (extension name, compiler flags); the names key the two builds' caches
_BUILDS = {
    'avx512': ('pale_mm_cpu_avx512', ['-mavx512f', '-mfma', '-DPALE_MM_VEC=16']),
    'avx2': ('pale_mm_cpu_avx2', ['-mavx2', '-mfma', '-DPALE_MM_VEC=8']),
}
# the CPU flags (as /proc/cpuinfo names them) each build's instructions need
_NEEDS = {'avx512': ('avx512f', 'fma'), 'avx2': ('avx2', 'fma')}
# torch's CPU capability -> the builds it allows
_BY_CAPABILITY = {'AVX512': ('avx512', 'avx2'), 'AVX2': ('avx2',)}
_NAMES = {'avx512': 'AVX-512', 'avx2': 'AVX2'}

_exts: Dict[str, object] = {}  # isa -> the loaded extension, or None (failed to build)
_available: Dict[tuple, Tuple[str, ...]] = {}  # (capability, CPU flags) -> available_isas()
_max_isa = [None]
logger = logging.getLogger(__name__)


def _proc_cpu_flags() -> Optional[FrozenSet[str]]:
    """The CPU's flags from ``/proc/cpuinfo`` (Linux); ``None`` where unreadable."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return None


_cpu_flags = [_proc_cpu_flags()]


def cpu_supports(isa: str) -> bool:
    """Whether the CPU itself has the instructions of build ``isa``, whatever
    ``ATEN_CPU_CAPABILITY`` says (it can claim AVX-512 on a CPU without it)."""
    if isa not in _NEEDS:
        raise ValueError(f'unknown kernel build {isa!r}; the builds are {ISAS}')
    flags = _cpu_flags[0]
    if flags is not None:
        return all(f in flags for f in _NEEDS[isa])
    # no /proc/cpuinfo (macOS, Windows): torch's cpuinfo (AVX-512: F, BW, DQ, VL; AVX2
    # CPUs all have FMA)
    check = getattr(getattr(torch, 'cpu', None), f'_is_{isa}_supported', None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001 -- a failing probe means: not known to be there
        return False


def torch_capability() -> str:
    """PyTorch's CPU capability (``torch.backends.cpu.get_cpu_capability()``: e.g.
    ``'AVX512'``, ``'AVX2'``, lowered by ``ATEN_CPU_CAPABILITY``); ``'DEFAULT'`` on
    torch builds that do not say."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return 'DEFAULT'


def available_isas() -> Tuple[str, ...]:
    """The builds this process may use, widest first: those that the CPU supports
    (:func:`cpu_supports`) and PyTorch's CPU capability allows (AVX512: both; AVX2,
    e.g. under ``ATEN_CPU_CAPABILITY=avx2``: the AVX2 build; anything else: none)."""
    key = (torch_capability(), _cpu_flags[0])  # asked at every kernel call: remembered
    if key not in _available:
        _available[key] = tuple(isa for isa in _BY_CAPABILITY.get(key[0], ())
                                if cpu_supports(isa))
    return _available[key]


def cpu_isa() -> Optional[str]:
    """The build the kernels use: the widest of :func:`available_isas` no wider than
    :func:`set_max_isa`'s limit; ``None`` where none applies (the reference ops run)."""
    limit = _max_isa[0]
    allowed = ISAS if limit is None else ISAS[ISAS.index(limit):]
    return next((isa for isa in available_isas() if isa in allowed), None)


def set_max_isa(isa: Optional[str]) -> Optional[str]:
    """Use no build wider than ``isa`` (``'avx2'``: the AVX2 build even on an AVX-512
    CPU); ``None`` (the default) lifts the limit. It never selects a build the CPU
    lacks. Returns the previous limit."""
    if isa is not None and isa not in ISAS:
        raise ValueError(f'set_max_isa: unknown kernel build {isa!r}; the builds are {ISAS} '
                         f'(or None: no limit)')
    previous = _max_isa[0]
    _max_isa[0] = isa
    return previous


def _build(isa: str):
    # importing cpp_extension warns, on a CPU-only build of torch with a CUDA_HOME
    # present, that no CUDA runtime is found: not our concern here
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as cpp_load
    finally:
        cpp_logger.setLevel(level)
    name, flags = _BUILDS[isa]
    logger.info(f'pale_mm: compiling the fused CPU kernels, {_NAMES[isa]} build (once; cached)')
    return cpp_load(name, _SOURCES, extra_cflags=['-O3', '-fopenmp'] + flags,
                    extra_ldflags=['-fopenmp'], verbose=False)


def load():
    """The extension module of the build :func:`cpu_isa` names, built on its first
    call; ``None`` where no build applies or it cannot be built (then with one
    warning)."""
    isa = cpu_isa()
    if isa is None:
        return None
    if isa not in _exts:
        ext = None
        try:
            ext = _build(isa)
        except Exception as e:  # compiler, ninja or headers missing
            warnings.warn(f'pale_mm: the fused CPU attention and depthwise-conv kernels '
                          f'({_NAMES[isa]} build) could not be built ({type(e).__name__}: '
                          f'{e}); using F.scaled_dot_product_attention and F.conv2d instead. '
                          f'Set PALE_MM_FAST_PATHS=0 to run the reference model without '
                          f'trying.')
        _exts[isa] = ext
    return _exts[isa]
