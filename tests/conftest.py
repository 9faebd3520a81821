import os

import torch

# Triton decides at import time whether kernels run compiled or interpreted: on a machine without CUDA every
# Triton kernel in the suite runs under the interpreter. This root conftest runs before any test module (and
# so before anything imports triton; fewstep itself imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
