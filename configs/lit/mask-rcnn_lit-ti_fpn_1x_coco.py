# Mask R-CNN + FPN with LIT-Ti on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2), following the official LIT detection configs
# (mmdet 2.x): warm-up 500 iterations, steps at epochs 8 and 11, drop path 0.1
# (official for Ti/S; ours for M/B).
# Backbone weights: the official ImageNet-1K LIT-Ti checkpoint, a release asset of
# github.com/ziplab/LIT, downloaded on first use into torch.hub's cache (the file
# timm.create_model('lit_ti', pretrained=True) uses); docs/weights.md.
# Built on the shared Mask R-CNN base (../_base_/: model, data, 1x schedule and batch
# of the Swin protocol; not Pale's config, so Pale's recipe cannot change this one);
# the warm-up and the optimizer settings below are LIT's own.
# The backbone is the official detection LIT-Ti's (ziplab/LIT detection/mmdet/models/
# backbones/lit_ti.py): no output norms, and unpadded merges (an odd last row or
# column is dropped; detection inputs are padded to a multiple of 32, so this only
# matters for other sizes). So the released Mask R-CNN LIT-Ti (42.0 box / 39.1 mask
# AP) loads with every key and evaluates as published:
#   python tools/test.py configs/lit/mask-rcnn_lit-ti_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_ti.pth
# (configs/lit/README.md).
_base_ = '../_base_/mask-rcnn_fpn_adamw-1x_coco.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LIT',
        arch='ti',  # embed dims 64, 128, 320, 512
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        out_norm_indices=(),  # official LIT-Ti: no output norms
        size_rounding='floor',  # official: unpadded merges
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end={{_base_.max_epochs}}, by_epoch=True,
         milestones=[8, 11], gamma=0.1),
]

# The official LIT recipe (ziplab/LIT detection/configs/lit): AdamW lr 2e-4, weight
# decay 1e-4, none on norms and position tables.
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'relative_position_bias_table': dict(decay_mult=0.),
        'pos_embed': dict(decay_mult=0.)}),
    optimizer=dict(lr=2e-4, weight_decay=1e-4))
