"""The MLM decoder and its loss in one op, computed a chunk of rows at a time.

The unfused head is `F.cross_entropy(hidden @ weight.T + bias, labels)`. Its logits are
(N, V): for a BERT-base batch of 256 x 128 tokens, N = 32768 and V = 30522, so the logits
are 1.0e9 numbers, 2.0 GB in bf16 or 4.0 GB in fp32 (cross_entropy runs in fp32 under
autocast). Autograd keeps an (N, V) log-softmax alive from forward to backward, and the
backward makes another (N, V) tensor for the gradient of the logits.

Here the rows are taken `chunk_size` at a time: each chunk's logits are made, reduced to a
log-sum-exp per row, and dropped. Only that lse (N floats, 128 KB for N = 32768) is kept for
the backward, which rebuilds each chunk's logits once more (one extra matmul of the head,
the usual price of recomputation) and turns them into the three gradients straight away.
Peak extra memory is one chunk, whatever N is: with the default budget of 2^25 logits a
chunk (1024 rows at V = 30522) holds 125 MB of fp32 logits, which the backward turns into
the softmax in place and copies once to bf16 (62 MB) for its matmuls. The weight gradient is
summed in an fp32 (V, H) buffer (94 MB for BERT-base) when the weight itself is bf16.

A second saving: only labelled rows (label != ignore_index) go through the head at all. An
MLM batch labels about 15% of tokens, so a caller that hands in every position saves ~85%
of the decoder's FLOPs. Picking those rows out needs their count on the host (one GPU sync
per call); inside a custom op that is invisible to torch.compile, so it costs no graph break.

Plain PyTorch ops only: this runs on every device, no Triton needed.
"""

from __future__ import annotations

import torch

# Logits per chunk (rows x V). 2^25 fp32 logits = 128 MB.
LOGITS_PER_CHUNK = 1 << 25


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so a chunk holds about LOGITS_PER_CHUNK logits; a multiple of 128 rows
    (a friendly matmul size) when there is room for one."""
    rows = LOGITS_PER_CHUNK // max(vocab_size, 1)
    return max(128, rows // 128 * 128)


def _chunk_logits(
    hidden_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """(C, V) fp32 logits of C rows. The matmul runs in hidden's dtype (bf16 tensor cores under
    mixed precision), as the unfused head would; the softmax maths after it runs in fp32."""
    w = weight.to(hidden_rows.dtype)
    b = bias.to(hidden_rows.dtype)
    return torch.addmm(b, hidden_rows, w.T).float()  # (C, V)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (mean loss over labelled rows as an fp32 scalar, lse (N,) fp32 for the backward,
    predictions (N,) long: each labelled row's argmax over V, ignore_index on the other rows).
    The predictions are what an accuracy needs and the logits are gone afterwards; the argmax
    is one more read of each chunk while it is in memory.

    With no labelled row the loss is 0/0 = NaN, as F.cross_entropy gives."""
    n_rows = hidden.shape[0]
    lse = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    pred = torch.full((n_rows,), ignore_index, dtype=torch.long, device=hidden.device)
    rows = (labels != ignore_index).nonzero().squeeze(1)  # (n_labelled,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]  # (C,)
        logits = _chunk_logits(hidden[idx], weight, bias)  # (C, V)
        chunk_lse = torch.logsumexp(logits, dim=1)  # (C,)
        target = logits.gather(1, labels[idx].unsqueeze(1)).squeeze(1)  # (C,)
        total += (chunk_lse - target).sum()
        lse[idx] = chunk_lse
        pred[idx] = logits.argmax(dim=1)
    loss = total / rows.numel()
    return loss, lse, pred


def backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for hidden, weight, bias. For a labelled row, dloss/dlogits is
    (softmax(logits) - onehot(label)) / n_labelled; an ignored row gets zero."""
    rows = (labels != ignore_index).nonzero().squeeze(1)  # (n_labelled,)
    grad_hidden = torch.zeros_like(hidden)
    # Weight-gradient partial sums are added in fp32 even for a bf16 weight.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    if rows.numel() == 0:
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
    scale = grad_loss.float() / rows.numel()
    w = weight.to(hidden.dtype)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]  # (C,)
        h = hidden[idx]  # (C, H)
        logits = _chunk_logits(h, weight, bias)  # (C, V)
        dlogits = torch.exp_(logits.sub_(lse[idx].unsqueeze(1)))  # softmax, in place: (C, V)
        dlogits[torch.arange(idx.numel(), device=idx.device), labels[idx]] -= 1.0
        dlogits.mul_(scale)
        grad_bias += dlogits.sum(0)
        d = dlogits.to(hidden.dtype)  # (C, V), matmuls in the compute dtype
        grad_hidden[idx] = d @ w  # (C, H)
        grad_weight += (d.T @ h).float()  # (V, H)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
