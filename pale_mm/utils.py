"""Helpers for the train / test entry points (``tools/train.py``, ``tools/test.py``)
and the demo: pick the OpenMMLab library from a config, move a config's data root,
turn SyncBN into BN for single-process runs, and check the data before a run starts
so that a missing folder or a malformed annotation file fails with one clear line.
"""
import importlib
import json
import os
import os.path as osp
from typing import Iterator, List, Optional, Tuple

__all__ = ['DataCheckError', 'config_scope', 'register_scope', 'replace_data_root',
           'sync_bn_to_bn', 'check_data', 'check_coco_json', 'prepare_config',
           'init_cpu_process_group']

SCOPES = ('mmdet', 'mmseg')


class DataCheckError(RuntimeError):
    """The data a config names is missing or malformed."""


def config_scope(cfg) -> str:
    """``'mmdet'`` or ``'mmseg'``, from the config's ``default_scope``."""
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'config {getattr(cfg, "filename", "")!r} has default_scope='
                         f'{scope!r}; pale_mm tools handle {SCOPES} (inherit an mmdet:: or '
                         f'mmseg:: base config, which sets it)')
    return scope


def register_scope(scope: str):
    """Register all modules of mmdet or mmseg (and set it as the default scope), then
    import ``pale_mm`` so that ``PaleTransformer`` is in that library's registry."""
    if scope not in SCOPES:
        raise ValueError(f'unknown scope {scope!r}, expected one of {SCOPES}')
    utils = importlib.import_module(f'{scope}.utils')
    utils.register_all_modules(init_default_scope=True)
    import pale_mm  # noqa: F401  (registers the backbones)
    from pale_mm.compat import allow_numpy_in_checkpoints
    allow_numpy_in_checkpoints()


def _walk(node, path: str = '') -> Iterator[Tuple[object, object, str]]:
    """Yield ``(container, key, path)`` for every value in nested dicts and lists."""
    if isinstance(node, dict):
        for k in list(node.keys()):
            yield node, k, f'{path}.{k}' if path else str(k)
            yield from _walk(node[k], f'{path}.{k}' if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            if isinstance(node, list):
                yield node, i, f'{path}[{i}]'
            yield from _walk(v, f'{path}[{i}]')


def replace_data_root(cfg, new_root: str, old_root: Optional[str] = None) -> List[str]:
    """Point every dataset of ``cfg`` at ``new_root``.

    Upstream configs spell paths as ``data_root + 'annotations/...'``, which is
    resolved when the file is parsed, so ``--cfg-options data_root=X`` alone moves
    nothing. This sets each ``data_root`` key to ``new_root`` and rewrites every
    string that starts with the old root (e.g. the evaluator's ``ann_file``).
    Returns the paths of the keys it changed."""
    old_root = old_root if old_root is not None else cfg.get('data_root', None)
    changed = []
    for container, key, path in list(_walk(cfg._cfg_dict if hasattr(cfg, '_cfg_dict')
                                           else cfg)):
        value = container[key]
        if key == 'data_root' and isinstance(value, str):
            container[key] = new_root
            changed.append(path)
        elif (old_root and isinstance(value, str) and value.startswith(old_root)
              and value != old_root):
            container[key] = osp.join(new_root, value[len(old_root):].lstrip('/'))
            changed.append(path)
    return changed


def sync_bn_to_bn(cfg) -> List[str]:
    """Rewrite every ``norm_cfg`` of type SyncBN / MMSyncBN to BN (in place) for a
    single-process run; returns the changed paths."""
    changed = []
    for container, key, path in list(_walk(cfg._cfg_dict if hasattr(cfg, '_cfg_dict')
                                           else cfg)):
        value = container[key]
        if key == 'type' and value in ('SyncBN', 'MMSyncBN'):
            container[key] = 'BN'
            changed.append(path)
    return changed


# ---------------------------------------------------------------- data checks
def _is_remote(path: str) -> bool:
    return '://' in str(path)


def _datasets(node, where: str) -> Iterator[Tuple[dict, str]]:
    """Leaf dataset configs under a dataloader's ``dataset`` (through wrappers)."""
    if node is None:
        return
    if 'dataset' in node:
        yield from _datasets(node['dataset'], f'{where}.dataset')
    elif 'datasets' in node:
        for i, d in enumerate(node['datasets']):
            yield from _datasets(d, f'{where}.datasets[{i}]')
    else:
        yield node, where


def check_coco_json(path: str, max_bytes: int = 256 * 2 ** 20) -> dict:
    """Parse a COCO instances file and check its structure; raise ``DataCheckError``
    naming the file on any problem. Files over ``max_bytes`` are only parsed.
    Returns a summary (numbers of images, annotations, categories)."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataCheckError(f'malformed annotation file {path}: not valid JSON '
                             f'({e.msg} at line {e.lineno}, column {e.colno})') from None
    except UnicodeDecodeError as e:
        raise DataCheckError(f'malformed annotation file {path}: not UTF-8 text '
                             f'({e.reason})') from None
    except OSError as e:
        raise DataCheckError(f'cannot read annotation file {path}: {e.strerror}') from None
    if not isinstance(data, dict):
        raise DataCheckError(f'malformed annotation file {path}: expected a COCO JSON '
                             f'object, got a {type(data).__name__}')
    for key in ('images', 'categories'):
        if not isinstance(data.get(key), list):
            raise DataCheckError(f'malformed annotation file {path}: the COCO key {key!r} '
                                 f'is missing or not a list')
    anns = data.get('annotations', [])
    if not isinstance(anns, list):
        raise DataCheckError(f'malformed annotation file {path}: "annotations" is not a '
                             f'list')
    if osp.getsize(path) <= max_bytes:
        for i, img in enumerate(data['images']):
            if not isinstance(img, dict) or not {'id', 'file_name'} <= set(img):
                raise DataCheckError(f'malformed annotation file {path}: images[{i}] '
                                     f'needs "id" and "file_name"')
        for i, c in enumerate(data['categories']):
            if not isinstance(c, dict) or not {'id', 'name'} <= set(c):
                raise DataCheckError(f'malformed annotation file {path}: categories[{i}] '
                                     f'needs "id" and "name"')
        for i, a in enumerate(anns):
            if not isinstance(a, dict) or not {'image_id', 'category_id', 'bbox'} <= set(a):
                raise DataCheckError(f'malformed annotation file {path}: annotations[{i}] '
                                     f'needs "image_id", "category_id" and "bbox"')
            box = a['bbox']
            if not (isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, (int, float)) for v in box)):
                raise DataCheckError(f'malformed annotation file {path}: annotations[{i}] '
                                     f'has bbox {box!r}, expected [x, y, w, h]')
    return dict(images=len(data['images']), annotations=len(anns),
                categories=len(data['categories']))


def _check_path(path: str, what: str, where: str, kind: str = 'dir'):
    exists = osp.isdir(path) if kind == 'dir' else osp.isfile(path)
    if not exists:
        hint = ('Download / generate the dataset there, or move the config to it with '
                '--cfg-options data_root=PATH')
        raise DataCheckError(f'{where}: {what} {path!r} does not exist '
                             f'({"folder" if kind == "dir" else "file"} not found). {hint}')


def check_data(cfg, splits=('train', 'val', 'test')) -> None:
    """Check that the data every dataloader and evaluator of ``cfg`` names exists and
    that COCO annotation files parse. Raises ``DataCheckError`` with one clear line."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader', None)
        if not loader:
            continue
        for ds, where in _datasets(loader.get('dataset'), f'{split}_dataloader.dataset'):
            root = ds.get('data_root', None) or ''
            if root and not _is_remote(root):
                _check_path(root, 'data root', where)
            ann = ds.get('ann_file', None)
            if ann and not _is_remote(ann):
                ann_path = ann if osp.isabs(ann) else osp.join(root, ann)
                _check_path(ann_path, 'annotation file', where, kind='file')
                if ann_path.endswith('.json'):
                    check_coco_json(ann_path)
            for key, prefix in (ds.get('data_prefix', None) or {}).items():
                if prefix and not _is_remote(prefix):
                    p = prefix if osp.isabs(prefix) else osp.join(root, prefix)
                    _check_path(p, f'data_prefix.{key}', where)
        evaluators = cfg.get(f'{split}_evaluator', None)
        if evaluators is None:
            continue
        for ev in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
            ann = ev.get('ann_file', None) if isinstance(ev, dict) else None
            if ann and not _is_remote(ann):
                _check_path(ann, 'annotation file', f'{split}_evaluator', kind='file')
                if ann.endswith('.json'):
                    check_coco_json(ann)


def prepare_config(cfg, launcher: str = 'none', cfg_options: Optional[dict] = None,
                   logger=None):
    """What ``tools/train.py`` and ``tools/test.py`` do to a loaded config before the
    Runner is built: merge ``cfg_options`` (moving every path when ``data_root`` is
    among them), SyncBN -> BN when not distributed, and gloo instead of NCCL when
    distributed without CUDA. Returns the library scope."""
    def log(msg):
        if logger is not None:
            logger(msg)

    cfg.launcher = launcher
    if cfg_options:
        old_root = cfg.get('data_root', None)
        cfg.merge_from_dict(cfg_options)
        if 'data_root' in cfg_options:
            changed = replace_data_root(cfg, cfg_options['data_root'], old_root)
            log(f'data_root -> {cfg_options["data_root"]} ({len(changed)} settings moved)')
    scope = config_scope(cfg)
    if launcher == 'none':
        changed = sync_bn_to_bn(cfg)
        if changed:
            log(f'not distributed: SyncBN -> BN in {len(changed)} norm configs')
    else:
        import torch
        env = cfg.get('env_cfg', None)
        if env is not None and not torch.cuda.is_available():
            dist_cfg = env.setdefault('dist_cfg', {})
            if dist_cfg.get('backend', 'nccl') == 'nccl':
                dist_cfg['backend'] = 'gloo'
                log('no CUDA device: distributed backend nccl -> gloo')
        if not torch.cuda.is_available() and cfg.get('model_wrapper_cfg', None) is None:
            # mmengine's default DDP wrapper passes device_ids=[LOCAL_RANK], which DDP
            # rejects for a CPU module
            cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                         broadcast_buffers=False,
                                         find_unused_parameters=cfg.get(
                                             'find_unused_parameters', False))
        if launcher == 'pytorch' and not torch.cuda.is_available() and \
                'RANK' in os.environ and 'WORLD_SIZE' in os.environ:  # under torchrun
            init_cpu_process_group(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    return scope


def init_cpu_process_group(dist_cfg: Optional[dict] = None):
    """Join the torchrun process group with gloo on a machine without CUDA.

    mmengine 0.10's ``init_dist('pytorch')`` calls ``torch.cuda.set_device``
    unconditionally, which fails without a GPU; the Runner skips its own
    initialisation when a process group already exists."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    kwargs = {k: v for k, v in (dist_cfg or {}).items() if k != 'backend'}
    if 'timeout' in kwargs and not hasattr(kwargs['timeout'], 'total_seconds'):
        import datetime
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    dist.init_process_group(backend='gloo', **kwargs)


def load_tool_config(config: str, launcher: str = 'none', cfg_options: Optional[dict] = None,
                     work_dir: Optional[str] = None):
    """The common start of ``tools/train.py`` and ``tools/test.py``: load ``config``,
    :func:`prepare_config` it, register its library, and set ``work_dir`` (the given
    one, the config's, or ``./work_dirs/<config name>``). Returns ``(cfg, scope)``."""
    from mmengine.config import Config
    from mmengine.logging import print_log
    cfg = Config.fromfile(config)
    scope = prepare_config(cfg, launcher, cfg_options,
                           logger=lambda m: print_log(m, logger='current'))
    register_scope(scope)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg, scope
