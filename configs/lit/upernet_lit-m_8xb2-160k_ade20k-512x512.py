# UperNet + LIT-M on ADE20K, 512x512 crops, 160k iterations, batch 16.
# The official LIT code trains Semantic FPN (80k) instead; this follows the Swin
# UperNet protocol: AdamW lr 6e-5, weight decay 0.01, warm-up 1500 iterations, poly
# decay, FCN auxiliary head on stage 3; drop path 0.4 (ours).
# Backbone weights: the official ImageNet-1K LIT-M checkpoint, a release asset of
# github.com/ziplab/LIT, downloaded on first use into torch.hub's cache (the file
# timm.create_model('lit_m', pretrained=True) uses); docs/weights.md.
# Recipe: see upernet_lit-ti_8xb2-160k_ade20k-512x512.py.
# pretrain_img_size=512: relative position tables sized for 512-px input, as the
# official segmentation backbone (input_resolution = 512 // patch_size); see
# mask-rcnn_lit-s_fpn_1x_coco.py.
_base_ = './upernet_lit-ti_8xb2-160k_ade20k-512x512.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_m.pth'
model = dict(
    backbone=dict(
        arch='m', drop_path_rate=0.4, pretrain_img_size=512,  # embed dims 96, 192, 384, 768
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
