"""Layers shared by the Pale, LIT and ScalableViT backbones.

Token maps travel between blocks channels-last, as ``(B, H, W, C)`` tensors; a
conv sees them through the free ``permute(0, 3, 1, 2)`` view (channels-last memory).
"""
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ['to_pair', 'check_pale_size', 'DropPath', 'Mlp', 'ConvPatchEmbed',
           'check_image', 'checkpoint_block', 'linear', 'set_fast_cpu_linear']


def to_pair(value) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f'expected an int or a pair, got {value!r}')
        return tuple(value)
    return value, value


def check_pale_size(pale_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Validate a pale size ``sr`` or ``(sr, sc)``; returns ``(sr, sc)``."""
    pair = to_pair(pale_size)
    for s in pair:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f'pale_size must be an int or a pair of ints, got {pale_size!r}')
        if s < 1:
            raise ValueError(f'pale_size must be >= 1, got {pale_size!r}')
    return pair


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1. - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'


def _find_onednn_linear(overload: str):
    """``mkldnn::_linear_pointwise.<overload>``, or ``None`` on builds without it."""
    try:
        return getattr(torch.ops.mkldnn._linear_pointwise, overload)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear('default')
_ONEDNN_LINEAR_ADD = _find_onednn_linear('binary')  # with a binary post-op ('add')
_fast_cpu_linear = [True]


def set_fast_cpu_linear(enabled: bool) -> bool:
    """Turn the oneDNN inference path of :func:`linear` on or off; returns the
    previous setting (used by the benchmark to show its effect)."""
    previous = _fast_cpu_linear[0]
    _fast_cpu_linear[0] = bool(enabled)
    return previous


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's linear serves fp32 CPU tensors outside autocast, tracing (the FLOP
    counter traces ``aten::linear``) and torch.compile (inductor picks its own kernels)."""
    if torch.compiler.is_compiling():  # first: the checks below would break the graph
        return False
    return (_fast_cpu_linear[0] and _ONEDNN_LINEAR is not None and x.device.type == 'cpu'
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not (_autocast_on() or torch.jit.is_tracing()))


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, gelu: bool = False,
           residual=None):
    """``F.linear`` (then exact GELU when ``gelu``) on the last dim of ``x``; with a
    ``residual`` (shaped like the output), ``residual + out``.

    At fp32 CPU inference it runs oneDNN's linear (``mkldnn::_linear_pointwise``,
    what inductor uses on CPU) with the GELU, or the residual add, fused as a
    post-op: one pass less over the output, and on some CPUs (AMD) oneDNN's GEMM is
    markedly faster than the BLAS behind ``F.linear``. With autograd, autocast,
    tracing or on other devices it is ``F.linear`` (+ ``F.gelu``, + ``residual``).
    :func:`set_fast_cpu_linear` turns it off."""
    if not _needs_grad(x, weight, bias, residual) and _onednn_ok(x, weight):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        shape = (*x.shape[:-1], weight.shape[0])
        if residual is not None and not gelu and _ONEDNN_LINEAR_ADD is not None \
                and residual.shape == shape and residual.dtype == x.dtype:
            out = _ONEDNN_LINEAR_ADD(x2, residual.reshape(x2.shape[0], -1).contiguous(),
                                     weight.contiguous(), bias, 'add')
            return out.view(shape)
        out = _ONEDNN_LINEAR(x2, weight.contiguous(), bias, 'gelu' if gelu else 'none', [],
                             'none').view(shape)
    else:
        out = F.linear(x, weight, bias)
        out = F.gelu(out) if gelu else out
    return out if residual is None else residual + out


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` that saves ``h`` but not ``gelu(h)``:
    the backward recomputes the activation (one elementwise op) instead of keeping
    a second hidden-width tensor alive per block. Gradients are the same ops as
    autograd's; under autocast the weight is cast like ``F.linear`` does."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g.mm(weight.to(g.dtype)).view(h.shape).to(h.dtype)
            grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        if ctx.needs_input_grad[1]:
            a = F.gelu(h).reshape(-1, h.shape[-1]).to(g.dtype)
            grad_w = g.t().mm(a).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_h, grad_w, grad_b


class Mlp(nn.Module):
    """Linear C -> hidden, GELU, Linear hidden -> C (on the last dim).

    In training without dropout the GELU output is not kept for the backward; it
    is recomputed from the fc1 output (:class:`_GeluLinear`), which saves a
    hidden-width activation (4C per token) per block at the cost of one GELU. At
    inference the GELU is fused into fc1 (:func:`linear`)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, identity=None) -> torch.Tensor:
        """``x``: ``(..., C)``. With ``identity`` (shaped like the output), returns
        ``identity + mlp(x)``; at fp32 CPU inference the add is fused into fc2."""
        fc1, fc2 = self.fc1, self.fc2
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == 'none'
        if exact_gelu and (self.drop.p == 0 or not self.training):
            if not _needs_grad(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
                return linear(linear(x, fc1.weight, fc1.bias, gelu=True), fc2.weight, fc2.bias,
                              residual=identity)
            out = _GeluLinear.apply(fc1(x), fc2.weight, fc2.bias)
        else:
            out = self.drop(fc2(self.drop(self.act(fc1(x)))))
        return out if identity is None else identity + out


class ConvPatchEmbed(nn.Module):
    """Strided conv then LayerNorm: ``(B, C_in, H, W)`` -> ``(B, H', W', C_out)``
    with ``H' = floor((H + 2p - k) / s) + 1`` (ceil(H/s) for the Pale stem and
    merges).

    With ``channels_last``, the conv weight is stored channels-last (same values and
    state dict): patch merges get channels-last views of ``(B, H, W, C)`` maps,
    and PyTorch's CPU (oneDNN) conv would otherwise copy the weight to that layout
    on every call; the stem then also writes its output channels-last, which the
    LayerNorm reads without a copy. ``load_state_dict`` and ``.to()`` keep the
    layout. The conv's default init runs before the conversion, so its values are
    those of a plain conv; a later in-place random init (``trunc_normal_`` etc.) fills
    the weight in memory order, so the same seed then gives other (equally
    distributed) values than a contiguous weight would get. ScalableViT re-initialises
    its convs that way, so it keeps plain weights: its results stay as they were."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 padding: int, channels_last: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding)
        if channels_last:
            self.proj.to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def check_image(x, in_channels: int, owner: str):
    """Raise a clear error unless ``x`` is a ``(B, in_channels, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{owner} expects a torch.Tensor, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{owner} expects a 4-D (B, C, H, W) image tensor, got a '
                         f'{x.dim()}-D tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_channels:
        raise ValueError(f'{owner} was built with in_channels={in_channels} but got an '
                         f'input with {x.shape[1]} channels (shape {tuple(x.shape)})')
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f'{owner} got an empty image of shape {tuple(x.shape)}')


def _set_bn_stat_updates(module: nn.Module, flag: bool):
    for m in module.modules():
        if hasattr(m, 'update_bn_stats'):
            m.update_bn_stats = flag


def checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``block(x)`` under non-reentrant activation checkpointing.

    Non-reentrant checkpointing keeps gradients of parameters whose inputs do not
    require grad (frozen earlier stages) and restores the RNG state, so dropout and
    drop path replay exactly. Modules exposing ``update_bn_stats`` skip updating
    BatchNorm running statistics during the recompute, so they move once per step
    as without checkpointing.
    """
    calls = [0]

    def run(inp):
        calls[0] += 1
        if calls[0] == 1:
            return block(inp)
        _set_bn_stat_updates(block, False)
        try:
            return block(inp)
        finally:
            _set_bn_stat_updates(block, True)

    return checkpoint(run, x, use_reentrant=False)
