import os

# Triton reads this when kernels are defined: set it first so Triton kernels run on CPU tensors in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
