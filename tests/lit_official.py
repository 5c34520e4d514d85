"""The official LIT code's published behaviour, written out independently for the
tests (the official code, ziplab/LIT, is not a dependency and is not copied): its
checkpoints' key layouts and shapes, and the forward of its downstream backbones.

- Classification checkpoints (``classification/code_for_lit_ti/lit.py``,
  ``classification/code_for_lit_s_m_b/models/lit.py``): :func:`official_lit_smb_shapes`
  and :func:`official_lit_ti_shapes`.
- Downstream checkpoints (release v2.0: RetinaNet and Mask R-CNN in mmdet 2.11,
  Semantic FPN in mmseg 0.13; ``detection/mmdet/models/backbones/lit.py`` and
  ``lit_ti.py``, ``segmentation/mmseg/models/backbones/`` the same):
  :func:`official_downstream_shapes` for the backbone, :func:`mmdet2_head_keys` and
  :func:`mmseg0_head_keys` for the neck and heads, :func:`official_downstream_forward`
  for the backbone's outputs.

What the downstream forward mirrors (each point is a fact of the official code):

- LIT-S (Swin-style): the image is zero-padded at the bottom and right to a multiple
  of 4, a 4x4/s4 conv and a LayerNorm (eps 1e-5) embed it; stages 1-2 are MLP blocks,
  stages 3-4 attention with a relative position bias whose table, sized for
  ``input_resolution // 2**i`` with ``input_resolution = 800 // 4`` (detection) or
  ``512 // 4`` (segmentation), is resized bicubically (``align_corners=False``) to
  ``(2H-1, 2W-1)`` in every forward and gathered with the row-major relative index;
  attention is ``softmax(q * d**-0.5 @ k^T + bias) @ v``. Each stage's output (before
  its merge) is an output, normed by ``norm{i}`` where the backbone has one
  (detection: stages 1-3, segmentation: 0-3). The merge is a 2x2/s2 DCNv1 whose
  offsets come from a 2x2/s2 conv, with no padding (an odd last row or column is
  dropped), then BatchNorm and GELU.
- LIT-Ti (PVT-style): a 4x4/s4 conv without padding (``H // 4`` rows) and a LayerNorm
  with eps 1e-5; position embeddings for a 224-px image (56, 28, 14, 7; stage 4's
  has a class-token slot first, skipped) are added, resized bilinearly to the
  run-time grid unless the grid has exactly 56 * 56 tokens (the official
  ``_get_pos_embed`` tests ``H * W == patch_embed1.num_patches`` for every stage);
  merges are the same unpadded DCN + BN + GELU; blocks use LayerNorms with eps 1e-6
  and plain attention; no output norms.

The DCN itself is torchvision's ``deform_conv2d``, as in the model:
``tests/models/test_lit.py::test_dcn_zero_offsets_is_conv_and_offset_layout`` checks
its offset layout separately.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

LIT_S = dict(dims=[96, 192, 384, 768], depths=[2, 2, 6, 2], heads=[3, 6, 12, 24])
LIT_TI = dict(dims=[64, 128, 320, 512], depths=[3, 4, 6, 3], heads=[1, 2, 5, 8],
              ratios=[8, 8, 4, 4])
# the official downstream backbones: (arch, task) -> (output norms, table image size)
DOWNSTREAM = {('s', 'det'): ((1, 2, 3), 800), ('s', 'seg'): ((0, 1, 2, 3), 512),
              ('ti', 'det'): ((), 224), ('ti', 'seg'): ((), 224)}


# ------------------------------------------------------------------ key layouts
def _bn(prefix, c):
    return {f'{prefix}.weight': (c, ), f'{prefix}.bias': (c, ), f'{prefix}.running_mean': (c, ),
            f'{prefix}.running_var': (c, ), f'{prefix}.num_batches_tracked': ()}


def _dtm(prefix, cin, cout):
    return {f'{prefix}.dconv.weight': (cout, cin, 2, 2), f'{prefix}.dconv.bias': (cout, ),
            f'{prefix}.dconv.conv_offset.weight': (8, cin, 2, 2),
            f'{prefix}.dconv.conv_offset.bias': (8, ), **_bn(f'{prefix}.norm_layer', cout)}


def _block(prefix, c, ratio, attn, heads=None, table=None, index_buffer=True):
    h = int(c * ratio)
    shapes = {f'{prefix}.norm2.weight': (c, ), f'{prefix}.norm2.bias': (c, ),
              f'{prefix}.mlp.fc1.weight': (h, c), f'{prefix}.mlp.fc1.bias': (h, ),
              f'{prefix}.mlp.fc2.weight': (c, h), f'{prefix}.mlp.fc2.bias': (c, )}
    if attn:
        shapes.update({f'{prefix}.norm1.weight': (c, ), f'{prefix}.norm1.bias': (c, ),
                       f'{prefix}.attn.qkv.weight': (3 * c, c),
                       f'{prefix}.attn.qkv.bias': (3 * c, ),
                       f'{prefix}.attn.proj.weight': (c, c), f'{prefix}.attn.proj.bias': (c, )})
        if table:
            shapes[f'{prefix}.attn.relative_position_bias_table'] = ((2 * table - 1) ** 2, heads)
            if index_buffer:
                # the classification RelPosAttention's persistent buffer, saved by
                # state_dict() (the downstream code computes the index in each forward)
                shapes[f'{prefix}.attn.relative_position_index'] = (table ** 2, table ** 2)
    return shapes


@functools.lru_cache(maxsize=None)
def _official_index(h, w):
    """The official ``relative_position_index`` of an ``h x w`` grid, from its
    published definition: tokens ``p = (i1, j1)``, ``q = (i2, j2)`` in row-major order
    index the ``(2h-1) x (2w-1)`` table at row ``i1 - i2 + h - 1``, column
    ``j1 - j2 + w - 1``."""
    index = torch.empty(h * w, h * w, dtype=torch.long)
    for p in range(h * w):
        for q in range(h * w):
            (i1, j1), (i2, j2) = divmod(p, w), divmod(q, w)
            index[p, q] = (i1 - i2 + h - 1) * (2 * w - 1) + (j1 - j2 + w - 1)
    return index


def official_index(h, w):
    return _official_index(h, w).clone()


def official_lit_smb_shapes(dims, depths, heads, img=224, classes=1000, downstream=False):
    """Key -> shape of the official LIT-S/M/B (Swin-style) classification checkpoint;
    with ``downstream``, of its detection / segmentation backbone (no ``norm``,
    ``head`` or index buffers; tables for ``img``; output norms are added by
    :func:`official_downstream_shapes`)."""
    s = {'patch_embed.proj.weight': (dims[0], 3, 4, 4), 'patch_embed.proj.bias': (dims[0], ),
         'patch_embed.norm.weight': (dims[0], ), 'patch_embed.norm.bias': (dims[0], )}
    if not downstream:
        s.update({'norm.weight': (dims[-1], ), 'norm.bias': (dims[-1], ),
                  'head.weight': (classes, dims[-1]), 'head.bias': (classes, )})
    for i, depth in enumerate(depths):
        for j in range(depth):
            s.update(_block(f'layers.{i}.blocks.{j}', dims[i], 4, i >= 2, heads[i],
                            img // 4 // 2 ** i, index_buffer=not downstream))
        if i < len(depths) - 1:
            s.update(_dtm(f'layers.{i}.downsample', dims[i], dims[i + 1]))
    return s


def official_lit_ti_shapes(dims, depths, ratios, img=224, classes=1000, downstream=False):
    """Key -> shape of the official LIT-Ti (PVT-style) classification checkpoint; with
    ``downstream``, of its detection / segmentation backbone (no class token, ``norm``
    or ``head``)."""
    s = {'patch_embed1.proj.weight': (dims[0], 3, 4, 4), 'patch_embed1.proj.bias': (dims[0], ),
         'patch_embed1.norm.weight': (dims[0], ), 'patch_embed1.norm.bias': (dims[0], )}
    if not downstream:
        s.update({'cls_token': (1, 1, dims[-1]), 'norm.weight': (dims[-1], ),
                  'norm.bias': (dims[-1], ), 'head.weight': (classes, dims[-1]),
                  'head.bias': (classes, )})
    for k in range(1, 5):
        g = img // 4 // 2 ** (k - 1)
        s[f'pos_embed{k}'] = (1, g * g + (k == 4), dims[k - 1])
        if k > 1:
            s.update(_dtm(f'patch_embed{k}', dims[k - 2], dims[k - 1]))
        for j in range(depths[k - 1]):
            s.update(_block(f'block{k}.{j}', dims[k - 1], ratios[k - 1], k >= 3))
    return s


def official_downstream_shapes(arch: str, task: str) -> dict:
    """Key -> shape of the backbone of a released downstream LIT model (``arch`` 's'
    or 'ti', ``task`` 'det' or 'seg'), without the ``backbone.`` prefix."""
    norms, img = DOWNSTREAM[arch, task]
    if arch == 's':
        s = official_lit_smb_shapes(LIT_S['dims'], LIT_S['depths'], LIT_S['heads'], img,
                                    downstream=True)
        dims = LIT_S['dims']
    else:
        s = official_lit_ti_shapes(LIT_TI['dims'], LIT_TI['depths'], LIT_TI['ratios'], img,
                                   downstream=True)
        dims = LIT_TI['dims']
    for i in norms:
        s.update({f'norm{i}.weight': (dims[i], ), f'norm{i}.bias': (dims[i], )})
    return s


def _conv(prefix, bias=True):
    return [f'{prefix}.weight'] + ([f'{prefix}.bias'] if bias else [])


def mmdet2_head_keys(detector: str) -> list:
    """The neck and head keys of an mmdet 2.11 ``RetinaNet`` or ``MaskRCNN`` with the
    official LIT configs (FPN with 4 inputs; RetinaNet's from stage 1 with two extra
    convs on the input, ``num_outs=5``; ``RetinaHead`` with 4 stacked convs; ``RPNHead``,
    ``Shared2FCBBoxHead``, ``FCNMaskHead`` with 4 convs and a deconv), as mmdet 2.11's
    modules name them (``ConvModule`` wraps ``conv``; ``nn.Conv2d`` / ``nn.Linear`` are
    bare)."""
    keys = []
    if detector == 'retinanet':
        for i in range(3):
            keys += _conv(f'neck.lateral_convs.{i}.conv')
        for i in range(5):
            keys += _conv(f'neck.fpn_convs.{i}.conv')
        for branch in ('cls_convs', 'reg_convs'):
            for i in range(4):
                keys += _conv(f'bbox_head.{branch}.{i}.conv')
        keys += _conv('bbox_head.retina_cls') + _conv('bbox_head.retina_reg')
        return keys
    for i in range(4):
        keys += _conv(f'neck.lateral_convs.{i}.conv') + _conv(f'neck.fpn_convs.{i}.conv')
    keys += _conv('rpn_head.rpn_conv') + _conv('rpn_head.rpn_cls') + _conv('rpn_head.rpn_reg')
    for i in range(2):
        keys += _conv(f'roi_head.bbox_head.shared_fcs.{i}')
    keys += _conv('roi_head.bbox_head.fc_cls') + _conv('roi_head.bbox_head.fc_reg')
    for i in range(4):
        keys += _conv(f'roi_head.mask_head.convs.{i}.conv')
    keys += _conv('roi_head.mask_head.upsample') + _conv('roi_head.mask_head.conv_logits')
    return keys


def mmseg0_head_keys() -> list:
    """The neck and head keys of the official Semantic FPN (mmseg 0.13: ``FPN`` with 4
    inputs and outputs, ``FPNHead`` over strides 4-32 with SyncBN ``ConvModule``s,
    which have no conv bias, and ``Upsample`` layers between them)."""
    keys = []
    for i in range(4):
        keys += _conv(f'neck.lateral_convs.{i}.conv') + _conv(f'neck.fpn_convs.{i}.conv')
    for i, length in enumerate((1, 1, 2, 3)):  # max(1, log2(stride / 4)) convs per scale
        for j in range(length):
            p = f'decode_head.scale_heads.{i}.{2 * j}'  # each conv followed by an Upsample
            keys += _conv(f'{p}.conv', bias=False) + list(_bn(f'{p}.bn', 0))
    return keys + _conv('decode_head.conv_seg')


def random_state(shapes, seed=1, scale=0.1):
    """Random tensors of the given shapes; official index buffers hold the official
    index, BatchNorm variances are positive."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith('num_batches_tracked'):
            state[k] = torch.randint(0, 100, shape, generator=g)
        elif k.endswith('relative_position_index'):
            g_side = math.isqrt(shape[0])
            state[k] = official_index(g_side, g_side)
        elif k.endswith('running_var'):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * scale
    return state


# ---------------------------------------------------------- downstream forward
def _ln(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + '.weight'], state[prefix + '.bias'], eps)


def _mlp(x, state, prefix):
    x = F.gelu(F.linear(x, state[prefix + '.fc1.weight'], state[prefix + '.fc1.bias']))
    return F.linear(x, state[prefix + '.fc2.weight'], state[prefix + '.fc2.bias'])


def _attention(x, state, prefix, heads, H=None, W=None):
    """Official MSA (``ViTAttention``; ``RelPosAttention`` where the state has a table)."""
    B, N, C = x.shape
    qkv = F.linear(x, state[prefix + '.qkv.weight'], state[prefix + '.qkv.bias'])
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    table = state.get(prefix + '.relative_position_bias_table')
    if table is not None:
        side = math.isqrt(table.shape[0])
        resized = F.interpolate(table.permute(1, 0).view(1, heads, side, side),
                                size=(2 * H - 1, 2 * W - 1), mode='bicubic')
        resized = resized.reshape(heads, -1).permute(1, 0)
        bias = resized[official_index(H, W).view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
    x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, state[prefix + '.proj.weight'], state[prefix + '.proj.bias'])


def _merge(x, state, prefix):
    """NCHW map -> unpadded 2x2/s2 DCN + BN (eval) + GELU, NCHW."""
    offset = F.conv2d(x, state[prefix + '.dconv.conv_offset.weight'],
                      state[prefix + '.dconv.conv_offset.bias'], stride=2)
    x = deform_conv2d(x, offset, state[prefix + '.dconv.weight'], state[prefix + '.dconv.bias'],
                      stride=2)
    bn = prefix + '.norm_layer'
    x = F.batch_norm(x, state[bn + '.running_mean'], state[bn + '.running_var'],
                     state[bn + '.weight'], state[bn + '.bias'], training=False, eps=1e-5)
    return F.gelu(x)


def _to_nchw(x, H, W):
    return x.reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2)


def _forward_smb(state, x, heads, norms):
    H, W = x.shape[2:]
    x = F.pad(x, (0, -W % 4, 0, -H % 4))
    x = F.conv2d(x, state['patch_embed.proj.weight'], state['patch_embed.proj.bias'], stride=4)
    H, W = x.shape[2:]
    x = _ln(x.flatten(2).transpose(1, 2), state, 'patch_embed.norm', 1e-5)
    outs = []
    for i in range(4):
        j = 0
        while f'layers.{i}.blocks.{j}.norm2.weight' in state:
            p = f'layers.{i}.blocks.{j}'
            if p + '.norm1.weight' in state:
                x = x + _attention(_ln(x, state, p + '.norm1', 1e-5), state, p + '.attn',
                                   heads[i], H, W)
            x = x + _mlp(_ln(x, state, p + '.norm2', 1e-5), state, p + '.mlp')
            j += 1
        out = _ln(x, state, f'norm{i}', 1e-5) if i in norms else x
        outs.append(_to_nchw(out, H, W))
        if i < 3:
            x = _merge(_to_nchw(x, H, W), state, f'layers.{i}.downsample')
            H, W = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
    return outs


def _pos_embed(pos, grid, H, W):
    if H * W == 56 * 56:  # the official test is against stage 1's token count
        return pos
    pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    return F.interpolate(pos, size=(H, W), mode='bilinear').reshape(1, -1, H * W).permute(0, 2, 1)


def _forward_ti(state, x, heads):
    x = F.conv2d(x, state['patch_embed1.proj.weight'], state['patch_embed1.proj.bias'], stride=4)
    outs = []
    for k in range(1, 5):
        if k > 1:
            x = _merge(outs[-1], state, f'patch_embed{k}')
        H, W = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if k == 1:
            x = _ln(x, state, 'patch_embed1.norm', 1e-5)
        pos = state[f'pos_embed{k}'][:, int(k == 4):]
        x = x + _pos_embed(pos, 56 >> (k - 1), H, W)
        j = 0
        while f'block{k}.{j}.norm2.weight' in state:
            p = f'block{k}.{j}'
            if p + '.norm1.weight' in state:
                x = x + _attention(_ln(x, state, p + '.norm1', 1e-6), state, p + '.attn',
                                   heads[k - 1])
            x = x + _mlp(_ln(x, state, p + '.norm2', 1e-6), state, p + '.mlp')
            j += 1
        outs.append(_to_nchw(x, H, W))
    return outs


def official_downstream_forward(state: dict, x: torch.Tensor, arch: str, task: str) -> list:
    """The four NCHW outputs of the official downstream LIT backbone (``arch`` 's' or
    'ti', ``task`` 'det' or 'seg') with weights ``state`` (its keys, without
    ``backbone.``) on the image ``x``, in eval mode, as the module docstring describes."""
    if arch == 's':
        return _forward_smb(state, x, LIT_S['heads'], DOWNSTREAM[arch, task][0])
    return _forward_ti(state, x, LIT_TI['heads'])
