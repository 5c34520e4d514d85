"""Train and evaluate one demo config in this process (used by ``tools/run_demo.py``
and the tests)."""
import glob
import itertools
import os.path as osp
import time
from typing import Dict, Optional

__all__ = ['DEMO_CONFIGS', 'build_demo_runner', 'train_and_evaluate', 'val_metrics']

_RUNNER_IDS = itertools.count()
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIGS = {
    'det': osp.join(REPO, 'configs', 'demo', 'mask-rcnn_pale-t-demo_fpn_200i_shapes-128.py'),
    'seg': osp.join(REPO, 'configs', 'demo', 'upernet_pale-t-demo_600i_shapes-128.py'),
}


def build_demo_runner(config: str, data_root: str, work_dir: str,
                      cfg_options: Optional[dict] = None, launcher: str = 'none'):
    """Build an mmengine Runner for ``config`` with its data under ``data_root``,
    as ``tools/train.py`` would."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from pale_mm.utils import check_data, prepare_config, register_scope

    cfg = Config.fromfile(config)
    options = dict(data_root=data_root)
    options.update(cfg_options or {})
    register_scope(prepare_config(cfg, launcher, options))
    cfg.work_dir = work_dir
    # mmengine keeps one Visualizer instance per name for the whole process: a second
    # runner (another task, or the same task again) would get the first one, with
    # its class and save directory. A unique name gives each runner its own.
    if cfg.get('visualizer') is not None:
        cfg.visualizer.name = f'pale_mm_demo_{osp.basename(config)}_{next(_RUNNER_IDS)}'
    check_data(cfg, splits=('train', 'val'))
    return Runner.from_cfg(cfg)


def val_metrics(runner) -> Dict[str, float]:
    """The metrics of the runner's last validation (``RuntimeInfoHook`` keeps them
    in the message hub as ``val/<name>``)."""
    out = {}
    for key, buf in runner.message_hub.log_scalars.items():
        if key.startswith('val/') and key not in ('val/time', 'val/data_time'):
            out[key[len('val/'):]] = float(buf.current())
    return out


def train_and_evaluate(task: str, data_root: str, work_dir: str,
                       cfg_options: Optional[dict] = None) -> dict:
    """Train the demo config of ``task`` ('det' or 'seg'), validate at the end, and
    return ``{'metrics', 'train_seconds', 'work_dir', 'log_dir', 'vis_images',
    'checkpoint'}`` (``checkpoint``: the final weights' file, or None if none was saved)."""
    if task not in DEMO_CONFIGS:
        raise ValueError(f'task must be one of {sorted(DEMO_CONFIGS)}, got {task!r}')
    runner = build_demo_runner(DEMO_CONFIGS[task], data_root, work_dir, cfg_options)
    t0 = time.time()
    runner.train()
    seconds = time.time() - t0
    log_dir = runner.log_dir
    vis = sorted(glob.glob(osp.join(log_dir, 'vis_data', 'vis_image', '*.png')))
    ckpt = osp.join(work_dir, f'iter_{runner.iter}.pth')
    return dict(metrics=val_metrics(runner), train_seconds=seconds, work_dir=work_dir,
                log_dir=log_dir, vis_images=vis,
                checkpoint=ckpt if osp.isfile(ckpt) else None)
