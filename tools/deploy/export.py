#!/usr/bin/env python
"""Export a trained pale_mm segmentor or detector to ONNX, once for every input size.

    python tools/deploy/export.py CONFIG CHECKPOINT --out model.onnx
                                  [--exporter torchscript|dynamo] [--opset N]
                                  [--runtime any|onnxruntime]
                                  [--sample-size H W] [--cfg-options k=v ...]

(mmdet 2.x called this ``tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT
--output-file``, mmseg 0.x ``tools/pytorch2onnx.py``; mmdeploy's ``tools/deploy.py``
and ``torch2onnx`` stop on current torch: ``docs/deploy.md``.) Run the file with
``tools/deploy/infer.py``.

What the file computes (batch, height and width dynamic, one export):

- **input** ``img``: ``(B, 3, H, W)`` float32 pixel values, 0-255, in the channel order
  the test pipeline loads (BGR for mmcv's ``LoadImageFromFile``), after the test
  pipeline's resize: the data preprocessor's channel swap and normalisation (and, for
  detectors, its zero padding to ``pad_size_divisor`` after normalising) are inside
  the graph.
- **segmentors** (``EncoderDecoder``: UperNet, Semantic FPN, ...): ``seg_logits``,
  ``(B, num_classes, H, W)``, the decode head's logits resized to the input, as
  ``EncoderDecoder.encode_decode`` returns them (mmseg's ``postprocess_result`` then
  resizes them to the original image and takes the argmax).
- **single-stage detectors** (RetinaNet, ...): the bbox head's raw outputs,
  ``cls_score_<level>`` and ``bbox_pred_<level>`` (mmdet's ``predict_by_feat`` turns
  them into detections, NMS included).
- **two-stage detectors** (Mask R-CNN, ...): ``<out>`` holds the neck's maps
  ``feat_<level>`` and the RPN head's ``rpn_cls_<level>`` / ``rpn_bbox_<level>``;
  ``<out stem>.roi_bbox.onnx`` maps ``(feats, rois)`` to the bbox head's
  ``cls_score, bbox_pred`` and ``<out stem>.roi_mask.onnx`` to the mask head's
  ``mask_pred`` (RoIAlign as ONNX ``RoiAlign``). mmdet's RPN, bbox and mask
  post-processing run between them (``tools/deploy/infer.py``).

``--runtime onnxruntime`` writes the pale attention with onnxruntime's
``com.microsoft.MultiHeadAttention`` (its fused attention: faster, and no scores
tensor in memory; :mod:`pale_mm.ops.export`), a file for onnxruntime only; the
default, ``any``, writes standard ONNX ops, for every runtime.

The config (as text), the task and the dataset's classes and palette are stored in
the file's metadata (``metadata_props``), so a runner needs only the ``.onnx`` file.
"""
import argparse
import json
import os
import os.path as osp
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EXPORTERS = ('dynamo', 'torchscript')
# The opset each exporter writes by default: the TorchScript exporter's 17 is what
# mmdeploy uses; the default exporter needs 18 or newer (19: DeformConv, for LIT).
DEFAULT_OPSET = {'dynamo': 19, 'torchscript': 17}
META_PREFIX = 'pale_mm.'


# ------------------------------------------------------------------ the model
def load_model(config: str, checkpoint: Optional[str], cfg_options: Optional[dict] = None):
    """``(model, cfg, scope)``: the model of ``config`` with ``checkpoint`` loaded, in
    eval mode on the CPU, built by mmdet's ``init_detector`` or mmseg's ``init_model``
    (SyncBN turned into BN: one process). Its ``dataset_meta`` is the checkpoint's,
    else the config's test dataset ``metainfo``."""
    from mmengine.config import Config

    from pale_mm.utils import config_scope, register_scope, sync_bn_to_bn
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    if checkpoint is not None and '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = config_scope(cfg)
    register_scope(scope)
    sync_bn_to_bn(cfg)
    if scope == 'mmdet':
        from mmdet.apis import init_detector
        model = init_detector(cfg, None, device='cpu')
    else:
        from mmseg.apis import init_model
        model = init_model(cfg, None, device='cpu')
    model.dataset_meta = _config_metainfo(cfg)
    if checkpoint is not None:  # mmengine's loader: mmseg's init_model needs a 'meta'
        from mmengine.runner import load_checkpoint
        state = load_checkpoint(model, checkpoint, map_location='cpu')
        meta = state.get('meta', {}).get('dataset_meta') if isinstance(state, dict) else None
        if meta:
            model.dataset_meta = meta
    return model.eval(), cfg, scope


def _config_metainfo(cfg) -> Optional[dict]:
    """The test dataset's ``metainfo`` (classes, palette) set in the config, if any."""
    loader = cfg.get('test_dataloader') or {}
    metainfo = (loader.get('dataset') or {}).get('metainfo')
    return dict(metainfo) if metainfo else None


class Preprocess(nn.Module):
    """The data preprocessor's test-time work on an image batch, as graph ops: channel
    swap, ``(x - mean) / std`` and zero padding of the bottom and right to a multiple
    of ``pad_divisor`` (after normalising, as mmengine's ``ImgDataPreprocessor``
    pads)."""

    def __init__(self, preprocessor: nn.Module, pad_divisor: int = 1, pad_value: float = 0.):
        super().__init__()
        self.swap = bool(getattr(preprocessor, '_channel_conversion',
                                 getattr(preprocessor, 'channel_conversion', False)))
        self.normalize = bool(getattr(preprocessor, '_enable_normalize', False))
        if self.normalize:
            self.register_buffer('mean', preprocessor.mean.detach().clone().view(1, -1, 1, 1))
            self.register_buffer('std', preprocessor.std.detach().clone().view(1, -1, 1, 1))
        self.pad_divisor = int(pad_divisor)
        self.pad_value = float(pad_value)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.swap:
            img = img.flip(1)
        if self.normalize:
            img = (img - self.mean) / self.std
        if self.pad_divisor > 1:
            d = self.pad_divisor
            H, W = img.shape[2:]
            img = F.pad(img, (0, (d - W % d) % d, 0, (d - H % d) % d), value=self.pad_value)
        return img


def _check_seg_preprocessor(preprocessor: nn.Module):
    if getattr(preprocessor, 'test_cfg', None):
        raise ValueError(f'the data preprocessor pads at test time (test_cfg='
                         f'{preprocessor.test_cfg}); export supports the default (no '
                         f'test-time padding for segmentors)')


class AdaptiveAvgPool2dForExport(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging matrices built from the input's size:
    output bin ``i`` of ``n`` averages lines ``floor(i*L/n)`` to ``ceil((i+1)*L/n) - 1``,
    PyTorch's definition. The exporters write ``adaptive_avg_pool2d`` for the traced
    size only (kernels or gather indices fixed), wrong at any other size."""

    def __init__(self, output_size):
        super().__init__()
        size = output_size if isinstance(output_size, (tuple, list)) else (output_size, ) * 2
        if any(s is None for s in size):
            raise ValueError(f'export supports AdaptiveAvgPool2d with a fixed output size, '
                             f'got {output_size}')
        self.output_size = tuple(int(s) for s in size)

    @staticmethod
    def averaging(length, n: int, like: torch.Tensor) -> torch.Tensor:
        """``(n, length)``: row ``i`` holds ``1 / len(bin i)`` over bin ``i``."""
        i = torch.arange(n, device=like.device)[:, None]
        j = torch.arange(length, device=like.device)[None, :]
        start = torch.div(i * length, n, rounding_mode='floor')
        end = torch.div((i + 1) * length + n - 1, n, rounding_mode='floor')
        inside = ((j >= start) & (j < end)).to(like.dtype)
        return inside / (end - start).to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        rows = self.averaging(H, self.output_size[0], x)
        cols = self.averaging(W, self.output_size[1], x)
        return rows @ x @ cols.transpose(0, 1)


class UpsampleForExport(nn.Module):
    """mmseg's ``Upsample`` by an integer factor, its output size kept symbolic: mmseg
    computes it with ``int()``, which the TorchScript exporter records as the traced
    size's constant."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        factor = upsample.scale_factor
        if upsample.size or not isinstance(factor, float) or factor != int(factor):
            raise ValueError(f'export supports mmseg Upsample by one integer factor, got '
                             f'size={upsample.size}, scale_factor={factor}')
        self.factor, self.mode = int(factor), upsample.mode
        self.align_corners = upsample.align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        return F.interpolate(x, (H * self.factor, W * self.factor), mode=self.mode,
                             align_corners=self.align_corners)


def _exportable(m: nn.Module) -> Optional[nn.Module]:
    """The replacement of a module that exports for the traced size only, or ``None``."""
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size not in (1, (1, 1)):
        return AdaptiveAvgPool2dForExport(m.output_size)
    if type(m).__name__ == 'Upsample' and type(m).__module__.startswith('mmseg.'):
        return UpsampleForExport(m)
    return None


def exportable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the modules that export for the traced size only
    (``nn.AdaptiveAvgPool2d`` to more than 1x1, mmseg's ``Upsample``) replaced by
    equal ones that serve every size (the model itself is left as it is)."""
    import copy
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        new = _exportable(m)
        if new is not None:
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


class SegmentorForExport(nn.Module):
    """Image -> ``seg_logits`` of an mmseg ``EncoderDecoder`` (see the module
    docstring): its own ``encode_decode``, with the image size as the target size."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        mode = (segmentor.test_cfg or {}).get('mode', 'whole')
        if mode != 'whole':
            raise ValueError(f"the segmentor's test_cfg.mode is {mode!r}; export supports "
                             f"'whole' inference (sliding windows run outside the graph)")
        _check_seg_preprocessor(segmentor.data_preprocessor)
        self.preprocess = Preprocess(segmentor.data_preprocessor)
        self.segmentor = exportable_copy(segmentor)

    def output_names(self) -> List[str]:
        return ['seg_logits']

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(img)
        # a torch.Size img_shape: the decode head resizes to it (mmseg's slide-inference
        # convention), so the target size stays symbolic in the graph
        return self.segmentor.encode_decode(x, [dict(img_shape=x.shape[2:])])


class DetectorForExport(nn.Module):
    """Image -> the raw outputs of ``head`` (an mmdet dense head of ``detector``), with
    the data preprocessor's work (normalising, then zero padding to
    ``pad_size_divisor``) inside and the detector's modules exportable at every size
    (:func:`exportable_copy`)."""

    head_name = ''
    prefixes: Tuple[str, ...] = ()

    def __init__(self, detector: nn.Module):
        super().__init__()
        p = detector.data_preprocessor
        self.preprocess = Preprocess(p, getattr(p, 'pad_size_divisor', 1),
                                     getattr(p, 'pad_value', 0))
        self.detector = exportable_copy(detector)
        self.levels = getattr(detector, self.head_name).prior_generator.num_levels

    def output_names(self) -> List[str]:
        return [f'{p}_{i}' for p in self.prefixes for i in range(self.levels)]


class SingleStageForExport(DetectorForExport):
    """Image -> the bbox head's raw outputs (``cls_score_<level>``,
    ``bbox_pred_<level>``) of an mmdet single-stage detector."""

    head_name, prefixes = 'bbox_head', ('cls_score', 'bbox_pred')

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.detector.extract_feat(self.preprocess(img))
        return tuple(t for outs in self.detector.bbox_head(feats)[:2] for t in outs)


class TwoStageForExport(DetectorForExport):
    """Image -> the neck's maps (``feat_<level>``) and the RPN head's raw outputs
    (``rpn_cls_<level>``, ``rpn_bbox_<level>``) of an mmdet two-stage detector."""

    head_name, prefixes = 'rpn_head', ('feat', 'rpn_cls', 'rpn_bbox')

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.detector.extract_feat(self.preprocess(img))
        cls, reg = self.detector.rpn_head(feats)
        return tuple(feats) + tuple(cls) + tuple(reg)


def roi_align_aligned(feat: torch.Tensor, rois: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """mmcv's ``RoIAlign`` layer (average pooling) computed by torchvision's
    ``roi_align``, which both exporters write as ONNX ``RoiAlign`` (the same
    sampling: ``sampling_ratio`` 0 is adaptive in both)."""
    from torchvision.ops import roi_align
    if getattr(layer, 'pool_mode', 'avg') != 'avg':
        raise ValueError(f'RoI export supports average RoIAlign, got pool_mode='
                         f'{layer.pool_mode!r}')
    return roi_align(feat, rois, layer.output_size, layer.spatial_scale,
                     layer.sampling_ratio, layer.aligned)


def extract_rois(extractor: nn.Module, feats: Sequence[torch.Tensor],
                 rois: torch.Tensor) -> torch.Tensor:
    """mmdet's ``SingleRoIExtractor.forward`` without its data-dependent branches:
    every RoI is pooled on every level and ``map_roi_levels`` (mmdet's own) picks
    its level with a select."""
    n = len(feats)
    if n == 1:
        return roi_align_aligned(feats[0], rois, extractor.roi_layers[0])
    target = extractor.map_roi_levels(rois, n)[:, None, None, None]
    out = None
    for i in range(n):
        pooled = roi_align_aligned(feats[i], rois, extractor.roi_layers[i])
        out = pooled if out is None else torch.where(target == i, pooled, out)
    return out


class RoIForExport(nn.Module):
    """``(feat_0 .. feat_{n-1}, rois)`` -> the outputs of one RoI branch of an mmdet
    ``StandardRoIHead``: its RoI extractor (:func:`extract_rois`), shared head, then
    ``head``, as ``StandardRoIHead._bbox_forward`` / ``_mask_forward`` compute them."""

    def __init__(self, roi_head: nn.Module, branch: str):
        super().__init__()
        if branch == 'mask' and roi_head.share_roi_extractor:
            raise ValueError('RoI mask export needs a mask_roi_extractor of its own')
        self.branch = branch
        self.extractor = getattr(roi_head, f'{branch}_roi_extractor')
        self.shared_head = roi_head.shared_head if roi_head.with_shared_head else None
        self.head = getattr(roi_head, f'{branch}_head')
        self.levels = self.extractor.num_inputs

    def output_names(self) -> List[str]:
        return ['cls_score', 'bbox_pred'] if self.branch == 'bbox' else ['mask_pred']

    def forward(self, *args: torch.Tensor):
        x = extract_rois(self.extractor, args[:-1], args[-1])
        if self.shared_head is not None:
            x = self.shared_head(x)
        out = self.head(x)
        return tuple(out[:2]) if self.branch == 'bbox' else out


def graph_modules(model: nn.Module, scope: str) -> Dict[str, nn.Module]:
    """``{suffix: module to export}``: ``''`` the main graph (image in), and for
    two-stage detectors ``'roi_bbox'`` / ``'roi_mask'``. Raises ``ValueError`` for a
    model type the export does not cover."""
    if scope == 'mmseg':
        if not hasattr(model, 'encode_decode'):
            raise ValueError(f'segmentor {type(model).__name__} has no encode_decode; '
                             f'export supports mmseg EncoderDecoder models')
        return {'': SegmentorForExport(model)}
    from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
    if isinstance(model, SingleStageDetector):
        return {'': SingleStageForExport(model)}
    if isinstance(model, TwoStageDetector):
        graphs = {'': TwoStageForExport(model), 'roi_bbox': RoIForExport(model.roi_head, 'bbox')}
        if getattr(model.roi_head, 'with_mask', False):
            graphs['roi_mask'] = RoIForExport(model.roi_head, 'mask')
        return graphs
    raise ValueError(f'detector {type(model).__name__} is neither a SingleStageDetector nor '
                     f'a TwoStageDetector; export covers those (RetinaNet, Mask R-CNN, ...)')


# ------------------------------------------------------------------ export
def sibling_path(out: str, suffix: str) -> str:
    """``model.onnx`` -> ``model.<suffix>.onnx`` (``out`` itself for ``''``)."""
    if not suffix:
        return out
    stem, ext = osp.splitext(out)
    return f'{stem}.{suffix}{ext or ".onnx"}'


def check_runtime(runtime: str, exporter: str):
    """``ValueError`` unless ``runtime`` is one of :data:`pale_mm.ops.export.RUNTIMES`
    and can be written: onnxruntime's attention op by the TorchScript exporter, as an
    export form (with the fast paths on; off, the file would hold the reference's
    standard ops under an onnxruntime label)."""
    from pale_mm.ops import ENV, fast_paths_enabled
    from pale_mm.ops.export import RUNTIMES
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
    if runtime != 'any' and exporter != 'torchscript':
        raise ValueError(f"--runtime {runtime} needs --exporter torchscript (the dynamo "
                         f"exporter writes standard ops only: use --runtime any)")
    if runtime != 'any' and not fast_paths_enabled():
        raise ValueError(f"--runtime {runtime} writes pale_mm's export form, which needs "
                         f"the fast paths on ({ENV}=0 switched them off): unset {ENV}, or "
                         f"use --runtime any for the reference's graph")


def export_graph(module: nn.Module, path: str, args: tuple, input_names: List[str],
                 dynamic: Dict[str, Dict[int, str]], exporter: str = 'torchscript',
                 opset: Optional[int] = None, runtime: str = 'any') -> str:
    """``torch.onnx.export`` of ``module`` (eval, no grad) with the named dynamic axes
    on inputs and outputs, its pale attention written for ``runtime``
    (:func:`pale_mm.ops.export.export_runtime`); returns ``path``."""
    from pale_mm.ops.export import export_runtime
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    check_runtime(runtime, exporter)
    opset = opset or DEFAULT_OPSET[exporter]
    outputs = module.output_names()
    with torch.no_grad():
        sample = module(*args)
    sample = sample if isinstance(sample, (tuple, list)) else (sample, )
    dynamic = dict(dynamic)
    image_in = input_names == ['img']  # maps out: batch, height and width dynamic
    for name, t in zip(outputs, sample):
        dims = (0, 2, 3) if image_in and t.dim() == 4 else (0, )
        dynamic[name] = {d: f'{name}_{d}' for d in dims}
    kwargs = dict(opset_version=opset, input_names=input_names, output_names=outputs,
                  dynamic_axes=dynamic, dynamo=exporter == 'dynamo')
    if exporter == 'dynamo':
        kwargs['external_data'] = False
    with torch.no_grad(), warnings.catch_warnings(), export_runtime(runtime):
        warnings.simplefilter('ignore')  # the exporters' advice and deprecation warnings
        torch.onnx.export(module.eval(), args, path, **kwargs)
    return path


def export_model(model: nn.Module, cfg, scope: str, out: str, exporter: str = 'torchscript',
                 opset: Optional[int] = None, sample_size: Tuple[int, int] = (256, 320),
                 dataset_meta: Optional[dict] = None, runtime: str = 'any') -> List[str]:
    """Export ``model`` (built by :func:`load_model`) to ``out`` (and, for two-stage
    detectors, its RoI graphs next to it) for ``runtime`` (``'any'`` or
    ``'onnxruntime'``), with the metadata :func:`read_metadata` reads; returns the
    written paths."""
    if len(sample_size) != 2 or min(sample_size) < 1:
        raise ValueError(f'sample_size must be (H, W) >= 1, got {sample_size}')
    check_runtime(runtime, exporter)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    graphs = graph_modules(model, scope)
    # a batch of two and H != W: torch.export specialises a size of 1, and sizes equal
    # in the example may be taken as equal for every input
    img = torch.rand(2, 3, *sample_size) * 255
    paths = []
    feats = None
    for suffix, module in graphs.items():
        path = sibling_path(out, suffix)
        if not suffix:
            args, names = (img, ), ['img']
            dynamic = {'img': {0: 'batch', 2: 'height', 3: 'width'}}
            if isinstance(module, TwoStageForExport):
                with torch.no_grad():
                    feats = module(img)[:module.levels]
        else:
            n = module.levels
            H, W = sample_size
            rois = torch.tensor([[0., 4., 6., 0.6 * W, 0.5 * H], [1., 1., 2., 20., 30.],
                                 [1., 0., 0., W - 1., H - 1.]])
            args = tuple(feats[:n]) + (rois, )
            names = [f'feat_{i}' for i in range(n)] + ['rois']
            dynamic = {f'feat_{i}': {0: 'batch', 2: f'h{i}', 3: f'w{i}'} for i in range(n)}
            dynamic['rois'] = {0: 'num_rois'}
        export_graph(module, path, args, names, dynamic, exporter, opset, runtime)
        paths.append(path)
    write_metadata(paths[0], cfg, scope, graphs, dataset_meta or getattr(model, 'dataset_meta',
                                                                          None),
                   [osp.basename(p) for p in paths[1:]], exporter, runtime)
    return paths


def write_metadata(path: str, cfg, scope: str, graphs: Dict[str, nn.Module],
                   dataset_meta: Optional[dict], siblings: List[str], exporter: str,
                   runtime: str = 'any'):
    """Store what a runner needs in the ONNX file's ``metadata_props``."""
    import onnx
    main = graphs['']
    meta = {
        'task': scope,
        'kind': type(main).__name__,
        'config': cfg.pretty_text,
        'dataset_meta': json.dumps(_jsonable(dataset_meta or {})),
        'outputs': json.dumps(main.output_names()),
        'siblings': json.dumps(siblings),
        'exporter': exporter,
        'runtime': runtime,
        'min_size': str(min_input_size(main, exporter)),
    }
    proto = onnx.load(path)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    onnx.save(proto, path)


def read_metadata(path: str) -> dict:
    """The metadata :func:`write_metadata` stored in ``path`` (JSON values decoded);
    ``ValueError`` if the file was not written by this tool."""
    import onnx
    proto = onnx.load(path, load_external_data=False)
    meta = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props
            if p.key.startswith(META_PREFIX)}
    if 'task' not in meta:
        raise ValueError(f'{path} has no pale_mm metadata: export it with '
                         f'tools/deploy/export.py')
    for k in ('dataset_meta', 'outputs', 'siblings'):
        meta[k] = json.loads(meta[k])
    meta['min_size'] = int(meta['min_size'])
    return meta


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, 'tolist'):
        return obj.tolist()
    return obj


def min_input_size(main: nn.Module, exporter: str) -> int:
    """The smallest input side the main graph serves. TorchScript-exported graphs
    serve every size (1x1 is tested). ``torch.export`` records sizes as symbols of at
    least 2, so the default exporter's graph needs every map of the network at least
    2 lines long: the input larger than the coarsest stride (32 for the backbones'
    last stage, the coarsest anchor stride for detectors)."""
    if exporter == 'torchscript':
        return 1
    if isinstance(main, SegmentorForExport):
        return 32 + 1
    head = main.detector.rpn_head if isinstance(main, TwoStageForExport) \
        else main.detector.bbox_head
    return max(max(s) if isinstance(s, (tuple, list)) else s
               for s in head.prior_generator.strides) + 1


def parse_args(argv=None):
    from mmengine.config import DictAction

    from pale_mm.ops.export import RUNTIMES
    parser = argparse.ArgumentParser(description='Export a pale_mm segmentor or detector '
                                                 'to ONNX (batch, height and width dynamic)')
    parser.add_argument('config', help='model config (mmdet or mmseg)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', '--output-file', dest='out', default='model.onnx',
                        help='the ONNX file to write (two-stage detectors: also '
                             '<stem>.roi_bbox.onnx and <stem>.roi_mask.onnx)')
    parser.add_argument('--exporter', choices=EXPORTERS, default='torchscript',
                        help="torch.onnx's exporter: 'torchscript' (the default here: "
                             "exact at every size, exports in seconds) or 'dynamo' "
                             "(torch.export, torch's default since 2.9; needed by LIT's "
                             "deformable convs, which the TorchScript exporter cannot "
                             "write)")
    parser.add_argument('--opset', type=int, default=None,
                        help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--runtime', choices=RUNTIMES, default=RUNTIMES[0],
                        help="'any' (default): standard ONNX ops, for every runtime; "
                             "'onnxruntime': the pale attention as onnxruntime's "
                             "com.microsoft.MultiHeadAttention (fused: faster, far less "
                             "memory), a file for onnxruntime only (TorchScript "
                             "exporter)")
    parser.add_argument('--sample-size', type=int, nargs=2, default=(256, 320),
                        metavar=('H', 'W'), help='the example input size the exporter '
                                                 'traces (the file serves every size; '
                                                 'keep H != W for the default exporter)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    model, cfg, scope = load_model(args.config, args.checkpoint, args.cfg_options)
    paths = export_model(model, cfg, scope, args.out, args.exporter, args.opset,
                         tuple(args.sample_size), runtime=args.runtime)
    for p in paths:
        print(f'wrote {p}')
    return paths


if __name__ == '__main__':
    main()
