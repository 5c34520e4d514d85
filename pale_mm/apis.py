"""One-call inference with a trained pale_mm detector or segmentor.

    from pale_mm.apis import inference
    result = inference('configs/pale/mask-rcnn_pale-t_fpn_1x_coco.py', 'epoch_12.pth',
                       'demo.jpg', out_dir='outputs')

Goes through mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` (picked from the
config's ``default_scope``), which build the model from our config, load the
checkpoint, run the test pipeline and draw the predictions into ``out_dir/vis/``.
"""
import os
import os.path as osp
from typing import Optional

__all__ = ['inference', 'build_inferencer']


def build_inferencer(config: str, checkpoint: Optional[str] = None, device: str = 'cpu'):
    from mmengine.config import Config

    from pale_mm.utils import config_scope, register_scope, sync_bn_to_bn
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    if checkpoint is not None and '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
    cfg = Config.fromfile(config)
    scope = config_scope(cfg)
    register_scope(scope)
    sync_bn_to_bn(cfg)  # single process: SyncBN needs a process group
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        return DetInferencer(model=cfg, weights=checkpoint, device=device, scope='mmdet',
                             show_progress=False)
    from mmseg.apis import MMSegInferencer
    return MMSegInferencer(model=cfg, weights=checkpoint, device=device, scope='mmseg')


def inference(config: str, checkpoint: str, image: str, out_dir: str = 'outputs',
              device: str = 'cpu', score_thr: float = 0.3) -> dict:
    """Run ``config`` + ``checkpoint`` on ``image`` and write the visualisation to
    ``out_dir/vis/<image name>``. Returns ``{'predictions': [one per image],
    'vis_path'}``."""
    if not osp.isfile(image):
        raise FileNotFoundError(f'image not found: {image}')
    inferencer = build_inferencer(config, checkpoint, device)
    os.makedirs(out_dir, exist_ok=True)
    kwargs = dict(out_dir=out_dir, return_datasamples=False)
    if type(inferencer).__name__ == 'DetInferencer':
        kwargs.update(pred_score_thr=score_thr, no_save_pred=False)
    result = inferencer(image, **kwargs)
    vis = osp.join(out_dir, 'vis', osp.basename(image))
    if not osp.isfile(vis):  # in case a library names the file differently
        stem = osp.splitext(osp.basename(image))[0]
        cands = [osp.join(out_dir, 'vis', f) for f in sorted(os.listdir(osp.join(out_dir, 'vis')))
                 if f.startswith(stem)] if osp.isdir(osp.join(out_dir, 'vis')) else []
        vis = cands[0] if cands else None
    preds = result.get('predictions')
    if not isinstance(preds, list):  # MMSegInferencer unwraps a single image's result
        preds = [preds]
    return dict(predictions=preds, vis_path=vis)
