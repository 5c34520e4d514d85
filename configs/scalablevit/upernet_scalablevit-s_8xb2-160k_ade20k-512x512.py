# UperNet + ScalableViT-S on ADE20K, 512x512 crops, 160k iterations, batch 16
# (the Swin protocol, as in the paper; no segmentation code was released):
# AdamW lr 6e-5, weight decay 0.01, warm-up 1500 iterations, poly decay, FCN
# auxiliary head on stage 3; drop path 0.3 (ours).
# Official ImageNet-1K weights: Google Drive only (not downloadable by mmengine), so
# this config starts from scratch; download the file, then
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=/path/to/scalablevit_s.pth
# (links and details: configs/scalablevit/README.md, docs/weights.md).
# Recipe: the shared UperNet base's (../_base_/, the Swin protocol; not Pale's
# config, so Pale's recipe cannot change this one), with this backbone and no weight
# decay on its position tables either.
_base_ = '../_base_/upernet_adamw-160k_ade20k-512x512.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ScalableViT',
        arch='s',  # embed dims 64, 128, 256, 512
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'relative_position_bias_table': dict(decay_mult=0.),
    'pos_embed': dict(decay_mult=0.)}))
