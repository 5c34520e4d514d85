"""Run test code with one of pale_mm's run-time switches (``set_fast_cpu_linear``,
``set_cpu_attention``, ``set_fused_dwconv``: each takes a bool and returns the
previous setting) turned off, restoring it afterwards."""
import contextlib


@contextlib.contextmanager
def switched_off(setter):
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)
