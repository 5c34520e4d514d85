# UperNet + Pale-S on ADE20K (see the Pale-T config for the recipe).
_base_ = './upernet_pale-t_8xb2-160k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.4),  # embed dims 96, 192, 384, 768
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
