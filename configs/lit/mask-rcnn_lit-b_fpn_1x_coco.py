# Mask R-CNN + FPN with LIT-B on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2), following the official LIT detection configs
# (mmdet 2.x): warm-up 500 iterations, steps at epochs 8 and 11, drop path 0.5
# (official for Ti/S; ours for M/B).
# Backbone weights: the official ImageNet-1K LIT-B checkpoint, a release asset of
# github.com/ziplab/LIT, downloaded on first use into torch.hub's cache (the file
# timm.create_model('lit_b', pretrained=True) uses); docs/weights.md.
# Recipe: see mask-rcnn_lit-ti_fpn_1x_coco.py.
# pretrain_img_size=800: the relative position tables are sized for 800-px input, as
# the official detection backbone (input_resolution = 800 // patch_size) does; the
# 224-px ImageNet tables are resized to it at load, then to the run-time size in each
# forward (the official two resizes). pretrain_img_size=224 keeps the 224-px tables
# and resizes once, straight to the run-time size (not the official behaviour away
# from 224; fewer parameters).
_base_ = './mask-rcnn_lit-ti_fpn_1x_coco.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_b.pth'
model = dict(
    backbone=dict(
        arch='b', drop_path_rate=0.5, pretrain_img_size=800,  # embed dims 128, 256, 512, 1024
        # no official downstream LIT-B: a norm on every output, odd sizes padded
        # (this project's defaults, not the official LIT-Ti's this file inherits)
        out_norm_indices=None, size_rounding='ceil',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
