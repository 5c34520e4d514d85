# RetinaNet + FPN with LIT-Ti on COCO, 1x (12 epochs), single scale (1333, 800),
# batch 16 (8 GPUs x 2): the official LIT model (ziplab/LIT
# detection/configs/lit/retinanet_lit_ti_fpn_1x_coco.py, mmdet 2.11), 41.6 box AP.
# Evaluate the released model (configs/lit/README.md: what to expect from mmdet 3):
#   python tools/test.py configs/lit/retinanet_lit-ti_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/retina_lit_ti.pth
# The backbone is the official detection LIT-Ti's: no output norms, unpadded merges
# (detection inputs are padded to a multiple of 32, so those only matter at other
# sizes), position embeddings for 224 px; drop path 0.1. Recipe as the official one:
# mmdet's RetinaNet 1x (warm-up 500 iterations, steps at epochs 8 and 11) with AdamW
# lr 1e-4, weight decay 1e-4.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)
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
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # FPN from stage 1 (strides 8-128), as mmdet's RetinaNet
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=1e-4))
