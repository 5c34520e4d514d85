#!/usr/bin/env python
"""Print params and multiply-adds ("FLOPs") of a pale_mm model.

    python tools/analysis/get_flops.py pale_tiny                  # timm classifier, 224
    python tools/analysis/get_flops.py tiny --shape 512 512       # same
    python tools/analysis/get_flops.py configs/pale/X.py --shape 800 1216   # backbone of a config

Attention is counted (mmengine has no handle for scaled_dot_product_attention and
would count it as zero; pale_mm.flops adds one, and ``import pale_mm`` registers it
with mmengine, so mmdet's and mmseg's own tools/analysis_tools/get_flops.py, run on a
config that imports pale_mm, count it too). FLOPs are multiply-adds.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def build(target: str, num_classes: int):
    import pale_mm  # noqa: F401  (registers models)
    if target.endswith('.py'):
        if not os.path.isfile(target):
            raise SystemExit(f'config file not found: {target}')
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        cfg = Config.fromfile(target)
        scope = cfg.get('default_scope', 'mmdet')
        init_default_scope(scope)
        registry = pale_mm.registration.REGISTERED.get(scope)
        if registry is None:
            raise SystemExit(f'{scope} is not installed; cannot build {target}')
        backbone = cfg.model.backbone
        return registry.build(backbone), f'{backbone["type"]} backbone of {target}'
    import timm
    name = target if target.startswith(('pale_', 'lit_', 'scalablevit_')) else f'pale_{target}'
    if name not in timm.list_models(name):
        raise SystemExit(f'unknown model {target!r}; pale_mm models: '
                         f'{timm.list_models("pale_*")}')
    return timm.create_model(name, num_classes=num_classes), f'{name} ({num_classes} classes)'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('target', help='timm model name (pale_tiny), arch (tiny) or config')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224],
                        help='input H W (or one value for a square)')
    parser.add_argument('--num-classes', type=int, default=1000)
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error('--shape takes H W or a single size')
    h, w = (args.shape * 2)[:2]

    from pale_mm.flops import count_flops, count_params
    model, desc = build(args.target, args.num_classes)
    params = count_params(model)
    flops = count_flops(model, (3, h, w))
    print(f'model:  {desc}')
    print(f'input:  3x{h}x{w}')
    print(f'params: {params / 1e6:.2f}M ({params})')
    print(f'FLOPs:  {flops / 1e9:.2f}G multiply-adds ({flops})')
    return params, flops


if __name__ == '__main__':
    main()
