"""FlashAttention-2-style Triton kernels: non-causal, with padding and packed-document masks.

Imported lazily, like _triton_rows (see there why).

Attention per (batch, head) is  O = softmax(S) V  with  S = scale * Q K^T,  T x T scores.
The kernels never store S. The forward walks over key blocks keeping, per query row, a
running max m, a running sum l of exp(S - m), and an unnormalised output acc; when a new
block raises the max, the old l and acc are scaled down by exp(m_old - m_new) ("online
softmax"). At the end O = acc / l, and lse = m + log(l) is saved: with it the backward can
rebuild any block of probabilities as P = exp(S - lse) without another pass.

Backward, with dP = dO V^T and D = rowsum(dO * O) (= rowsum(P * dP), computed first):
    dS = P * (dP - D),   dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K
One kernel walks query blocks for a fixed key block (dK, dV), another walks key blocks for a
fixed query block (dQ), so every gradient is written by exactly one program (no atomics,
deterministic) at the price of computing P twice.

Exponentials are taken base 2 (exp2 is one hardware instruction): scores are multiplied by
scale * log2(e) once, and lse is converted between natural log and log2 where it is used.

Masking. `doc_ids` (B, T) int32 holds a document id per token, 0 for padding: query i sees
key j iff doc_ids[i] == doc_ids[j] != 0. A query that sees nothing (padding) ends with l = 0:
its output is written as 0 and its lse as +inf, so in the backward its P = exp(S - inf) = 0
and it adds nothing to any gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import dot, interpreter_bf16, round_bf16

_LOG2E = tl.constexpr(1.0 / math.log(2.0))
_LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _load_tile(ptr, idx, stride_t, T, HEAD_DIM: tl.constexpr):
    """Rows idx of one head's (T, HEAD_DIM) matrix at ptr; zeros for idx >= T."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + idx[:, None] * stride_t + dims[None, :], mask=(idx < T)[:, None], other=0.0)


@triton.jit
def _store_tile(ptr, idx, stride_t, T, x, HEAD_DIM: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Store fp32 x as rows idx of one head's (T, HEAD_DIM) matrix, in ptr's dtype."""
    dims = tl.arange(0, HEAD_DIM)
    x = round_bf16(x, INTERP_BF16).to(ptr.dtype.element_ty)
    tl.store(ptr + idx[:, None] * stride_t + dims[None, :], x, mask=(idx < T)[:, None])


@triton.jit
def _load_doc(Doc, b, idx, T, HAS_DOCS: tl.constexpr):
    """Document ids of tokens idx in row b (0, padding, past the end); idx itself when
    unmasked, where the value is never read."""
    ids = idx
    if HAS_DOCS:
        ids = tl.load(Doc + b * T + idx, mask=idx < T, other=0)
    return ids


@triton.jit
def _allowed(rows, cols, doc_q, doc_k, T, HAS_DOCS: tl.constexpr):
    """(len(rows), len(cols)) bool: query row may see key col (in range and, with doc ids,
    the same document and a real key)."""
    ok = (rows < T)[:, None] & (cols < T)[None, :]
    if HAS_DOCS:
        ok = ok & (doc_q[:, None] == doc_k[None, :]) & (doc_k != 0)[None, :]
    return ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Doc, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_heads, T, qk_scale,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    # Grid: (query blocks, B * nh). One program owns BLOCK_M query rows of one head.
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    Q += b * stride_qb + h * stride_qh  # each pointer now at its (b, h) matrix
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, rows, stride_qt, T, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    doc_q = _load_doc(Doc, b, rows, T, HAS_DOCS)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)  # running sum of exp2(s - m_i) v
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, cols, stride_kt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
        v = _load_tile(V, cols, stride_vt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
        doc_k = _load_doc(Doc, b, cols, T, HAS_DOCS)

        s = dot(q, tl.trans(k), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_allowed(rows, cols, doc_q, doc_k, T, HAS_DOCS), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no allowed key yet has m_new = -inf; subtracting it would give
        # -inf - -inf = NaN, so such rows subtract 0 instead (all their s are -inf anyway).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)  # rescales what was summed under the old max
        p = tl.exp2(s - m_sub[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = round_bf16(p, INTERP_BF16).to(v.dtype)  # P V on the tensor cores in the input dtype
        acc = acc * alpha[:, None] + dot(p, v, DOT_PRECISION, INTERP_BF16)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    _store_tile(O, rows, stride_ot, T, acc / l_safe[:, None], HEAD_DIM, INTERP_BF16)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("inf"))  # natural log
    tl.store(LSE + bh * T + rows, lse, mask=rows < T)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    n_heads, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # D = rowsum(dO * O) in fp32, one value per query row: the backward's softmax correction.
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(O + b * stride_ob + h * stride_oh, rows, stride_ot, T, HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dot, T, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh * T + rows, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Doc, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    n_heads, T, scale, qk_scale,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    # Grid: (key blocks, B * nh). Works in the transposed frame (keys as rows) so dK and dV
    # come out as plain products: dV = P^T dO, dK = scale * dS^T Q.
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh * T
    Delta += bh * T

    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
    k = _load_tile(K, cols, stride_kt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
    v = _load_tile(V, cols, stride_vt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
    doc_k = _load_doc(Doc, b, cols, T, HAS_DOCS)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # query positions
        q = _load_tile(Q, rows, stride_qt, T, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
        do = _load_tile(DO, rows, stride_dot, T, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
        lse2 = tl.load(LSE + rows, mask=rows < T, other=float("inf")) * _LOG2E
        delta = tl.load(Delta + rows, mask=rows < T, other=0.0)
        doc_q = _load_doc(Doc, b, rows, T, HAS_DOCS)

        s_t = dot(k, tl.trans(q), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_N, BLOCK_M)
        allowed_t = (cols < T)[:, None] & (rows < T)[None, :]  # (BLOCK_N, BLOCK_M)
        if HAS_DOCS:
            allowed_t = allowed_t & (doc_k[:, None] == doc_q[None, :]) & (doc_k != 0)[:, None]
        p_t = tl.where(allowed_t, tl.exp2(s_t - lse2[None, :]), 0.0)  # P^T
        dv += dot(round_bf16(p_t, INTERP_BF16).to(do.dtype), do, DOT_PRECISION, INTERP_BF16)
        dp_t = dot(v, tl.trans(do), DOT_PRECISION, INTERP_BF16)  # dP^T: (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T
        dk += dot(round_bf16(ds_t, INTERP_BF16).to(q.dtype), q, DOT_PRECISION, INTERP_BF16)

    _store_tile(DK, cols, stride_dkt, T, dk * scale, HEAD_DIM, INTERP_BF16)
    _store_tile(DV, cols, stride_dvt, T, dv, HEAD_DIM, INTERP_BF16)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Doc, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    n_heads, T, scale, qk_scale,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    # Grid: (query blocks, B * nh). dQ = scale * dS K, summed over key blocks.
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, rows, stride_qt, T, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    do = _load_tile(DO, rows, stride_dot, T, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    lse2 = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
    doc_q = _load_doc(Doc, b, rows, T, HAS_DOCS)

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, cols, stride_kt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
        v = _load_tile(V, cols, stride_vt, T, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
        doc_k = _load_doc(Doc, b, cols, T, HAS_DOCS)

        s = dot(q, tl.trans(k), DOT_PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        allowed = _allowed(rows, cols, doc_q, doc_k, T, HAS_DOCS)
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), DOT_PRECISION, INTERP_BF16)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += dot(round_bf16(ds, INTERP_BF16).to(k.dtype), k, DOT_PRECISION, INTERP_BF16)

    _store_tile(DQ, rows, stride_dqt, T, dq * scale, HEAD_DIM, INTERP_BF16)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _config(q: torch.Tensor, kernel: str) -> dict:
    """Tile sizes and launch settings for kernel "fwd", "dkdv", "dq" or "delta". Under the CPU
    interpreter: 16 x 16, the smallest tl.dot takes, so the tests' short sequences still span
    several blocks and a ragged last one."""
    if q.device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16) if kernel != "delta" else dict(BLOCK_M=16)
    return _gpu_config(q.shape[-1], q.dtype, kernel)


def _gpu_config(head_dim: int, dtype: torch.dtype, kernel: str) -> dict:
    """GPU tiles, chosen by compiling every kernel for sm_90 and reading register use off the
    cubin (python -m minibert.kernels.compile_check): the largest tiles that spill nothing.
    bf16 / fp16 run on the Hopper tensor cores (HGMMA): 128-row query tiles over 8 warps for
    the forward, as in FlashAttention-2; 64 x 64 for the backward, which keeps five tiles
    live, narrowed at hd = 128. fp32 runs exact ("ieee") products on the CUDA cores, in small
    tiles. Not yet timed on an H100: a tuning pass may pick larger tiles or more stages."""
    if kernel == "delta":
        return dict(BLOCK_M=64)
    if dtype == torch.float32:
        if kernel == "fwd" and head_dim <= 64:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        if kernel == "fwd":
            return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    if kernel == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if kernel == "dkdv":
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _dot_args(q: torch.Tensor) -> dict:
    """DOT_PRECISION: fp32 inputs get true fp32 products ("ieee"), not TF32's 10-bit
    mantissa: an fp32 run is for checking against a checkpoint; bf16/fp16 is the fast path.
    INTERP_BF16: see _triton_common."""
    return dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERP_BF16=interpreter_bf16(q.dtype, q.device),
    )


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    assert t.stride(-1) == 1, "head dim must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def _doc_arg(doc_ids: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if doc_ids is None:
        return torch.empty(1, dtype=torch.int32, device=like.device), False
    return doc_ids.to(torch.int32).contiguous(), True


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns o (B, nh, T, hd) and lse (B, nh, T) fp32.

    o is a (B, nh, T, hd) view of a (B, T, nh, hd) buffer: the caller's usual
    o.transpose(1, 2).reshape(B, T, C) is then a free view rather than a copy."""
    B, nh, T, hd = q.shape
    o = torch.empty((B, T, nh, hd), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, nh, T, hd)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    doc_t, has_docs = _doc_arg(doc_ids, q)
    cfg = _config(q, "fwd")
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * nh)
    _attn_fwd_kernel[grid](
        q, k, v, doc_t, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        nh, T, scale * 1.4426950408889634,  # times log2(e): scores in base-2 units
        HAS_DOCS=has_docs, HEAD_DIM=hd, **_dot_args(q), **cfg,
    )
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, each laid out like its input (torch.empty_like)."""
    B, nh, T, hd = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    doc_t, has_docs = _doc_arg(doc_ids, q)
    qk_scale = scale * 1.4426950408889634  # log2(e)

    # 1) D = rowsum(dO * O), before anything that needs it
    delta = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    cfg = _config(q, "delta")
    _attn_bwd_delta_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * nh)](
        o, do, delta, *_strides(o), *_strides(do), nh, T, HEAD_DIM=hd, **cfg
    )

    # 2) dK, dV: one program per key block, looping over query blocks
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = _config(q, "dkdv")
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * nh)](
        q, k, v, doc_t, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        nh, T, scale, qk_scale,
        HAS_DOCS=has_docs, HEAD_DIM=hd, **_dot_args(q), **cfg,
    )

    # 3) dQ: one program per query block, looping over key blocks
    dq = torch.empty_like(q)
    cfg = _config(q, "dq")
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * nh)](
        q, k, v, doc_t, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        nh, T, scale, qk_scale,
        HAS_DOCS=has_docs, HEAD_DIM=hd, **_dot_args(q), **cfg,
    )
    return dq, dk, dv
