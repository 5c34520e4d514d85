"""tools/train.py and tools/test.py, the stock mmdet / mmseg tools with our configs,
checkpoints that load again (resume), 2-process DDP on the CPU, and clear errors."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from pale_mm.demo import generate  # noqa: E402
from pale_mm.demo.run import DEMO_CONFIGS, build_demo_runner  # noqa: E402
from pale_mm.utils import (DataCheckError, check_coco_json, check_data,  # noqa: E402
                           prepare_config, replace_data_root, sync_bn_to_bn)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
DET = DEMO_CONFIGS['det']
SEG = DEMO_CONFIGS['seg']
UPERNET_T = osp.join(ROOT, 'configs', 'pale', 'upernet_pale-t_8xb2-160k_ade20k-512x512.py')
MRCNN_T = osp.join(ROOT, 'configs', 'pale', 'mask-rcnn_pale-t_fpn_1x_coco.py')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('tool_shapes'))
    generate(root, num_train=8, num_val=4, size=64, seed=1)
    return root


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '2')
    return env


def _run(args, timeout=600, **kw):
    return subprocess.run([PY] + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def _short(iters):
    """cfg-options for a few iterations with a validation at the end."""
    return [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=1']


# ------------------------------------------------------------- config helpers
def test_replace_data_root_moves_every_path():
    cfg = Config.fromfile(MRCNN_T)
    assert cfg.val_evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'
    prepare_config(cfg, 'none', {'data_root': '/elsewhere/coco'})
    for split in ('train', 'val', 'test'):
        assert cfg[f'{split}_dataloader'].dataset.data_root == '/elsewhere/coco'
    assert cfg.val_evaluator.ann_file == '/elsewhere/coco/annotations/instances_val2017.json'
    assert cfg.test_evaluator.ann_file == '/elsewhere/coco/annotations/instances_val2017.json'
    assert replace_data_root(Config(dict(a=dict(data_root='x'))), 'y') == ['a.data_root']


def test_sync_bn_to_bn_only_when_not_distributed():
    cfg = Config.fromfile(UPERNET_T)
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    changed = sync_bn_to_bn(Config.fromfile(UPERNET_T))
    assert 'model.decode_head.norm_cfg.type' in changed
    assert 'model.auxiliary_head.norm_cfg.type' in changed
    cfg = Config.fromfile(UPERNET_T)
    prepare_config(cfg, 'pytorch')
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    if not torch.cuda.is_available():
        assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    prepare_config(cfg, 'none')
    assert cfg.model.decode_head.norm_cfg.type == 'BN'


def test_check_data_missing_root(tmp_path):
    cfg = Config.fromfile(UPERNET_T)
    missing = str(tmp_path / 'no_ade')
    prepare_config(cfg, 'none', {'data_root': missing})
    with pytest.raises(DataCheckError, match='data root .*no_ade.* does not exist'):
        check_data(cfg)


@pytest.mark.parametrize('content, match', [
    ('{"images": [', 'not valid JSON'),
    ('[1, 2]', 'expected a COCO JSON object'),
    ('{"images": [], "annotations": []}', "'categories' is missing"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2]}]}', 'bbox'),
])
def test_check_coco_json_malformed(tmp_path, content, match):
    path = tmp_path / 'instances_bad.json'
    path.write_text(content)
    with pytest.raises(DataCheckError, match=match) as e:
        check_coco_json(str(path))
    assert str(path) in str(e.value)


def test_check_data_accepts_demo(shapes):
    for config in (DET, SEG):
        cfg = Config.fromfile(config)
        prepare_config(cfg, 'none', {'data_root': shapes})
        check_data(cfg)


# ----------------------------------------------- entry points, clear errors
def test_train_tool_missing_data_root_is_one_clear_line(tmp_path):
    missing = str(tmp_path / 'missing_coco')
    r = _run(['tools/train.py', MRCNN_T, '--work-dir', str(tmp_path / 'w'),
              '--cfg-options', f'data_root={missing}'])
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'data root' in r.stderr and missing in r.stderr


def test_train_tool_malformed_annotations_names_the_file(shapes, tmp_path):
    import shutil
    root = str(tmp_path / 'shapes_bad')
    shutil.copytree(shapes, root)
    bad = osp.join(root, 'annotations', 'instances_training.json')
    with open(bad, 'w') as f:
        f.write('{"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [')
    r = _run(['tools/train.py', DET, '--work-dir', str(tmp_path / 'w'),
              '--cfg-options', f'data_root={root}'])
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'malformed annotation file' in r.stderr and bad in r.stderr


def _stock_tool(lib):
    mod = __import__(lib)
    path = osp.join(osp.dirname(mod.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(path):
        pytest.skip(f'{lib} wheel has no .mim/tools/train.py')
    return path


def _data_options(config, root):
    """Per-key data paths for the stock tools, which do not move ``data_root``."""
    opts = [f'{s}_dataloader.dataset.data_root={root}' for s in ('train', 'val', 'test')]
    if config == DET:
        ann = osp.join(root, 'annotations', 'instances_validation.json')
        opts += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    return opts


@pytest.mark.parametrize('lib, config', [('mmdet', DET), ('mmseg', SEG)])
def test_stock_train_tool_runs_our_config(lib, config, shapes, tmp_path):
    """mmdet's / mmseg's own tools/train.py (shipped in the wheel) trains our config
    unchanged, validates, and saves a checkpoint. The seg config keeps SyncBN in its
    heads: a single-process run must not need a process group."""
    work = str(tmp_path / 'w')
    r = _run([_stock_tool(lib), config, '--work-dir', work, '--cfg-options']
             + _short(2) + _data_options(config, shapes))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
    log = r.stdout + r.stderr
    assert ('coco/bbox_mAP' in log) if lib == 'mmdet' else ('mIoU' in log)


def test_our_train_and_test_tools(shapes, tmp_path):
    """tools/train.py (data_root moved with one option), then tools/test.py on the
    checkpoint it saved, with pictures of predictions."""
    work = str(tmp_path / 'w')
    r = _run(['tools/train.py', SEG, '--work-dir', work, '--cfg-options',
              f'data_root={shapes}'] + _short(2))
    assert r.returncode == 0, r.stderr[-5000:]
    assert 'SyncBN -> BN' in r.stdout + r.stderr
    ckpt = osp.join(work, 'iter_2.pth')
    r = _run(['tools/test.py', SEG, ckpt, '--work-dir', work, '--show-dir', 'shown',
              '--cfg-options', f'data_root={shapes}'])
    assert r.returncode == 0, r.stderr[-5000:]
    assert 'mIoU' in r.stdout + r.stderr
    shown = [f for _, _, fs in os.walk(work) for f in fs if f.endswith('.png')]
    assert shown


# ------------------------------------------------------------------ resume
class _Recorder(Hook):
    def __init__(self):
        self.lrs = {}
        self.before = None

    def before_train(self, runner):
        self.before = dict(iter=runner.iter,
                           optim=_clone(runner.optim_wrapper.optimizer.state_dict()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.lrs[runner.iter] = runner.optim_wrapper.get_lr()['lr'][0]


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _assert_same(a, b, path='optim'):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, (path, a, b)


def test_resume_continues_exactly(shapes, tmp_path):
    """Train 4 iterations with a checkpoint at 2; resume from it: the iteration,
    the optimizer state (loaded with torch's weights_only default) and the lr of
    every later iteration continue exactly."""
    opts = {'train_cfg.max_iters': 4, 'train_cfg.val_interval': 100,
            'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.max_keep_ckpts': 3,
            'param_scheduler': [dict(type='LinearLR', start_factor=0.1, by_epoch=False,
                                     begin=0, end=3),
                                dict(type='PolyLR', power=1.0, by_epoch=False, begin=3,
                                     end=4)]}
    first = build_demo_runner(SEG, shapes, str(tmp_path / 'a'), opts)
    rec_a = _Recorder()
    first.register_hook(rec_a)
    first.train()
    ckpt = osp.join(str(tmp_path / 'a'), 'iter_2.pth')
    saved = torch.load(ckpt, map_location='cpu')  # weights_only=True by default
    assert saved['meta']['iter'] == 2

    opts2 = dict(opts, resume=True, load_from=ckpt)
    second = build_demo_runner(SEG, shapes, str(tmp_path / 'b'), opts2)
    rec_b = _Recorder()
    second.register_hook(rec_b)
    second.train()
    assert rec_b.before['iter'] == 2
    for key in ('state', 'param_groups'):  # the wrapper also saves base_param_settings
        _assert_same(saved['optimizer'][key], rec_b.before['optim'][key], key)
    assert second.iter == 4
    # after_train_iter sees the 0-based index of the iteration just run
    assert sorted(rec_a.lrs) == [0, 1, 2, 3] and sorted(rec_b.lrs) == [2, 3]
    for it in (2, 3):
        assert rec_b.lrs[it] == rec_a.lrs[it], (it, rec_a.lrs, rec_b.lrs)
    steps = {int(s['step']) for s in second.optim_wrapper.optimizer.state_dict()['state'].values()}
    assert steps == {4}


def test_load_from_checkpoint(shapes, tmp_path):
    """``load_from`` (not resume) loads a Runner checkpoint's weights."""
    opts = {'train_cfg.max_iters': 1, 'train_cfg.val_interval': 100,
            'default_hooks.checkpoint.interval': 1}
    first = build_demo_runner(SEG, shapes, str(tmp_path / 'a'), opts)
    first.train()
    ckpt = osp.join(str(tmp_path / 'a'), 'iter_1.pth')
    second = build_demo_runner(SEG, shapes, str(tmp_path / 'b'), dict(opts, load_from=ckpt))
    second.load_or_resume()
    w = 'backbone.patch_embeds.0.proj.weight'
    assert torch.equal(second.model.state_dict()[w], first.model.state_dict()[w])


# --------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.serial
def test_ddp_two_processes_cpu_with_frozen_stages(shapes, tmp_path):
    """2-process torch.distributed (gloo) run of a few Mask R-CNN demo iterations
    with frozen_stages=1, through tools/dist_train.sh."""
    work = str(tmp_path / 'ddp')
    env = _env()
    env.update(PYTHON=PY, PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS='1')
    cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), DET, '2', '--work-dir', work,
           '--cfg-options', f'data_root={shapes}', 'model.backbone.frozen_stages=1',
           'train_dataloader.batch_size=2'] + _short(3)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and 'SIGABRT' in r.stderr:
        # Seen once on a loaded 2-core machine: a worker aborted inside the CPU/gloo
        # stack, not in our code, and the rerun passed. Retry once, with a new port,
        # and show the first failure's error lines if the retry fails too.
        first = '\n'.join(line for line in r.stderr.splitlines()
                          if any(w in line for w in ('Error', 'error', 'terminate', 'what()',
                                                     'Abort', 'SIG')))[-4000:]
        env['PORT'] = str(int(env['PORT']) + 7)
        shutil.rmtree(work, ignore_errors=True)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (first, r.stdout[-3000:], r.stderr[-6000:])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert osp.isfile(osp.join(work, 'iter_3.pth'))
    ckpt = torch.load(osp.join(work, 'iter_3.pth'), map_location='cpu')
    assert ckpt['meta']['iter'] == 3
    logs = [osp.join(dp, f) for dp, _, fs in os.walk(work) for f in fs if f == 'scalars.json']
    assert logs
    with open(logs[0]) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    assert any('coco/bbox_mAP' in x for x in lines)
