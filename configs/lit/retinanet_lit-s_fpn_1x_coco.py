# RetinaNet + FPN with LIT-S on COCO, 1x: the official LIT model (ziplab/LIT
# detection/configs/lit/retinanet_lit_s_fpn_1x_coco.py, mmdet 2.11), 41.6 box AP.
# Evaluate the released model (configs/lit/README.md):
#   python tools/test.py configs/lit/retinanet_lit-s_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/retina_lit_s.pth
# The backbone is the official detection LIT-S's: output norms on stages 1-3 (none on
# stage 0), relative position tables for 800 px, unpadded merges; drop path 0.2.
# Recipe as the official one: AdamW lr 1e-4, weight decay 1e-4, none on norms and
# position tables (the official run also used gradient checkpointing and apex fp16:
# with_cp=True and --amp here, neither changes the model).
_base_ = './retinanet_lit-ti_fpn_1x_coco.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth'
model = dict(
    backbone=dict(
        arch='s', drop_path_rate=0.2, pretrain_img_size=800,  # embed dims 96, 192, 384, 768
        out_norm_indices=(1, 2, 3),  # official detection LIT-S: no norm0
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'norm': dict(decay_mult=0.), 'relative_position_bias_table': dict(decay_mult=0.)}))
