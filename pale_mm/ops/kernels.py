"""Build and load pale_mm's fused fp32 CPU kernels (AVX-512): one C++ extension with
the pale attention kernel (``csrc/attention_cpu.cpp``, :mod:`.attention`) and the
Pale block's depthwise convs (``csrc/dwconv_cpu.cpp``, :mod:`.dwconv`).

It is compiled on first use with ``torch.utils.cpp_extension.load`` (about 40 s,
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). On a
CPU without AVX-512 it is not built and the reference ops run. If it cannot be built
(no compiler, no ninja), one warning says why and the reference ops run.
``PALE_MM_FAST_PATHS=0`` (:func:`pale_mm.ops.set_fast_paths`) turns it off with every
other fast path.
"""
import logging
import os.path as osp
import warnings

import torch

__all__ = ['load', 'cpu_has_avx512']

_CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
_SOURCES = [osp.join(_CSRC, 'attention_cpu.cpp'), osp.join(_CSRC, 'dwconv_cpu.cpp')]
_state = {'loaded': False, 'ext': None}
logger = logging.getLogger(__name__)


def cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() == 'AVX512'
    except AttributeError:  # older torch
        return False


def _build():
    # importing cpp_extension warns, on a CPU-only build of torch with a CUDA_HOME
    # present, that no CUDA runtime is found: not our concern here
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as cpp_load
    finally:
        cpp_logger.setLevel(level)
    logger.info('pale_mm: compiling the fused CPU kernels (once; cached)')
    return cpp_load('pale_mm_attention_cpu', _SOURCES,
                    extra_cflags=['-O3', '-mavx512f', '-mfma', '-fopenmp'],
                    extra_ldflags=['-fopenmp'], verbose=False)


def load():
    """The extension module, built on first call; ``None`` on CPUs without AVX-512
    or where it cannot be built (then with one warning)."""
    if not _state['loaded']:
        ext = None
        if cpu_has_avx512():
            try:
                ext = _build()
            except Exception as e:  # compiler, ninja or headers missing
                warnings.warn(f'pale_mm: the fused CPU attention and depthwise-conv kernels '
                              f'could not be built ({type(e).__name__}: {e}); using '
                              f'F.scaled_dot_product_attention and F.conv2d instead. Set '
                              f'PALE_MM_FAST_PATHS=0 to run the reference model without '
                              f'trying.')
        _state.update(loaded=True, ext=ext)
    return _state['ext']
