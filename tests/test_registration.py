import subprocess
import sys

import torch

import pale_mm
from pale_mm.models import PaleTransformer


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    for registry in (DET, SEG):
        assert registry.get('PaleTransformer') is PaleTransformer
        model = registry.build(dict(type='PaleTransformer', arch='tiny', out_indices=(3, ),
                                    frozen_stages=1))
        assert isinstance(model, PaleTransformer) and model.out_indices == (3, )
    assert set(pale_mm.registration.REGISTERED) == {'mmdet', 'mmseg'}


def test_build_through_default_scope():
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(dict(type='PaleTransformer',
                                  arch=dict(embed_dims=16, depths=[1, 1, 1, 1],
                                            num_heads=2))).eval()
    with torch.no_grad():
        assert len(model(torch.randn(1, 3, 64, 64))) == 4


def _import_without(blocked):
    code = (
        'import sys\n'
        f'for m in {blocked!r}:\n'
        '    sys.modules[m] = None\n'
        'import pale_mm\n'
        'print(sorted(pale_mm.registration.REGISTERED))\n')
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)


def test_imports_with_either_library_alone():
    only_seg = _import_without(['mmdet', 'mmdet.registry'])
    assert only_seg.returncode == 0, only_seg.stderr
    assert only_seg.stdout.strip() == "['mmseg']"
    only_det = _import_without(['mmseg', 'mmseg.registry'])
    assert only_det.returncode == 0, only_det.stderr
    assert only_det.stdout.strip() == "['mmdet']"
    neither = _import_without(['mmseg', 'mmseg.registry', 'mmdet', 'mmdet.registry', 'timm'])
    assert neither.returncode == 0, neither.stderr
    assert neither.stdout.strip() == '[]'


def test_import_is_quiet():
    out = subprocess.run([sys.executable, '-W', 'default', '-c', 'import pale_mm'],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == ''
    assert 'httpx' not in out.stderr and 'Warning' not in out.stderr, out.stderr
