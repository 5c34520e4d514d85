# Shared base of the Pale, LIT and ScalableViT demo configs (each sets its backbone in
# its own file, so editing one family's demo does not change another's): Mask R-CNN +
# FPN on the bundled synthetic shapes (pale_mm/demo/shapes.py), 128x128 images, 200
# iterations from scratch on the CPU, evaluated with mmdet's CocoMetric; heads narrowed
# to FPN width 64. A config sets model.backbone (with _delete_=True) and
# model.neck.in_channels.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)

data_root = 'data/demo/shapes/'
classes = ('circle', 'square', 'triangle')
palette = [(220, 20, 60), (0, 128, 255), (255, 200, 0)]
img_scale = (128, 128)
max_iters = 200
width = 64  # FPN / RoI head channels

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes, palette=palette),
        ann_file='annotations/instances_training.json',
        data_prefix=dict(img='images/training/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes, palette=palette),
        ann_file='annotations/instances_validation.json',
        data_prefix=dict(img='images/validation/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_validation.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# From scratch, so a higher learning rate than the COCO recipe (which starts from
# ImageNet weights); no weight decay on norm layers as there.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.),
    clip_grad=dict(max_norm=10., norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', T_max=max_iters - 30, eta_min=1e-5, by_epoch=False,
         begin=30, end=max_iters),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1),
    # Draw ground truth and predictions of a few validation images into
    # <work_dir>/<timestamp>/vis_data/vis_image/.
    visualization=dict(type='DetVisualizationHook', draw=True, interval=3, score_thr=0.1))
log_processor = dict(by_epoch=False, window_size=10)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=4)
