# Mask R-CNN + FPN with ScalableViT-B on COCO, 1x (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2). The paper follows the Swin/Twins protocol;
# its detection code was never released. Drop path 0.3 (ours).
# Official ImageNet weights ({'model': ..., 'args': Namespace}) load as is:
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='scalablevit_b.pth')
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)

model = dict(
    type='MaskRCNN',
    backbone=dict(
        _delete_=True,
        type='ScalableViT',
        arch='b',  # embed dims 96, 192, 384, 768
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=None),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]

# Swin protocol (ScalableViT released no detection code): AdamW lr 1e-4, weight
# decay 0.05, none on norm layers.
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(norm_decay_mult=0.),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05))

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
