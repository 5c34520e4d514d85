"""Fused pale attention for CUDA tensors (Triton), forward and backward.

PS-Attention's row branch attends within groups of interlaced rows, its column branch
within groups of interlaced columns (:mod:`pale_mm.models.pale_attention`). The
reference builds each group by padding and copying (``pale_partition``), runs SDPA with
the padded keys masked, and copies back (``pale_reverse``, ``cat``). Here one launch
serves both branches, and every program finds its tokens by index arithmetic in the
``(B, H, W, C)`` maps:

- a *sequence* is (branch, image ``b``, group ``g``, head): in the row branch, line ``i``
  of group ``g`` is row ``i*G + g``, its tokens ``(i*G + g, w)`` for every ``w``; in
  the column branch, column ``i*G + g``, tokens ``(h, i*G + g)``. Channels ``[:C/2]``
  belong to the row branch, ``[C/2:]`` to the column branch, ``d`` per head;
- only real lines are read: a group whose last line would be padding has ``s - 1``
  lines, so the padded keys the reference masks are never loaded, and padded queries
  (whose outputs the reference drops) are never computed. This is exactly the
  reference's function (a masked key has weight ``exp(-inf) = 0``);
- q, k and v are read from one ``(3, B, H, W, C)`` tensor (the q/k/v projections'
  output) and the output is written straight into a ``(B, H, W, C)`` map; the
  backward writes the three gradients into one ``(3, B, H, W, C)`` tensor.

Sizes are runtime arguments that Triton does not specialise on, so one compiled
kernel serves every input size (detection batches change size every iteration);
kernels are compiled per dtype and padded head dim only. Products run on the tensor
cores in the inputs' dtype (bf16, fp16) with fp32 accumulation and an fp32 online
softmax, as FlashAttention does. fp32 inputs use full fp32 products (``ieee``), or TF32
when ``torch.backends.cuda.matmul.allow_tf32`` allows it for the reference too.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is
how the tests prove them equal to the reference on machines without a GPU.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from ..models.layers import check_heads
from ..models.pale_attention import pale_groups

__all__ = ['pale_attention_qkv', 'PaleAttentionFunction', 'compiled_op', 'MAX_HEAD_DIM', 'DTYPES',
           'launch_plan']

MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes the kernels take
BLOCK_M = 64  # queries per program (keys per program in the dk/dv kernel)
# the arguments that change with the input size: Triton does not specialise on them,
# so one compiled kernel serves all sizes (C, heads and d, fixed per stage, it does)
_SIZES = ['n0', 'B', 'H', 'W', 'G0', 'F0', 'NA0', 'NB0', 'S0', 'G1', 'F1', 'NA1', 'NB1', 'S1']


@triton.jit
def _locate(pid, n0, B, H, W, C, heads, d, G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1):
    """The sequence and block of program ``pid``: programs ``[0, n0)`` serve the row
    branch, the rest the column branch. Within a branch, programs run over
    (image, head, group, block); groups ``g < F`` have ``S`` lines, the others
    ``S - 1``, with ``NA`` and ``NB`` blocks of ``BLOCK`` tokens each.
    Returns ``(g, blk, G, other, step_along, step_other, n, plane, base, lse_base)``:
    ``other`` is the tokens per line, the two steps the token-index strides along the
    grouped axis and along a line, ``n`` the group's token count, ``plane`` the
    elements of one of q, k, v, ``base`` the offset of the head's first channel in its
    image, ``lse_base`` that of its per-token statistics (``(B, H*W, 2*heads)``)."""
    col = (pid >= n0).to(tl.int32)
    r = pid - col * n0
    G = tl.where(col == 1, G1, G0)
    F = tl.where(col == 1, F1, F0)
    NA = tl.where(col == 1, NA1, NA0)
    NB = tl.maximum(tl.where(col == 1, NB1, NB0), 1)  # 0 only when every group is full
    S = tl.where(col == 1, S1, S0)
    per_bh = F * NA + (G - F) * NB
    bh = r // per_bh
    r = r % per_bh
    b = bh // heads
    head = bh % heads
    r2 = r - F * NA
    full = r < F * NA
    g = tl.where(full, r // NA, F + r2 // NB)
    blk = tl.where(full, r % NA, r2 % NB)
    lines = tl.where(g < F, S, S - 1)
    other = tl.where(col == 1, H, W)
    step_along = tl.where(col == 1, 1, W)
    step_other = tl.where(col == 1, W, 1)
    HW = H * W
    plane = B.to(tl.int64) * HW * C
    base = b.to(tl.int64) * HW * C + col * (C // 2) + head * d
    lse_base = b.to(tl.int64) * HW * 2 * heads + col * heads + head
    return g, blk, G, other, step_along, step_other, lines * other, plane, base, lse_base


@triton.jit
def _rows(base, pos, g, G, other, step_along, step_other, C, ALIGN: tl.constexpr):
    """Element offsets of the head's first channel at positions ``pos`` of a sequence
    (token ``h*W + w`` at ``base + (h*W + w) * C``), and the token indices. Every
    offset is a multiple of ``ALIGN`` (a power of two dividing ``C``, ``C/2`` and the
    head dim), which lets the loads of a head's channels be vectorised."""
    tok = (pos // other * G + g) * step_along + (pos % other) * step_other
    return tl.multiple_of(base + tok * C, ALIGN), tok


@triton.jit
def _tile(base, start, n, g, G, other, step_along, step_other, C, dd, dmask,
          BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Positions ``start .. start + BLOCK`` of a sequence of ``n`` tokens: the
    ``(BLOCK, BLOCK_D)`` element offsets of their head channels and the mask of the
    real ones, the row mask and the token indices."""
    pos = start + tl.arange(0, BLOCK)
    rows = pos < n
    offsets, tok = _rows(base, pos, g, G, other, step_along, step_other, C, ALIGN)
    return offsets[:, None] + dd[None, :], rows[:, None] & dmask[None, :], rows, tok


@triton.jit(do_not_specialize=_SIZES)
def _pale_fwd(QKV, OUT, LSE, sm_scale, n0, B, H, W, C, heads, d,
              G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    g, blk, G, other, s_al, s_ot, n, plane, base, lse_base = _locate(
        tl.program_id(0), n0, B, H, W, C, heads, d, G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    qo, qmask, mmask, tm = _tile(base, blk * BLOCK_M, n, g, G, other, s_al, s_ot, C, dd,
                                 dmask, BLOCK_M, ALIGN)
    q = tl.load(QKV + qo, mask=qmask, other=0.)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        kv, kvmask, jmask, _ = _tile(base, start, n, g, G, other, s_al, s_ot, C, dd, dmask,
                                     BLOCK_N, ALIGN)
        k = tl.load(QKV + plane + kv, mask=kvmask, other=0.)
        v = tl.load(QKV + 2 * plane + kv, mask=kvmask, other=0.)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(jmask[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + qo, acc.to(OUT.dtype.element_ty), mask=qmask)
    tl.store(LSE + lse_base + tm * 2 * heads, m_i + tl.log2(l_i), mask=mmask)


@triton.jit(do_not_specialize=_SIZES)
def _pale_bwd_dq(QKV, OUT, DO, LSE, DELTA, DQKV, sm_scale, n0, B, H, W, C, heads, d,
                 G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """dq of one block of queries; also writes ``delta = rowsum(dO * O)`` for
    :func:`_pale_bwd_dkdv`."""
    g, blk, G, other, s_al, s_ot, n, plane, base, lse_base = _locate(
        tl.program_id(0), n0, B, H, W, C, heads, d, G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    qo, qmask, mmask, tm = _tile(base, blk * BLOCK_M, n, g, G, other, s_al, s_ot, C, dd,
                                 dmask, BLOCK_M, ALIGN)
    q = tl.load(QKV + qo, mask=qmask, other=0.)
    do = tl.load(DO + qo, mask=qmask, other=0.)
    o = tl.load(OUT + qo, mask=qmask, other=0.)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + lse_base + tm * 2 * heads, delta, mask=mmask)
    lse = tl.load(LSE + lse_base + tm * 2 * heads, mask=mmask, other=0.)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        kv, kvmask, jmask, _ = _tile(base, start, n, g, G, other, s_al, s_ot, C, dd, dmask,
                                     BLOCK_N, ALIGN)
        k = tl.load(QKV + plane + kv, mask=kvmask, other=0.)
        v = tl.load(QKV + 2 * plane + kv, mask=kvmask, other=0.)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(jmask[None, :], tl.exp2(s - lse[:, None]), 0.)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQKV + qo, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=_SIZES)
def _pale_bwd_dkdv(QKV, DO, LSE, DELTA, DQKV, sm_scale, n0, B, H, W, C, heads, d,
                   G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """dk and dv of one block of keys (blocks of ``BLOCK_M`` keys, the same blocks as
    the queries'), looping over the group's queries ``BLOCK_N`` at a time."""
    g, blk, G, other, s_al, s_ot, n, plane, base, lse_base = _locate(
        tl.program_id(0), n0, B, H, W, C, heads, d, G0, F0, NA0, NB0, S0, G1, F1, NA1, NB1, S1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    kv, kvmask, jmask, _ = _tile(base, blk * BLOCK_M, n, g, G, other, s_al, s_ot, C, dd,
                                 dmask, BLOCK_M, ALIGN)
    k = tl.load(QKV + plane + kv, mask=kvmask, other=0.)
    v = tl.load(QKV + 2 * plane + kv, mask=kvmask, other=0.)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        qo, qmask, mmask, tm = _tile(base, start, n, g, G, other, s_al, s_ot, C, dd, dmask,
                                     BLOCK_N, ALIGN)
        q = tl.load(QKV + qo, mask=qmask, other=0.)
        do = tl.load(DO + qo, mask=qmask, other=0.)
        lse = tl.load(LSE + lse_base + tm * 2 * heads, mask=mmask, other=0.)
        delta = tl.load(DELTA + lse_base + tm * 2 * heads, mask=mmask, other=0.)
        # transposed scores: keys along dim 0, queries along dim 1
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.where(mmask[None, :], tl.exp2(st - lse[None, :]), 0.)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DQKV + plane + kv, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=kvmask)
    tl.store(DQKV + 2 * plane + kv, dv.to(DQKV.dtype.element_ty), mask=kvmask)


def _branch(length: int, other: int, size: int, block: int) -> Tuple[int, ...]:
    """``(G, F, NA, NB, S)`` of one branch: ``G`` groups of ``S`` interlaced lines
    (:func:`pale_groups`), of which the first ``F`` have all ``S`` lines real and the
    others ``S - 1`` (their last line would be padding); ``NA``/``NB`` blocks of
    ``block`` tokens per full/short group."""
    groups, lines = pale_groups(length, size)
    full = length - (lines - 1) * groups
    return (groups, full, triton.cdiv(lines * other, block),
            triton.cdiv((lines - 1) * other, block), lines)


def launch_plan(shape, pale_size: Tuple[int, int], heads: int, block: int = BLOCK_M):
    """``(grid, n0, row_args, col_args)`` for a ``(B, H, W, C)`` map with ``heads``
    heads per branch: one program per block of ``block`` tokens of every sequence."""
    B, H, W, C = shape
    rows = _branch(H, W, pale_size[0], block)
    cols = _branch(W, H, pale_size[1], block)

    def programs(br):
        G, F, NA, NB, _ = br
        return B * heads * (F * NA + (G - F) * NB)
    n0 = programs(rows)
    return (n0 + programs(cols),), n0, rows, cols


def _precision(dtype: torch.dtype):
    """fp32 products as the reference's matmuls run them: full fp32 (``ieee``) unless
    TF32 is allowed; bf16/fp16 products are exact in the fp32 accumulator."""
    if dtype != torch.float32:
        return None
    return 'tf32' if torch.backends.cuda.matmul.allow_tf32 else 'ieee'


def _key_block(dtype: torch.dtype, block_d: int) -> Tuple[int, int]:
    """``(BLOCK_N, num_warps)``: the keys per step (queries per step in the dk/dv
    kernel) and the warps per program. bf16/fp16 take 64 keys on 4 warps. fp32 tiles
    take twice the registers, and full-fp32 products (``ieee``, on the FMA units) hold
    both operands in registers: at 64 keys all three kernels spilled registers on sm80
    and sm90. So fp32 takes 32 keys, and 16 keys on 8 warps for padded head dims 64
    and 128 (at 128 the dq kernel still spills). tests/ops/test_triton_compile.py
    compiles the kernels for sm80, sm90 and sm100 at head dims 24 and 32 and fails on
    a spill; docs/performance.md has the figures."""
    if dtype != torch.float32:
        return 64, 4
    return (32, 4) if block_d <= 32 else (16, 8)


def _meta(qkv: torch.Tensor, heads: int):
    """The launch settings of the three kernels (the forward adds ``num_stages=2``,
    the backward ``num_stages=1``), and the head dim."""
    C = qkv.shape[-1]
    d = C // 2 // heads
    common = math.gcd(d, C // 2)
    block_d = max(16, triton.next_power_of_2(d))
    block_n, warps = _key_block(qkv.dtype, block_d)
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_D=block_d,
                PRECISION=_precision(qkv.dtype), ALIGN=min(16, common & -common),
                num_warps=warps), d


def _forward(qkv, pale_size, heads, scale):
    _, B, H, W, C = qkv.shape
    meta, d = _meta(qkv, heads)
    grid, n0, rows, cols = launch_plan((B, H, W, C), pale_size, heads)
    out = torch.empty(qkv.shape[1:], dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B, H * W, 2 * heads), dtype=torch.float32, device=qkv.device)
    _pale_fwd[grid](qkv, out, lse, scale, n0, B, H, W, C, heads, d, *rows, *cols,
                    num_stages=2, **meta)
    return out, lse


def _backward(qkv, out, lse, grad, pale_size, heads, scale):
    _, B, H, W, C = qkv.shape
    meta, d = _meta(qkv, heads)
    grid, n0, rows, cols = launch_plan((B, H, W, C), pale_size, heads)
    grad = grad.contiguous()
    dqkv = torch.empty_like(qkv)
    delta = torch.empty_like(lse)
    _pale_bwd_dq[grid](qkv, out, grad, lse, delta, dqkv, scale, n0, B, H, W, C, heads, d,
                       *rows, *cols, num_stages=1, **meta)
    _pale_bwd_dkdv[grid](qkv, grad, lse, delta, dqkv, scale, n0, B, H, W, C, heads, d,
                         *rows, *cols, num_stages=1, **meta)
    return dqkv


class PaleAttentionFunction(torch.autograd.Function):
    """Autograd of :func:`pale_attention_qkv` in eager mode: saves q, k, v (one
    tensor), the output and the per-query log-sum-exp; the backward recomputes the
    attention weights."""

    @staticmethod
    def forward(ctx, qkv, pale_size, heads, scale):
        out, lse = _forward(qkv, pale_size, heads, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.args = (pale_size, heads, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qkv, out, lse = ctx.saved_tensors
        return _backward(qkv, out, lse, grad, *ctx.args), None, None, None


def _define_compiled_ops():
    """The same kernels as ``torch.library`` custom ops (``pale_mm::pale_attention``
    and its backward), for ``torch.compile``: the compiler keeps them as opaque
    calls, with output shapes from their fake implementations, so it neither traces
    the launch arithmetic nor specialises on the input size. ``None`` on a torch
    without ``torch.library.custom_op`` (< 2.4)."""
    if not hasattr(torch.library, 'custom_op'):
        return None

    @torch.library.custom_op('pale_mm::pale_attention', mutates_args=())
    def pale_attention_op(qkv: torch.Tensor, sr: int, sc: int, heads: int,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _forward(qkv, (sr, sc), heads, scale)

    @pale_attention_op.register_fake
    def _(qkv, sr, sc, heads, scale):
        _, B, H, W, C = qkv.shape
        return (qkv.new_empty(qkv.shape[1:]),
                qkv.new_empty((B, H * W, 2 * heads), dtype=torch.float32))

    @torch.library.custom_op('pale_mm::pale_attention_backward', mutates_args=())
    def pale_attention_backward_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                   grad: torch.Tensor, sr: int, sc: int, heads: int,
                                   scale: float) -> torch.Tensor:
        return _backward(qkv, out, lse, grad, (sr, sc), heads, scale)

    @pale_attention_backward_op.register_fake
    def _(qkv, out, lse, grad, sr, sc, heads, scale):
        return torch.empty_like(qkv)

    def setup_context(ctx, inputs, output):
        qkv, sr, sc, heads, scale = inputs
        ctx.save_for_backward(qkv, *output)
        ctx.args = (sr, sc, heads, scale)

    def backward(ctx, grad, _grad_lse):
        qkv, out, lse = ctx.saved_tensors
        return pale_attention_backward_op(qkv, out, lse, grad, *ctx.args), None, None, None, \
            None

    pale_attention_op.register_autograd(backward, setup_context=setup_context)
    return pale_attention_op


compiled_op = _define_compiled_ops()


def pale_attention_qkv(qkv: torch.Tensor, pale_size: Tuple[int, int],
                       num_heads: int) -> torch.Tensor:
    """PS-Attention of ``qkv``, the stacked ``(3, B, H, W, C)`` q, k and v maps (one
    contiguous tensor of float32, bfloat16 or float16): ``(B, H, W, C)``, the same
    function as :func:`pale_mm.models.pale_attention.pale_attention_nhwc` without
    dropout. Head dims up to :data:`MAX_HEAD_DIM`."""
    if qkv.dim() != 5 or qkv.shape[0] != 3:
        raise ValueError(f'pale_attention_qkv expects stacked q, k, v of shape '
                         f'(3, B, H, W, C), got {tuple(qkv.shape)}')
    C = qkv.shape[-1]
    check_heads(C, num_heads, where='pale_attention_qkv: ')
    d = C // num_heads
    if d > MAX_HEAD_DIM:
        raise ValueError(f'pale_attention_qkv serves head dims up to {MAX_HEAD_DIM}, '
                         f'got {d}')
    if qkv.dtype not in DTYPES:
        raise TypeError(f'pale_attention_qkv expects float32, bfloat16 or float16, got '
                        f'{qkv.dtype}')
    qkv = qkv.contiguous()
    scale = 1.0 / math.sqrt(d)
    sr, sc = pale_size
    if torch.compiler.is_compiling():
        return compiled_op(qkv, sr, sc, num_heads // 2, scale)[0]
    if torch.is_grad_enabled() and qkv.requires_grad:
        return PaleAttentionFunction.apply(qkv, (sr, sc), num_heads // 2, scale)
    return _forward(qkv, (sr, sc), num_heads // 2, scale)[0]
