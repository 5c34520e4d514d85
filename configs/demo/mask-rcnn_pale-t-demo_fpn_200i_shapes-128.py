# The bundled demo, detection half: Mask R-CNN + FPN with a narrow Pale backbone on
# the synthetic shapes dataset (pale_mm/demo/shapes.py), 128x128 images, trained from
# scratch on the CPU in a few minutes and evaluated with mmdet's CocoMetric.
#   python tools/run_demo.py            # generates the data, trains, evaluates both
#   python tools/train.py configs/demo/mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py
# The backbone is the real PaleTransformer (stem, PS-Attention blocks, merges, pale
# size 7) with Pale-T's layout narrowed for a CPU: widths 32-64-128-256 and depths
# 1-1-2-1 instead of 64-128-256-512 and 2-2-16-2. The heads are narrowed to match.
# The data, heads, schedule and evaluation are the shared demo base's (also used by
# the LIT and ScalableViT demos); this file sets the backbone.
_base_ = ['../_base_/mask-rcnn_fpn_200i_shapes-128_demo.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='PaleTransformer',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                  num_heads=[2, 2, 4, 8]),
        pale_size=7,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256]))
