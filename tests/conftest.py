"""Loaded by pytest before any test module.

Triton decides compiled-or-interpreted when a kernel module is first imported, so the
CPU interpreter must be switched on before anything imports minibert's Triton kernels.
On a machine with a GPU the real kernels run instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
