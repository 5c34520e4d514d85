# Shared base of the Pale, LIT and ScalableViT Mask R-CNN configs: the common protocol
# only. Each family's config sets its backbone and drop path in its own file, so editing
# one family's config does not change another's. Mask R-CNN + FPN on COCO, 1x schedule
# (12 epochs), single scale (1333, 800), batch 16 (8 GPUs x 2), the Swin/CSWin protocol:
# AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 and none on norm layers; linear
# warm-up over 1000 iterations; steps at epochs 8 and 11. A config sets model.backbone
# (with _delete_=True) and model.neck.in_channels.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)

model = dict(type='MaskRCNN')

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]

# AdamW; no weight decay on any norm layer.
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(norm_decay_mult=0.),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05))

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
