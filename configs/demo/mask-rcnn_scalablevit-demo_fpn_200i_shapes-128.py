# The bundled demo with a narrow ScalableViT backbone (IWSA window attention with the
# local interactive module alternating with scalable SSA, CPE after each stage's first
# block): Mask R-CNN + FPN on the synthetic shapes, from scratch on the CPU.
# Everything else from the demos' shared base.
#   python tools/train.py configs/demo/mask-rcnn_scalablevit-demo_fpn_200i_shapes-128.py
_base_ = '../_base_/mask-rcnn_fpn_200i_shapes-128_demo.py'  # not Pale's demo config
model = dict(
    backbone=dict(
        _delete_=True,
        type='ScalableViT',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                  c_ratios=[1.25, 1.25, 1.25, 1]),
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None))
