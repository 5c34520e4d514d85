# The bundled demo, segmentation half: UperNet with a narrow Pale backbone on the
# synthetic shapes dataset in ADE20K layout (pale_mm/demo/shapes.py), 128x128
# images, trained from scratch on the CPU in a few minutes and evaluated with
# mmseg's IoUMetric.
#   python tools/run_demo.py            # generates the data, trains, evaluates both
#   python tools/train.py configs/demo/upernet_pale-t-demo_600i_shapes-128.py
# Backbone as in the Mask R-CNN demo: the real PaleTransformer with Pale-T's layout
# narrowed (widths 32-64-128-256, depths 1-1-2-1). The heads keep the upstream
# SyncBN; tools/train.py turns it into BN when not distributed.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)

data_root = 'data/demo/shapes/'
classes = ('background', 'circle', 'square', 'triangle')
palette = [[120, 120, 120], [220, 20, 60], [0, 128, 255], [255, 200, 0]]
crop_size = (128, 128)
max_iters = 600

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='PaleTransformer',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                  num_heads=[2, 2, 4, 8]),
        pale_size=7,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64,
                     num_classes=len(classes)),
    auxiliary_head=dict(in_channels=128, in_index=2, channels=32,
                        num_classes=len(classes)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=dict(classes=classes, palette=palette),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.),
    clip_grad=dict(max_norm=10., norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=20, end=max_iters, by_epoch=False),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1),
    # Draw ground truth and predictions of every image of every 5th validation batch
    # into <work_dir>/<timestamp>/vis_data/vis_image/.
    visualization=dict(type='SegVisualizationHook', draw=True, interval=5))
log_processor = dict(by_epoch=False, window_size=10)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
