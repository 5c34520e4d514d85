"""Params and multiply-adds against the paper (arXiv 2112.14000, Table 1)."""
import subprocess
import sys

import pytest
import torch

from pale_mm.flops import count_flops, count_params, flop_analyzer
from pale_mm.models import PaleClassifier, PaleTransformer

PAPER = {'tiny': (22e6, 4.2e9), 'small': (48e6, 9.0e9), 'base': (85e6, 15.6e9)}


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_params_and_flops_match_paper(arch):
    model = PaleClassifier(arch, num_classes=1000)
    params, flops = count_params(model), count_flops(model, (3, 224, 224))
    p_ref, f_ref = PAPER[arch]
    assert abs(params / p_ref - 1) < 0.02, params
    assert abs(flops / f_ref - 1) < 0.03, flops


def _hand_attention_madds(model, H, W):
    """hwc(sr*w + sc*h) per block, from the paper's cost formula (no padding at 224)."""
    total = 0
    h, w = -(-H // 4), -(-W // 4)
    for i, (c, depth) in enumerate(zip(model.embed_dims, model.depths)):
        if i:
            h, w = -(-h // 2), -(-w // 2)
        sr, sc = model.pale_sizes[i]
        sr, sc = min(sr, h), min(sc, w)
        total += depth * h * w * c * (sr * w + sc * h)
    return total


def test_attention_is_counted_and_matches_formula():
    model = PaleTransformer('tiny').eval()
    with torch.no_grad():
        by_op = flop_analyzer(model, (torch.zeros(1, 3, 224, 224), )).by_operator()
    assert by_op['scaled_dot_product_attention'] == _hand_attention_madds(model, 224, 224)


def test_hand_count_of_structure():
    """Projections + MLP + convs by hand for Pale-T at 224: 4hwc^2 + 8hwc^2 per block
    plus 27 (3 dw convs) + 9 (CPE) hwc, the stem/merges and the head."""
    model = PaleClassifier('tiny')
    total = _hand_attention_madds(model, 224, 224)
    h = w = 56
    for i, (c, depth) in enumerate(zip(model.embed_dims, model.depths)):
        if i:
            h, w = h // 2, w // 2
            total += h * w * c * model.embed_dims[i - 1] * 9
        total += depth * (12 * h * w * c * c + 36 * h * w * c)
    total += 56 * 56 * 64 * 3 * 49 + 512 * 1000
    flops = count_flops(model, (3, 224, 224))
    # the analyzer also counts norms and pooling: a small excess over the hand count
    assert total < flops < total * 1.03
    assert abs(total / 4.2e9 - 1) < 0.03


def test_get_flops_tool():
    import re
    out = subprocess.run([sys.executable, 'tools/analysis/get_flops.py', 'tiny', '--shape', '96',
                          '128'], capture_output=True, text=True, check=True).stdout
    params = int(re.search(r'params: .*\((\d+)\)', out).group(1))
    flops = int(re.search(r'FLOPs: .*\((\d+)\)', out).group(1))
    model = PaleClassifier('tiny')
    assert params == count_params(model)
    assert flops == count_flops(model, (3, 96, 128))
    assert 'input:  3x96x128' in out
    bad = subprocess.run([sys.executable, 'tools/analysis/get_flops.py', 'pale_huge'],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and 'unknown model' in bad.stderr
