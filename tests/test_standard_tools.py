"""Standard tools see the model that runs (issue 15, part 3).

People convert, hook, count, trace and export backbones with standard tools: these
tests use each tool as a new user would, on the Pale model (the ``PaleTransformer``
backbone and timm's ``pale_tiny``), and check that the tool sees the computation
that really runs: SyncBatchNorm conversion, forward hooks, mmengine's FLOP counter
(what mmdet's and mmseg's ``get_flops.py`` call), ``torch.fx`` and torchvision's
feature extractor, and ``torch.onnx`` export run in onnxruntime.

Where a fast path could hide a module from a tool (hooks, SyncBN), the tests run with
pale_mm's fast paths on (the default) and off (``pale_mm.ops.set_fast_paths``): with
them on, a converted or hooked module must still run its own forward.
"""
import contextlib
import os
import os.path as osp
import re
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn as nn

import pale_mm  # noqa: F401  (registers the timm models and the FLOP handles)
from pale_mm.flops import count_flops
from pale_mm.models import PaleTransformer
from tests.backbones import (assert_onnx_matches, max_rel_err, onnx_exporter_kwargs,
                             randomize_bn)
from tests.tools import load_tool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# The demo's narrowed Pale-T (configs/demo): the real PaleTransformer, widths
# 32-64-128-256, depths 1-1-2-1, pale size 7.
SMALL = dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 8])
# Per-block modules a tool must see called (the list plus the MLP's fc1).
BLOCK_MODULES = ('attn.qkv_dw', 'attn.qkv_bn', 'attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def small_backbone(**kwargs) -> PaleTransformer:
    kwargs.setdefault('drop_path_rate', 0.)
    model = PaleTransformer(SMALL, pale_size=7, **kwargs)
    model.init_weights()
    return model


def blocks(model):
    """``(name, block)`` of every Pale block of a backbone or classifier."""
    return [(f'stages.{i}.{j}', blk) for i, stage in enumerate(model.stages)
            for j, blk in enumerate(stage)]


@pytest.fixture(params=[True, False], ids=['fast_paths_on', 'fast_paths_off'])
def fast_paths(request):
    """Runs the test with pale_mm's fast paths on, then off (restored afterwards)."""
    from pale_mm.ops import set_fast_paths
    previous = set_fast_paths(request.param)
    try:
        yield request.param
    finally:
        set_fast_paths(previous)


# --------------------------------------------------------------------- SyncBN
def _syncbn_on_cpu_works() -> bool:
    """Whether this torch's SyncBatchNorm runs a CPU training forward inside an
    initialised gloo process group (torch 2.x raises ``ValueError: SyncBatchNorm
    expected input tensor to be on GPU ...`` and has no CPU ``batch_norm_stats``)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return False
    own = not dist.is_initialized()
    if own:
        dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        nn.SyncBatchNorm(2).train()(torch.randn(2, 2, 2, 2))
        return True
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    finally:
        if own:
            dist.destroy_process_group()


@contextlib.contextmanager
def counting_syncbn_forward():
    """Count calls of every SyncBatchNorm's own ``forward``, by wrapping the class's
    method: no hook is registered, so this sees whether the model calls a module just
    because it was converted (a fast path must notice conversion by itself, not only
    hooks). Yields ``{module: calls}``."""
    calls = {}
    original = nn.SyncBatchNorm.forward

    def forward(self, input):
        calls[self] = calls.get(self, 0) + 1
        return original(self, input)

    nn.SyncBatchNorm.forward = forward
    try:
        yield calls
    finally:
        nn.SyncBatchNorm.forward = original


def _syncbn_modules(model):
    mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert len(mods) == sum(len(s) for s in model.stages)  # one qkv_bn per Pale block
    return mods


def test_syncbn_training_forward_calls_every_syncbn(fast_paths):
    """After ``convert_sync_batchnorm``, a training forward runs every SyncBatchNorm
    module and updates its running statistics.

    The 2-process version is :func:`test_syncbn_two_process_gloo`; this torch's
    SyncBatchNorm does not run on CPU tensors (it raises ``ValueError: SyncBatchNorm
    expected input tensor to be on GPU``, and ``aten::batch_norm_stats`` has no CPU
    kernel), so on a CPU machine the calls are counted in one process instead, where
    SyncBatchNorm falls back to ``F.batch_norm``. Counted twice: first by wrapping
    ``SyncBatchNorm.forward`` (no hooks, so a fast path cannot step aside just because
    it sees a hook), then with forward hooks."""
    torch.manual_seed(0)
    model = small_backbone().train()
    reference = small_backbone().train()
    reference.load_state_dict(model.state_dict())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    syncbns = _syncbn_modules(model)
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for n, m in syncbns.items()}
    x = torch.randn(2, 3, 64, 96)
    with counting_syncbn_forward() as calls:
        outs = model(x)
    called = {n: calls.get(m, 0) for n, m in syncbns.items()}
    assert called == {n: 1 for n in syncbns}, f'SyncBatchNorm calls per module: {called}'
    for n, m in syncbns.items():
        mean, var, tracked = before[n]
        assert int(m.num_batches_tracked) == tracked + 1, n
        assert not torch.equal(m.running_mean, mean), f'{n}: running_mean unchanged'
        assert not torch.equal(m.running_var, var), f'{n}: running_var unchanged'
    # SyncBatchNorm without a process group is BatchNorm: same outputs, same statistics
    ref_outs = reference(x)
    for out, ref in zip(outs, ref_outs):
        assert max_rel_err(out, ref) < 1e-5
    ref_bns = dict(reference.named_modules())
    for n, m in syncbns.items():
        torch.testing.assert_close(m.running_mean, ref_bns[n].running_mean)
        torch.testing.assert_close(m.running_var, ref_bns[n].running_var)
    sum(o.float().square().mean() for o in outs).backward()
    for n, m in syncbns.items():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, n

    # the same with forward hooks, in training and in eval
    hooked = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hooked.__setitem__(
        n, hooked.get(n, 0) + 1)) for n, m in syncbns.items()]
    try:
        model(x)
        assert hooked == {n: 1 for n in syncbns}
        hooked.clear()
        model.eval()
        with torch.no_grad():
            model(x)
        assert hooked == {n: 1 for n in syncbns}
    finally:
        for h in handles:
            h.remove()


def test_syncbn_eval_forward_uses_syncbn_modules(fast_paths):
    """In eval mode a converted model still runs its SyncBatchNorm modules (no fast
    path folds their running statistics into the convolution behind their back), and
    gives the unconverted model's output."""
    model = randomize_bn(small_backbone()).eval()
    reference = randomize_bn(small_backbone()).eval()
    reference.load_state_dict(model.state_dict())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    syncbns = _syncbn_modules(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), counting_syncbn_forward() as calls:
        outs = model(x)
        ref_outs = reference(x)
    assert {n: calls.get(m, 0) for n, m in syncbns.items()} == {n: 1 for n in syncbns}
    for out, ref in zip(outs, ref_outs):
        assert max_rel_err(out, ref) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _syncbn_worker(rank: int, world_size: int, port: int, out_dir: str):
    """One rank of :func:`test_syncbn_two_process_gloo`: the same model on both ranks,
    different images; writes what it saw to ``out_dir/rank{rank}.pt``."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size)
    try:
        torch.manual_seed(0)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(small_backbone().train())
        syncbns = _syncbn_modules(model)
        torch.manual_seed(100 + rank)  # each rank its own images
        x = torch.randn(1, 3, 64, 64) * (1 + rank)
        with counting_syncbn_forward() as calls:
            outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        torch.save(dict(
            calls={n: calls.get(m, 0) for n, m in syncbns.items()},
            running_mean={n: m.running_mean.clone() for n, m in syncbns.items()},
            running_var={n: m.running_var.clone() for n, m in syncbns.items()},
        ), osp.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_syncbn_two_process_gloo():
    """Two gloo processes on 127.0.0.1, each with its own images: every SyncBatchNorm
    runs, and the running statistics it updates are the synchronised ones (equal on
    both ranks, although the ranks saw different images). Skipped where this torch's
    SyncBatchNorm does not run on CPU tensors (torch 2.x); then
    :func:`test_syncbn_training_forward_calls_every_syncbn` counts the calls."""
    if not _syncbn_on_cpu_works():
        pytest.skip("this torch's SyncBatchNorm does not run on CPU tensors with gloo")
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_syncbn_worker, args=(2, _free_port(), out_dir), nprocs=2,
                                 join=False, start_method='spawn')
        deadline = time.monotonic() + 240
        try:
            while not ctx.join(timeout=5):
                assert time.monotonic() < deadline, '2-process SyncBN run timed out'
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        r0, r1 = (torch.load(osp.join(out_dir, f'rank{r}.pt')) for r in range(2))
    for r in (r0, r1):
        assert set(r['calls'].values()) == {1}, r['calls']
    for n in r0['running_mean']:
        torch.testing.assert_close(r0['running_mean'][n], r1['running_mean'][n])
        torch.testing.assert_close(r0['running_var'][n], r1['running_var'][n])
        assert r0['running_mean'][n].abs().sum() > 0, n


# ---------------------------------------------------------------------- hooks
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_forward_hooks_fire(fast_paths, mode):
    """Forward hooks on q/k/v BatchNorm, the q/k/v projection, and both MLP layers of
    every Pale block fire once per forward, in training and in eval, and see outputs
    of the module's shape."""
    model = small_backbone()
    model.train(mode == 'train')
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen.setdefault(name, []).append((tuple(inputs[0].shape), tuple(output.shape)))
        return record

    handles = []
    for name, blk in blocks(model):
        for sub in ('attn.qkv_bn', 'attn.qkv', 'mlp.fc1', 'mlp.fc2'):
            handles.append(blk.get_submodule(sub).register_forward_hook(hook(f'{name}.{sub}')))
    x = torch.randn(2, 3, 64, 96)
    with torch.set_grad_enabled(mode == 'train'):
        model(x)
    expected = {f'{n}.{s}' for n, _ in blocks(model)
                for s in ('attn.qkv_bn', 'attn.qkv', 'mlp.fc1', 'mlp.fc2')}
    assert set(seen) == expected, f'hooks that never fired: {sorted(expected - set(seen))}'
    assert all(len(v) == 1 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    for name, blk in blocks(model):
        c = blk.attn.qkv.in_features
        hidden = blk.mlp.fc1.out_features
        (bn_in, bn_out), = seen[f'{name}.attn.qkv_bn']
        assert bn_out == bn_in and bn_out[1] == 3 * c  # NCHW over the 3C q/k/v channels
        (_, qkv_out), = seen[f'{name}.attn.qkv']
        assert qkv_out[-1] == 3 * c
        (_, fc1_out), = seen[f'{name}.mlp.fc1']
        (_, fc2_out), = seen[f'{name}.mlp.fc2']
        assert fc1_out[-1] == hidden and fc2_out[-1] == c
    for h in handles:
        h.remove()


def test_global_module_hooks_see_block_modules(fast_paths):
    """A global forward hook (``register_module_forward_hook``, what hook-based
    counters such as ptflops or thop-style profilers install) sees every block's
    layers called."""
    from torch.nn.modules.module import register_module_forward_hook
    model = small_backbone().eval()
    called = []
    handle = register_module_forward_hook(lambda m, i, o: called.append(m))
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    called = {id(m) for m in called}
    missing = [f'{name}.{sub}' for name, blk in blocks(model) for sub in BLOCK_MODULES
               if id(blk.get_submodule(sub)) not in called]
    assert not missing, f'never called: {missing}'


def test_mmcv_fuse_conv_bn(fast_paths):
    """mmcv's ``fuse_conv_bn`` folds each block's q/k/v BatchNorm into the depthwise
    conv before it and replaces the BatchNorm with ``Identity``; the fused model gives
    the same output (the model calls its modules, so it runs the fused ones)."""
    fuse_conv_bn = pytest.importorskip('mmcv.cnn').fuse_conv_bn
    import copy
    model = randomize_bn(small_backbone()).eval()
    fused = fuse_conv_bn(copy.deepcopy(model))
    for name, blk in blocks(fused):
        assert isinstance(blk.attn.qkv_bn, nn.Identity), name
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _assert_outputs_equal(fused(x), model(x))


@pytest.mark.parametrize('sub', ['attn.proj', 'attn.qkv_bn', 'attn.qkv', 'mlp.fc2'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_hook_that_changes_output_changes_model_output(fast_paths, sub, mode):
    """A forward hook that returns a modified output (scaled by 2) changes the model's
    output: the module's output is really used. Removing the hook restores it."""
    model = randomize_bn(small_backbone())
    model.train(mode == 'train')
    x = torch.randn(1, 3, 64, 64)

    def run():
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            outs = model(x)
        model.load_state_dict(state)  # training forwards move BN statistics
        return outs

    baseline = run()
    module = model.stages[2][1].get_submodule(sub)
    handle = module.register_forward_hook(lambda m, i, o: o * 2)
    try:
        changed = run()
    finally:
        handle.remove()
    restored = run()
    # stages before the hooked block are untouched; the hooked stage and later change
    for i, (b, c) in enumerate(zip(baseline, changed)):
        if i < 2:
            assert max_rel_err(c, b) < 1e-5
        else:
            assert max_rel_err(c, b) > 1e-3, f'stage {i}: hook on {sub} had no effect'
    for b, r in zip(baseline, restored):
        assert max_rel_err(r, b) < 1e-5


# ---------------------------------------------------------------------- FLOPs
PALE_T_DET = osp.join(REPO, 'configs', 'pale', 'mask-rcnn_pale-t_fpn_1x_coco.py')


def test_import_registers_attention_flop_handle():
    """``import pale_mm`` adds an SDPA handle to mmengine's default table: a plain
    ``FlopAnalyzer`` (as ``get_model_complexity_info`` builds it) counts attention."""
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info

    class Attend(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    assert FlopAnalyzer(Attend(), (q, k, v)).total() == 2 * 3 * 5 * 7 * (8 + 4)
    info = get_model_complexity_info(Attend(), inputs=(q, k, v), show_table=False,
                                     show_arch=False)
    assert info['flops'] == 2 * 3 * 5 * 7 * 12
    assert info['activations'] == 2 * 3 * 5 * 4  # output elements, as for a matmul


@pytest.fixture(scope='module')
def pale_t_mmengine():
    """mmengine's own analysis of the Pale-T backbone at 224, with gradients enabled
    as mmdet's and mmseg's get_flops.py run it: ``(get_model_complexity_info's
    result, the FlopAnalyzer it built, the model)``."""
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info, print_helper
    built = []

    class Recorded(FlopAnalyzer):  # keeps the analyzer for its per-module counts
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    model = PaleTransformer('tiny').eval()
    print_helper.FlopAnalyzer = Recorded
    try:
        with torch.enable_grad():
            info = get_model_complexity_info(model, inputs=(torch.randn(1, 3, 224, 224), ),
                                             show_table=False, show_arch=False)
    finally:
        print_helper.FlopAnalyzer = FlopAnalyzer
    analyzer, = built
    return info, analyzer, model


def test_mmengine_flops_match_get_flops_tool(pale_t_mmengine):
    """``get_model_complexity_info`` on the Pale-T backbone (with gradients, as stock
    get_flops.py calls it) agrees within 1% with tools/analysis/get_flops.py, gives
    the paper's figure (tests/test_flops.py's PAPER, for the classifier, whose
    head adds 0.01%), and counts the attention as the paper's cost formula does."""
    pytest.importorskip('mmdet')
    from tests.test_flops import PAPER, _hand_attention_madds
    info, analyzer, model = pale_t_mmengine
    tool = load_tool('analysis/get_flops.py', 'pale_get_flops')
    params, tool_flops = tool.main([PALE_T_DET, '--shape', '224'])
    assert params == info['params']
    assert abs(info['flops'] / tool_flops - 1) < 0.01, (info['flops'], tool_flops)
    assert abs(info['flops'] / PAPER['tiny'][1] - 1) < 0.03, info['flops']
    by_op = analyzer.by_operator()
    attention = _hand_attention_madds(model, 224, 224)
    assert by_op.get('scaled_dot_product_attention', 0) == attention, by_op
    assert not [op for op in analyzer.unsupported_ops() if 'attention' in op]


def test_mmengine_flops_match_paper_for_pale_tiny():
    """The stock ``get_model_complexity_info`` on timm's ``pale_tiny`` at 224, with
    gradients enabled, gives the paper's figure (tests/test_flops.py's PAPER)."""
    import timm
    from mmengine.analysis import get_model_complexity_info
    from tests.test_flops import PAPER
    model = timm.create_model('pale_tiny').eval()
    with torch.enable_grad():
        flops = get_model_complexity_info(model, input_shape=(3, 224, 224), show_table=False,
                                          show_arch=False)['flops']
    assert abs(flops / PAPER['tiny'][1] - 1) < 0.03, flops


def test_no_uncalled_modules_in_flop_count(pale_t_mmengine):
    """mmengine's uncalled-module warning names no PS-Attention or MLP layer: the
    q/k/v conv, BatchNorm and projection, the output projection and both MLP layers
    are called as modules in the traced graph."""
    _, analyzer, model = pale_t_mmengine
    uncalled = {m for m in analyzer.uncalled_modules() if analyzer._has_forward(m)}
    ours = sorted(m for m in uncalled if m.endswith(BLOCK_MODULES))
    assert not ours, f'{len(ours)} block modules never called, e.g. {ours[:6]}'
    # the only modules the warning names: timm's DropPath, which is the identity in
    # eval mode and so runs no traced op (as in any timm model with stochastic depth)
    others = sorted(m for m in uncalled if not m.endswith('drop_path'))
    assert not others, others
    by_module = analyzer.by_module()
    for name, _ in blocks(model):
        for sub in ('attn.qkv_dw', 'attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
            assert by_module[f'{name}.{sub}'] > 0, f'{name}.{sub}'


def _flops_value(text: str) -> float:
    """``Flops: 9.12G`` (mmengine's _format_size) -> 9.12e9."""
    match = re.search(r'^Flops: ([\d.]+)([KMGT]?)\s*$', text, re.M)
    assert match, text
    return float(match.group(1)) * {'': 1, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12}[
        match.group(2)]


@pytest.mark.slow
def test_mmdet_get_flops_tool_on_pale_config(tmp_path):
    """The ``get_flops.py`` shipped inside the installed mmdet wheel, run on the Pale-T
    Mask R-CNN config with the demo data (the config imports pale_mm through
    ``custom_imports``, which registers the attention FLOP handle): it exits 0 and
    reports the count that mmengine's analyzer gives the same detector here, whose
    backbone part is pale_mm's own count of Pale-T at that size. Test images are
    resized to 224x224 and the RPN keeps one proposal (so the count does not depend
    on the untrained RPN's scores)."""
    mmdet = pytest.importorskip('mmdet')
    script = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'analysis_tools',
                      'get_flops.py')
    assert osp.isfile(script), script
    from pale_mm.demo import ensure_dataset
    root = str(tmp_path / 'shapes')
    ensure_dataset(root, num_train=1, num_val=2)
    options = [f'val_dataloader.dataset.data_root={root}/',
               'val_dataloader.dataset.ann_file=annotations/instances_validation.json',
               'val_dataloader.dataset.data_prefix.img=images/validation/',
               'val_dataloader.dataset.metainfo.classes=(circle,square,triangle)',
               'val_dataloader.dataset.pipeline.1.scale=(224,224)',
               'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
               'model.test_cfg.rpn.max_per_img=1']
    # the pale_mm under test, wherever the installed one points
    path = os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault('OMP_NUM_THREADS', '2')  # 1 in run_tests.sh's parallel workers
    proc = subprocess.run([sys.executable, script, PALE_T_DET, '--num-images', '1',
                           '--cfg-options', *options], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Input shape: (224, 224)' in proc.stdout, proc.stdout
    reported = _flops_value(proc.stdout)

    # the same count here: the detector built from the same config, analysed as the
    # script analyses it (mmengine's default FlopAnalyzer), split by module
    from functools import partial

    from mmengine.analysis import FlopAnalyzer
    from mmengine.config import Config, DictAction
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmdet.registry import MODELS
    parser = __import__('argparse').ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = Config.fromfile(PALE_T_DET)
    cfg.val_dataloader.batch_size = 1
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model).eval()
    data_batch = next(iter(Runner.build_dataloader(cfg.val_dataloader)))
    data = model.data_preprocessor(data_batch)
    model.forward = partial(model.forward, data_samples=data['data_samples'])
    analyzer = FlopAnalyzer(model, data['inputs'])
    total, backbone = analyzer.total(), analyzer.by_module()['backbone']
    assert abs(reported / total - 1) < 0.01, (reported, total)  # 3 significant figures
    assert backbone == count_flops(PaleTransformer('tiny'), (3, 224, 224))
    assert 0.2 < backbone / total < 0.9, (backbone, total)
    assert analyzer.by_operator().get('scaled_dot_product_attention', 0) > 0


# ------------------------------------------------------------------------- FX
def _assert_outputs_equal(got, expected, tol=1e-5):
    if isinstance(expected, torch.Tensor):
        got, expected = (got, ), (expected, )
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert max_rel_err(g, e) < tol, max_rel_err(g, e)


def test_fx_symbolic_trace_backbone():
    """``torch.fx.symbolic_trace`` of the backbone: the traced module gives the eager
    outputs, at the traced size and at others (H and W are not baked in), and its
    graph calls the blocks' BatchNorm and linear layers as modules."""
    model = randomize_bn(small_backbone()).eval()
    gm = torch.fx.symbolic_trace(model)
    called = {n.target for n in gm.graph.nodes if n.op == 'call_module'}
    for name, _ in blocks(model):
        for sub in ('attn.qkv_dw', 'attn.qkv_bn', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
            assert f'{name}.{sub}' in called, f'{name}.{sub} is not a module call in the graph'
    with torch.no_grad():
        for shape in ((1, 3, 64, 64), (2, 3, 97, 130)):
            x = torch.randn(shape)
            _assert_outputs_equal(gm(x), model(x))


def test_fx_symbolic_trace_pale_tiny():
    import timm
    model = randomize_bn(timm.create_model('pale_tiny')).eval()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        x = torch.randn(1, 3, 160, 192)
        _assert_outputs_equal(gm(x), model(x))


def test_torchvision_feature_extractor_pale_tiny():
    """torchvision's ``create_feature_extractor`` on ``pale_tiny`` with the four stages
    as return nodes gives each stage's output (the last block's, as eager)."""
    import timm
    from torchvision.models.feature_extraction import create_feature_extractor
    model = randomize_bn(timm.create_model('pale_tiny')).eval()
    extractor = create_feature_extractor(
        model, return_nodes={f'stages.{i}': f'stage{i}' for i in range(4)})
    eager = {}
    handles = [model.stages[i][-1].register_forward_hook(
        lambda m, inp, out, i=i: eager.__setitem__(f'stage{i}', out)) for i in range(4)]
    x = torch.randn(1, 3, 128, 160)
    try:
        with torch.no_grad():
            model(x)
            feats = extractor(x)
    finally:
        for h in handles:
            h.remove()
    assert list(feats) == [f'stage{i}' for i in range(4)]
    for i in range(4):
        f, e = feats[f'stage{i}'], eager[f'stage{i}']
        assert f.numel() == e.numel() == 128 * 160 // 16 // 4 ** i * model.embed_dims[i]
        _assert_outputs_equal(f, e)


# --------------------------------------------------------------- torch.export
def test_torch_export_with_dynamic_hw_matches_eager_within_its_guards():
    """``torch.export.export`` with H and W as ``Dim.AUTO``, at 224x224 (nothing padded):
    the program matches eager at a size in its guarded band that pads every stage's
    pale groups (160x192; the reference used to leave the mask out under export, and
    the program then stopped there on a guard), and stops with a guard error, not a
    wrong result, at a size outside the band (97x130: stage 3 then has one group)."""
    from torch.export import Dim
    model = randomize_bn(small_backbone()).eval()
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(1, 3, 224, 224), ),
                                 dynamic_shapes=({2: Dim.AUTO, 3: Dim.AUTO}, ))
        program = ep.module()
        for hw in ((224, 224), (160, 192)):
            x = torch.randn(1, 3, *hw)
            _assert_outputs_equal(program(x), model(x))
        with pytest.raises((AssertionError, RuntimeError), match='(?i)guard'):
            program(torch.randn(1, 3, 97, 130))


# ----------------------------------------------------------------------- ONNX
def test_onnx_export_dynamic_hw_matches_pytorch(tmp_path):
    """``torch.onnx.export`` with the TorchScript exporter (opset 17), as mmdeploy
    uses it, with dynamic H and W, run in onnxruntime at three sizes."""
    assert_onnx_matches(randomize_bn(small_backbone()), tmp_path / 'pale.onnx',
                        ((224, 224), (256, 320), (97, 130)),
                        **onnx_exporter_kwargs('torchscript'))


def test_onnx_default_exporter_dynamic_hw_matches_pytorch(tmp_path):
    """``torch.onnx.export``'s default exporter since torch 2.9 (``dynamo=True``, built
    on ``torch.export``) with dynamic H and W. At 224x224 no stage pads its pale
    groups; the other sizes pad (160x192, 256x320), lie outside the sizes
    ``torch.export`` itself guards the graph to (97x130, 256x320: its ONNX file keeps
    H and W dynamic without those guards), or have more or fewer groups. The
    reference built the padding mask only where the traced size padded, so this file
    gave errors of 4e-4 to 2.5e-3 at every other size, silently."""
    assert_onnx_matches(randomize_bn(small_backbone()), tmp_path / 'pale.onnx',
                        ((224, 224), (160, 192), (256, 320), (97, 130)),
                        **onnx_exporter_kwargs('dynamo'))
