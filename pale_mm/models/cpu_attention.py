"""A fused fp32 CPU attention kernel for head dims 24 and 32 (AVX-512), forward and
backward.

PS-Attention attends within long pale groups (e.g. 896 tokens at stage 1 of a
512x512 input) with head dim 32 (Pale-T, Pale-B) or 24 (Pale-S). PyTorch's CPU flash
attention reaches about half of the machine's GEMM rate there; this kernel
(``pale_mm/csrc/attention_cpu.cpp``) computes each row of scores whole, so the
softmax needs no online rescaling, and keeps 8x32 register tiles for both products
(head dim 24 is zero-padded to 32 in its packed copies). It is the same function as
``F.scaled_dot_product_attention`` (no mask, no dropout) to fp32 rounding; the
tests compare both, values and gradients.

It is compiled on first use with ``torch.utils.cpp_extension.load`` (about 40 s,
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
used only where it applies: CPU, float32 (not under autocast), head dim 24 or 32, no
attention dropout, outside tracing and ``torch.compile``. Everything else, and
CPUs without AVX-512, uses ``F.scaled_dot_product_attention``.

``PALE_MM_CPU_ATTENTION``: ``auto`` (default: use it where it applies; if it cannot
be built, warn once and use SDPA), ``0`` (never), ``1`` (required: raise if it
cannot be built or the CPU lacks AVX-512). :func:`set_cpu_attention` switches it
at run time (the benchmark uses it to show its effect).
"""
import logging
import os
import os.path as osp
import warnings
from typing import Optional, Sequence

import torch

__all__ = ['cpu_attention_available', 'set_cpu_attention', 'fused_attention',
           'gathered_attention', 'can_fuse']

HEAD_DIM = 32  # the kernel's default and widest head dim
HEAD_DIMS = (24, 32)  # the head dims it serves (Pale-S; Pale-T and Pale-B)
_ENV = 'PALE_MM_CPU_ATTENTION'
_CSRC = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'csrc')
# one extension: the attention kernel and the depthwise convs of :mod:`.cpu_dwconv`
_SOURCES = [osp.join(_CSRC, 'attention_cpu.cpp'), osp.join(_CSRC, 'dwconv_cpu.cpp')]
_state = {'loaded': False, 'ext': None, 'enabled': True}
logger = logging.getLogger(__name__)


def _mode() -> str:
    mode = os.environ.get(_ENV, 'auto').strip().lower()
    if mode not in ('auto', '0', '1'):
        raise ValueError(f'{_ENV} must be auto, 0 or 1, got {mode!r}')
    return mode


def _cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() == 'AVX512'
    except AttributeError:  # older torch
        return False


def _load():
    """Build (once per machine) and import the extension; ``None`` where it does not
    apply or, in ``auto`` mode, cannot be built."""
    if _state['loaded']:
        return _state['ext']
    mode = _mode()
    ext = None
    if mode != '0':
        problem = None if _cpu_has_avx512() else \
            f'this CPU has no AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})'
        if problem is None:
            try:
                # importing cpp_extension warns, on a CPU-only build of torch with a
                # CUDA_HOME present, that no CUDA runtime is found: not our concern here
                cpp_logger = logging.getLogger('torch.utils.cpp_extension')
                level = cpp_logger.level
                cpp_logger.setLevel(logging.ERROR)
                try:
                    from torch.utils.cpp_extension import load
                finally:
                    cpp_logger.setLevel(level)
                logger.info('pale_mm: compiling the CPU attention kernel (once; cached)')
                ext = load('pale_mm_attention_cpu', _SOURCES,
                           extra_cflags=['-O3', '-mavx512f', '-mfma', '-fopenmp'],
                           extra_ldflags=['-fopenmp'], verbose=False)
            except Exception as e:  # compiler, ninja or headers missing
                problem = f'it could not be built ({type(e).__name__}: {e})'
        if problem is not None:
            if mode == '1':
                raise RuntimeError(f'{_ENV}=1 but the pale_mm CPU attention kernel cannot be '
                                   f'used: {problem}')
            if _cpu_has_avx512():
                warnings.warn(f'pale_mm: using F.scaled_dot_product_attention and F.conv2d '
                              f'on the CPU because the fused attention and depthwise-conv '
                              f'kernels are unavailable: {problem}. Set {_ENV}=0 to silence '
                              f'this.')
    _state.update(loaded=True, ext=ext)
    return ext


def cpu_attention_available() -> bool:
    """Whether the fused kernel is built and enabled (builds it on first call)."""
    return _state['enabled'] and _load() is not None


def set_cpu_attention(enabled: bool) -> bool:
    """Turn the fused kernel on or off; returns the previous setting."""
    previous = _state['enabled']
    _state['enabled'] = bool(enabled)
    return previous


def _tracing_or_compiling() -> bool:
    """Under torch.compile, jit tracing (the FLOP counter) or scripting, where the
    extension's kernels must not be called; ask this before any other check, which
    would break the graph or the trace."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def can_fuse(x: torch.Tensor, head_dim: int, dropout_p: float = 0.) -> bool:
    """Whether the fused kernel serves attention of head dim ``head_dim`` on tensors
    like ``x``."""
    if _tracing_or_compiling():
        return False
    return bool(_state['enabled'] and dropout_p == 0. and x.device.type == 'cpu'
                and x.dtype == torch.float32 and int(head_dim) in HEAD_DIMS
                and _load() is not None)


def _offsets_ok(numel: int, offsets: Sequence[torch.Tensor], head_dim: int = HEAD_DIM) -> bool:
    """Every ``head_dim``-float row of a ``numel``-element tensor named exactly once
    over all ``offsets``."""
    rows = torch.cat([o.flatten() for o in offsets]).sort().values
    return rows.numel() * head_dim == numel and torch.equal(
        rows, torch.arange(0, numel, head_dim, device=rows.device))


class _GatheredAttention(torch.autograd.Function):
    """Attention within each row of every ``offsets`` tensor (see
    :func:`gathered_attention`); ``lse`` per offsets tensor is kept for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, scale, head_dim):
        out = torch.empty_like(q)
        lses = [_state['ext'].forward(q, k, v, out, off, scale, head_dim) for off in offsets]
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.offsets, ctx.scale, ctx.head_dim = offsets, scale, head_dim
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, *lses = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        for off, lse in zip(ctx.offsets, lses):
            _state['ext'].backward(grad, q, k, v, out, lse, off, ctx.scale, dq, dk, dv,
                                   ctx.head_dim)
        return dq, dk, dv, None, None, None


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       offsets: Sequence[torch.Tensor], scale: float,
                       check: bool = True, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """Softmax attention over gathered rows of contiguous float32 CPU tensors.

    ``offsets``: ``(S, N)`` int64 tensors (``N`` may differ between them); row ``r``
    of sequence ``s`` is the ``head_dim`` (24 or 32) floats at element offset
    ``offsets[s, r]`` of ``q``, ``k``, ``v`` (all the same shape) and of the output.
    Together the offsets must name every ``head_dim``-float row of the tensors exactly
    once (the output has no other elements); callers build them once per shape and
    may then pass ``check=False`` to skip verifying that (a sort of all offsets).
    Returns a tensor like ``q``. Call only where :func:`can_fuse` holds."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f'gathered_attention expects q, k, v of one shape, got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    head_dim = int(head_dim)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f'gathered_attention serves head dims {HEAD_DIMS}, got {head_dim}')
    if check and not _offsets_ok(q.numel(), offsets, head_dim):
        raise ValueError(f'gathered_attention: the offsets must name every row of '
                         f'{head_dim} floats of the {tuple(q.shape)} tensors exactly once')
    scale = float(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _GatheredAttention.apply(q, k, v, tuple(offsets), scale, head_dim)
    out = torch.empty_like(q)
    for off in offsets:
        _state['ext'].forward(q, k, v, out, off, scale, head_dim)
    return out


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for ``(..., N, d)`` float32 CPU tensors, ``d`` 24
    or 32, like ``F.scaled_dot_product_attention(q, k, v, scale=scale)``. Call only
    where :func:`can_fuse` holds."""
    shape = q.shape
    if not (k.shape == v.shape == shape):
        raise ValueError(f'fused_attention expects q, k, v of one shape, got {tuple(shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    d = shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f'fused_attention needs a head dim in {HEAD_DIMS}, got {d}')
    n = shape[-2]
    offsets = torch.arange(0, q.numel(), d).view(-1, n) if n else \
        torch.zeros(0, 0, dtype=torch.long)
    return gathered_attention(q, k, v, [offsets], d ** -0.5 if scale is None else scale,
                              check=False, head_dim=d)
