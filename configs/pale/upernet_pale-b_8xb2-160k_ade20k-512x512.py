# UperNet + Pale-B on ADE20K (see the Pale-T config for the recipe).
_base_ = './upernet_pale-t_8xb2-160k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6),  # embed dims 128, 256, 512, 1024
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
