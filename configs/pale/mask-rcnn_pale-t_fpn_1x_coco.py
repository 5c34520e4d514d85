# Mask R-CNN + FPN with Pale-T on COCO, 1x schedule (12 epochs), single scale
# (1333, 800), batch 16 (8 GPUs x 2).
# Recipe (docs/pale_transformer.md, the Swin/CSWin protocol, in the shared base): AdamW
# lr 1e-4, betas (0.9, 0.999), weight decay 0.05 and none on norm layers (the
# backbone's LayerNorms and the BatchNorm of its q/k/v convolutions); linear warm-up
# over 1000 iterations; steps at epochs 8 and 11. Drop path 0.2 (Pale-T), 0.3
# (Pale-S), 0.5 (Pale-B) (the paper gives no value; ours).
# No ImageNet weights ship with pale_mm. To start from an ImageNet checkpoint of the
# timm classifier (``pale_tiny``; it shares the backbone's parameter names), set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='pale_tiny_in1k.pth')
_base_ = ['../_base_/mask-rcnn_fpn_adamw-1x_coco.py']

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
        with_cp=False),
    neck=dict(in_channels=[64, 128, 256, 512]))
