# UperNet + Pale-T on ADE20K, 512x512 crops, 160k iterations, batch 16 (8 GPUs x 2).
# Recipe (docs/pale_transformer.md, the Swin/CSWin protocol, in the shared base): AdamW
# lr 6e-5, betas (0.9, 0.999), weight decay 0.01 and none on norm layers; linear
# warm-up over 1500 iterations, then poly decay (power 1.0); FCN auxiliary head on
# stage 3 (loss weight 0.4). Drop path 0.3 (Pale-T), 0.4 (Pale-S), 0.6 (Pale-B).
# No ImageNet weights ship with pale_mm. To start from an ImageNet checkpoint of the
# timm classifier (``pale_tiny``; it shares the backbone's parameter names), set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint='pale_tiny_in1k.pth')
_base_ = ['../_base_/upernet_adamw-160k_ade20k-512x512.py']

model = dict(
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
        with_cp=False),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150))
