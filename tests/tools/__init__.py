"""Tests of the scripts under ``tools/``."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(relpath: str, name: str = None):
    """The script ``tools/<relpath>`` (e.g. ``'analysis/benchmark.py'``) loaded as a
    module named ``name`` (its file name by default): the tools are scripts, not a
    package."""
    path = os.path.join(ROOT, 'tools', relpath)
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
