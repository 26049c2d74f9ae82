"""The fused kernels as PyTorch custom ops (namespace `minibert`), so torch.compile can use them.

To torch.compile a custom op is one opaque node: `register_fake` tells it the shapes, dtypes
and strides of the outputs without running anything, so `fullgraph=True` traces straight
through; `register_autograd` gives the backward, itself another custom op, so the compiled
backward graph holds one opaque node too. Each forward op also returns what its backward
needs (LayerNorm's mean and rstd, attention's logsumexp, the loss's per-row lse); the public
wrappers in `minibert.kernels` hand back only the main output.

The Triton modules are imported inside the op bodies, on first use (see _triton_rows for why).
Call these ops through the wrappers in `minibert.kernels`, which pick the device path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cross_entropy as _lce

# ----------------------------------------------------------------------------------------
# add + LayerNorm
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("minibert::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y = LayerNorm(x + residual) and the fp32 per-row mean and rstd."""
    from . import _triton_rows

    return _triton_rows.add_layer_norm_fwd(x, residual, weight, bias, eps)


@add_layer_norm.register_fake
def _(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    stats_shape = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(stats_shape, dtype=torch.float32),
        x.new_empty(stats_shape, dtype=torch.float32),
    )


@torch.library.custom_op("minibert::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward(
    dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns d(x + residual), dweight, dbias."""
    from . import _triton_rows

    return _triton_rows.add_layer_norm_bwd(dy, x, residual, weight, mean, rstd)


@add_layer_norm_backward.register_fake
def _(
    dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), torch.empty_like(weight), torch.empty_like(weight)


def _add_layer_norm_setup(ctx, inputs, output) -> None:
    x, residual, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, residual, weight, mean, rstd)


def _add_layer_norm_grad(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = add_layer_norm_backward(dy, x, residual, weight, mean, rstd)
    # x and residual enter only through their sum, so both get the same gradient.
    return ds.to(x.dtype), ds.to(residual.dtype), dw, db.to(weight.dtype), None


add_layer_norm.register_autograd(_add_layer_norm_grad, setup_context=_add_layer_norm_setup)

# ----------------------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("minibert::bias_gelu", mutates_args=())
def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """Returns gelu_erf(x + bias) in x's dtype."""
    from . import _triton_rows

    return _triton_rows.bias_gelu_fwd(x, bias)


@bias_gelu.register_fake
def _(x: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("minibert::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Returns dx (x's dtype) and dbias (bias's dtype, summed in fp32)."""
    from . import _triton_rows

    return _triton_rows.bias_gelu_bwd(dy, x, bias)


@bias_gelu_backward.register_fake
def _(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), torch.empty_like(bias)


def _bias_gelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # x, bias: u = x + bias is recomputed, not stored


def _bias_gelu_grad(ctx, dy: Tensor):
    x, bias = ctx.saved_tensors
    return bias_gelu_backward(dy, x, bias)


bias_gelu.register_autograd(_bias_gelu_grad, setup_context=_bias_gelu_setup)

# ----------------------------------------------------------------------------------------
# FlashAttention
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("minibert::flash_attention", mutates_args=())
def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """q, k, v (B, nh, T, hd); doc_ids (B, T) int32 with 0 = padding, or None.
    Returns o (B, nh, T, hd) and the fp32 logsumexp of each query's scores (B, nh, T)."""
    from . import _triton_attention

    return _triton_attention.attention_fwd(q, k, v, doc_ids, scale)


@flash_attention.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    B, nh, T, hd = q.shape
    o = q.new_empty((B, T, nh, hd)).transpose(1, 2)  # (B, nh, T, hd), the kernel's layout
    return o, q.new_empty((B, nh, T), dtype=torch.float32)


@torch.library.custom_op("minibert::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    doc_ids: Tensor | None,
    o: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from . import _triton_attention

    return _triton_attention.attention_bwd(do, q, k, v, doc_ids, o, lse, scale)


@flash_attention_backward.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    doc_ids: Tensor | None,
    o: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention_setup(ctx, inputs, output) -> None:
    q, k, v, doc_ids, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, doc_ids, o, lse)
    ctx.scale = scale


def _flash_attention_grad(ctx, do: Tensor, _dlse: Tensor):
    q, k, v, doc_ids, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(do, q, k, v, doc_ids, o, lse, ctx.scale)
    return dq, dk, dv, None, None


flash_attention.register_autograd(_flash_attention_grad, setup_context=_flash_attention_setup)

# ----------------------------------------------------------------------------------------
# Linear + cross-entropy (plain PyTorch inside, any device)
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("minibert::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, ignore_index: int, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), bias (V,), labels (N,). Returns the fp32 mean loss, the
    fp32 per-row logsumexp (N,) that the backward reuses, and the per-row argmax (N,) long."""
    return _lce.forward(hidden, weight, bias, labels, ignore_index, chunk_size)


@linear_cross_entropy.register_fake
def _(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, ignore_index: int, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    rows = hidden.shape[:1]
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, dtype=torch.long)


@torch.library.custom_op("minibert::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _lce.backward(grad_loss, hidden, weight, bias, labels, lse, ignore_index, chunk_size)


@linear_cross_entropy_backward.register_fake
def _(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


def _linear_cross_entropy_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, chunk_size = inputs
    _loss, lse, pred = output
    ctx.mark_non_differentiable(lse, pred)
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.chunk_size = chunk_size


def _linear_cross_entropy_grad(ctx, grad_loss: Tensor, _dlse: Tensor, _dpred: Tensor):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    dh, dw, db = linear_cross_entropy_backward(
        grad_loss, hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_size
    )
    return dh, dw, db, None, None, None


linear_cross_entropy.register_autograd(
    _linear_cross_entropy_grad, setup_context=_linear_cross_entropy_setup
)
