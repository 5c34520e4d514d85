# Mask R-CNN + FPN with Pale-T on COCO, 1x schedule (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2).
# Recipe (docs/pale_transformer.md, the Swin/CSWin protocol): AdamW lr 1e-4, betas
# (0.9, 0.999), weight decay 0.05 and none on norm layers; linear warm-up over 1000
# iterations; steps at epochs 8 and 11; drop path 0.2 (Pale-T), 0.3 (Pale-S),
# 0.5 (Pale-B) (the paper gives no value; ours).
# No ImageNet weights ship with pale_mm. To start from an ImageNet checkpoint of the
# timm classifier (``pale_tiny``; it shares the backbone's parameter names), set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='pale_tiny_in1k.pth')
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
        type='PaleTransformer',
        arch='tiny',  # embed dims 64, 128, 256, 512
        pale_size=7,
        mlp_ratio=4.,
        qkv_bias=True,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]

# AdamW; no weight decay on any norm layer (the backbone's LayerNorms and the
# BatchNorm of its q/k/v convolutions).
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(norm_decay_mult=0.),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05))

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
