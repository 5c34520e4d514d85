"""The per-stage arch parser shared by the backbones (pale_mm/models/arch.py)."""
import pytest

from pale_mm.models.arch import drop_path_rates, parse_arch

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
