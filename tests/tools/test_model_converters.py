import hashlib
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import pale_mm  # noqa: F401
from pale_mm.models import PaleTransformer


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True)


def test_extract_from_classifier_and_detector(tmp_path):
    cls = timm.create_model('pale_tiny', num_classes=5)
    state = cls.state_dict()
    torch.save({'model': state, 'optimizer': {'lr': 0.1}, 'epoch': 1}, tmp_path / 'cls.pth')
    out = _run('tools/model_converters/extract_backbone.py', str(tmp_path / 'cls.pth'),
               str(tmp_path / 'bb.pth'))
    assert out.returncode == 0, out.stderr
    assert 'dropped 2 tensors: head x2' in out.stdout
    bb = torch.load(tmp_path / 'bb.pth')['state_dict']
    assert set(bb) == set(state) - {'head.weight', 'head.bias'}
    model = PaleTransformer('tiny', init_cfg=dict(type='Pretrained',
                                                  checkpoint=str(tmp_path / 'bb.pth')))
    model.init_weights()
    torch.testing.assert_close(model.stages[2][5].attn.qkv.weight,
                               state['stages.2.5.attn.qkv.weight'])

    det = {'state_dict': {**{'backbone.' + k: v for k, v in bb.items()},
                          'neck.conv.weight': torch.zeros(3)},
           'meta': {'seed': np.int64(1)}, 'optimizer': {}}
    torch.save(det, tmp_path / 'det.pth')
    out = _run('tools/model_converters/extract_backbone.py', str(tmp_path / 'det.pth'),
               str(tmp_path / 'bb2.pth'))
    assert out.returncode == 0, out.stderr
    assert 'neck x1' in out.stdout
    assert set(torch.load(tmp_path / 'bb2.pth')['state_dict']) == set(bb)


def test_extract_errors(tmp_path):
    out = _run('tools/model_converters/extract_backbone.py', str(tmp_path / 'missing.pth'),
               str(tmp_path / 'o.pth'))
    assert out.returncode != 0 and 'checkpoint file not found' in out.stderr
    torch.save({'a.b': torch.zeros(1)}, tmp_path / 'x.pth')
    out = _run('tools/model_converters/extract_backbone.py', str(tmp_path / 'x.pth'),
               str(tmp_path / 'o.pth'), '--prefix', 'backbone')
    assert out.returncode != 0 and "start with 'backbone.'" in out.stderr


def test_publish(tmp_path):
    ckpt = {'state_dict': {'w': torch.ones(2)}, 'optimizer': {'state': {}},
            'param_schedulers': [], 'message_hub': {},
            'meta': {'epoch': np.int64(3), 'hook_msgs': {'x': 1}}}
    torch.save(ckpt, tmp_path / 'epoch_3.pth')
    out = _run('tools/model_converters/publish_model.py', str(tmp_path / 'epoch_3.pth'),
               str(tmp_path / 'model.pth'))
    assert out.returncode == 0, out.stderr
    files = list(tmp_path.glob('model-*.pth'))
    assert len(files) == 1
    sha = hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert files[0].name == f'model-{sha[:8]}.pth'
    pub = torch.load(files[0])
    assert set(pub) == {'state_dict', 'meta'} and 'hook_msgs' not in pub['meta']
    assert 'optimizer' in out.stdout


@pytest.mark.parametrize('tool', ['extract_backbone.py', 'publish_model.py'])
def test_tools_reject_non_checkpoints(tmp_path, tool):
    (tmp_path / 'a.txt').write_text('hello')
    out = _run(f'tools/model_converters/{tool}', str(tmp_path / 'a.txt'), str(tmp_path / 'o.pth'))
    assert out.returncode != 0 and 'cannot read checkpoint' in out.stderr
