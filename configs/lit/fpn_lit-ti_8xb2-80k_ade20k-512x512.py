# Semantic FPN with LIT-Ti on ADE20K, 512x512 crops, 80k iterations, batch 16
# (8 GPUs x 2): the official LIT model (ziplab/LIT
# segmentation/configs/lit/lit_ti_fpn_r50_512x512_80k_ade20k.py, mmseg 0.13), 41.3 mIoU.
# Evaluate the released model (configs/lit/README.md):
#   python tools/test.py configs/lit/fpn_lit-ti_8xb2-80k_ade20k-512x512.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/sem_fpn_lit_ti.pth
# The backbone is the official segmentation LIT-Ti's: no output norms, unpadded stem
# and merges (a 512x683 test image reaches the backbone as it is, and each stage
# drops an odd last row or column as the official code does), position embeddings for
# 224 px; drop path 0.1. Recipe as the official one: mmseg's FPN neck and FPNHead,
# AdamW lr 1e-4, weight decay 1e-4, poly decay (power 0.9, down to 1e-6), single-scale
# 'whole' inference at (2048, 512).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'
crop_size = (512, 512)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='LIT',
        arch='ti',  # embed dims 64, 128, 320, 512
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        out_norm_indices=(),  # official LIT-Ti: no output norms
        size_rounding='floor',  # official: unpadded stem and merges
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-6, power=0.9, begin=0, end=80000, by_epoch=False)
]
# 8 GPUs x 2 images = batch 16
train_dataloader = dict(batch_size=2)
