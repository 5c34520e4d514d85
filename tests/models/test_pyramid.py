"""The backbone interface every family shares (PaleTransformer, LIT in both layouts,
ScalableViT): bad inputs and constructor arguments are named where they are misused
(one shared check, pale_mm/models/arch.py, pyramid.py and layers.check_image, so
every family gives the same error); the deprecated ``pretrained`` string becomes an
``init_cfg``;
norm_eval keeps BatchNorms, and only them, in eval mode;
frozen_stages freezes exactly the named parts and keeps them fixed through an optimizer
step; with_cp changes neither outputs, gradients nor buffers; checkpointing keeps
gradients next to frozen stages. Family-specific behaviour stays in
test_pale_transformer.py, test_lit.py and test_scalablevit.py."""
import copy

import pytest
import torch
import torch.nn as nn

from tests.models.test_lit import LAYOUTS as LIT_ARCHS
from tests.models.test_lit import _small as lit_small
from tests.models.test_pale_transformer import _small as pale_small
from tests.models.test_scalablevit import TINY as SCALABLEVIT_ARCH
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


# ------------------------------------------------- bad inputs, named at misuse
@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize('family', FAMILIES)
def test_non_floating_image_is_a_type_error_naming_dtype_and_fix(family, dtype):
    """An image straight from a decoder (uint8) would otherwise fail deep in torch's
    conv ("Input type (unsigned char) and bias type (float) should be the same")."""
    model = FAMILIES[family][0]().eval()
    image = torch.randint(0, 2 if dtype == torch.bool else 256, (1, 3, 32, 32)).to(dtype)
    with pytest.raises(TypeError, match=rf'floating-point image.*dtype {dtype}.*'
                                        r'x\.float\(\) - mean\) / std'):
        model(image)
    with torch.no_grad():  # the same image, normalised, runs
        outs = model((image.float() - 127.5) / 64)
    assert len(outs) == 4 and all(o.is_floating_point() for o in outs)


RATES = ('drop_rate', 'attn_drop_rate', 'drop_path_rate')


@pytest.mark.parametrize('value', [2, -0.1, 1.0, float('nan')])
@pytest.mark.parametrize('rate', RATES)
@pytest.mark.parametrize('family', FAMILIES)
def test_rate_outside_unit_interval_is_a_value_error_at_construction(family, rate, value):
    with pytest.raises(ValueError, match=rf'{rate} must be in \[0, 1\), got {value!r}'):
        FAMILIES[family][0](**{rate: value})


@pytest.mark.parametrize('value', ['0.1', None, True])
@pytest.mark.parametrize('family', FAMILIES)
def test_rate_that_is_not_a_number_is_a_type_error(family, value):
    with pytest.raises(TypeError, match=rf'drop_path_rate must be a number in \[0, 1\), '
                                        rf'got {value!r}'):
        FAMILIES[family][0](drop_path_rate=value)


@pytest.mark.parametrize('family', FAMILIES)
def test_rates_at_the_ends_of_the_interval_are_accepted(family):
    model = FAMILIES[family][0](drop_path_rate=0.99, drop_rate=0., attn_drop_rate=0.5)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == 'DropPath']
    assert rates and max(rates) == pytest.approx(0.99)


def _mlp_ratio_kwargs(family, value):
    """The MLP ratio as each family takes it: Pale's ``mlp_ratio`` argument, the
    ``mlp_ratios`` of LIT's and ScalableViT's arch dict."""
    if family == 'pale':
        return dict(mlp_ratio=value)
    arch = LIT_ARCHS[family.split('-')[1]] if family.startswith('lit') else SCALABLEVIT_ARCH
    return dict(arch=dict(arch, mlp_ratios=value))


@pytest.mark.parametrize('value,match', [
    (0, 'must be a finite number > 0, got 0'),
    (-4, 'must be a finite number > 0, got -4'),
    (float('inf'), 'must be a finite number > 0, got inf'),
    (0.01, r'=0\.01 gives stage 0 \(16 channels\) an MLP with int\(16 \* 0\.01\) = 0 '
           r'hidden units'),
])
@pytest.mark.parametrize('family', FAMILIES)
def test_mlp_ratio_without_hidden_units_is_a_value_error(family, value, match):
    name = 'mlp_ratio' if family == 'pale' else r'arch mlp_ratios'
    with pytest.raises(ValueError, match=f'{name}.*{match}'):
        FAMILIES[family][0](**_mlp_ratio_kwargs(family, value))


@pytest.mark.parametrize('family', ['lit-swin', 'lit-pvt', 'scalablevit'])
def test_per_stage_mlp_ratio_names_its_stage(family):
    with pytest.raises(ValueError, match=r'arch mlp_ratios\[2\] must be a finite number > 0, '
                                         r'got 0'):
        FAMILIES[family][0](**_mlp_ratio_kwargs(family, [4, 4, 0, 4]))


@pytest.mark.parametrize('family', FAMILIES)
def test_small_valid_mlp_ratio_builds_its_hidden_units(family):
    model = FAMILIES[family][0](**_mlp_ratio_kwargs(family, 0.0625))  # 16 -> 1 unit
    assert min(m.fc1.out_features for m in model.modules() if type(m).__name__ == 'Mlp') == 1


@pytest.mark.parametrize('arg,value', [
    ('qkv_bias', 'False'), ('qkv_bias', 0), ('norm_eval', 'no'), ('with_cp', 1),
    ('norm_eval', None)])
@pytest.mark.parametrize('family', FAMILIES)
def test_flags_must_be_bools(family, arg, value):
    """``'False'`` would be taken for True, silently."""
    with pytest.raises(TypeError, match=rf'{arg} must be True or False, got {value!r}'):
        FAMILIES[family][0](**{arg: value})


@pytest.mark.parametrize('value,match', [
    ((3, 0), 'must be increasing, without repeats'),
    ((1, 1), 'must be increasing, without repeats'),
    ((0, -1, 2), r'must be increasing.*got \(0, -1, 2\)'),
    ('0123', 'must be an int or a sequence of ints'),
    ((0, 1.0), 'must be an int or a sequence of ints'),
    ((0, 4), 'out of range for 4 stages'),
])
@pytest.mark.parametrize('family', FAMILIES)
def test_out_indices_must_name_stages_in_order(family, value, match):
    """The outputs come in stage order: (3, 0) would return stage 0's map first."""
    with pytest.raises(ValueError, match=f'out_indices.*{match}'):
        FAMILIES[family][0](out_indices=value)


@pytest.mark.parametrize('family', FAMILIES)
def test_negative_and_single_out_indices(family):
    model = FAMILIES[family][0](out_indices=(1, -1)).eval()
    assert model.out_indices == (1, 3)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert FAMILIES[family][0](out_indices=2).out_indices == (2, )


@pytest.mark.parametrize('init_cfg,match', [
    (dict(type='Pretrained'), "needs checkpoint='path or URL'"),
    (dict(type='Pretrained', checkpoint=''), "needs checkpoint='path or URL'"),
    (dict(type='Pretrained', checkpoint='a.pth', prefx='backbone.'),
     r"unknown keys \['prefx'\]"),
])
@pytest.mark.parametrize('family', FAMILIES)
def test_pretrained_init_cfg_checked_at_construction(family, init_cfg, match):
    """Not at init_weights, hours later in a training job."""
    with pytest.raises(ValueError, match=match):
        FAMILIES[family][0](init_cfg=init_cfg)
