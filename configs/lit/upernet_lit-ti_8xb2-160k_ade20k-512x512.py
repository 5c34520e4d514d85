# UperNet + LIT-Ti on ADE20K, 512x512 crops, 160k iterations, batch 16.
# The official LIT code trains Semantic FPN (80k) instead; this follows the Swin
# UperNet protocol: AdamW lr 6e-5, weight decay 0.01, warm-up 1500 iterations, poly
# decay, FCN auxiliary head on stage 3; drop path 0.2 (ours).
# Official ImageNet weights:
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='lit_ti.pth')
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
    backbone=dict(
        _delete_=True,
        type='LIT',
        arch='ti',  # embed dims 64, 128, 320, 512
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=None),
    decode_head=dict(in_channels=[64, 128, 320, 512], num_classes=150),
    auxiliary_head=dict(in_channels=320, in_index=2, num_classes=150))

# AdamW; no weight decay on norm layers or position tables.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={
        'relative_position_bias_table': dict(decay_mult=0.),
        'pos_embed': dict(decay_mult=0.)}))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
