"""Which build of the fused CPU kernels (pale_mm.ops.kernels) a process uses: the
widest that both the CPU's flags and PyTorch's CPU capability allow, never one the
CPU lacks, none on a CPU without AVX2; each build its own extension."""
import os
import subprocess
import sys

import pytest
import torch

from pale_mm.ops import kernels

ALL = frozenset({'sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl'})
AVX2_CPU = frozenset({'sse4_2', 'avx', 'avx2', 'fma'})


@pytest.fixture
def fake_cpu(monkeypatch):
    """Set (capability, flags) as torch and /proc/cpuinfo would report them."""
    monkeypatch.setattr(kernels, '_available', {})
    monkeypatch.setattr(kernels, '_max_isa', [None])

    def fake(capability, flags):
        monkeypatch.setattr(kernels, 'torch_capability', lambda: capability)
        monkeypatch.setattr(kernels, '_cpu_flags', [flags])
    return fake


@pytest.mark.parametrize('capability,flags,builds', [
    ('AVX512', ALL, ('avx512', 'avx2')),     # an AVX-512 CPU
    ('AVX2', ALL, ('avx2',)),                # the same under ATEN_CPU_CAPABILITY=avx2
    ('AVX2', AVX2_CPU, ('avx2',)),           # an AVX2 CPU (Zen 2/3, many Intel parts)
    ('AVX512', AVX2_CPU, ('avx2',)),         # ATEN_CPU_CAPABILITY=avx512 on an AVX2 CPU
    ('AVX2', AVX2_CPU - {'fma'}, ()),        # AVX2 without FMA
    ('AVX2', frozenset({'sse4_2', 'avx'}), ()),  # ATEN_CPU_CAPABILITY=avx2 on an AVX CPU
    ('DEFAULT', ALL, ()),                    # ATEN_CPU_CAPABILITY=default
    ('SVE256', frozenset({'sve'}), ()),      # not x86
])
def test_the_widest_build_both_the_cpu_and_torch_allow(fake_cpu, capability, flags, builds):
    fake_cpu(capability, flags)
    assert kernels.available_isas() == builds
    assert kernels.cpu_isa() == (builds[0] if builds else None)
    assert kernels.set_max_isa('avx2') is None
    assert kernels.cpu_isa() == ('avx2' if builds else None)
    assert kernels.set_max_isa('avx512') == 'avx2'  # a limit, never a build the CPU lacks
    assert kernels.cpu_isa() == (builds[0] if builds else None)


@pytest.mark.parametrize('avx512,avx2,builds', [(True, True, ('avx512', 'avx2')),
                                                (False, True, ('avx2',)),
                                                (False, False, ())])
def test_without_proc_cpuinfo_torch_cpuinfo_decides(fake_cpu, monkeypatch, avx512, avx2, builds):
    fake_cpu('AVX512', None)
    monkeypatch.setattr(torch.cpu, '_is_avx512_supported', lambda: avx512, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx2_supported', lambda: avx2, raising=False)
    assert kernels.available_isas() == builds


def test_set_max_isa_names_the_builds():
    with pytest.raises(ValueError, match=r"unknown kernel build 'sse'.*\('avx512', 'avx2'\)"):
        kernels.set_max_isa('sse')
    with pytest.raises(ValueError, match="unknown kernel build 'avx'"):
        kernels.cpu_supports('avx')


def _proc_flags():
    try:
        with open('/proc/cpuinfo') as f:
            return next((set(line.split(':', 1)[1].split()) for line in f
                         if line.startswith('flags')), None)
    except OSError:
        return None


def test_this_machine_gets_what_its_cpu_has():
    """On this machine, read independently of the module: an AVX-512 CPU gets both
    builds, an AVX2 CPU the AVX2 build (unless torch runs below AVX2)."""
    flags = _proc_flags()
    if flags is None:
        pytest.skip('no /proc/cpuinfo')
    capability = torch.backends.cpu.get_cpu_capability()
    want = []
    if capability == 'AVX512' and {'avx512f', 'fma'} <= flags:
        want.append('avx512')
    if capability in ('AVX512', 'AVX2') and {'avx2', 'fma'} <= flags:
        want.append('avx2')
    assert kernels.available_isas() == tuple(want)


def test_emulated_avx2_cpu_picks_the_avx2_build():
    """Under the libraries' AVX2 emulation an AVX-512 CPU runs the AVX2 build (and an
    AVX2 CPU does anyway)."""
    flags = _proc_flags()
    if flags is None or not {'avx2', 'fma'} <= flags:
        pytest.skip('needs an x86 CPU with AVX2 and /proc/cpuinfo')
    env = dict(os.environ, ATEN_CPU_CAPABILITY='avx2', ONEDNN_MAX_CPU_ISA='AVX2',
               MKL_ENABLE_INSTRUCTIONS='AVX2')
    code = ('import torch; from pale_mm.ops import kernels;'
            'print(torch.backends.cpu.get_cpu_capability(), kernels.available_isas(),'
            ' kernels.cpu_isa())')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "AVX2 ('avx2',) avx2"


def test_each_build_is_its_own_extension():
    """The builds this CPU runs load as separate extensions (separate build caches),
    each used while selected."""
    builds = kernels.available_isas()
    if not builds:
        pytest.skip('no build of the fused CPU kernels runs on this CPU')
    previous = kernels.set_max_isa(None)
    try:
        files = set()
        for isa in builds:
            kernels.set_max_isa(isa)
            ext = kernels.load()
            assert ext is not None and ext.__name__ == f'pale_mm_cpu_{isa}'
            files.add(ext.__file__)
        assert len(files) == len(builds)
    finally:
        kernels.set_max_isa(previous)
