# Mask R-CNN + FPN with ScalableViT-S on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2). The paper follows the Swin/Twins protocol;
# its detection code was never released. Drop path 0.2 (ours).
# Official ImageNet-1K weights: Google Drive only (not downloadable by mmengine), so
# this config starts from scratch; download the file, then
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=/path/to/scalablevit_s.pth
# (links and details: configs/scalablevit/README.md, docs/weights.md).
# Recipe: the shared Mask R-CNN base's (../_base_/, the Swin protocol: AdamW lr 1e-4,
# weight decay 0.05 and none on norm layers, warm-up 1000 iterations, steps at epochs
# 8 and 11; not Pale's config, so Pale's recipe cannot change this one), with this
# backbone.
_base_ = '../_base_/mask-rcnn_fpn_adamw-1x_coco.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ScalableViT',
        arch='s',  # embed dims 64, 128, 256, 512
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False),
    neck=dict(in_channels=[64, 128, 256, 512]))
