"""Smoke test of tools/analysis/time_budget.py on a tiny input (not a timing test)."""
import json

import pytest

from pale_mm.ops import kernels
from pale_mm.ops.attention import cpu_attention_available
from tests.tools import load_tool


@pytest.mark.serial  # compares a step's time with its parts' timed in other steps
def test_time_budget_splits_pale_steps(tmp_path):
    tb = load_tool('analysis/time_budget.py')  # it puts its folder on sys.path
    ext = kernels.load()
    before = {n: getattr(ext, n) for n in tb.ATTENTION_FNS + tb.OTHER_FNS} if ext else {}
    out = tmp_path / 'tb.json'
    tb.main(['--res', '64x96', '--reps', '1', '--modes', 'infer', 'train', '--out', str(out)])
    result = json.loads(out.read_text())
    assert set(result['cases']) == {'64x96 infer', '64x96 train'}
    fused = cpu_attention_available()
    for name, r in result['cases'].items():
        assert r['step_s'] > 0 and r['gemm_s'] > 0 and r['linear_gmacs'] > 0
        assert r['attention_gmacs'] > 0
        # the kernel's time is seen exactly where the kernel runs, and its backward
        # only in training
        assert (r['attention_forward_s'] > 0) == fused
        assert (r['attention_backward_s'] > 0) == (fused and name.endswith('train'))
        parts = r['gemm_s'] + r['attention_s'] + r['other_kernels_s']
        assert 0 < parts < r['step_s']
    # the extension's functions are restored
    assert all(getattr(ext, n) is f for n, f in before.items())
