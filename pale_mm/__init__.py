"""pale_mm: Pale Transformer (and sibling) backbones for mmdet, mmseg and timm.

Importing ``pale_mm`` registers ``PaleTransformer`` in mmdet's and mmseg's model
registries (whichever are installed) and ``pale_tiny/small/base`` in timm, and
lets ``torch.load(weights_only=True)`` read mmengine Runner checkpoints.
"""
__version__ = '0.1.0'

from .compat import allow_numpy_in_checkpoints, fix_inductor_stride_order  # noqa: E402

# torch >= 2.6 loads with weights_only=True and mmengine 0.10 does not opt out:
# allow-list the plain-data types that Runner checkpoints hold (resume, load_from).
allow_numpy_in_checkpoints()
# inductor with dynamic shapes cannot order the symbolic strides of our (B, H, W, C)
# maps' permuted views (pytorch/pytorch#185871, open): backported, applied when
# inductor loads (the first compilation), not here.
fix_inductor_stride_order()

from . import models  # noqa: F401,E402
from .ops import pale as _fast_paths  # noqa: F401,E402  (registers the CPU fast forwards)
from .ops import pale_cuda as _gpu_paths  # noqa: F401,E402  (and the GPU one)
from . import registration  # noqa: F401,E402
from .models import PaleTransformer, PSAttention, pale_attention  # noqa: F401,E402
from . import flops  # noqa: F401,E402  (adds attention FLOP handles to mmengine's defaults)

try:
    from . import timm_models  # noqa: F401
except ModuleNotFoundError as _e:  # timm is optional for mmdet/mmseg users
    if _e.name is None or _e.name.split('.')[0] != 'timm':
        raise
