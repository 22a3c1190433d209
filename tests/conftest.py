import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter. The variable must be set before
# triton.jit sees the kernels, i.e. before any backend module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test runs use each Triton kernel's default config: autotuning every constexpr variant of every test would compile
# each one once per config. The benchmarks autotune (and check results before timing them).
os.environ.setdefault("HADAMARD_KERNELS_AUTOTUNE", "0")
