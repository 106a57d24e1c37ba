"""Test set-up: without a GPU the Triton kernels run in the interpreter, set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
