# The bundled demo with a narrow LIT backbone (MLP-only stages 1-2, global MSA with
# relative position bias in stages 3-4, deformable token merging): Mask R-CNN + FPN on
# the synthetic shapes, from scratch on the CPU, with the demos' shared base.
#   python tools/train.py configs/demo/mask-rcnn_lit-demo_fpn_200i_shapes-128.py
_base_ = '../_base_/mask-rcnn_fpn_200i_shapes-128_demo.py'  # not Pale's demo config
model = dict(
    backbone=dict(
        _delete_=True,
        type='LIT',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8]),
        pretrain_img_size=128,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None))
