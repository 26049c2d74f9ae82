"""Triton kernels for the two row-wise fusions: add + LayerNorm, and bias + GELU.

Imported lazily (only when an op first runs), because `triton.jit` decides at decoration
time whether a kernel is compiled for the GPU or run by the CPU interpreter
(TRITON_INTERPRET=1). Importing late lets a test module set that variable first.

Both fusions are memory-bound: the point is to read each input once and write each output
once, instead of once per PyTorch op (x + residual, mean, var, normalise, scale...).
Every kernel works on a (BLOCK_M, BLOCK_N) tile: BLOCK_M rows of the flattened input, and
BLOCK_N >= the row width for LayerNorm (a row must be in one tile to take its statistics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import interpreter_bf16, round_bf16

# Globals read inside a @triton.jit function must be constexpr.
_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


def _num_programs_target(device: torch.device) -> int:
    """How many programs a backward pass splits its rows into: a few per SM keeps the GPU busy
    while leaving few fp32 partial sums (for dweight, dbias) to add up afterwards."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: small, but > 1 so the tests exercise the partial-sum reduction


def _row_tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of width n_cols: a whole row per tile and about
    4096 elements per program, so narrow rows (H=128) still give each program enough work."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = 8 if block_m * block_n >= 8192 else 4
    return block_m, block_n, num_warps


def _row_groups(n_rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Split n_rows into groups for the backward kernels: (rows per group, number of groups).
    Rows per group is a multiple of block_m so a tile never straddles two groups."""
    target = _num_programs_target(device)
    rows_per_group = triton.cdiv(triton.cdiv(n_rows, target), block_m) * block_m
    rows_per_group = max(rows_per_group, block_m)
    return rows_per_group, triton.cdiv(n_rows, rows_per_group)


# ----------------------------------------------------------------------------------------
# add + LayerNorm
#   s = x + r;  mean = sum(s)/N;  rstd = 1/sqrt(sum((s-mean)^2)/N + eps)
#   xhat = (s - mean) * rstd;  y = xhat * w + b
# ----------------------------------------------------------------------------------------


@triton.jit
def _add_layer_norm_fwd_kernel(
    X, R, W, B, Y, Mean, Rstd,
    n_rows, n_cols, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    # int64 offsets: B*T*H passes 2^31 for big batches.
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]

    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(s, axis=1) / n_cols
    centred = tl.where(mask, s - mean[:, None], 0.0)  # padding columns must not add to var
    var = tl.sum(centred * centred, axis=1) / n_cols  # biased, as LayerNorm defines it
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, round_bf16(y, ROUND_BF16).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY, X, R, W, Mean, Rstd, DS, DW_part, DB_part,
    n_rows, n_cols, rows_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # d/ds of LayerNorm, with g = w * dy:
    #   ds = rstd * (g - mean(g) - xhat * mean(g * xhat))      (row means over N)
    # dw and db are sums over all rows; each program adds its group of rows into one fp32
    # partial row, and the host sums the few partial rows (deterministic, no atomics).
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = group * rows_per_group
    for start in range(0, rows_per_group, BLOCK_M):
        rows = first_row + start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]

        s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)

        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = w[None, :] * dy
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        ds = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(DS + offs, round_bf16(ds, ROUND_BF16).to(DS.dtype.element_ty), mask=mask)

        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_part + group * n_cols + cols, dw_acc, mask=col_ok)
    tl.store(DB_part + group * n_cols + cols, db_acc, mask=col_ok)


def add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns y (x's shape, dtype of x + residual) and fp32 mean, rstd
    (x.shape[:-1])."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()  # (M, N)
    r2 = residual.reshape(-1, n_cols).contiguous()  # (M, N)
    n_rows = x2.shape[0]
    # Output dtype follows x + residual's type promotion (bf16 + fp32 -> fp32, as unfused).
    y = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _row_tile(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    _add_layer_norm_fwd_kernel[grid](
        x2, r2, weight.contiguous(), bias.contiguous(), y, mean, rstd,
        n_rows, n_cols, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, ROUND_BF16=interpreter_bf16(y.dtype, y.device),
        num_warps=num_warps,
    )
    lead = x.shape[:-1]
    return y.view(x.shape), mean.view(lead), rstd.view(lead)  # (..., N), (...), (...)


def add_layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns d(x + residual) in the dtype of x + residual, dweight and
    dbias in weight's dtype (summed in fp32)."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()  # (M, N)
    r2 = residual.reshape(-1, n_cols).contiguous()  # (M, N)
    dy2 = dy.reshape(-1, n_cols).contiguous()  # (M, N)
    n_rows = x2.shape[0]
    block_m, block_n, num_warps = _row_tile(n_cols)
    rows_per_group, n_groups = _row_groups(n_rows, block_m, x.device)
    ds = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
    dw_part = torch.empty(n_groups, n_cols, dtype=torch.float32, device=x.device)
    db_part = torch.empty(n_groups, n_cols, dtype=torch.float32, device=x.device)
    _add_layer_norm_bwd_kernel[(n_groups,)](
        dy2, x2, r2, weight.contiguous(), mean.contiguous(), rstd.contiguous(), ds, dw_part, db_part,
        n_rows, n_cols, rows_per_group,
        BLOCK_M=block_m, BLOCK_N=block_n, ROUND_BF16=interpreter_bf16(ds.dtype, ds.device),
        num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype)
    return ds.view(x.shape), dw, db  # ds: (..., N)


# ----------------------------------------------------------------------------------------
# bias + GELU (exact erf form)
#   u = x + b;  y = u * Phi(u),  Phi(u) = (1 + erf(u / sqrt 2)) / 2
#   dy/du = Phi(u) + u * phi(u),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
# ----------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_fwd_kernel(
    X, Bias, Y, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = u * 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT2))
    tl.store(Y + offs, round_bf16(y, ROUND_BF16).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, Bias, DX, DB_part, n_rows, n_cols, rows_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # Grid: (row groups, column blocks). dbias is a column sum of dx, added in fp32 per group
    # (like LayerNorm's dweight) so it is not rounded to bf16 before the sum.
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = group * rows_per_group
    for start in range(0, rows_per_group, BLOCK_M):
        rows = first_row + start + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT2))
        pdf = tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
        du = dy * (cdf + u * pdf)
        tl.store(DX + offs, round_bf16(du, ROUND_BF16).to(DX.dtype.element_ty), mask=mask)
        db_acc += tl.sum(du, axis=0)  # masked entries have dy = 0, so they add nothing
    tl.store(DB_part + group * n_cols + cols, db_acc, mask=col_ok)


def _elementwise_tile(n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for bias-GELU: up to 1024 columns by enough rows for ~4096 elements."""
    block_n = min(1024, triton.next_power_of_2(n_cols))
    return max(1, 4096 // block_n), block_n


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Launch the forward; returns gelu(x + bias) in x's shape and dtype."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()  # (M, N)
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    block_m, block_n = _elementwise_tile(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    _bias_gelu_fwd_kernel[grid](
        x2, bias.contiguous(), y, n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, ROUND_BF16=interpreter_bf16(y.dtype, y.device),
        num_warps=4,
    )
    return y.view(x.shape)  # (..., N)


def bias_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns dx (x's dtype) and dbias (bias's dtype, summed in fp32)."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()  # (M, N)
    dy2 = dy.reshape(-1, n_cols).contiguous()  # (M, N)
    n_rows = x2.shape[0]
    block_m, block_n = _elementwise_tile(n_cols)
    rows_per_group, n_groups = _row_groups(n_rows, block_m, x.device)
    dx = torch.empty_like(x2)
    db_part = torch.empty(n_groups, n_cols, dtype=torch.float32, device=x.device)
    grid = (n_groups, triton.cdiv(n_cols, block_n))
    _bias_gelu_bwd_kernel[grid](
        dy2, x2, bias.contiguous(), dx, db_part, n_rows, n_cols, rows_per_group,
        BLOCK_M=block_m, BLOCK_N=block_n, ROUND_BF16=interpreter_bf16(dx.dtype, dx.device),
        num_warps=4,
    )
    return dx.view(x.shape), db_part.sum(0).to(bias.dtype)  # dx: (..., N)
