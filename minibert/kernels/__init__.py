"""Fused kernels for BERT training, reached through torch.compile.

Four functions, each a thin wrapper that picks an implementation:

    add_layer_norm(x, residual, weight, bias, eps)     LayerNorm(x + residual), post-LN step
    bias_gelu(x, bias)                                 exact-erf GELU of x + bias
    flash_attention(q, k, v, doc_ids, scale)           softmax(q k^T * scale) v, masked
    linear_cross_entropy(hidden, weight, bias, labels)  MLM decoder + loss, chunked

The first three are Triton kernels wrapped as custom ops (`minibert.kernels.ops`, namespace
`torch.ops.minibert`); the fourth is plain PyTorch in chunks, also a custom op. Every one has
a plain-PyTorch twin in `minibert.kernels.reference`, which the tests compare against.

Which implementation runs (the dispatch rule), decided per call from the first tensor:

* a CUDA tensor and Triton installed                  -> the Triton kernel;
* a CPU tensor, Triton installed and TRITON_INTERPRET=1 -> the Triton kernel, run by
  Triton's CPU interpreter (slow: for tests only);
* anything else (CPU without TRITON_INTERPRET, no Triton) -> the reference in PyTorch.

So a CPU user never pays for the interpreter, and `import minibert.kernels` works without
Triton (HAS_TRITON tells which). linear_cross_entropy needs no Triton and always takes the
chunked path. TRITON_INTERPRET must be set before the first kernel call of the process:
Triton fixes compiled-or-interpreted when a kernel module is first imported. Run the tests
with  `TRITON_INTERPRET=1 pytest tests/test_kernels.py`  (the test module also sets it).
"""

from __future__ import annotations

import math
import os

import torch

from . import ops, reference
from .cross_entropy import default_chunk_size

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "add_layer_norm",
    "bias_gelu",
    "flash_attention",
    "linear_cross_entropy",
    "reference",
    "uses_triton",
]

# Attention head sizes the kernel takes (tl.arange needs a power of two, tl.dot at least 16);
# each compiles for sm_90 without register spills at the tile sizes _config picks.
_HEAD_DIMS = (16, 32, 64, 128)


def uses_triton(t: torch.Tensor) -> bool:
    """The dispatch rule: True when an op on tensor t runs the Triton kernel (see module doc)."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim, in one pass: BERT's post-LN residual step.

    x, residual: (..., H), any leading shape; weight, bias: (H,). Sum and statistics in fp32.
    The result has the dtype of x + residual. eps defaults to BERT's 1e-12. Differentiable
    in x, residual, weight and bias.
    """
    if uses_triton(x):
        return ops.add_layer_norm(x, residual, weight, bias, eps)[0]
    return reference.add_layer_norm(x, residual, weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), exact erf form as in BERT, in one pass; x (..., N), bias (N,).

    Computed in fp32, returned in x's dtype. Differentiable in x and bias. Pair it with a
    bias-free matmul: `bias_gelu(h @ W.T, b)` replaces `F.gelu(F.linear(h, W, b))`.
    """
    if uses_triton(x):
        return ops.bias_gelu(x, bias)
    return reference.bias_gelu(x, bias)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention softmax(q k^T * scale) v without storing the T x T scores.

    q, k, v: (B, nh, T, hd), one dtype (fp32, bf16 or fp16), hd in 16, 32, 64, 128
    (MiniLM uses 32, BERT 64). scale defaults to 1/sqrt(hd).
    doc_ids: (B, T) ints, 0 = padding, else the document each token belongs to in a packed
        row: token i attends token j iff doc_ids[i] == doc_ids[j] != 0 (block-diagonal mask).
        A key-padding mask (B, T) with True/1 = real token is the one-document case and is
        passed as is. None: every token sees every token.
    A padding query (one that sees no key) gets a zero output row and passes no gradient.
    Returns (B, nh, T, hd); on the Triton path it is a view of a (B, T, nh, hd) buffer, so
    `o.transpose(1, 2).reshape(B, T, nh * hd)` costs no copy.
    """
    B, nh, T, hd = q.shape
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share shape and dtype, got {q.shape} {k.shape} {v.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    if not uses_triton(q):
        return reference.flash_attention(q, k, v, doc_ids, scale)
    if hd not in _HEAD_DIMS:
        raise ValueError(f"flash_attention kernel takes head dims {_HEAD_DIMS}, got {hd}")
    # The kernels index the head dim as contiguous; any other layout is copied once.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    ids = None if doc_ids is None else doc_ids.to(torch.int32)  # bool mask: True -> 1, False -> 0
    return ops.flash_attention(q, k, v, ids, scale)[0]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_predictions: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `hidden @ weight.T + bias` against labels, without ever holding
    the full (N, V) logits (see minibert.kernels.cross_entropy for the memory saved).
    With return_predictions, also each row's argmax over V (shape of labels, ignore_index
    where the row is not labelled), since no logits are left to take it from.

    hidden (..., H), weight (V, H), bias (V,), labels (...) with ignore_index marking rows
    without a target. Equal to F.cross_entropy(hidden @ weight.T + bias, labels,
    ignore_index=ignore_index), NaN included when no row is labelled, but returned in fp32.
    chunk_size: rows per chunk; default keeps a chunk at about 2^25 logits. Any device.
    """
    H = hidden.shape[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    hidden2 = hidden.reshape(-1, H)  # (N, H)
    labels1 = labels.reshape(-1)  # (N,)
    loss, _lse, pred = ops.linear_cross_entropy(hidden2, weight, bias, labels1, ignore_index, chunk_size)
    return (loss, pred.view(labels.shape)) if return_predictions else loss
