"""Plain-PyTorch versions of every fused kernel in this package.

Each function here computes exactly what the matching op in `minibert.kernels` computes,
written the obvious way so a reader can check the maths in ten lines. They serve twice:

* they are what the public wrappers run on the CPU (no Triton, no interpreter), and
* they are the oracle the tests compare the Triton kernels against.

Autograd differentiates them, so they need no hand-written backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim: BERT's post-LN residual step.

    The sum and the statistics are taken in fp32 (as the kernel does), so a bf16 model does not
    round the residual sum before normalising; the result has the dtype that x + residual
    would have (bf16 + bf16 -> bf16, bf16 + fp32 -> fp32).
    """
    s = x.float() + residual.float()
    y = F.layer_norm(s, s.shape[-1:], weight.float(), bias.float(), eps)
    return y.to(torch.promote_types(x.dtype, residual.dtype))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) with the exact erf form, 0.5 * u * (1 + erf(u / sqrt(2))), as BERT uses.
    Computed in fp32, returned in x's dtype (the bias is only read: under autocast x is the
    bf16 output of a bias-free matmul and the bias an fp32 parameter)."""
    u = x.float() + bias.float()
    return F.gelu(u, approximate="none").to(x.dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q, k, v of shape (B, nh, T, hd), computed in fp32.

    doc_ids (B, T): 0 = padding, else the document each token belongs to; token i sees token
    j iff doc_ids[i] == doc_ids[j] != 0 (a block-diagonal mask for packed rows). A padding
    mask with 1/True = real token is the one-document case. A query that sees no key at all
    (a padding query) gets an all-zero output row rather than the NaN a plain softmax gives.
    """
    hd = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
    if doc_ids is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        ids = doc_ids.to(torch.int32)
        allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] != 0)  # (B, T, T)
        allowed = allowed[:, None, :, :]  # (B, 1, T, T), shared by the heads
        # A row with no allowed key would be softmax of all -inf = NaN; give it zeros instead.
        has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        scores = torch.where(has_key, scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * has_key
    return (probs @ v.float()).to(q.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T + bias over rows whose label is not
    ignore_index; the whole (N, V) logits tensor is built at once. Same as F.cross_entropy,
    NaN included when no row is labelled, but always returned in fp32."""
    logits = hidden.float() @ weight.float().T + bias.float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)
