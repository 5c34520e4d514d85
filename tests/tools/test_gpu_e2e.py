"""tools/analysis/gpu_e2e.py and the scripts around it, checked on the CPU: the GPU
run is rare and short, so the script must not fail there for a reason a CPU finds."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.mark.parametrize('script', ['tools/build_mmcv.sh', 'tools/analysis/gpu_check.sh'])
def test_scripts_parse(script):
    r = subprocess.run(['bash', '-n', osp.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_build_mmcv_usage():
    r = subprocess.run(['bash', osp.join(ROOT, 'tools', 'build_mmcv.sh')], capture_output=True,
                       text=True)
    assert r.returncode == 2 and 'usage: bash tools/build_mmcv.sh PYTHON DEST_DIR' in r.stderr


@pytest.mark.slow
def test_gpu_e2e_smoke_run(tmp_path):
    """Every part on the CPU at tiny sizes (``--smoke``): mmcv's ops compared (CPU with
    CPU here), both demo configs and both detectors trained through tools/train.py for
    a few iterations, their logs read, and the table written."""
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    out = tmp_path / 'e2e'
    r = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analysis', 'gpu_e2e.py'),
                        'ops', 'demo', 'detector', '--smoke', '--out', str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def load(name):
        with open(out / f'{name}.json') as f:
            return json.load(f)
    assert load('ops')['ok']
    demo = load('demo')
    for task, iters in (('det', 4), ('seg', 4)):
        run = demo[task]
        assert run['exit'] == 0 and run['iters'] == iters, (task, run)
        assert run['sec_per_iter'] > 0 and run['loss_first'] > 0
        assert run['headline'] in run['metrics'], run['metrics']  # evaluated at the end
    det = load('detector')
    for name in ('pale-t', 'swin-t'):
        assert det[name]['exit'] == 0 and det[name]['iters'] == 10, det[name]
    assert det['pale_over_swin_throughput'] > 0
    r = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analysis', 'gpu_e2e.py'),
                        'table', '--out', str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and 'Pale-T/Swin-T throughput' in r.stdout, r.stdout
    assert os.path.isfile(out / 'table-e2e.md')
