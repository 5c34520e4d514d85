"""The per-stage arch parser shared by the backbones (pale_mm/models/arch.py)."""
import pytest

from pale_mm.models.arch import (check_flag, check_mlp_ratios, check_positive_int, check_rate,
                                 check_ratio, drop_path_rates, parse_arch)

ZOO = {'tiny': dict(embed_dims=32, depths=[1, 2, 3], num_heads=[1, 2, 4]),
       'base': dict(embed_dims=[8, 16, 24], depths=[1, 1, 1], num_heads=2)}
ALIASES = {'t': 'tiny', 'b': 'base', 'l': 'large'}


def _parse(arch, **kw):
    return parse_arch(arch, ZOO, ('embed_dims', 'depths', 'num_heads'), ALIASES,
                      owner='Net', **kw)


def test_per_stage_expansion():
    assert _parse('tiny') == dict(embed_dims=[32, 64, 128], depths=[1, 2, 3],
                                  num_heads=[1, 2, 4])
    assert _parse('base') == dict(embed_dims=[8, 16, 24], depths=[1, 1, 1],
                                  num_heads=[2, 2, 2])
    out = _parse(dict(ZOO['tiny'], ratio=2.), defaults=dict(ratio=4., eps=1e-6,
                                                            flags=lambda n: [True] * n),
                 scalar_keys=('eps', ))
    assert out['ratio'] == [2., 2., 2.] and out['eps'] == 1e-6
    assert out['flags'] == [True, True, True]


def test_aliases_and_case():
    assert _parse('t') == _parse('TINY') == _parse('tiny')
    assert _parse('B') == _parse('base')


def test_zoo_entry_not_mutated():
    out = _parse('tiny')
    out['depths'].append(9)
    assert ZOO['tiny']['depths'] == [1, 2, 3]


@pytest.mark.parametrize('arch,exc,match', [
    # the alias 'l' names no zoo entry, so it is not offered
    ('huge', ValueError, r"unknown Net arch 'huge'; valid archs are "
                         r"\['b', 'base', 't', 'tiny'\] or a dict"),
    ('l', ValueError, 'unknown Net arch'),
    (3, TypeError, 'Net arch must be a str or a dict, got int'),
    (dict(embed_dims=8, depths=[1]), ValueError, r"missing keys \['num_heads'\]"),
    (dict(ZOO['tiny'], heads=3), ValueError, r"unknown arch keys \['heads'\]"),
    (dict(ZOO['tiny'], num_heads=[1, 2]), ValueError, 'one entry per stage'),
    (dict(ZOO['tiny'], depths=[]), ValueError, 'non-empty list'),
    (dict(ZOO['tiny'], depths=[1, 0, 1]), ValueError,
     r'Net arch depths \[1, 0, 1\]: stage 1 has 0; each entry must be an int >= 1'),
    (dict(ZOO['tiny'], embed_dims=[8, 16.5, 32]), ValueError, 'embed_dims .*stage 1 has 16.5'),
    (dict(ZOO['tiny'], num_heads=2.0), ValueError, 'num_heads .*stage 0 has 2.0'),
])
def test_errors(arch, exc, match):
    with pytest.raises(exc, match=match):
        _parse(arch)


def test_drop_path_rates():
    import torch
    assert drop_path_rates(0.1, [1, 2, 2]) == torch.linspace(0, 0.1, 5).tolist()
    expected = torch.linspace(0, 0.2, 2).tolist()
    with torch.device('meta'):  # plain floats even while building on the meta device
        assert drop_path_rates(0.2, [2]) == expected


def test_positive_int_keys_can_be_chosen():
    arch = dict(ZOO['tiny'], num_heads=0)  # e.g. a model without attention heads
    assert _parse(arch, positive_int_keys=('embed_dims', 'depths'))['num_heads'] == [0] * 3


@pytest.mark.parametrize('check,value,exc,match', [
    (check_rate, 1, ValueError, r'Net: p must be in \[0, 1\), got 1'),
    (check_rate, -1e-9, ValueError, r'Net: p must be in \[0, 1\), got -1e-09'),
    (check_rate, float('nan'), ValueError, r'got nan'),
    (check_rate, '0.1', TypeError, r"Net: p must be a number in \[0, 1\), got '0.1'"),
    (check_rate, False, TypeError, 'got False'),
    (check_ratio, 0, ValueError, 'Net: p must be a finite number > 0, got 0'),
    (check_ratio, float('-inf'), ValueError, 'got -inf'),
    (check_ratio, None, TypeError, 'Net: p must be a number > 0, got None'),
    (check_positive_int, 0, ValueError, 'Net: p must be an int >= 1, got 0'),
    (check_positive_int, 2.0, ValueError, 'got 2.0'),
    (check_positive_int, True, ValueError, 'got True'),
    (check_flag, 'True', TypeError, "Net: p must be True or False, got 'True'"),
    (check_flag, 1, TypeError, 'got 1'),
])
def test_shared_argument_checks(check, value, exc, match):
    with pytest.raises(exc, match=match):
        check(value, 'p', 'Net')


def test_shared_argument_checks_pass_good_values_through():
    import numpy as np
    assert check_rate(0, 'p', 'Net') == 0. and check_rate(np.float32(0.5), 'p', 'Net') == 0.5
    assert check_ratio(1e-6, 'p', 'Net') == 1e-6 and check_ratio(4, 'p', 'Net') == 4.
    assert check_positive_int(np.int64(3), 'p', 'Net') == 3
    assert check_flag(False, 'p', 'Net') is False


def test_mlp_ratios_name_the_stage_and_the_hidden_units():
    check_mlp_ratios([16, 32], 0.0625, 'mlp_ratio', 'Net')  # 1 and 2 hidden units
    with pytest.raises(ValueError, match=r'Net: mlp_ratio=0\.05 gives stage 0 \(16 channels\) '
                                         r'an MLP with int\(16 \* 0\.05\) = 0 hidden units'):
        check_mlp_ratios([16, 32], 0.05, 'mlp_ratio', 'Net')
    with pytest.raises(ValueError, match=r'Net: arch mlp_ratios\[1\]=0\.01 gives stage 1 '
                                         r'\(32 channels\)'):
        check_mlp_ratios([16, 32], [4, 0.01], 'arch mlp_ratios', 'Net')
