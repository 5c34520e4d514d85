import os
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# tests/ on the path for the shared oracle (a site-packages ``tests`` package from a
# dependency shadows ``tests.*`` imports)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end test (deselect with -m "not slow")')
    warnings.filterwarnings('ignore', category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
