"""Test-session set-up.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter. The interpreter is chosen
when Triton is first imported (PyG imports it too), so the variable is set here, before any test
module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny; one intra-op thread avoids oversubscribing small CI machines (the Rust
# loader runs its own threads next to torch).
torch.set_num_threads(1)
