#!/usr/bin/env python
"""Run a model exported by ``tools/deploy/export.py`` on images, in onnxruntime or
OpenVINO, with mmdet's / mmseg's own pipeline, post-processing and drawing.

    python tools/deploy/infer.py MODEL.onnx IMAGE [IMAGE ...] [--backend onnxruntime|openvino]
                                 [--out-dir outputs] [--score-thr 0.3] [--threads N]
                                 [--static-shapes]

It builds mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` from the config
stored in the file, without weights, and hands the network's work to the runtime:

- segmentors: ``EncoderDecoder.inference`` is the exported graph; mmseg's
  ``postprocess_result`` resizes the logits to the image and takes the argmax;
- single-stage detectors: the bbox head's forward is the exported graph; mmdet's
  ``predict_by_feat`` decodes the boxes and runs NMS;
- two-stage detectors: the neck and the RPN head are the main graph, the RoI bbox and
  mask heads the two RoI graphs; mmdet's RPN, bbox and mask post-processing run
  between them.

The data preprocessor's normalisation and padding are inside the graph, so the
inferencer's preprocessor only stacks the images: run detectors one image per batch
(the inferencers' default ``batch_size=1``); images of different sizes stacked in one
batch would be padded before the graph normalises them, unlike mmdet. The output is what the upstream
inferencers print and draw (``outputs/vis/``, ``outputs/preds/``). Needs the
``deploy`` extra (``pip install -e .[deploy]``: onnx, onnxruntime, openvino).
"""
import argparse
import os.path as osp
import sys
import warnings
from typing import Dict, List, Sequence

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import export as exported  # noqa: E402  (tools/deploy/export.py: the file's metadata)

import numpy as np  # noqa: E402
import torch  # noqa: E402

BACKENDS = ('onnxruntime', 'openvino')


class Runtime:
    """One exported graph in onnxruntime (CPU) or OpenVINO (CPU): ``run(inputs)`` ->
    the outputs as float tensors, in the graph's output order. With
    ``static_shapes``, OpenVINO compiles the graph once per input shape, reshaped to
    it (fewer nodes run: its shape computations fold away; each new shape costs a
    compilation)."""

    def __init__(self, path: str, backend: str = 'onnxruntime', threads: int = 0,
                 static_shapes: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if not osp.isfile(path):
            raise FileNotFoundError(f'model file not found: {path}')
        self.backend = backend
        if backend == 'onnxruntime':
            import onnxruntime as ort
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(path, options,
                                                providers=['CPUExecutionProvider'])
            self.inputs = [i.name for i in self.session.get_inputs()]
        else:
            try:
                import openvino as ov
            except ImportError as e:
                raise ImportError('the OpenVINO backend needs openvino (pip install -e '
                                  '.[deploy])') from e
            self.config = {'INFERENCE_NUM_THREADS': threads} if threads else {}
            self.config['INFERENCE_PRECISION_HINT'] = 'f32'  # fp32, as exported
            self.core, self.path = ov.Core(), path
            model = self.core.read_model(path)
            self.inputs = [i.any_name for i in model.inputs]
            self.static = {} if static_shapes else None
            if not static_shapes:
                self.session = self.core.compile_model(model, 'CPU', self.config)

    def run(self, *arrays: torch.Tensor) -> List[torch.Tensor]:
        feed = {name: np.ascontiguousarray(a.detach().float().cpu().numpy())
                for name, a in zip(self.inputs, arrays)}
        if self.backend == 'onnxruntime':
            outs = self.session.run(None, feed)
        else:
            compiled = self.session if self.static is None else self._static(feed)
            result = compiled(feed)
            outs = [result[o] for o in compiled.outputs]
        return [torch.from_numpy(np.asarray(o)) for o in outs]


    def _static(self, feed: Dict[str, np.ndarray]):
        shapes = tuple((k, a.shape) for k, a in feed.items())
        if shapes not in self.static:
            model = self.core.read_model(self.path)
            model.reshape({k: list(shape) for k, shape in shapes})
            self.static[shapes] = self.core.compile_model(model, 'CPU', self.config)
        return self.static[shapes]


def check_size(img: torch.Tensor, min_size: int):
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f'the exported model takes (B, 3, H, W) images, got shape '
                         f'{tuple(img.shape)}')
    if min(img.shape[2:]) < min_size:
        raise ValueError(f'image of {img.shape[2]}x{img.shape[3]} after the test pipeline: '
                         f'this export serves sides of at least {min_size} (exported with '
                         f'the default exporter; the TorchScript exporter serves any size)')


def _raw_preprocessor(preprocessor):
    """The inferencer's data preprocessor reduced to stacking: the graph normalises
    and pads."""
    for attr in ('_enable_normalize', '_channel_conversion', 'channel_conversion'):
        if hasattr(preprocessor, attr):
            setattr(preprocessor, attr, False)
    if hasattr(preprocessor, 'pad_size_divisor'):
        preprocessor.pad_size_divisor = 1


def _bind_segmentor(model, graph: Runtime, min_size: int):
    def inference(inputs, batch_img_metas):
        check_size(inputs, min_size)
        return graph.run(inputs)[0]
    model.inference = inference


def _bind_single_stage(model, graph: Runtime, min_size: int):
    levels = model.bbox_head.prior_generator.num_levels

    def head_forward(img):
        check_size(img, min_size)
        outs = graph.run(img)
        return outs[:levels], outs[levels:2 * levels]
    model.extract_feat = lambda img: img
    model.bbox_head.forward = head_forward


def _bind_two_stage(model, graphs: Dict[str, Runtime], min_size: int):
    levels = model.rpn_head.prior_generator.num_levels
    rpn: Dict[str, tuple] = {}

    def extract_feat(img):
        check_size(img, min_size)
        outs = graphs[''].run(img)
        rpn['outs'] = (outs[levels:2 * levels], outs[2 * levels:3 * levels])
        return tuple(outs[:levels])

    roi_head = model.roi_head
    nb = roi_head.bbox_roi_extractor.num_inputs

    def bbox_forward(x, rois):
        cls_score, bbox_pred = graphs['roi_bbox'].run(*x[:nb], rois)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=None)

    def mask_forward(x, rois=None, pos_inds=None, bbox_feats=None):
        if rois is None:
            raise ValueError('the exported mask graph takes RoIs')
        nm = roi_head.mask_roi_extractor.num_inputs
        return dict(mask_preds=graphs['roi_mask'].run(*x[:nm], rois)[0], mask_feats=None)

    model.extract_feat = extract_feat
    model.rpn_head.forward = lambda feats: rpn.pop('outs')
    roi_head._bbox_forward = bbox_forward
    if 'roi_mask' in graphs:
        roi_head._mask_forward = mask_forward


def build_inferencer(path: str, backend: str = 'onnxruntime', threads: int = 0,
                     static_shapes: bool = False):
    """mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` for the exported file
    ``path``, its network run by ``backend`` (see the module docstring and
    :class:`Runtime` for ``static_shapes``)."""
    from mmengine.config import Config

    from pale_mm.utils import register_scope
    meta = exported.read_metadata(path)
    runtime = meta.get('runtime', 'any')  # files of older exports: standard ops
    if runtime not in ('any', backend):
        raise ValueError(f'{path} was exported for {runtime} (export.py --runtime '
                         f'{runtime}); export it with --runtime any to run it in {backend}')
    cfg = Config.fromstring(meta['config'], '.py')
    register_scope(meta['task'])
    graphs = {'': Runtime(path, backend, threads, static_shapes)}
    for name in meta['siblings']:  # model.roi_bbox.onnx, model.roi_mask.onnx
        suffix = name[:-len('.onnx')].rsplit('.', 1)[-1]
        graphs[suffix] = Runtime(osp.join(osp.dirname(path), name), backend, threads,
                                 static_shapes)
    classes = meta['dataset_meta'].get('classes')
    palette = meta['dataset_meta'].get('palette')
    if palette is not None:  # JSON gave lists; the visualizers take tuples
        palette = [tuple(c) for c in palette]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "weights is None": the runtime has them
        if meta['task'] == 'mmseg':
            from mmseg.apis import MMSegInferencer
            inferencer = MMSegInferencer(cfg, None, classes=classes, palette=palette,
                                         device='cpu')
        else:
            from mmdet.apis import DetInferencer
            inferencer = DetInferencer(cfg, None, device='cpu', scope='mmdet',
                                       show_progress=False)
            inferencer.model.dataset_meta = dict(meta['dataset_meta'], palette=palette)
            inferencer.visualizer.dataset_meta = inferencer.model.dataset_meta
    model = inferencer.model.eval()
    _raw_preprocessor(model.data_preprocessor)
    bind = dict(SegmentorForExport=_bind_segmentor, SingleStageForExport=_bind_single_stage,
                TwoStageForExport=_bind_two_stage)[meta['kind']]
    bind(model, graphs if meta['kind'] == 'TwoStageForExport' else graphs[''],
         meta['min_size'])
    return inferencer


def infer(path: str, images: Sequence[str], backend: str = 'onnxruntime',
          out_dir: str = 'outputs', score_thr: float = 0.3, threads: int = 0,
          draw: bool = True, static_shapes: bool = False) -> dict:
    """Run the exported model on ``images``; returns the inferencer's result
    (``{'predictions': ..., 'visualization': ...}``), drawn into ``out_dir/vis/``."""
    for image in images:
        if not osp.isfile(image):
            raise FileNotFoundError(f'image not found: {image}')
    inferencer = build_inferencer(path, backend, threads, static_shapes)
    kwargs = dict(out_dir=out_dir if draw else '', return_datasamples=False)
    if type(inferencer).__name__ == 'DetInferencer':
        kwargs.update(pred_score_thr=score_thr, no_save_pred=not draw, no_save_vis=not draw)
    with torch.no_grad():
        return inferencer(list(images), **kwargs)


def summary(predictions, score_thr: float) -> List[str]:
    """One line per image: detections above ``score_thr`` or the classes' pixel counts."""
    preds = predictions if isinstance(predictions, list) else [predictions]
    lines = []
    for i, p in enumerate(preds):
        if not isinstance(p, dict) or 'sem_seg' in p:  # MMSegInferencer: the class map
            seg = np.asarray(p['sem_seg'] if isinstance(p, dict) else p)
            ids, counts = np.unique(seg, return_counts=True)
            lines.append(f'image {i}: ' + ', '.join(f'class {k}: {c} px'
                                                     for k, c in zip(ids, counts)))
        else:
            keep = [j for j, s in enumerate(p['scores']) if s >= score_thr]
            lines.append(f'image {i}: {len(keep)} detections >= {score_thr}: ' + '; '.join(
                f'label {p["labels"][j]} score {p["scores"][j]:.3f} box '
                f'{[round(v, 1) for v in p["bboxes"][j]]}' for j in keep))
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Run an exported pale_mm model in '
                                                 'onnxruntime or OpenVINO')
    parser.add_argument('model', help='the .onnx file written by tools/deploy/export.py')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--backend', choices=BACKENDS, default='onnxruntime')
    parser.add_argument('--out-dir', default='outputs', help='drawings go to OUT_DIR/vis/')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections drawn and printed at or above this score')
    parser.add_argument('--threads', type=int, default=0,
                        help="the runtime's threads (0: its default)")
    parser.add_argument('--static-shapes', action='store_true',
                        help='OpenVINO: compile the graph once per input shape (faster '
                             'runs where few sizes recur)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = infer(args.model, args.images, args.backend, args.out_dir, args.score_thr,
                   args.threads, static_shapes=args.static_shapes)
    for line in summary(result['predictions'], args.score_thr):
        print(line)
    print(f'drawn into {osp.join(args.out_dir, "vis")}')
    return result


if __name__ == '__main__':
    main()
