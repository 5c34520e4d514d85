"""The bundled demo: a synthetic shapes dataset (``pale_mm.demo.shapes``) that
``tools/run_demo.py`` trains Mask R-CNN and UperNet on."""
from .shapes import DET_CLASSES, SEG_CLASSES, SEG_PALETTE, ensure_dataset, generate

__all__ = ['DEMO_FLOORS', 'DET_CLASSES', 'SEG_CLASSES', 'SEG_PALETTE', 'ensure_dataset',
           'generate']

# What the trained demo must reach, on any device (the demo tests on the CPU,
# tools/analysis/gpu_e2e.py on a GPU): task -> (headline metric, absolute floor,
# required gain over the untrained model). An untrained model scores about 0 box mAP,
# and about 20 mIoU (every pixel called background, which is ~80% of the pixels).
DEMO_FLOORS = {
    'det': ('coco/bbox_mAP', 0.05, 0.04),
    'seg': ('mIoU', 26.0, 4.0),
}
