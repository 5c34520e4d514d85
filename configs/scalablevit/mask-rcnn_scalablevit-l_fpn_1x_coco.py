# Mask R-CNN + FPN with ScalableViT-L on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2). The paper follows the Swin/Twins protocol;
# its detection code was never released. Drop path 0.3 (ours).
# Official ImageNet-1K weights: Google Drive only (not downloadable by mmengine), so
# this config starts from scratch; download the file, then
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=/path/to/scalablevit_l.pth
# (links and details: configs/scalablevit/README.md, docs/weights.md).
# Recipe: see mask-rcnn_scalablevit-s_fpn_1x_coco.py.
_base_ = './mask-rcnn_scalablevit-s_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='l', drop_path_rate=0.3),  # embed dims 128, 256, 512, 1024
    neck=dict(in_channels=[128, 256, 512, 1024]))
