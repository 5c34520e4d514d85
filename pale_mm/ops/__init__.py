"""Optional speed paths for pale_mm's models, behind one switch.

The model files (:mod:`pale_mm.models`) are the reference: every module's forward
calls its own layers, so SyncBatchNorm conversion, hooks, FLOP counters, FX and ONNX
export see the model that runs. This package holds faster implementations of a few
of those forwards, each proven equal to the reference in the tests. For CPU tensors:

- :mod:`.pale`: the Pale block (CPE, PS-Attention, MLP) with copy-once pale grouping,
  BatchNorm folded into the q/k/v projections, residual adds fused into the output
  GEMMs, and the CPU kernels below; the MLP with its GELU recomputed in the backward
  instead of stored, for all three backbones.
- :mod:`.linear`: oneDNN's linear with fused GELU / residual post-ops (fp32 CPU
  inference).
- :mod:`.attention`, :mod:`.dwconv`: fused fp32 CPU kernels (AVX-512 or AVX2) for pale
  attention and the block's depthwise convs, built on first use (:mod:`.kernels`).

For CUDA tensors:

- :mod:`.pale_cuda`: PS-Attention with its q/k/v projections as one batched GEMM and
  the pale attention of both branches in one fused Triton kernel
  (:mod:`.triton_pale`), its modules (BatchNorm or SyncBatchNorm included) called as
  modules; the Pale block and the MLP run their reference forwards.

A model reaches them through one dispatch point, :func:`fast_path`, called first
in the forward of the modules that have a fast implementation; it picks the fast path
registered for the module's class and the device type of its input. It returns
``None``, and the reference forward runs, when there is none, or whenever a fast path
could differ from what a standard tool expects to see:

- fast paths are switched off: :func:`set_fast_paths` or ``PALE_MM_FAST_PATHS=0``;
- the model is being traced, scripted or exported (``torch.jit``, ``torch.fx``,
  ``torch.export``, ``torch.onnx``), or compiled (``torch.compile``), except for the
  GPU path, which compiles (:mod:`.pale_cuda`);
- the module or any of its submodules has been converted or replaced (e.g.
  ``nn.SyncBatchNorm.convert_sync_batchnorm``, ``fuse_conv_bn``, parametrizations),
  or carries a hook (or a global module hook is registered).

For ONNX export, a reference *function* may name an export path instead
(:func:`export_path`), and a module class may have an export form (registered for
the device type ``'onnx'``, with the same layout and hook checks): while
``torch.onnx.export`` runs (either exporter) with the fast paths on, they hand over to
code that computes the same values as graph ops that the runtimes run faster
(:mod:`.export`: the pale attention, PS-Attention's q/k/v); with the fast paths off the
file holds the reference's graph.
"""
import functools
import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

__all__ = ['set_fast_paths', 'fast_paths_enabled', 'fast_path', 'register_fast_path',
           'is_tracing', 'is_exporting', 'graph_for_all_sizes', 'fx_tracing',
           'register_export_path', 'export_path']

ENV = 'PALE_MM_FAST_PATHS'


def _env_enabled() -> bool:
    value = os.environ.get(ENV, '1').strip().lower()
    if value in ('1', 'on', 'true', 'auto', ''):
        return True
    if value in ('0', 'off', 'false'):
        return False
    raise ValueError(f'{ENV} must be 1 (fast paths on, the default) or 0 (every fast path '
                     f'off: the reference model runs), got {value!r}')


_enabled = [_env_enabled()]


def set_fast_paths(enabled: bool) -> bool:
    """Turn every fast path on or off at run time; returns the previous setting.
    Off, every module runs its reference forward (``PALE_MM_FAST_PATHS=0`` sets the
    initial state)."""
    previous = _enabled[0]
    _enabled[0] = bool(enabled)
    return previous


def fast_paths_enabled() -> bool:
    return _enabled[0]


def fx_tracing() -> bool:
    """Whether ``torch.fx`` is symbolically tracing (tensors are proxies)."""
    fx = torch.fx._symbolic_trace
    if hasattr(fx, 'is_fx_symbolic_tracing'):  # torch >= 2.5; is_fx_tracing() warns there
        return fx.is_fx_symbolic_tracing()
    return fx.is_fx_tracing()


def is_tracing() -> bool:
    """Under ``torch.compile``, ``torch.jit`` tracing or scripting, ``torch.fx``
    symbolic tracing or ``torch.onnx`` export. Ask this before looking at any tensor:
    the other checks would break a graph or a trace."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return fx_tracing() or torch.onnx.is_in_onnx_export()


def is_exporting() -> bool:
    """Under ``torch.export`` (also ``torch.onnx.export``, whose default exporter
    since torch 2.9 is built on it) or the TorchScript ONNX exporter: what
    ``torch.compiler.is_compiling()`` does not tell from ``torch.compile``."""
    compiler_exporting = getattr(torch.compiler, 'is_exporting', None)  # absent in older torch
    return torch.onnx.is_in_onnx_export() or (compiler_exporting is not None
                                              and compiler_exporting())


def graph_for_all_sizes() -> bool:
    """Whether the graph being recorded will run at other input sizes: traced by
    ``torch.jit`` or exported (``torch.export``, ``torch.onnx``). A branch on the
    input size must then take its general side (pad, mask) even where this size needs
    neither: ``torch.onnx.export``'s default exporter (``torch.export``, torch >= 2.9)
    keeps H and W dynamic but drops the guards such a branch becomes."""
    return torch.jit.is_tracing() or is_exporting()


# (module class, device type) -> (fast forward, {submodule name: its classes}, predicate,
# whether it runs under torch.compile)
_REGISTRY: Dict[Tuple[type, str],
                Tuple[Callable, Dict[str, Tuple[type, ...]], Callable, bool]] = {}


def register_fast_path(cls: type, layout: Dict[str, Union[type, Tuple[type, ...]]],
                       applies: Callable[[nn.Module], bool] = lambda m: True,
                       device: str = 'cpu', compiles: bool = False):
    """Decorator: the function is the fast forward, on tensors of device type
    ``device`` (``'cpu'``, ``'cuda'``), of modules of exactly class ``cls`` whose
    submodules are exactly ``layout`` (name -> class, or a tuple of the classes the
    fast forward accepts, e.g. ``(nn.BatchNorm2d, nn.SyncBatchNorm)`` where it calls
    that submodule as a module; every submodule must be listed), carry no hooks, and
    for which ``applies(module)`` holds (a setting the fast forward does not cover
    sends the module to its reference forward). Its arguments are the module, then the
    module's forward arguments. With ``compiles``, ``torch.compile`` traces the fast
    forward too (it must trace without graph breaks); other fast paths step aside
    under ``torch.compile``, and all of them under ``torch.export``. ``device='onnx'``
    registers a module's export form: what ``torch.onnx.export`` writes for it (either
    exporter) while the fast paths are on (:mod:`.export`)."""
    def register(fn):
        _REGISTRY[cls, device] = (fn, {k: v if isinstance(v, tuple) else (v,)
                                       for k, v in layout.items()}, applies, compiles)
        return fn
    return register


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(getattr(_module, '_global_forward_hooks', None)
                or getattr(_module, '_global_forward_pre_hooks', None)
                or getattr(_module, '_global_backward_hooks', None)
                or getattr(_module, '_global_backward_pre_hooks', None))


def _as_built(module: nn.Module, layout: Dict[str, Tuple[type, ...]]) -> bool:
    """Every submodule has exactly one of the classes the layout names and no hook."""
    if _has_hooks(module):
        return False
    seen = 0
    for name, m in module.named_modules():
        if not name:
            continue
        if type(m) not in layout.get(name, ()) or _has_hooks(m):
            return False
        seen += 1
    return seen == len(layout)


def fast_path(module: nn.Module, *args) -> Optional[Callable]:
    """The fast forward of ``module`` bound to it (call it with the forward's
    arguments), or ``None`` where the reference forward must run (see the module
    docstring). ``args``: the forward's tensor arguments, which must be plain
    tensors."""
    if not _enabled[0]:
        return None
    if torch.onnx.is_in_onnx_export():  # the module's export form (.export), if any
        from . import export  # noqa: F401  (registers the export forms on first use)
        device, compiling = 'onnx', False
    else:
        compiling = torch.compiler.is_compiling()
        if (is_exporting() if compiling else is_tracing()):
            return None
        if not args or not all(type(a) is torch.Tensor for a in args):
            return None
        device = args[0].device.type
    entry = _REGISTRY.get((type(module), device))
    if entry is None or _global_hooks():
        return None
    fn, layout, applies, compiles = entry
    if (compiling and not compiles) or not (_as_built(module, layout) and applies(module)):
        return None
    return functools.partial(fn, module)


# reference function name -> the function torch.onnx writes instead (pale_mm.ops.export)
_EXPORT_PATHS: Dict[str, Callable] = {}


def register_export_path(name: str):
    """Decorator: the function is what ``torch.onnx.export`` writes for the reference
    function ``name`` (same arguments, same values at every input size) while the
    fast paths are on."""
    def register(fn):
        _EXPORT_PATHS[name] = fn
        return fn
    return register


def export_path(name: str) -> Optional[Callable]:
    """The export form of the reference function ``name``, or ``None`` (the reference
    runs): ``None`` unless ``torch.onnx.export`` is running (TorchScript or
    ``torch.export``-based exporter) and the fast paths are on."""
    if not (_enabled[0] and torch.onnx.is_in_onnx_export()):
        return None
    from . import export  # noqa: F401  (registers the export forms on first use)
    return _EXPORT_PATHS.get(name)
