"""Loading checkpoints into the backbones through init_cfg (timm and mm layouts)."""
import argparse
import logging

import numpy as np
import pytest
import timm
import torch

import pale_mm  # noqa: F401
from pale_mm.models import PaleTransformer
from pale_mm.models.checkpoint import CheckpointError

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4])


def _classifier_state(arch='tiny', **kw):
    torch.manual_seed(1)
    model = timm.create_model(f'pale_{arch}', num_classes=10, **kw)
    with torch.no_grad():  # make every tensor distinctive, BN statistics included
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1 + (t if t.dim() > 1 else 1))
    return model, model.state_dict()


def _backbone(checkpoint, **kw):
    kw.setdefault('arch', 'tiny')
    model = PaleTransformer(init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint),
                                          prefix=kw.pop('prefix', None)), **kw)
    model.init_weights()
    return model


def _assert_loaded(model, state):
    own = model.state_dict()
    last = model.num_stages - 1
    for k, v in own.items():
        if k.startswith(f'norm{last}.'):
            torch.testing.assert_close(v, state['norm.' + k.split('.', 1)[1]], rtol=0, atol=0)
        elif k.split('.')[0] in {f'norm{i}' for i in range(last)}:
            continue  # per-stage output norms keep their init
        else:
            torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize('wrap', ['raw', 'model', 'state_dict', 'module'])
def test_timm_checkpoint_layouts(tmp_path, wrap):
    _, state = _classifier_state()
    if wrap == 'module':
        obj = {'state_dict': {'module.' + k: v for k, v in state.items()}}
    elif wrap == 'raw':
        obj = state
    else:
        obj = {wrap: state, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3),
               'meta': {'seed': np.int64(5), 'hist': np.arange(3.)}}
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    _assert_loaded(_backbone(path), state)


def test_full_detector_checkpoint_with_prefix(tmp_path):
    _, state = _classifier_state()
    body = {k: v for k, v in state.items() if not k.startswith(('head.', 'norm.'))}
    full = {'state_dict': {**{'backbone.' + k: v for k, v in body.items()},
                           'neck.lateral_convs.0.conv.weight': torch.zeros(256, 64, 1, 1)},
            'meta': {'epoch': np.int64(12), 'dataset_meta': {'palette': [(1, 2, 3)]}}}
    path = tmp_path / 'mask_rcnn.pth'
    torch.save(full, path)
    model = _backbone(path, prefix='backbone.')
    own = model.state_dict()
    for k, v in body.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="set prefix='backbone.'"):
        _backbone(path)


def test_summary_logged(tmp_path, caplog):
    from mmengine.logging import MMLogger
    _, state = _classifier_state()
    torch.save(state, tmp_path / 'c.pth')
    logger = MMLogger.get_instance('pale_test_ckpt')
    model = PaleTransformer('tiny', init_cfg=dict(type='Pretrained',
                                                  checkpoint=str(tmp_path / 'c.pth')))
    from pale_mm.models.checkpoint import load_pretrained
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    summary = load_pretrained(model, model.init_cfg, logger=logger)
    logger.removeHandler(handler)
    msg = ' '.join(r.getMessage() for r in records)
    assert f'loaded {summary["loaded"]} tensors' in msg
    assert sorted(summary['missing']) == sorted(
        f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias'))
    assert summary['unexpected'] == ['head.bias', 'head.weight']
    assert 'norm0.weight' in msg and 'head.weight' in msg
    assert summary['loaded'] == len(model.state_dict()) - 6


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _, state = _classifier_state()
    state['stages.2.3.mlp.fc1.weight'] = torch.zeros(1024, 255)
    torch.save(state, tmp_path / 'c.pth')
    with pytest.raises(CheckpointError, match=r'size mismatch for stages\.2\.3\.mlp\.fc1\.weight: '
                                              r'checkpoint \(1024, 255\) vs model \(1024, 256\)'):
        _backbone(tmp_path / 'c.pth')


def test_arch_mismatch_one_line(tmp_path):
    _, state = _classifier_state()
    torch.save(state, tmp_path / 'tiny.pth')
    with pytest.raises(CheckpointError) as e:
        _backbone(tmp_path / 'tiny.pth', arch='base')
    msg = str(e.value)
    assert '\n' not in msg and 'different architecture' in msg
    assert 'checkpoint (64, 3, 7, 7) vs model (128, 3, 7, 7)' in msg


def test_missing_backbone_tensors(tmp_path):
    _, state = _classifier_state()
    del state['stages.3.1.attn.qkv.weight']
    torch.save(state, tmp_path / 'c.pth')
    with pytest.raises(CheckpointError, match=r'lacks 1 backbone tensors.*stages\.3\.1\.attn'):
        _backbone(tmp_path / 'c.pth')


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        _backbone(tmp_path / 'nope.pth')
    _, state = _classifier_state()
    torch.save(state, tmp_path / 'full.pth')
    data = (tmp_path / 'full.pth').read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated, corrupt or not a PyTorch checkpoint'):
        _backbone(tmp_path / 'trunc.pth')
    (tmp_path / 'notes.txt').write_text('this is not a checkpoint\n' * 10)
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        _backbone(tmp_path / 'notes.txt')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='expected a checkpoint dict'):
        _backbone(tmp_path / 'list.pth')
    torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'nostate.pth')
    with pytest.raises(CheckpointError, match='does not look like a state dict'):
        _backbone(tmp_path / 'nostate.pth')


class _Evil:
    def __reduce__(self):
        return (print, ('code ran on load',))


def test_weights_only_stays_on(tmp_path, capsys):
    _, state = _classifier_state()
    torch.save({'state_dict': state, 'evil': _Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'weights_only=True\) \(Unsupported global: '
                                              r'GLOBAL print\)'):
        _backbone(tmp_path / 'evil.pth')
    assert 'code ran on load' not in capsys.readouterr().out


def test_224_checkpoint_loads_at_any_size_and_pale_size(tmp_path):
    cls, state = _classifier_state()
    torch.save({'model': state}, tmp_path / 'c.pth')
    for pale_size in (5, [3, 5, 7, 9], (2, 6)):
        model = _backbone(tmp_path / 'c.pth', pale_size=pale_size).eval()
        with torch.no_grad():
            for hw in [(97, 131), (40, 300)]:
                outs = model(torch.randn(1, 3, *hw))
                assert [tuple(o.shape[-2:]) for o in outs][0] == (-(-hw[0] // 4), -(-hw[1] // 4))
    assert not [n for n, _ in model.named_buffers() if 'position' in n or 'pos_embed' in n]


def test_timm_and_backbone_agree_with_same_weights(tmp_path):
    cls, state = _classifier_state()
    cls.eval()
    torch.save(state, tmp_path / 'c.pth')
    backbone = _backbone(tmp_path / 'c.pth').eval()
    x = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        _, inter = cls.forward_intermediates(x)
        outs = backbone(x)
        # last stage: the backbone's norm3 is the classifier's final norm
        final = cls.norm(inter[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(outs[3], final)
    for i in range(3):
        norm = getattr(backbone, f'norm{i}')
        ref = norm(inter[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(outs[i], ref)
