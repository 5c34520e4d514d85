# Mask R-CNN + FPN with Pale-B on COCO, 3x with multi-scale training and random
# crops (see the Pale-T configs for the recipe).
_base_ = './mask-rcnn_pale-t_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5),  # embed dims 128, 256, 512, 1024
    neck=dict(in_channels=[128, 256, 512, 1024]))
