"""Compatibility shims for the installed OpenMMLab stack.

``allow_numpy_in_checkpoints``: torch >= 2.6 loads checkpoints with
``weights_only=True`` by default, and mmengine 0.10.x calls ``torch.load`` without
the argument. Every checkpoint the mmengine ``Runner`` saves holds numpy values in
its ``meta`` (the seed, dataset palettes, the message hub's ``HistoryBuffer``s), so
``--resume`` and ``load_from`` fail with ``UnpicklingError: Weights only load
failed``. Instead of turning ``weights_only`` off (which would allow arbitrary code
on load), this allow-lists the few plain-data numpy types and mmengine's ``HistoryBuffer``
that such checkpoints need.

``ensure_safe_globals`` adds entries to torch's ``weights_only`` allow-list unless
torch's *current* list (``torch.serialization.get_safe_globals()``) already holds
them. It is checked on every call, never cached: a ``torch.serialization.safe_globals``
context (timm's checkpoint loader uses one) restores the list it found when it exits,
which can drop entries added meanwhile.

``fix_inductor_stride_order``: ``torch.compile(dynamic=True)`` (inductor) of a model
that keeps ``(B, H, W, C)`` maps and saves a permuted view of one for a convolution's
backward (the Pale block's CPE, LIT's and ScalableViT's convolutions) stops with
``TypeError: cannot determine truth value of Relational`` in torch 2.11 to 2.14:
inductor sorts the view's symbolic strides with plain Python comparisons where sizes
come from a strided stem (``(s - 1)//4 + 1``), which SymPy cannot order. torch's own
symbolic sort (``argsort_sym``, with the graph's ShapeEnv) orders them; the open
upstream fix (pytorch/pytorch#185871) makes inductor use it there. This backports
that: once inductor is loaded (pale_mm does not load it: the first compilation does),
``torch._inductor.ir.get_fill_order`` gets the active graph's ShapeEnv whenever it is
handed symbolic strides without one. Static strides, and callers that pass a ShapeEnv,
are unchanged.
"""
import functools
import pickle
import sys

import torch

__all__ = ['allow_numpy_in_checkpoints', 'numpy_safe_globals', 'mmengine_safe_globals',
           'ensure_safe_globals', 'fix_inductor_stride_order']


def ensure_safe_globals(entries: list) -> bool:
    """Add the ``entries`` missing from torch's current ``weights_only`` allow-list.

    Returns False on torch without ``torch.serialization.add_safe_globals``
    (torch < 2.4, where loading is not restricted anyway), True otherwise."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return False
    get = getattr(torch.serialization, 'get_safe_globals', None)
    current = get() if get is not None else []
    missing = [e for e in entries if e not in current]
    if missing:
        add(missing)
    return True


def numpy_safe_globals() -> list:
    """The numpy callables and types found in mmengine-saved checkpoints.

    Only data constructors: array reconstruction, dtype objects and scalars. No
    callable here can run code beyond building a numpy value."""
    import numpy as np
    try:  # numpy >= 1.25 exposes the private core under ``numpy._core`` too
        from numpy.core import multiarray
    except ImportError:  # pragma: no cover - numpy 2 without the alias
        from numpy._core import multiarray  # type: ignore
    safe = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    # Concrete dtype classes (numpy >= 1.25: ``numpy.dtypes.Float64DType`` ...).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [getattr(dtypes, name) for name in dir(dtypes)
                 if name.endswith('DType') and isinstance(getattr(dtypes, name), type)]
    else:  # pragma: no cover - old numpy: dtype classes are ``type(np.dtype(x))``
        scalars = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                   np.int64, np.uint8, np.bool_)
        safe += [type(np.dtype(t)) for t in scalars]
    return safe


def _history_buffer_getattr(obj, name: str):
    """Stand-in for ``builtins.getattr`` while unpickling with ``weights_only``.

    A ``HistoryBuffer`` pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. Allow-listing the real ``getattr`` would let a
    checkpoint reach any attribute of any allowed object, so this resolves only the
    statistics methods of ``HistoryBuffer`` and refuses everything else."""
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'pale_mm.compat: refusing getattr({obj!r}, {name!r}) in a weights_only load; '
        f'only HistoryBuffer statistics methods are allowed. Load the file with '
        f'weights_only=False only if you trust its source.')


def mmengine_safe_globals() -> list:
    """mmengine's plain-data classes pickled into Runner checkpoints: the message
    hub's ``HistoryBuffer`` (numpy arrays of logged scalars), whose statistics methods
    are pickled through ``getattr`` (resolved by a restricted stand-in)."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:  # pragma: no cover - mmengine not installed
        return []
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')]


def allow_numpy_in_checkpoints() -> bool:
    """Allow-list numpy data types for ``torch.load(weights_only=True)``.

    Idempotent, checked against torch's current list on every call
    (:func:`ensure_safe_globals`); a no-op (returns False) on torch builds without
    ``torch.serialization.add_safe_globals`` (torch < 2.4), where the default load
    is not restricted anyway. Returns True when the allow-list is installed.
    """
    return ensure_safe_globals(numpy_safe_globals() + mmengine_safe_globals())


def _shape_env_of(seq):
    """The ShapeEnv of the strides ``seq`` (from a SymInt among them, or from the
    graph inductor is lowering), or None."""
    for s in seq:
        if isinstance(s, torch.SymInt):
            return s.node.shape_env
    from torch._inductor.virtualized import V
    try:
        return V.graph.sizevars.shape_env
    except (AttributeError, AssertionError):  # no graph being lowered
        return None


def _patch_fill_order(ir) -> bool:
    """Wrap ``ir.get_fill_order`` (``torch._inductor.ir``) once; False where it is
    missing."""
    import sympy
    orig = getattr(ir, 'get_fill_order', None)
    if orig is None or getattr(orig, '_pale_mm_fix', False):
        return orig is not None

    @functools.wraps(orig)
    def get_fill_order(seq, shape_env=None):
        if shape_env is None and not all(isinstance(s, (int, sympy.Integer)) for s in seq):
            shape_env = _shape_env_of(seq)
        return orig(seq, shape_env)

    get_fill_order._pale_mm_fix = True
    ir.get_fill_order = get_fill_order
    return True


class _PatchInductorOnImport:
    """A ``sys.meta_path`` finder that lets ``torch._inductor.ir`` load as usual and
    wraps its ``get_fill_order`` right after, then takes itself off the path."""

    name = 'torch._inductor.ir'

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        import importlib.util
        sys.meta_path.remove(self)  # find the real spec without this finder
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch_fill_order(module)
        spec.loader.exec_module = exec_then_patch  # this spec's own loader instance
        return spec


def fix_inductor_stride_order() -> bool:
    """Backport pytorch/pytorch#185871 (see the module docstring): wrap inductor's
    ``get_fill_order`` now if inductor is loaded, else as soon as it loads (the first
    compilation), so importing pale_mm does not import inductor."""
    ir = sys.modules.get(_PatchInductorOnImport.name)
    if ir is not None:
        return _patch_fill_order(ir)
    if not any(isinstance(f, _PatchInductorOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchInductorOnImport())
    return True
