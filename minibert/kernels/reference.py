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


def segment_ids(
    key_padding_mask: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """Fold a padding mask and document ids into one (B, T) int32 "segment" per token.

    Token i may attend to token j iff seg[i] == seg[j] and seg[j] >= 0. Padding gets -1, so a
    padding key is never attended and a padding query attends nothing (its output is zero).
    Without doc ids every real token is in segment 0. None means no masking at all.
    """
    if key_padding_mask is None and doc_ids is None:
        return None
    if doc_ids is None:
        seg = torch.zeros(key_padding_mask.shape, dtype=torch.int32, device=key_padding_mask.device)
    else:
        seg = doc_ids.to(torch.int32)
    if key_padding_mask is not None:
        seg = torch.where(key_padding_mask.bool(), seg, torch.full_like(seg, -1))
    return seg


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q, k, v of shape (B, nh, T, hd), computed in fp32.

    key_padding_mask (B, T) bool, True = real token; doc_ids (B, T) ints >= 0 for packed rows
    (a token sees only real tokens of its own document). A query that may see no key at all
    (a padding query) gets an all-zero output row rather than the NaN a plain softmax gives.
    """
    B, nh, T, hd = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(hd)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
    seg = segment_ids(key_padding_mask, doc_ids)
    if seg is not None:
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)  # (B, T, T)
        allowed = allowed[:, None, :, :]  # (B, 1, T, T), shared by the heads
        scores = scores.masked_fill(~allowed, float("-inf"))
        # A row with no allowed key would be softmax of all -inf = NaN; give it zeros instead.
        has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
        scores = torch.where(has_key, scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * has_key
    else:
        probs = torch.softmax(scores, dim=-1)
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
