"""A fused fp32 CPU attention kernel for head dims 24 and 32 (AVX-512 or AVX2),
forward and backward.

PS-Attention attends within long pale groups (e.g. 896 tokens at stage 1 of a
512x512 input) with head dim 32 (Pale-T, Pale-B) or 24 (Pale-S). PyTorch's CPU flash
attention reaches about half of the machine's GEMM rate there; this kernel
(``csrc/attention_cpu.cpp``) computes each row of scores whole, so the softmax needs
no online rescaling, and keeps register tiles for both products sized to the build's
registers (AVX-512: 8 rows x 32 floats; AVX2: 6 rows x 16 floats; head dim 24 is
zero-padded to 32 in its packed copies). It is the same function as
``F.scaled_dot_product_attention`` (no mask, no dropout) to fp32 rounding; the tests
compare both, values and gradients, for each build.

Built on first use (:mod:`.kernels`: the AVX-512 build on AVX-512 CPUs, the AVX2
build on AVX2 CPUs, none on others) and used only where it applies
(:func:`can_fuse`): CPU, float32 (not under autocast), head dim 24 or 32, no
attention dropout, a build for this CPU, outside tracing and ``torch.compile``.
:func:`set_cpu_attention` switches it alone at run time (the benchmark uses it to
show its effect); :func:`pale_mm.ops.set_fast_paths` switches it with every other
fast path.
"""
from typing import Optional, Sequence

import torch

from . import fast_paths_enabled, is_tracing, kernels
from .linear import autocast_on

__all__ = ['cpu_attention_available', 'set_cpu_attention', 'fused_attention',
           'gathered_attention', 'can_fuse']

HEAD_DIM = 32  # the kernel's default and widest head dim
HEAD_DIMS = (24, 32)  # the head dims it serves (Pale-S; Pale-T and Pale-B)
_enabled = [True]


def cpu_attention_available() -> bool:
    """Whether the fused kernel is built and enabled (builds it on first call); false
    on CPUs without AVX2 or AVX-512."""
    return _enabled[0] and fast_paths_enabled() and kernels.load() is not None


def set_cpu_attention(enabled: bool) -> bool:
    """Turn the fused kernel on or off; returns the previous setting."""
    previous = _enabled[0]
    _enabled[0] = bool(enabled)
    return previous


def can_fuse(x: torch.Tensor, head_dim: int, dropout_p: float = 0.) -> bool:
    """Whether the fused kernel serves attention of head dim ``head_dim`` on tensors
    like ``x``."""
    if is_tracing():
        return False
    return bool(dropout_p == 0. and x.device.type == 'cpu' and x.dtype == torch.float32
                and int(head_dim) in HEAD_DIMS and not autocast_on()
                and cpu_attention_available())


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
        lses = [kernels.load().forward(q, k, v, out, off, scale, head_dim) for off in offsets]
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
            kernels.load().backward(grad, q, k, v, out, lse, off, ctx.scale, dq, dk, dv,
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
        kernels.load().forward(q, k, v, out, off, scale, head_dim)
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
