import pytest
import timm
import torch

import pale_mm  # noqa: F401
from pale_mm.models import PaleTransformer


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
