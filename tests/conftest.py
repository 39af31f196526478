"""Test-suite set-up shared by every test module.

Triton decides at decoration time whether a ``@triton.jit`` function runs compiled or under
its CPU interpreter, so ``TRITON_INTERPRET`` must be set before any attnopt kernel module is
imported. Without a CUDA device every Triton test runs through the interpreter.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: ``../shared`` beside the checkout (CI puts it there); tests needing it skip when absent.
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

torch.manual_seed(0)
