"""A deterministic synthetic dataset for the bundled demo: coloured shapes
(circle, square, triangle) on textured backgrounds, with exact ground truth.

One folder serves both tasks::

    ROOT/
      images/training/shapes_000000.jpg ...      # RGB images (JPEG, as ADE20K)
      images/validation/...
      annotations/training/shapes_000000.png ... # ADE20K-style label maps
      annotations/validation/...
      annotations/instances_training.json        # COCO instances (polygon masks)
      annotations/instances_validation.json
      meta.json                                  # generator version and settings

Label maps follow ADE20K's convention, read with ``reduce_zero_label=True``:
0 = unlabelled (ignored; here a thin band on every shape boundary, where JPEG blurs
the edge), 1 = background, 2 = circle, 3 = square, 4 = triangle. After
``reduce_zero_label`` the segmentation classes are ``SEG_CLASSES``. The COCO file has
the three shape categories ``DET_CLASSES`` (ids 1, 2, 3).

Everything is a function of ``seed``: the same call writes byte-identical label
maps and JSON (and identical JPEGs with the same Pillow build).
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ['DET_CLASSES', 'SEG_CLASSES', 'SEG_PALETTE', 'generate', 'ensure_dataset',
           'render_sample']

GENERATOR_VERSION = 2
DET_CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + DET_CLASSES
SEG_PALETTE = [[120, 120, 120], [220, 20, 60], [0, 128, 255], [255, 200, 0]]
SPLITS = {'training': 'train', 'validation': 'val'}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: colour gradient, oriented stripes and noise (float RGB)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    angle = rng.uniform(0, math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = c0 * (1 - ramp) + c1 * ramp
    freq = rng.uniform(3, 12)
    theta = rng.uniform(0, math.pi)
    stripes = np.sin(2 * math.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)
                     + rng.uniform(0, 2 * math.pi))
    img = img + rng.uniform(10, 35) * stripes[..., None]
    img = img + rng.normal(0, 8, img.shape)
    return img


def _polygon(rng: np.random.Generator, cls: str, cx: float, cy: float,
             r: float) -> np.ndarray:
    """Vertices (N, 2) in pixel coordinates, randomly rotated."""
    rot = rng.uniform(0, 2 * math.pi)
    if cls == 'circle':
        n, rr = 48, r
    elif cls == 'square':
        n, rr = 4, r * math.sqrt(2) * 0.85
    else:
        n, rr = 3, r * 1.25
    ang = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)], 1)


def render_sample(rng: np.random.Generator, size: int = 128,
                  max_objects: int = 4) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """One image ``(size, size, 3) uint8 RGB``, its label map ``(size, size) uint8``
    and its instances ``[{'category_id', 'polygon', 'mask'}]``."""
    import cv2
    img = _texture(rng, size)
    label = np.ones((size, size), np.uint8)  # 1 = background
    band = np.zeros((size, size), bool)
    instances, boxes = [], []
    n_obj = int(rng.integers(2, max_objects + 1))
    attempts = 0
    while len(instances) < n_obj and attempts < 100:
        attempts += 1
        cls_idx = int(rng.integers(len(DET_CLASSES)))
        r = rng.uniform(0.12, 0.26) * size
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        box = (cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
               for b in boxes):
            continue  # keep instances disjoint, so polygons are the visible masks
        poly = _polygon(rng, DET_CLASSES[cls_idx], cx, cy, r)
        poly = np.clip(poly, 0, size - 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        if mask.sum() < 16:
            continue
        mask = mask.astype(bool)
        # A colour far from the local background, with a little shading noise.
        bg_mean = img[mask].mean(0)
        for _ in range(20):
            colour = rng.uniform(0, 255, 3)
            if np.abs(colour - bg_mean).sum() > 150:
                break
        img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        label[mask] = cls_idx + 2
        kernel = np.ones((3, 3), np.uint8)
        m8 = mask.astype(np.uint8)
        band |= (cv2.dilate(m8, kernel) - cv2.erode(m8, kernel)).astype(bool)
        boxes.append(box)
        instances.append(dict(category_id=cls_idx + 1, polygon=poly, mask=mask))
    label[band] = 0  # unlabelled boundary band, ignored with reduce_zero_label=True
    return np.clip(img, 0, 255).astype(np.uint8), label, instances


def _write_split(root: str, split: str, num: int, size: int, seed: int) -> dict:
    from PIL import Image
    img_dir = osp.join(root, 'images', split)
    ann_dir = osp.join(root, 'annotations', split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    # One generator per split, seeded from (seed, split): the splits are independent.
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    images, annotations = [], []
    for i in range(num):
        img, label, instances = render_sample(rng, size)
        name = f'shapes_{i:06d}'
        Image.fromarray(img).save(osp.join(img_dir, name + '.jpg'), quality=95)
        Image.fromarray(label).save(osp.join(ann_dir, name + '.png'))
        images.append(dict(id=i + 1, file_name=name + '.jpg', width=size, height=size))
        for inst in instances:
            poly = inst['polygon']
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1,
                category_id=inst['category_id'],
                segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
                area=float(inst['mask'].sum()),
                bbox=[round(float(x0), 2), round(float(y0), 2),
                      round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                iscrowd=0))
    coco = dict(
        info=dict(description=f'pale_mm synthetic shapes ({split})',
                  version=str(GENERATOR_VERSION)),
        images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory='shape')
                    for i, n in enumerate(DET_CLASSES)])
    with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return dict(images=len(images), instances=len(annotations))


def _settings(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val,
                size=size, seed=seed, det_classes=list(DET_CLASSES),
                seg_classes=list(SEG_CLASSES))


def generate(root: str, num_train: int = 200, num_val: int = 50, size: int = 128,
             seed: int = 0) -> dict:
    """Write the dataset under ``root`` (created if missing) and return its summary."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train}, {num_val}')
    if size < 32:
        raise ValueError(f'size must be >= 32 pixels, got {size}')
    os.makedirs(root, exist_ok=True)
    summary = _settings(num_train, num_val, size, seed)
    summary['training'] = _write_split(root, 'training', num_train, size, seed)
    summary['validation'] = _write_split(root, 'validation', num_val, size, seed)
    with open(osp.join(root, 'meta.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def ensure_dataset(root: str, num_train: int = 200, num_val: int = 50, size: int = 128,
                   seed: int = 0, force: bool = False) -> Optional[dict]:
    """Generate the dataset unless ``root/meta.json`` shows it was already generated
    with the same settings. Returns the summary."""
    meta = osp.join(root, 'meta.json')
    if not force and osp.isfile(meta):
        try:
            with open(meta) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        want = _settings(num_train, num_val, size, seed)
        if all(old.get(k) == v for k, v in want.items()):
            return old
    return generate(root, num_train, num_val, size, seed)
