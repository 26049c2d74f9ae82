"""The fast attention backends: a table from `attn_impl` name to a function and its mask builder.

Every backend computes what the readable "math" path in minibert/model.py computes,
softmax(q k^T * scale + mask) v over (B, nh, T, hs) tensors, in one fused kernel:

    sdpa    torch's scaled_dot_product_attention (flash / memory-efficient / C++ math)
    flex    FlexAttention: a kernel torch.compile generates from a block mask; run eagerly
            it is an unfused reference (and has no backward on the CPU)
    triton  minibert's own FlashAttention-style kernel (minibert.kernels.flash_attention)

A backend takes its mask in one of two forms, built once per forward pass by the model:
the additive bias the math path uses (mask_from_ids=None), or its own object made by
`mask_from_ids` from (B, T) ids -- a 0/1 padding mask or packed rows' doc ids (0 = padding,
k = the k-th sequence); token i may look at token j iff ids[i] == ids[j] != 0.
flex and triton have no attention-probability dropout (a deviation while training, none
at eval). Adding a backend is one entry in ATTENTION_BACKENDS (plus its parity test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AttentionBackend:
    # (q, k, v, mask, dropout_p, scale) -> (B, nh, T, hs); mask is the bias or mask_from_ids' result
    attend: Callable[[Tensor, Tensor, Tensor, object, float, float], Tensor]
    # (B, T) ids -> the backend's own mask; None: the backend takes the math path's additive bias
    mask_from_ids: Optional[Callable[[Tensor], object]] = None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, dropout_p: float, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _flex_block_mask(ids: Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc(b, h, q, k):
        return (ids[b, q] == ids[b, k]) & (ids[b, k] != 0)

    B, T = ids.shape
    return create_block_mask(same_doc, B, None, T, T, device=ids.device)


def _triton(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], dropout_p: float, scale: float) -> Tensor:
    from . import flash_attention

    return flash_attention(q, k, v, doc_ids, scale)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(_sdpa),
    "flex": AttentionBackend(_flex, _flex_block_mask),
    "triton": AttentionBackend(_triton, lambda ids: ids.to(torch.int32)),
}
