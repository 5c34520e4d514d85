"""The six released LIT detectors and segmenters (ziplab/LIT release v2.0): each
config's model loads a file in the released layout with exactly its keys, the backbone
each config builds equals the official downstream backbone (tests/lit_official.py), and
a file that does not fit stops with an error naming the keys, never a warning and
weights left at their initial values. No download: the files are written here, in the
released layout, with random tensors."""
import http.server
import logging
import os.path as osp
import threading

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.runner.checkpoint import load_checkpoint  # noqa: E402

from pale_mm.models.checkpoint import CheckpointError  # noqa: E402
from pale_mm.utils import config_scope  # noqa: E402
from tests.configs.test_configs import _build, _load, _registry  # noqa: E402
from tests.lit_official import (DOWNSTREAM, mmdet2_head_keys, mmseg0_head_keys,  # noqa: E402
                                official_downstream_forward, official_downstream_shapes,
                                random_state)
from tests.tolerances import assert_close_fp  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RELEASE = 'https://github.com/ziplab/LIT/releases/download/v2.0/'
# config -> (released file, arch, task, neck and head keys in mmdet 2.11 / mmseg 0.13)
RELEASED = {
    'retinanet_lit-ti_fpn_1x_coco.py': ('retina_lit_ti.pth', 'ti', 'det', 'retinanet'),
    'retinanet_lit-s_fpn_1x_coco.py': ('retina_lit_s.pth', 's', 'det', 'retinanet'),
    'mask-rcnn_lit-ti_fpn_1x_coco.py': ('mask_rcnn_lit_ti.pth', 'ti', 'det', 'mask_rcnn'),
    'mask-rcnn_lit-s_fpn_1x_coco.py': ('mask_rcnn_lit_s.pth', 's', 'det', 'mask_rcnn'),
    'fpn_lit-ti_8xb2-80k_ade20k-512x512.py': ('sem_fpn_lit_ti.pth', 'ti', 'seg', 'sem_fpn'),
    'fpn_lit-s_8xb2-80k_ade20k-512x512.py': ('sem_fpn_lit_s.pth', 's', 'seg', 'sem_fpn'),
}


def _config(name):
    return osp.join(ROOT, 'configs', 'lit', name)


def _head_keys(kind):
    return mmseg0_head_keys() if kind == 'sem_fpn' else mmdet2_head_keys(kind)


def released_file(name, model, path):
    """A file in the layout of the released ``name`` (mmdet 2.11 / mmseg 0.13
    ``save_checkpoint``: ``meta``, ``state_dict``, ``optimizer``): the official
    downstream backbone's keys under ``backbone.``, the neck and heads with the keys
    mmdet 2.11 / mmseg 0.13 give them, random tensors. Asserts first that ``model``
    (mmdet 3 / mmseg 1) names its neck and heads the same, so none is converted.
    Returns the state dict."""
    _, arch, task, kind = RELEASED[name]
    own = model.state_dict()
    heads = {k for k in own if not k.startswith(('backbone.', 'data_preprocessor.'))}
    assert heads == set(_head_keys(kind))
    state = {'backbone.' + k: v for k, v in
             random_state(official_downstream_shapes(arch, task)).items()}
    state.update(random_state({k: tuple(own[k].shape) for k in sorted(heads)}, seed=2))
    meta = dict(mmdet_version='2.11.0', epoch=12, iter=87960, CLASSES=('person', 'car')) \
        if task == 'det' else dict(mmseg_version='0.13.0', iter=80000,
                                   CLASSES=('wall', 'building'))
    optimizer = dict(state={0: dict(step=torch.tensor(1.), exp_avg=torch.zeros(2))},
                     param_groups=[dict(lr=1e-6, weight_decay=1e-4, params=[0])])
    torch.save(dict(meta=meta, state_dict=state, optimizer=optimizer), path)
    return state


def _load_as_test_py(model, filename):
    """Load ``filename`` into ``model`` as ``tools/test.py CONFIG CHECKPOINT`` does
    (``Runner.load_checkpoint``: mmengine's ``load_checkpoint``, ``strict=False``),
    and return the warnings mmengine logged about it."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        load_checkpoint(model, filename, map_location='cpu', strict=False,
                        revise_keys=[(r'^module\.', '')])
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


@pytest.mark.parametrize('name', sorted(RELEASED), ids=str)
def test_released_file_loads_with_exact_keys(name, tmp_path):
    """Each config names its released file in the command that evaluates it, and
    loads a file of that layout with no missing, unexpected or mismatched tensor
    (mmengine logs no warning), every tensor the file's."""
    released, arch, task, _ = RELEASED[name]
    cfg = _load(_config(name))
    text = ' '.join(open(_config(name)).read().replace('\\\n#', '').split())
    assert f'python tools/test.py configs/lit/{name} {RELEASE}{released}' in text
    assert cfg.model.backbone.arch == arch
    assert config_scope(cfg) == ('mmdet' if task == 'det' else 'mmseg')
    _, model = _build(_config(name))
    state = released_file(name, model, tmp_path / released)
    warnings = _load_as_test_py(model, str(tmp_path / released))
    assert not warnings, warnings
    own = model.state_dict()
    assert set(own) - {k for k in own if k.startswith('data_preprocessor.')} == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_released_url_loads_as_tools_test_py(tmp_path, monkeypatch):
    """``tools/test.py CONFIG URL``: mmengine downloads an ``http(s)://`` checkpoint
    into torch.hub's cache and loads it (``weights_only``, as torch >= 2.6 reads it).
    Served here from the loopback interface, in the released layout."""
    name = 'retinanet_lit-ti_fpn_1x_coco.py'
    _, model = _build(_config(name))
    served = tmp_path / 'served'
    served.mkdir()
    released_file(name, model, served / 'retina_lit_ti.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/retina_lit_ti.pth'
        _, fresh = _build(_config(name))
        assert not _load_as_test_py(fresh, url)
    finally:
        server.shutdown()
        thread.join(10)
    file_state = torch.load(served / 'retina_lit_ti.pth', weights_only=True)['state_dict']
    for k, v in fresh.state_dict().items():
        if k in file_state:
            assert torch.equal(v, file_state[k]), k


# the official downstream backbones, at an even size and at an odd one (a 512x683
# ADE20K image, scaled down: odd rows and columns at every stage)
BACKBONES = [('retinanet_lit-s_fpn_1x_coco.py', 's', 'det'),
             ('mask-rcnn_lit-ti_fpn_1x_coco.py', 'ti', 'det'),
             ('fpn_lit-s_8xb2-80k_ade20k-512x512.py', 's', 'seg'),
             ('fpn_lit-ti_8xb2-80k_ade20k-512x512.py', 'ti', 'seg')]


@pytest.mark.parametrize('size', [(64, 96), (75, 107)], ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('name,arch,task', BACKBONES, ids=lambda v: str(v))
def test_backbone_equals_official_downstream_backbone(name, arch, task, size):
    """The backbone a config builds, with a released file's backbone weights, gives
    the official downstream backbone's four outputs (tests/lit_official.py: its
    output norms, table sizes, unpadded merges), in float64. The RetinaNet and Mask
    R-CNN configs build the same backbone (test_official_settings_per_config)."""
    cfg = _load(_config(name))
    models = _registry(config_scope(cfg))
    backbone = models.build(cfg.model.backbone).double().eval()
    state = random_state(official_downstream_shapes(arch, task), seed=3)
    for k in state:
        if k.endswith('relative_position_bias_table'):  # tables of a trained size
            state[k] = state[k] * 10
        elif k.endswith('conv_offset.weight') and k.startswith(('layers.2.', 'patch_embed4')):
            # offsets of about a pixel there too (the last merge's input is larger): far
            # larger ones sample outside the 4x6 map only, and stage 4 sees a constant
            state[k] = state[k] * 0.1
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    backbone.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        outs = backbone(x)
        expected = official_downstream_forward(state, x, arch, task)
    assert [o.shape for o in outs] == [e.shape for e in expected]
    for i, (o, e) in enumerate(zip(outs, expected)):
        # the longest reductions are the MLPs' (8x or 4x the width), 12 blocks deep
        assert_close_fp(o, e, 4 * e.shape[1], depth=24, msg=f'output {i}')


@pytest.mark.parametrize('name', sorted(RELEASED), ids=str)
def test_official_settings_per_config(name):
    """Each config builds the official downstream backbone's options, and the LIT
    configs without a released model keep this project's defaults (a norm on every
    output, odd sizes padded), so the new options changed no other config's model."""
    _, arch, task, _ = RELEASED[name]
    backbone = _build(_config(name))[1].backbone
    norms, img = DOWNSTREAM[arch, task]
    assert backbone.out_norm_indices == norms
    assert backbone.out_indices == (0, 1, 2, 3)
    assert backbone.size_rounding == 'floor'
    assert backbone.pretrain_img_size == img


# ------------------------------------------------------ files that do not fit
@pytest.fixture(scope='module')
def det_s(tmp_path_factory):
    """Mask R-CNN LIT-S's config model and a file in its released layout."""
    name = 'mask-rcnn_lit-s_fpn_1x_coco.py'
    path = tmp_path_factory.mktemp('lit') / 'mask_rcnn_lit_s.pth'
    _, model = _build(_config(name))
    return model, released_file(name, model, path), path


def _resave(state, path):
    torch.save(dict(meta=dict(mmdet_version='2.11.0'), state_dict=state), path)
    return str(path)


def test_file_without_a_backbone_key_is_refused(det_s, tmp_path):
    model, state, _ = det_s
    for key in ('backbone.norm3.weight', 'backbone.layers.2.blocks.5.attn.qkv.weight'):
        partial = {k: v for k, v in state.items() if k != key}
        with pytest.raises(CheckpointError, match=r'missing from the checkpoint.*' +
                           key.replace('.', r'\.')):
            _load_as_test_py(model, _resave(partial, tmp_path / 'partial.pth'))


def test_file_with_an_extra_backbone_key_is_refused(det_s, tmp_path):
    model, state, _ = det_s
    extra = dict(state, **{'backbone.layers.0.blocks.0.gamma': torch.ones(96)})
    with pytest.raises(CheckpointError, match=r'not in the model.*'
                       r'backbone\.layers\.0\.blocks\.0\.gamma'):
        _load_as_test_py(model, _resave(extra, tmp_path / 'extra.pth'))


def test_released_detection_file_in_a_model_with_norm0_names_the_fix(det_s, tmp_path):
    """The released detection LIT-S has no norm0: the model built without
    ``out_norm_indices`` (every output normed) used to load it with a warning and a
    norm0 at its initial values, 40% off the official outputs."""
    _, _, path = det_s
    cfg = _load(_config('mask-rcnn_lit-s_fpn_1x_coco.py'))
    cfg.model.backbone.out_norm_indices = None
    model = _registry('mmdet').build(cfg.model)
    with pytest.raises(CheckpointError, match=r'backbone\.norm0\.weight.*'
                       r'out_norm_indices=\(1, 2, 3\)'):
        _load_as_test_py(model, str(path))


def test_tables_of_another_size_name_pretrain_img_size(det_s):
    _, _, path = det_s
    cfg = _load(_config('mask-rcnn_lit-s_fpn_1x_coco.py'))
    cfg.model.backbone.pretrain_img_size = 224
    model = _registry('mmdet').build(cfg.model)
    with pytest.raises(CheckpointError, match=r'relative_position_bias_table: checkpoint '
                       r'\(9801, 12\) vs model \(729, 12\).*pretrain_img_size=224'):
        _load_as_test_py(model, str(path))


def test_file_without_backbone_is_refused(det_s, tmp_path):
    model, state, _ = det_s
    heads = {k: v for k, v in state.items() if not k.startswith('backbone.')}
    with pytest.raises(CheckpointError, match=r'none of the backbone'):
        _load_as_test_py(model, _resave(heads, tmp_path / 'heads.pth'))
