import copy

import pytest
import timm
import torch
import torch.fx

import pale_mm  # noqa: F401
from pale_mm.models import LITClassifier, PaleClassifier, PaleTransformer, ScalableViTClassifier


@pytest.mark.parametrize('name,dims', [('pale_tiny', 512), ('pale_small', 768),
                                       ('pale_base', 1024)])
def test_registered(name, dims):
    assert name in timm.list_models('pale_*')
    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN
    assert cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg['input_size'] == (3, 224, 224) and cfg['num_classes'] == 1000


def test_create_and_forward():
    model = timm.create_model('pale_tiny', num_classes=1000).eval()
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
        assert model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)),
                                  pre_logits=True).shape == (1, 512)


def test_features_only():
    model = timm.create_model('pale_tiny', features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 112, 137))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 28, 35), (1, 128, 14, 18), (1, 256, 7, 9), (1, 512, 4, 5)]
    model = timm.create_model('pale_tiny', features_only=True, out_indices=(2, 3))
    assert model.feature_info.channels() == [256, 512]


def test_one_state_dict_serves_both():
    cls = timm.create_model('pale_tiny', num_classes=10).eval()
    backbone = PaleTransformer('tiny').eval()
    result = backbone.load_state_dict(cls.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(
        f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert sorted(result.unexpected_keys) == ['head.bias', 'head.weight', 'norm.bias',
                                              'norm.weight']
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        _, inter = cls.forward_intermediates(x)
        for i in range(4):
            getattr(backbone, f'norm{i}').weight.fill_(1)
            getattr(backbone, f'norm{i}').bias.zero_()
        ref = [torch.nn.functional.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2])
               .permute(0, 3, 1, 2) for f in inter]
        outs = backbone(x)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)


def test_classifier_bad_input():
    model = timm.create_model('pale_tiny')
    with pytest.raises(ValueError, match='4-D'):
        model(torch.randn(3, 64, 64))


# --------------------------------------------------- timm's model contract
# (timm's own tests/test_models.py runs on these models in tools/timm_contract.sh;
# these are quick unit checks of each piece of the contract.)
ALL = ['pale_tiny', 'pale_small', 'pale_base', 'lit_ti', 'lit_s', 'lit_m', 'lit_b',
       'scalablevit_s', 'scalablevit_b', 'scalablevit_l']
SMALL = ['pale_tiny', 'lit_ti', 'lit_s', 'scalablevit_s']


@pytest.mark.parametrize('name', ALL)
def test_device_dtype_arguments(name):
    model = timm.create_model(name, device='meta', dtype=torch.float64)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert all(t.device.type == 'meta' for t in tensors.values())
    assert all(t.dtype == torch.float64 for t in tensors.values() if t.is_floating_point())
    assert model.in_chans == 3
    assert model.output_fmt == ('NLC' if name == 'lit_ti' else 'NHWC')
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_a_model_arg=1)


@pytest.mark.parametrize('name', SMALL)
def test_nhwc_output_and_reset_classifier_keeps_dtype(name):
    model = timm.create_model(name).eval().double()
    x = torch.randn(1, 3, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        if name == 'lit_ti':  # class token + 1x2 patch tokens
            assert feats.shape == (1, 3, model.num_features)
        else:  # NHWC, as declared
            assert feats.shape == (1, 1, 2, model.num_features)
        model.reset_classifier(5)
        assert all(p.dtype == torch.float64 for p in model.get_classifier().parameters())
        assert model(x).shape == (1, 5) and model(x).dtype == torch.float64
        model.reset_classifier(0, '')
        out = model(x)
    assert out.shape == feats.shape[:-1] + (model.head_hidden_size, ) or out.shape == feats.shape


@pytest.mark.parametrize('name', SMALL)
def test_grad_checkpointing_same_output_and_grads(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, drop_path_rate=0.).train()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    assert model.with_cp
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_no_weight_decay_reaches_timm_optimizer():
    from timm.optim import create_optimizer_v2
    model = timm.create_model('lit_ti')
    nwd = model.no_weight_decay()
    assert nwd == {'cls_token', 'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4'}
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in no_decay for n in nwd)
    tables = timm.create_model('lit_s').no_weight_decay()
    assert len(tables) == 8 and all(n.endswith('relative_position_bias_table') for n in tables)
    assert timm.create_model('scalablevit_s').no_weight_decay() == {
        f'pos_block.{k}.proj.0.{p}' for k in range(4) for p in ('weight', 'bias')}


@pytest.mark.parametrize('name', SMALL)
def test_group_matcher_layer_decay(name):
    from timm.models._manipulate import group_parameters
    from timm.optim import create_optimizer_v2
    model = timm.create_model(name)
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        # every parameter is in a group (name -> group); stem, stages in order, head
        assert set(groups) == {n for n, _ in model.named_parameters()}
        assert len(set(groups.values())) > model.num_stages
        stem = next(n for n, _ in model.named_parameters())
        assert groups[stem] == min(groups.values())
        assert groups[next(n for n, _ in model.named_parameters() if n.startswith('head'))] \
            == max(groups.values())
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) > model.num_stages and scales[-1] == 1.0


@pytest.mark.parametrize('name', SMALL)
def test_prune_removes_unused_stages(name):
    full = timm.create_model(name)
    model = timm.create_model(name, features_only=True, out_indices=(0, ))
    n_full = sum(p.numel() for p in full.parameters())
    n_pruned = sum(p.numel() for p in model.parameters())
    assert n_pruned < 0.1 * n_full
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, full.embed_dims[0], 8, 8)]
    feats[0].sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    # pruned taps equal the unpruned model's
    full.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        taps = full.forward_intermediates(x, intermediates_only=True)
        for i in range(4):
            pruned = copy.deepcopy(full)
            take = pruned.prune_intermediate_layers([i])
            assert pruned.num_stages == i + 1
            torch.testing.assert_close(
                pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                taps[i])


@pytest.mark.parametrize('name', SMALL)
def test_forward_intermediates_final_equals_forward_features(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)
    assert [tuple(f.shape[1:]) for f in inter] == [
        (c, -(-64 // r), -(-96 // r)) for c, r in zip(model.embed_dims, (4, 8, 16, 32))]


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s', 'scalablevit_s'])
def test_fx_trace_matches_eager(name):
    """torch.fx traces the model (the size-dependent steps are wrapped leaves), and
    the graph is right at sizes that need padding too."""
    model = timm.create_model(name).eval()
    graph = torch.fx.symbolic_trace(model)
    for size in ((64, 64), (72, 100)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x))


# ------------------------------------------- bad inputs to the timm classifiers
# (the backbones' checks, tests/models/test_pyramid.py, run in the classifiers too;
# these are the classifiers' own entry points and arguments)
CLASSIFIERS = ['pale_tiny', 'lit_ti', 'lit_s', 'scalablevit_s']


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_classifier_non_floating_image_is_a_type_error(name):
    model = timm.create_model(name, device='meta')  # the check comes before any compute
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    match = r'floating-point image.*dtype torch\.uint8.*x\.float\(\) - mean\) / std'
    for run in (model, model.forward_features, model.forward_intermediates,
                timm.create_model(name, features_only=True, device='meta')):
        with pytest.raises(TypeError, match=match):
            run(image)


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(drop_rate=1.0), ValueError, r'drop_rate must be in \[0, 1\), got 1\.0'),
    (dict(drop_rate=-0.5), ValueError, r'drop_rate must be in \[0, 1\), got -0\.5'),
    (dict(drop_path_rate=2), ValueError, r'drop_path_rate must be in \[0, 1\), got 2'),
    (dict(drop_path_rate=-0.1), ValueError, r'drop_path_rate must be in \[0, 1\), got -0\.1'),
    (dict(attn_drop_rate=1), ValueError, r'attn_drop_rate must be in \[0, 1\), got 1'),
    (dict(qkv_bias='no'), TypeError, "qkv_bias must be True or False, got 'no'"),
    (dict(in_chans=0), ValueError, 'in_chans must be an int >= 1, got 0'),
    (dict(num_classes=-1), ValueError, r'num_classes must be an int >= 0 \(0: no head\), '
                                       r'got -1'),
    (dict(init_cfg=dict(type='Pretrained', checkpoint='x.pth')), TypeError,
     r"got an unexpected keyword argument 'init_cfg' \(load weights with "
     r"timm\.create_model"),
])
@pytest.mark.parametrize('name', CLASSIFIERS)
def test_classifier_bad_arguments_named_at_construction(name, kwargs, exc, match):
    with pytest.raises(exc, match=f'Classifier:? {match}'):
        timm.create_model(name, device='meta', **kwargs)


def test_pale_classifier_mlp_ratio():
    with pytest.raises(ValueError, match='PaleClassifier: mlp_ratio must be a finite number '
                                         '> 0, got 0'):
        timm.create_model('pale_tiny', device='meta', mlp_ratio=0)


@pytest.mark.parametrize('cls', [PaleClassifier, LITClassifier, ScalableViTClassifier])
def test_classifier_refuses_the_backbones_pretrained_string(cls):
    """timm never calls init_weights: a backbone-style pretrained='x.pth' would be kept
    and never loaded."""
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'pretrained' "
                                        r"\(load weights with timm"):
        cls(pretrained='x.pth', device='meta')


@pytest.mark.parametrize('num_classes', [-1, 2.5, True])
@pytest.mark.parametrize('name', CLASSIFIERS)
def test_reset_classifier_checks_num_classes(name, num_classes):
    """reset_classifier(-1) used to build no head (an Identity), silently."""
    model = timm.create_model(name, device='meta')
    with pytest.raises(ValueError, match=f'num_classes must be an int >= 0 .*got '
                                         f'{num_classes!r}'):
        model.reset_classifier(num_classes)
    assert model.num_classes == 1000


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(head_hidden=0), ValueError, 'head_hidden must be an int >= 1, got 0'),
    (dict(head_hidden=512.0), ValueError, 'head_hidden must be an int >= 1, got 512.0'),
    (dict(plain_head='yes'), TypeError, "plain_head must be True or False, got 'yes'"),
])
def test_scalablevit_head_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=f'ScalableViTClassifier: {match}'):
        timm.create_model('scalablevit_s', device='meta', **kwargs)
