"""The bundled demo: a synthetic shapes dataset (``pale_mm.demo.shapes``) that
``tools/run_demo.py`` trains Mask R-CNN and UperNet on."""
from .shapes import DET_CLASSES, SEG_CLASSES, SEG_PALETTE, ensure_dataset, generate

__all__ = ['DET_CLASSES', 'SEG_CLASSES', 'SEG_PALETTE', 'ensure_dataset', 'generate']
