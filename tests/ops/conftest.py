"""Fixtures and settings for the tests of pale_mm.ops.

- Fused CPU kernels (:mod:`pale_mm.ops.kernels`): ``kernel_build`` / ``kernel_isa`` run
  a test once per build this CPU can run: on an AVX-512 CPU the AVX-512 build and,
  forced, the AVX2 build; on an AVX2-only CPU (or under ``ATEN_CPU_CAPABILITY=avx2``)
  the AVX2 build. So CI on either kind of machine tests every build it can.
- Triton kernels (pale_mm/ops/triton_pale.py): without a GPU they run in Triton's
  interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in tests/conftest.py before
  anything imports Triton).
"""
import pytest

from pale_mm.ops import kernels

BUILDS = kernels.available_isas()


@pytest.fixture(params=BUILDS or (None,), ids=lambda isa: isa or 'no-kernel-build')
def kernel_build(request):
    """The test runs with this build selected (``kernels.cpu_isa()``); once with
    ``None`` where the CPU runs no build (the reference ops run)."""
    isa = request.param
    previous = kernels.set_max_isa(isa)
    try:
        assert kernels.cpu_isa() == isa
        yield isa
    finally:
        kernels.set_max_isa(previous)


@pytest.fixture
def kernel_isa(kernel_build):
    """:func:`kernel_build` for tests of the kernels themselves: skipped where the
    CPU runs no build."""
    if kernel_build is None:
        pytest.skip('no build of the fused CPU kernels runs on this CPU (needs AVX2 or '
                    'AVX-512)')
    return kernel_build
