# Mask R-CNN + FPN with LIT-S on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2), following the official LIT detection configs
# (mmdet 2.x): warm-up 500 iterations, steps at epochs 8 and 11, drop path 0.2
# (official for Ti/S; ours for M/B).
# Backbone weights: the official ImageNet-1K LIT-S checkpoint, a release asset of
# github.com/ziplab/LIT, downloaded on first use into torch.hub's cache (the file
# timm.create_model('lit_s', pretrained=True) uses); docs/weights.md.
# Recipe: see mask-rcnn_lit-ti_fpn_1x_coco.py.
# pretrain_img_size=800: the relative position tables are sized for 800-px input, as
# the official detection backbone (input_resolution = 800 // patch_size) does; the
# 224-px ImageNet tables are resized to it at load, then to the run-time size in each
# forward (the official two resizes). pretrain_img_size=224 keeps the 224-px tables
# and resizes once, straight to the run-time size (not the official behaviour away
# from 224; fewer parameters).
# The backbone is the official detection LIT-S's (ziplab/LIT detection/mmdet/models/
# backbones/lit.py): output norms on stages 1-3 and none on stage 0, tables for 800 px,
# unpadded merges. The released Mask R-CNN LIT-S (42.9 box / 39.6 mask AP) loads with
# every key:
#   python tools/test.py configs/lit/mask-rcnn_lit-s_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_s.pth
_base_ = './mask-rcnn_lit-ti_fpn_1x_coco.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth'
model = dict(
    backbone=dict(
        arch='s', drop_path_rate=0.2, pretrain_img_size=800,  # embed dims 96, 192, 384, 768
        out_norm_indices=(1, 2, 3),  # official detection LIT-S: no norm0
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
