"""Official weights one call away (docs/weights.md).

By value: the URLs, file names and evaluation settings of ``pretrained_cfg`` and of
the LIT configs' ``init_cfg``, against what the official repositories publish (below,
with where each value comes from), and timm's evaluation transform against the
official one built independently with torchvision.

The loading path: this machine cannot reach GitHub, so a checkpoint in the official
layout (random values, official keys and wrapper) is served over HTTP from
127.0.0.1 and fetched by the same code a real download runs: timm's
``load_pretrained`` (torch.hub download into its cache, ``weights_only=True``, our
filter, strict load) and the backbone's ``init_cfg`` (pale_mm's URL loader); only
the host of the URL differs.
"""
import argparse
import functools
import http.server
import os.path as osp
import threading

import pytest
import timm
import torch

import pale_mm  # noqa: F401
from pale_mm.models.checkpoint import CheckpointError
from tests.lit_official import official_lit_smb_shapes, official_lit_ti_shapes, random_state

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# github.com/ziplab/LIT README, "Image Classification on ImageNet" (and
# classification/README.md): the "github" link of each model, release v1.0.
OFFICIAL_LIT = {
    'lit_ti': 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth',
    'lit_s': 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth',
    'lit_m': 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_m.pth',
    'lit_b': 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_b.pth',
}
# github.com/Yangr116/ScalableViT image_classification/README.md: the "google" weights
# links (Google Drive file ids).
OFFICIAL_SCALABLEVIT_DRIVE = {
    'scalablevit_s': '1gCWsATBJmW3xwJaoCcxGO1Wbg51cPtzk',
    'scalablevit_b': '16MVmK4BGQpRH3Wz2VCOVzhTh2PFUFozH',
    'scalablevit_l': '17LLK5PSssMpepxeAt6-uKSd4aaV99u5X',
}
# The official evaluation (LIT code_for_lit_s_m_b/data/build.py and config.py,
# code_for_lit_ti/datasets.py; ScalableViT image_classification/datasets.py): 224 px,
# Resize(int(256 / 224 * 224)) with bicubic interpolation, CenterCrop(224), ToTensor,
# Normalize(timm's IMAGENET_DEFAULT_MEAN / STD), 1000 ImageNet classes.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _official_eval_transform(size=224):
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(int((256 / 224) * size),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---------------------------------------------------------------- by value
@pytest.mark.parametrize('name', OFFICIAL_LIT)
def test_lit_pretrained_cfg_is_the_official_release(name):
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.url == OFFICIAL_LIT[name]
    assert osp.basename(cfg.url) == f'{name}.pth'  # the file name torch.hub caches
    assert cfg.hf_hub_id is None and cfg.file is None  # so timm downloads the url
    assert cfg.has_weights and f'{name}.in1k' in timm.list_pretrained('lit_*')
    assert cfg.num_classes == 1000 and cfg.input_size == (3, 224, 224)
    assert (cfg.mean, cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (cfg.interpolation, cfg.crop_pct, cfg.crop_mode) == ('bicubic', 0.875, 'center')
    assert cfg.license == 'apache-2.0'  # ziplab/LIT LICENSE
    # the model timm builds for the weights has their classifier
    model = timm.create_model(name, device='meta')
    assert model.num_classes == 1000 and model.pretrained_cfg['url'] == OFFICIAL_LIT[name]


@pytest.mark.parametrize('name', OFFICIAL_SCALABLEVIT_DRIVE)
def test_scalablevit_cfg_has_the_official_eval_and_names_the_drive_file(name):
    cfg = timm.get_pretrained_cfg(name)
    assert not cfg.has_weights  # Google Drive: timm cannot download it
    assert (cfg.mean, cfg.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (cfg.interpolation, cfg.crop_pct, cfg.num_classes) == ('bicubic', 0.875, 1000)
    assert OFFICIAL_SCALABLEVIT_DRIVE[name] in cfg.notes[0]
    assert cfg.license is None  # the official repository has no license file
    with pytest.raises(RuntimeError, match=f'{name}: pretrained=True, but there are no '
                                           f'weights to download.*drive.google.com/file/d/'
                                           f'{OFFICIAL_SCALABLEVIT_DRIVE[name]}.*'
                                           r"pretrained_cfg_overlay=dict\(file='PATH'\)"):
        timm.create_model(name, pretrained=True)


def test_pale_pretrained_without_a_file_says_none_were_published():
    with pytest.raises(RuntimeError, match='no Pale Transformer weights were ever published'):
        timm.create_model('pale_tiny', pretrained=True)


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s', 'scalablevit_s'])
def test_timm_eval_transform_is_the_official_one(name):
    """timm's transform from the model's data config gives exactly the tensor of the
    official evaluation transform, on an image of another size and aspect."""
    from PIL import Image
    model = timm.create_model(name, device='meta')
    config = timm.data.resolve_data_config({}, model=model)
    ours = timm.data.create_transform(**config)
    g = torch.Generator().manual_seed(0)
    for h, w in ((300, 437), (512, 256)):
        image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                              dtype=torch.uint8).numpy())
        expected = _official_eval_transform()(image)
        assert expected.shape == (3, 224, 224)
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=0)


# ------------------------------------------------------ served over HTTP
@pytest.fixture
def served(tmp_path, monkeypatch):
    """``(root, base_url)``: files under ``root`` served at ``base_url`` (127.0.0.1);
    torch.hub's cache (``<hub dir>/checkpoints``, where timm and pale_mm keep downloads)
    moved to ``tmp_path / 'hub'``."""
    root = tmp_path / 'www'
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    try:
        yield root, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _official_lit_checkpoint(name):
    """A checkpoint in the layout of the official release: the official keys and
    shapes (relative position index buffers included), random values, and the
    wrapper of the official training code (LIT-S/M/B: Swin's ``model`` / ``epoch`` /
    ``max_accuracy``; LIT-Ti: DeiT's ``model`` / ``epoch`` / ``args`` Namespace)."""
    if name == 'lit_ti':
        state = random_state(official_lit_ti_shapes([64, 128, 320, 512], [3, 4, 6, 3],
                                                     [8, 8, 4, 4]))
        return state, {'model': state, 'epoch': 299,
                       'args': argparse.Namespace(model='lit_ti', input_size=224)}
    state = random_state(official_lit_smb_shapes([96, 192, 384, 768], [2, 2, 6, 2],
                                                  [3, 6, 12, 24]))
    return state, {'model': state, 'epoch': 299, 'max_accuracy': 81.5}


def _serve(root, base, name, checkpoint):
    """Save ``checkpoint`` where the release keeps it (``releases/download/v1.0/``)
    and return its URL on the local server."""
    path = root / 'ziplab' / 'LIT' / 'releases' / 'download' / 'v1.0'
    path.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path / f'{name}.pth')
    return base + OFFICIAL_LIT[name][len('https://github.com'):]


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_timm_pretrained_downloads_and_loads_exactly(name, served):
    root, base = served
    state, checkpoint = _official_lit_checkpoint(name)
    url = _serve(root, base, name, checkpoint)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url))
    assert osp.isfile(osp.join(torch.hub.get_dir(), 'checkpoints', f'{name}.pth'))
    own = model.state_dict()
    dropped = {k for k in state if k.endswith('relative_position_index')}
    assert set(own) == set(state) - dropped
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    # what timm's own tests ask of pretrained models: other in_chans / num_classes
    first = timm.get_pretrained_cfg(name).first_conv + '.weight'
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url),
                              in_chans=1, num_classes=5)
    torch.testing.assert_close(model.state_dict()[first], state[first].sum(1, keepdim=True))
    assert model.head.weight.shape == (5, model.num_features)


def test_timm_pretrained_checkpoint_with_python_objects_is_named(served):
    """A release that also pickled a training config object (e.g. a yacs CfgNode) is
    refused by torch.load(weights_only=True): the error says how to get the weights."""
    root, base = served
    state, checkpoint = _official_lit_checkpoint('lit_s')
    checkpoint['config'] = _TrainingConfig()
    url = _serve(root, base, 'lit_s', checkpoint)
    with pytest.raises(CheckpointError, match=r'lit_s: the pretrained checkpoint holds Python '
                                              r'objects that torch\.load\(weights_only=True\) '
                                              r'does not allow \(Unsupported global: GLOBAL '
                                              r'tests\.test_weights\._TrainingConfig\)\..*'
                                              r"pretrained_cfg_overlay=dict\(file='PATH'\)"):
        timm.create_model('lit_s', pretrained=True, pretrained_cfg_overlay=dict(url=url))


class _TrainingConfig:
    lr = 1e-3


@pytest.mark.parametrize('how', ['url', 'local file'])
def test_config_init_cfg_loads_the_official_checkpoint(how, served):
    """The LIT-Ti Mask R-CNN config's init_cfg, as the detector's backbone loads it
    (mmdet registry, init_weights), from the URL (served locally) or a local file."""
    from mmengine.config import Config

    from pale_mm.utils import register_scope
    register_scope('mmdet')
    from mmdet.registry import MODELS
    root, base = served
    state, checkpoint = _official_lit_checkpoint('lit_ti')
    url = _serve(root, base, 'lit_ti', checkpoint)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'lit', 'mask-rcnn_lit-ti_fpn_1x_coco.py'))
    assert cfg.model.backbone.init_cfg.checkpoint == OFFICIAL_LIT['lit_ti']
    local = str(root) + OFFICIAL_LIT['lit_ti'][len('https://github.com'):]
    cfg.model.backbone.init_cfg.checkpoint = url if how == 'url' else local
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    if how == 'url':  # downloaded into torch.hub's cache, where timm looks too
        assert osp.isfile(osp.join(torch.hub.get_dir(), 'checkpoints', 'lit_ti.pth'))
    # the config's backbone is the official detection LIT-Ti's, without output norms:
    # every tensor comes from the checkpoint (its final norm and head are not used)
    own = backbone.state_dict()
    assert set(own) <= set(state)
    for k in own:
        assert torch.equal(own[k], state[k]), k
    # with a norm on every output, those are the ones left at their initial values,
    # except the last: the classifier's final norm is the last output norm
    cfg.model.backbone.out_norm_indices = None
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    own = backbone.state_dict()
    loaded = [k for k in state if k in own]
    assert len(loaded) == len(own) - 8  # all but the output norms norm0..norm3 (+ head)
    for k in loaded:
        assert torch.equal(own[k], state[k]), k
    for p in ('weight', 'bias'):
        assert torch.equal(own[f'norm3.{p}'], state[f'norm.{p}'])


def test_config_url_that_cannot_be_downloaded_is_named(served):
    from pale_mm.models import LIT
    _, base = served
    url = base + '/ziplab/LIT/releases/download/v1.0/missing.pth'
    backbone = LIT('ti', init_cfg=dict(type='Pretrained', checkpoint=url))
    with pytest.raises(CheckpointError, match=rf'cannot download checkpoint {url} \(HTTP 404 '
                                              r'File not found\); download it yourself'):
        backbone.init_weights()


def test_config_url_is_read_with_weights_only(served, capsys):
    """mmengine's own URL loader reads downloads with weights_only=False; pale_mm's
    does not, so a URL in init_cfg runs no code from the file."""
    from pale_mm.models import LIT
    from tests.models.test_checkpoint import _Evil
    root, base = served
    state, checkpoint = _official_lit_checkpoint('lit_ti')
    checkpoint['evil'] = _Evil()
    url = _serve(root, base, 'lit_ti', checkpoint)
    backbone = LIT('ti', init_cfg=dict(type='Pretrained', checkpoint=url))
    with pytest.raises(CheckpointError, match=r'Unsupported global: GLOBAL print'):
        backbone.init_weights()
    assert 'code ran on load' not in capsys.readouterr().out


# ------------------------------------- files passed by hand (ScalableViT, Pale)
def _scalablevit_s_checkpoint(path):
    """The official ScalableViT-S layout, in DeiT's training wrapper."""
    from tests.models.test_scalablevit import official_shapes
    shapes = official_shapes([64, 128, 256, 512], [2, 2, 20, 2], [2, 4, 8, 16],
                             [1.25, 1.25, 1.25, 1])
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    torch.save({'model': state, 'epoch': 299,
                'args': argparse.Namespace(model='scalable_vit_small', input_size=224)}, path)
    return state


def _pale_tiny_checkpoint(path):
    """A timm training checkpoint of pale_tiny (docs/pretraining.md)."""
    state = timm.create_model('pale_tiny').state_dict()
    torch.save({'state_dict': state, 'epoch': 0,
                'args': argparse.Namespace(model='pale_tiny')}, path)
    return state


DOCUMENTED = {  # config -> (checkpoint maker, the config's last stage)
    'scalablevit/mask-rcnn_scalablevit-s_fpn_1x_coco.py': (_scalablevit_s_checkpoint, 3),
    'pale/mask-rcnn_pale-t_fpn_1x_coco.py': (_pale_tiny_checkpoint, 3),
}


@pytest.mark.parametrize('how', ['--cfg-options', 'own config'])
@pytest.mark.parametrize('config', DOCUMENTED)
def test_documented_ways_to_pass_a_checkpoint_file_to_a_config(config, how, tmp_path):
    """The two ways configs/scalablevit/README.md, docs/weights.md and
    docs/pretraining.md give: tools/train.py's --cfg-options (parsed by mmengine's
    DictAction) and a config of one's own that inherits the shipped one."""
    from mmengine.config import Config, DictAction

    from pale_mm.utils import register_scope
    register_scope('mmdet')
    from mmdet.registry import MODELS
    make, last = DOCUMENTED[config]
    path = tmp_path / 'weights.pth'
    state = make(path)
    shipped = osp.join(ROOT, 'configs', config)
    if how == '--cfg-options':
        parser = argparse.ArgumentParser()
        parser.add_argument('--cfg-options', nargs='+', action=DictAction)
        options = parser.parse_args(['--cfg-options', 'model.backbone.init_cfg.type=Pretrained',
                                     f'model.backbone.init_cfg.checkpoint={path}'])
        cfg = Config.fromfile(shipped)
        cfg.merge_from_dict(options.cfg_options)
    else:
        own = tmp_path / 'my_config.py'
        own.write_text(f'_base_ = {shipped!r}\nmodel = dict(backbone=dict(init_cfg=dict('
                       f"type='Pretrained', checkpoint={str(path)!r})))\n")
        cfg = Config.fromfile(str(own))
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    own_state = backbone.state_dict()
    body = [k for k in state if not k.startswith(('head', 'norm.'))]
    assert body and all(torch.equal(own_state[k], state[k]) for k in body)
    assert torch.equal(own_state[f'norm{last}.weight'], state['norm.weight'])


def test_scalablevit_file_through_timm(tmp_path):
    state = _scalablevit_s_checkpoint(tmp_path / 'scalablevit_s.pth')
    model = timm.create_model('scalablevit_s', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / 'scalablevit_s.pth')))
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in own)
