# Mask R-CNN + FPN with Pale-S on COCO, 3x with multi-scale training and random
# crops (see the Pale-T configs for the recipe).
_base_ = './mask-rcnn_pale-t_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3),  # embed dims 96, 192, 384, 768
    neck=dict(in_channels=[96, 192, 384, 768]))
