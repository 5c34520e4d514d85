#!/usr/bin/env python
"""Run a Pale-T backbone forward pass on an image and print the feature pyramid.

    python tools/forward_demo.py [--img IMAGE] [--arch tiny] [--size 512 512]

Without --img it draws a deterministic synthetic image. Weights are random (no
official Pale weights exist); this shows the backbone runs and its output shapes.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.full_like(xx, 96)], -1).astype(np.uint8)
    img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (min(h, w) // 5) ** 2] = (230, 40, 40)
    img[h // 5:h // 2, 2 * w // 3:9 * w // 10] = (30, 200, 60)
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img', help='image file (default: a synthetic image)')
    p.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='resize to H W (default: keep the image size; synthetic: 512 512)')
    args = p.parse_args(argv)

    from pale_mm.models import PaleTransformer
    if args.img:
        from PIL import Image
        if not os.path.isfile(args.img):
            p.error(f'image not found: {args.img}')
        im = Image.open(args.img).convert('RGB')
        if args.size:
            im = im.resize((args.size[1], args.size[0]), Image.BILINEAR)
        img, src = np.asarray(im), args.img
    else:
        h, w = args.size or (512, 512)
        img, src = synthetic_image(h, w), f'synthetic {h}x{w} image'
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    x = torch.from_numpy(((img - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]

    model = PaleTransformer(args.arch)
    model.init_weights()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(x)  # warm-up
        t = time.perf_counter()
        outs = model(x)
        dt = time.perf_counter() - t
    print(f'Pale-{args.arch[0].upper()} backbone ({n_params / 1e6:.1f}M params, random '
          f'weights) on {src}: input {tuple(x.shape)}, forward {dt * 1e3:.0f} ms')
    for i, o in enumerate(outs):
        print(f'  stage {i + 1}: stride {x.shape[-1] / o.shape[-1]:4.0f}  '
              f'{tuple(o.shape)}  mean {o.mean():+.3f} std {o.std():.3f}')


if __name__ == '__main__':
    main()
