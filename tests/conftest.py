"""tests/ is a package that mirrors pale_mm/ (models/, ops/, ...) plus tools/,
configs/ and demo/; shared helpers are its modules (``tests.pale_oracle``,
``tests.tolerances``, ``tests.switches``), imported by package name: pytest puts the
repository root first on the path (rootdir-based package import), so no test edits
``sys.path``."""
import os
import time
import warnings

import pytest
import torch

# Two threads, as the demo's figures were measured with (its segmentation result depends
# on the thread count, docs/demo_and_tests.md). In a pytest-xdist worker (``pytest -n
# 2``; tools/run_tests.sh runs the tests not marked ``serial`` so) one thread, for the
# worker and the processes its tests start: one worker per core, cores not
# oversubscribed (OpenMP's waiting threads slow 10-25x when they are).
# PALE_MM_TEST_THREADS overrides both.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(int(os.environ.get('PALE_MM_TEST_THREADS')
                          or (1 if os.environ.get('PYTEST_XDIST_WORKER')
                              else max(1, min(2, os.cpu_count() or 1)))))

# Without a GPU, pale_mm's Triton kernels (pale_mm/ops/triton_pale.py) run in Triton's
# interpreter on CPU tensors, so their tests (tests/ops/test_pale_cuda.py) prove them
# on any machine. Set before anything imports Triton: pale_mm does (through torch's
# compiler stack), and a kernel module defined outside interpreter mode cannot run in it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_addoption(parser):
    parser.addoption(
        '--cpu-durations', type=int, default=None, metavar='N',
        help='list the N tests that used the most CPU time (this process and the '
             'subprocesses it waited for; 0 lists all). Unlike --durations (wall '
             'time) it hardly changes when other jobs share the cores.')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end test (deselect with -m "not slow")')
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    config._pale_cpu_times = []


def pytest_collection_modifyitems(session, config, items):
    """In a pytest-xdist worker (tools/run_tests.sh), the files that hold slow tests come
    first, so that the longest ones (the inductor compiles, the GPU script's smoke run)
    start at once instead of ending the run on one busy worker while the others idle.
    run_tests.sh hands out whole files in this order (``--dist loadfile
    --no-loadscope-reorder``); the order within a file is unchanged."""
    if not hasattr(config, 'workerinput'):
        return
    heavy = {item.path for item in items if item.get_closest_marker('slow')}
    items.sort(key=lambda item: item.path not in heavy)  # stable: file order kept


def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.config.getoption('cpu_durations') is None:
        yield
        return
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    row = (_cpu_seconds() - cpu, time.perf_counter() - wall, item.nodeid)
    item.config._pale_cpu_times.append(row)
    path = os.environ.get('PALE_MM_CPU_TIMES_LOG')
    if path:  # as they finish, for runs that may not get to the summary
        with open(path, 'a') as f:
            f.write(f'{row[0]:8.1f}s cpu {row[1]:8.1f}s wall  {row[2]}\n')


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption('cpu_durations')
    if n is None:
        return
    rows = sorted(config._pale_cpu_times, reverse=True)
    total_cpu = sum(r[0] for r in rows)
    total_wall = sum(r[1] for r in rows)
    terminalreporter.write_sep('=', f'CPU time per test (setup + call + teardown), '
                                    f'{"all" if not n else f"top {n}"}')
    for cpu, wall, nodeid in (rows if not n else rows[:n]):
        terminalreporter.write_line(f'{cpu:8.1f}s cpu {wall:8.1f}s wall  {nodeid}')
    terminalreporter.write_line(f'{total_cpu:8.1f}s cpu {total_wall:8.1f}s wall  '
                                f'total of {len(rows)} tests')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fast_paths_on():
    """For a fast path's own tests (the export forms, ...): the fast paths on, whatever
    ``PALE_MM_FAST_PATHS`` says."""
    from pale_mm.ops import set_fast_paths
    previous = set_fast_paths(True)
    yield
    set_fast_paths(previous)


# ------------------------------------------------- the demo, trained once per session
@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
    """The bundled demo's synthetic shapes dataset, at the demo's default settings."""
    from pale_mm.demo import ensure_dataset
    root = str(tmp_path_factory.mktemp('demo_shapes'))
    ensure_dataset(root)
    return root


@pytest.fixture(scope='session')
def trained_demo(demo_data, tmp_path_factory):
    """``trained_demo(task)``: the demo's training of ``task`` ('det' or 'seg'), exactly
    as ``tools/run_demo.py`` runs it, done once per session and shared. Its result
    (``pale_mm.demo.run.train_and_evaluate``: metrics, checkpoint, pictures) serves
    the demo's learning test (tests/demo) and the inference APIs' test (test_apis),
    so each demo model is trained once, not once per test."""
    runs = {}

    def get(task):
        pytest.importorskip('mmdet')
        pytest.importorskip('mmseg')
        if task not in runs:
            from pale_mm.demo.run import train_and_evaluate
            work_dir = str(tmp_path_factory.mktemp(f'demo_{task}_trained'))
            runs[task] = train_and_evaluate(task, demo_data, work_dir)
        return runs[task]
    return get
