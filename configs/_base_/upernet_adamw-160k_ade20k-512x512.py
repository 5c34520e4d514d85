# Shared base of the Pale, LIT and ScalableViT UperNet configs: the common protocol
# only. Each family's config sets its backbone and drop path in its own file, so editing
# one family's config does not change another's. UperNet on ADE20K, 512x512 crops, 160k
# iterations, batch 16 (8 GPUs x 2), the Swin/CSWin protocol: AdamW lr 6e-5, betas (0.9,
# 0.999), weight decay 0.01 and none on norm layers; linear warm-up over 1500
# iterations, then poly decay (power 1.0); FCN auxiliary head on stage 3 (loss weight
# 0.4). A config sets model.backbone (with _delete_=True) and the heads' in_channels.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['pale_mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(in_index=2, num_classes=150))

# AdamW; no weight decay on any norm layer.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
