"""A state dict saved by pale_mm before the reference-first rewrite (commit d187eb5,
where PSAttention computed its layers by hand) loads strictly into today's
PaleTransformer, and the model gives the outputs that code gave: in eval mode, and
in training mode with the BatchNorm running statistics it left behind; with the
fast paths on and off. ``tests/models/data/pale_state_dict_d187eb5.pt`` holds a small
model's state dict (non-trivial BatchNorm statistics), a 45x39 input (padded pale
groups at every stage) and those outputs."""
import os

import pytest
import torch

from pale_mm.models import PaleTransformer
from pale_mm.ops import set_fast_paths
from tests.tolerances import fp_tol

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                    'pale_state_dict_d187eb5.pt')


@pytest.mark.parametrize('fast', [True, False], ids=['fast', 'reference'])
def test_old_state_dict_loads_and_gives_the_same_outputs(fast):
    blob = torch.load(DATA, weights_only=True)
    model = PaleTransformer(blob['arch'], pale_size=blob['pale_size'], drop_path_rate=0.)
    assert set(model.state_dict()) == set(blob['state_dict'])
    model.load_state_dict(blob['state_dict'], strict=True)
    x = blob['input']
    tol = fp_tol(4 * max(blob['arch']['embed_dims']), depth=6 * sum(blob['arch']['depths']))
    previous = set_fast_paths(fast)
    try:
        with torch.no_grad():
            for got, want in zip(model.eval()(x), blob['eval_outputs'], strict=True):
                torch.testing.assert_close(got, want, **tol)
            for got, want in zip(model.train()(x), blob['train_outputs'], strict=True):
                torch.testing.assert_close(got, want, **tol)
    finally:
        set_fast_paths(previous)
    state = model.state_dict()
    for key, want in blob['buffers_after_train'].items():
        torch.testing.assert_close(state[key], want, **tol, msg=key)
