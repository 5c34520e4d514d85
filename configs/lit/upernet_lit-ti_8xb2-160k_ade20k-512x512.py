# UperNet + LIT-Ti on ADE20K, 512x512 crops, 160k iterations, batch 16.
# The official LIT code trains Semantic FPN (80k) instead; this follows the Swin
# UperNet protocol: AdamW lr 6e-5, weight decay 0.01, warm-up 1500 iterations, poly
# decay, FCN auxiliary head on stage 3; drop path 0.2 (ours).
# Backbone weights: the official ImageNet-1K LIT-Ti checkpoint, a release asset of
# github.com/ziplab/LIT, downloaded on first use into torch.hub's cache (the file
# timm.create_model('lit_ti', pretrained=True) uses); docs/weights.md.
# Recipe: the shared UperNet base's (../_base_/, the Swin protocol; not Pale's
# config, so Pale's recipe cannot change this one), with this backbone and no weight
# decay on its position tables either.
_base_ = '../_base_/upernet_adamw-160k_ade20k-512x512.py'
pretrained = 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LIT',
        arch='ti',  # embed dims 64, 128, 320, 512
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'relative_position_bias_table': dict(decay_mult=0.),
    'pos_embed': dict(decay_mult=0.)}))
