# Semantic FPN with LIT-S on ADE20K, 512x512 crops, 80k iterations, batch 16: the
# official LIT model (ziplab/LIT
# segmentation/configs/lit/lit_s_fpn_r50_512x512_80k_ade20k.py, mmseg 0.13), 41.7 mIoU.
# Evaluate the released model (configs/lit/README.md):
#   python tools/test.py configs/lit/fpn_lit-s_8xb2-80k_ade20k-512x512.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/sem_fpn_lit_s.pth
# The backbone is the official segmentation LIT-S's: output norms on all four stages,
# relative position tables for 512 px, an image padded to a multiple of 4 and unpadded
# merges (each stage drops an odd last row or column); drop path 0.2. Recipe: as
# fpn_lit-ti_8xb2-80k_ade20k-512x512.py (the official run also used gradient
# checkpointing: with_cp=True here, which does not change the model).
_base_ = './fpn_lit-ti_8xb2-80k_ade20k-512x512.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth'
model = dict(
    backbone=dict(
        arch='s', drop_path_rate=0.2, pretrain_img_size=512,  # embed dims 96, 192, 384, 768
        out_norm_indices=(0, 1, 2, 3),  # official segmentation LIT-S: all four
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
