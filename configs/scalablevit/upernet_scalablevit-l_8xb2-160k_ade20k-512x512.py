# UperNet + ScalableViT-L on ADE20K, 512x512 crops, 160k iterations, batch 16
# (the Swin protocol, as in the paper; no segmentation code was released):
# AdamW lr 6e-5, weight decay 0.01, warm-up 1500 iterations, poly decay, FCN
# auxiliary head on stage 3; drop path 0.5 (ours).
# Official ImageNet-1K weights: Google Drive only (not downloadable by mmengine), so
# this config starts from scratch; download the file, then
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=/path/to/scalablevit_l.pth
# (links and details: configs/scalablevit/README.md, docs/weights.md).
# Recipe: see upernet_scalablevit-s_8xb2-160k_ade20k-512x512.py.
_base_ = './upernet_scalablevit-s_8xb2-160k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='l', drop_path_rate=0.5),  # embed dims 128, 256, 512, 1024
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
