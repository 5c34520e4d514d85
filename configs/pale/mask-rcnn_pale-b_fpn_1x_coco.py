# Mask R-CNN + FPN with Pale-B on COCO, 1x (see the Pale-T config for the recipe).
_base_ = './mask-rcnn_pale-t_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5),  # embed dims 128, 256, 512, 1024
    neck=dict(in_channels=[128, 256, 512, 1024]))
