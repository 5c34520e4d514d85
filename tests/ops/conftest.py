"""Without a GPU, pale_mm's Triton kernels (pale_mm/ops/triton_pale.py) run in Triton's
interpreter on CPU tensors, so their tests prove them on any machine. The variable
must be set before the kernels are defined (their module is imported lazily, on the
first use of the GPU path)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
