"""The backbone interface every family shares (PaleTransformer, LIT in both layouts,
ScalableViT): the deprecated ``pretrained`` string becomes an ``init_cfg``;
norm_eval keeps BatchNorms, and only them, in eval mode;
frozen_stages freezes exactly the named parts and keeps them fixed through an optimizer
step; with_cp changes neither outputs, gradients nor buffers; checkpointing keeps
gradients next to frozen stages. Family-specific behaviour stays in
test_pale_transformer.py, test_lit.py and test_scalablevit.py."""
import copy

import pytest
import torch
import torch.nn as nn

from tests.models.test_pale_transformer import _small as pale_small
from tests.models.test_lit import _small as lit_small
from tests.models.test_scalablevit import _small as scalablevit_small

# family -> (factory, parts frozen by frozen_stages=2, a parameter of stage 3)
FAMILIES = {
    'pale': (pale_small,
             ['patch_embeds.0', 'patch_embeds.1', 'stages.0', 'stages.1', 'norm0', 'norm1'],
             'stages.2.0.mlp.fc1.weight'),
    'lit-swin': (lambda **kw: lit_small('swin', **kw),
                 ['patch_embed', 'layers.0.blocks', 'layers.1.blocks', 'layers.0.downsample',
                  'norm0', 'norm1'],
                 'layers.2.blocks.0.mlp.fc1.weight'),
    'lit-pvt': (lambda **kw: lit_small('pvt', **kw),
                ['patch_embed1', 'patch_embed2', 'pos_embed1', 'pos_embed2', 'block1', 'block2',
                 'norm0', 'norm1'],
                'block3.0.mlp.fc1.weight'),
    'scalablevit': (scalablevit_small,
                    ['patch_embeds.0', 'patch_embeds.1', 'pos_block.0', 'pos_block.1',
                     'stages.0', 'stages.1', 'norm0', 'norm1'],
                    'stages.2.0.mlp.fc1.weight'),
}


@pytest.mark.parametrize('family', FAMILIES)
def test_pretrained_str_becomes_init_cfg(family):
    """The deprecated ``pretrained='path'`` of mmdet/mmseg backbones still works,
    with a warning, and cannot be combined with ``init_cfg``."""
    factory = FAMILIES[family][0]
    with pytest.warns(DeprecationWarning, match='pretrained is deprecated'):
        model = factory(pretrained='ckpt.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='ckpt.pth')
    with pytest.raises(ValueError, match='at the same time'):
        factory(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth'))


# families whose small model has BatchNorm layers (ScalableViT has none: its
# test_norm_eval_switches_only_batchnorm adds one), and how many
NUM_BATCHNORMS = {'pale': 5, 'lit-swin': 3, 'lit-pvt': 3}


@pytest.mark.parametrize('family', NUM_BATCHNORMS)
def test_norm_eval(family):
    """norm_eval=True keeps every BatchNorm in eval mode (running statistics fixed)
    when the model trains, and switches nothing else; norm_eval=False lets them move."""
    factory = FAMILIES[family][0]
    model = factory(norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == NUM_BATCHNORMS[family] and all(not m.training for m in bns)
    assert all(m.training for m in model.modules() if not isinstance(m, nn.BatchNorm2d))
    stats = copy.deepcopy(bns[0].running_mean)
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(stats, bns[0].running_mean)
    model = factory(norm_eval=False).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = copy.deepcopy(bn.running_mean)
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(stats, bn.running_mean)


@pytest.mark.parametrize('family', FAMILIES)
def test_frozen_stages(family):
    factory, frozen, live = FAMILIES[family]
    model = factory(frozen_stages=2)

    def is_frozen(name):
        return any(name == f or name.startswith(f + '.') for f in frozen)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not is_frozen(name)), name
    model.train()
    for name, m in model.named_modules():
        assert m.training == (not is_frozen(name)), name  # frozen parts stay in eval
    # frozen parts really stay fixed through an optimizer step
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        if is_frozen(k):
            assert torch.equal(before[k], after[k]), k  # includes BN running stats
    assert not torch.equal(before[live], after[live])


@pytest.mark.parametrize('family', FAMILIES)
def test_with_cp_same_outputs_grads_and_buffers(family):
    torch.manual_seed(0)
    ref = FAMILIES[family][0](drop_path_rate=0.3, drop_rate=0.1, attn_drop_rate=0.1).train()
    cp = copy.deepcopy(ref)
    cp.with_cp = True
    x = torch.randn(2, 3, 45, 38)
    outs = []
    for m in (ref, cp):
        torch.manual_seed(42)  # dropout and drop path replay under checkpointing
        o = m(x)
        sum((oi * torch.arange(oi.numel()).view_as(oi).sin()).sum() for oi in o).backward()
        outs.append(o)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (n, p), (_, q) in zip(ref.named_parameters(), cp.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    for (n, b1), (_, b2) in zip(ref.named_buffers(), cp.named_buffers()):
        assert torch.equal(b1, b2), n  # BN running stats updated once, not twice


@pytest.mark.parametrize('family', FAMILIES)
def test_with_cp_and_frozen_stages_keep_gradients(family):
    model = FAMILIES[family][0](with_cp=True, frozen_stages=1).train()
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
