# UperNet + Pale-T on ADE20K, 512x512 crops, 160k iterations, batch 16 (8 GPUs x 2).
# Recipe (docs/pale_transformer.md, the Swin/CSWin protocol): AdamW lr 6e-5, betas
# (0.9, 0.999), weight decay 0.01 and none on norm layers; linear warm-up over 1500
# iterations, then poly decay (power 1.0); FCN auxiliary head on stage 3 (loss weight
# 0.4); drop path 0.3 (Pale-T), 0.4 (Pale-S), 0.6 (Pale-B).
# No ImageNet weights ship with pale_mm. To start from an ImageNet checkpoint of the
# timm classifier (``pale_tiny``; it shares the backbone's parameter names), set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='pale_tiny_in1k.pth')
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
        type='PaleTransformer',
        arch='tiny',  # embed dims 64, 128, 256, 512
        pale_size=7,
        mlp_ratio=4.,
        qkv_bias=True,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=None),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150))

# AdamW; no weight decay on any norm layer (the backbone's LayerNorms and the
# BatchNorm of its q/k/v convolutions, and the heads' norms).
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
